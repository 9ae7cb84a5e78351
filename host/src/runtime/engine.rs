//! The process-wide wasmtime `Engine`.
//!
//! Epoch interruption is on: a background thread bumps the epoch every
//! [`TICK`], and each store turns its CPU budget into ticks (see
//! [`super::limits`]). The thread holds only a weak reference, so it ends
//! when the engine is dropped.

use std::time::Duration;
use wasmtime::{Config, Engine};

/// How often the epoch advances; the granularity of CPU accounting.
pub const TICK: Duration = Duration::from_millis(10);

/// Builds the engine and starts its epoch ticker.
pub fn new_engine() -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    let engine = Engine::new(&config)?;
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        })?;
    Ok(engine)
}
