//! The wasm side of the host: one file per capability a broker gets.
//!
//! * [`engine`]: the one wasmtime `Engine` and its epoch ticker.
//! * [`limits`]: per-call CPU and memory limits.
//! * [`egress`]: which hosts a broker may call over HTTP(S).
//! * [`sockets`]: which addresses a broker may open TCP connections to.
//! * [`config`]: `wasi:config/store`, a broker's own config keys.
//! * [`storage`]: durable key-value storage and logging.
//! * [`registry`]: loading, checking and calling broker components.

pub mod config;
pub mod egress;
pub mod engine;
pub mod limits;
pub mod registry;
pub mod sockets;
pub mod state;
pub mod storage;

/// Host bindings generated from `wit/broker.wit`.
///
/// The host binds the guest-facing world; the WASI interfaces of the full
/// `broker` world are linked from `wasmtime-wasi` and `wasmtime-wasi-http`.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "broker-guest",
        exports: { default: async },
        require_store_data_send: true,
    });
}

/// The WIT package this host serves.
pub const CONTRACT_PACKAGE: &str = "para:broker";
/// The version of the contract this host was built against.
pub const CONTRACT_VERSION: &str = "0.1.0";
