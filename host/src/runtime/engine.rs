//! The process-wide wasmtime `Engine`.
//!
//! Epoch interruption is on: a background thread bumps the epoch every
//! [`TICK`], and each store turns its CPU budget into ticks (see
//! [`super::limits`]). The thread holds only a weak reference, so it ends
//! when the engine is dropped.
//!
//! Instances come from wasmtime's pooling allocator when [`Pooling`] is
//! given: memories, tables and fiber stacks are reserved once and reused,
//! which makes the fresh store each API call gets several times cheaper
//! (BENCHMARKS.md). If the pool cannot be reserved (for example on a
//! machine with little virtual address space), the engine falls back to
//! on-demand allocation with a warning, as Spin and `wasmtime serve` do.

use std::time::Duration;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances; the granularity of CPU accounting.
pub const TICK: Duration = Duration::from_millis(10);

/// Sizes the instance pool.
#[derive(Debug, Clone, Copy)]
pub struct Pooling {
    /// How many broker stores may be live at once (API calls plus one poll
    /// instance per broker). The registry never runs more than this.
    pub max_instances: u32,
    /// The largest linear memory one instance may have (the store's cap).
    pub max_memory_bytes: usize,
}

impl Pooling {
    /// The pool the configured limits call for, or none if pooling is off.
    pub fn from_limits(limits: &crate::config::Limits) -> Option<Pooling> {
        limits.pooling.then_some(Pooling {
            max_instances: limits.max_concurrent,
            max_memory_bytes: limits.memory_bytes,
        })
    }
}

fn base_config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config
}

/// Builds the engine and starts its epoch ticker.
pub fn new_engine(pooling: Option<Pooling>) -> anyhow::Result<Engine> {
    let engine = match pooling {
        None => Engine::new(&base_config())?,
        Some(p) => {
            let n = p.max_instances.max(1);
            let mut pool = PoolingAllocationConfig::default();
            pool.total_component_instances(n)
                .total_core_instances(n.saturating_mul(8))
                .total_memories(n.saturating_mul(2))
                .total_tables(n.saturating_mul(8))
                .total_stacks(n)
                .max_memory_size(p.max_memory_bytes);
            let mut config = base_config();
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            match Engine::new(&config) {
                Ok(engine) => engine,
                Err(e) => {
                    tracing::warn!(error = %e, "instance pool unavailable; using on-demand allocation");
                    Engine::new(&base_config())?
                }
            }
        }
    };
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
