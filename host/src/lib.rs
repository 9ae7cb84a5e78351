//! para-host: a Para-compatible `/v1/things` backend whose IoT cloud
//! integrations ("brokers") are WebAssembly components.
//!
//! Layers, top to bottom (imports point down only):
//! 1. `main` / [`cli`]
//! 2. [`serve`]
//! 3. [`api`] and [`poller`]
//! 4. [`runtime`]: engine, limits, egress, config, storage, registry
//! 5. [`store`]: the storage trait and its SQLite implementation
//! 6. [`model`], [`config`], and the pure [`auth`] checks and [`apps`] keys

pub mod api;
pub mod apps;
pub mod auth;
pub mod cli;
pub mod config;
pub mod model;
pub mod poller;
pub mod runtime;
pub mod serve;
pub mod store;
