//! The Azure IoT Hub broker component.
//!
//! Implements `para:broker/thing-broker` for Azure IoT Hub:
//!
//! * `create` registers the device `{appid}:{thingId}` with hub-generated
//!   SAS keys and returns them once, in `device-details`.
//! * `update` makes the device twin's desired properties equal the thing's
//!   `deviceState` (etag-checked merge-patch).
//! * `delete` removes the device.
//! * `poll` queries twins whose reported properties changed since the
//!   cursor and returns their reported state; with `iot_eventhub_endpoint`
//!   set it also returns the device-to-cloud JSON messages read over AMQP
//!   from the hub's Event Hub-compatible endpoint (`eventhub.rs`).
//!
//! Configuration (`para.azure.*`): `iot_hostname`, `iot_access_key`,
//! optional `iot_policy_name` (default `iothubowner`) and `iot_endpoint`;
//! for D2C: `iot_eventhub_endpoint`, `iot_eventhub_name`, `iot_partitions`,
//! `iot_max_messages`, `iot_consumer_group`, and `tls_ca_pem` (injected by
//! the host from `para.host.tls_ca_file`).
//!
//! Everything but the component glue at the bottom of this file (and
//! `http.rs`) is plain Rust, unit-tested natively.

#![warn(missing_docs)]

pub mod amqp;
pub mod broker;
pub mod config;
pub mod connstr;
pub mod cursor;
pub mod error;
pub mod eventhub;
pub mod hub;
pub mod platform;
pub mod query;
pub mod registry;
pub mod retry;
pub mod sas;
pub mod timestamp;
pub mod twin;

#[cfg(target_arch = "wasm32")]
mod http;

/// Generated bindings for the `broker-guest` world (wasm only).
#[cfg(target_arch = "wasm32")]
#[allow(missing_docs, clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        world: "broker-guest",
        path: "../wit",
        with: { "wasi:config/store@0.2.0-rc.1": generate },
    });
}

#[cfg(target_arch = "wasm32")]
mod component {
    //! The WIT edge: converts between generated types and the broker's own,
    //! reads configuration and keeps the SAS token cache for the instance.

    use crate::amqp::wasi_tcp::WasiConnector;
    use crate::bindings::exports::para::broker::thing_broker::Guest;
    use crate::bindings::para::broker::types::{
        BrokerError, Created, PollBatch, StateChange, Thing, Throttle,
    };
    use crate::bindings::wasi::config::store;
    use crate::broker::{self, Events, ThingRef};
    use crate::config::Config;
    use crate::error::Failure;
    use crate::eventhub::{EventHubConfig, Reader};
    use crate::http::Wasi;
    use crate::hub::Hub;
    use crate::platform::{Level, Platform};
    use crate::sas::TokenCache;
    use std::cell::RefCell;

    thread_local! {
        /// The instance's SAS token, reused until shortly before expiry.
        static TOKENS: RefCell<TokenCache> = RefCell::new(TokenCache::new());
        /// The D2C reader and its AMQP connection. Only `poll` touches it,
        /// so only the long-lived poll instance ever connects.
        static EVENTS: RefCell<Reader> = RefCell::new(Reader::new());
    }

    struct AzureBroker;

    fn store_get(key: &str) -> Result<Option<String>, String> {
        store::get(key).map_err(|e| match e {
            store::Error::Upstream(m) | store::Error::Io(m) => m,
        })
    }

    fn load_config() -> Result<Config, Failure> {
        Config::load(store_get)
    }

    /// Runs one operation with configuration, a hub connection and error
    /// logging, converting the failure to the WIT error.
    fn with_hub<T>(
        op: &str,
        f: impl FnOnce(&mut Hub<'_, Wasi>) -> Result<T, Failure>,
    ) -> Result<T, BrokerError> {
        let mut platform = Wasi;
        let result = match load_config() {
            Ok(config) => TOKENS.with(|tokens| {
                let mut tokens = tokens.borrow_mut();
                let mut hub = Hub::new(&config, &mut platform, &mut tokens);
                f(&mut hub)
            }),
            Err(e) => Err(e),
        };
        result.map_err(|failure| {
            let level = match failure {
                Failure::Throttled { .. } | Failure::NotFound(_) => Level::Warn,
                _ => Level::Error,
            };
            platform.log(level, &format!("{op} failed: {failure}"));
            to_wit(failure)
        })
    }

    fn to_wit(f: Failure) -> BrokerError {
        match f {
            Failure::NotFound(m) => BrokerError::NotFound(m),
            Failure::Conflict(m) => BrokerError::Conflict(m),
            Failure::Unauthorized(m) => BrokerError::Unauthorized(m),
            Failure::Throttled {
                retry_after_ms,
                message,
            } => BrokerError::Throttled(Throttle {
                retry_after_ms,
                message,
            }),
            Failure::Unavailable(m) => BrokerError::Unavailable(m),
            Failure::InvalidInput(m) => BrokerError::InvalidInput(m),
            Failure::Misconfigured(m) => BrokerError::Misconfigured(m),
        }
    }

    fn thing_ref(t: &Thing) -> ThingRef<'_> {
        ThingRef {
            id: &t.id,
            appid: &t.appid,
            name: &t.name,
            device_state: &t.device_state,
            metadata: &t.metadata,
        }
    }

    impl Guest for AzureBroker {
        fn create(thing: Thing) -> Result<Created, BrokerError> {
            with_hub("create", |hub| broker::create(hub, &thing_ref(&thing))).map(|c| Created {
                device_details: c.device_details,
                metadata: c.metadata,
            })
        }

        fn update(thing: Thing) -> Result<String, BrokerError> {
            with_hub("update", |hub| broker::update(hub, &thing_ref(&thing)))
        }

        fn delete(thing: Thing) -> Result<(), BrokerError> {
            with_hub("delete", |hub| broker::delete(hub, &thing_ref(&thing)))
        }

        fn poll(cursor: String) -> Result<PollBatch, BrokerError> {
            with_hub("poll", |hub| match EventHubConfig::load(store_get)? {
                None => broker::poll(hub, &cursor),
                Some(config) => EVENTS.with(|reader| {
                    let mut reader = reader.borrow_mut();
                    let mut connector = WasiConnector;
                    let events = Events {
                        reader: &mut reader,
                        connector: &mut connector,
                        config: &config,
                    };
                    broker::poll_with_events(hub, &cursor, Some(events))
                }),
            })
            .map(|p| PollBatch {
                changes: p
                    .changes
                    .into_iter()
                    .map(|c| StateChange {
                        thing_id: c.thing_id,
                        appid: c.appid,
                        state: c.state,
                        written_at: c.written_at,
                    })
                    .collect(),
                cursor: p.cursor,
                next_poll_ms: p.next_poll_ms,
            })
        }
    }

    crate::bindings::export!(AzureBroker with_types_in crate::bindings);
}
