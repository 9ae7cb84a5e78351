//! Durable key-value storage and logging for brokers.
//!
//! Storage is the host's database ([`crate::store::Store`]), scoped by
//! broker name, so a broker's cursor state and queues survive restarts and
//! no broker sees another's keys. Sizes are capped so a broker cannot fill
//! the disk through one call.

use super::bindings::para::broker::{log, storage, types};
use super::state::BrokerState;

/// The largest key a broker may use.
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value a broker may store under one key.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

impl types::Host for BrokerState {}

impl storage::Host for BrokerState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, String> {
        self.broker
            .store
            .kv_get(&self.broker.name, &key)
            .map_err(|e| e.to_string())
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        if key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "key is {} bytes; the limit is {MAX_KEY_BYTES}",
                key.len()
            ));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "value is {} bytes; the limit is {MAX_VALUE_BYTES}",
                value.len()
            ));
        }
        self.broker
            .store
            .kv_set(&self.broker.name, &key, &value)
            .map_err(|e| e.to_string())
    }

    fn delete(&mut self, key: String) -> Result<(), String> {
        self.broker
            .store
            .kv_delete(&self.broker.name, &key)
            .map_err(|e| e.to_string())
    }

    fn list_keys(&mut self, prefix: String) -> Result<Vec<String>, String> {
        self.broker
            .store
            .kv_list(&self.broker.name, &prefix)
            .map_err(|e| e.to_string())
    }
}

impl log::Host for BrokerState {
    fn log(&mut self, level: log::Level, message: String) {
        let broker = self.broker.name.as_str();
        match level {
            log::Level::Debug => tracing::debug!(broker, "{message}"),
            log::Level::Info => tracing::info!(broker, "{message}"),
            log::Level::Warn => tracing::warn!(broker, "{message}"),
            log::Level::Error => tracing::error!(broker, "{message}"),
        }
    }
}
