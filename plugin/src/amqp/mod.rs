//! AMQP 1.0 over TLS, for reading device-to-cloud messages from the hub's
//! Event Hub-compatible endpoint.
//!
//! * `codec`: framing around the `fe2o3-amqp-types` performatives.
//! * `transport`: the byte-stream seam, TLS (rustls + ring), native TCP.
//! * `wasi_tcp`: TCP through `wasi:sockets` with pollable timeouts (wasm).
//! * `connection`: the client state machine (SASL, open, session, links).
//! * `cbs`: claims-based authorization (put-token with an Event Hubs SAS).

pub mod cbs;
pub mod codec;
pub mod connection;
pub mod transport;
#[cfg(target_arch = "wasm32")]
pub mod wasi_tcp;
