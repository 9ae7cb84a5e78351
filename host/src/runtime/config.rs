//! `wasi:config/store` for brokers: each broker reads only its own keys
//! (`para.<namespace>.*`, with the prefix stripped), never another
//! broker's and never the host's.

use super::bindings::wasi::config::store::{Error, Host};
use super::state::BrokerState;

impl Host for BrokerState {
    fn get(&mut self, key: String) -> Result<Option<String>, Error> {
        Ok(self.broker.config.get(&key).cloned())
    }

    fn get_all(&mut self) -> Result<Vec<(String, String)>, Error> {
        Ok(self
            .broker
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
