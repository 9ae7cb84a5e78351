//! `wasi:config/store` for brokers: each broker reads only its own keys
//! (`para.<namespace>.*`, with the prefix stripped), never another
//! broker's and never the host's.

use super::bindings::wasi::config::store::{Error, Host};
use super::state::BrokerState;
use std::collections::BTreeMap;

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

/// Expands `{key}` references in an allowlist entry with the broker's own
/// config values. `None` when the entry names a key that is not set, so
/// the caller can skip it (it then grants nothing).
pub fn expand(entry: &str, keys: &BTreeMap<String, String>) -> Option<String> {
    let mut expanded = entry.to_string();
    for (k, v) in keys {
        expanded = expanded.replace(&format!("{{{k}}}"), v);
    }
    (!expanded.contains('{')).then_some(expanded)
}
