//! Per-call resource limits for a broker store.
//!
//! * Memory: wasmtime's `StoreLimits`, capping linear memory per store and
//!   trapping (instead of failing `memory.grow` quietly) so the host can name
//!   the cause.
//! * CPU: epoch interruption. Every epoch tick that lands while guest code is
//!   running calls back into [`CpuMeter::on_tick`], which yields to tokio (so
//!   a busy guest never starves other requests) and counts the tick. Time
//!   spent waiting in host calls (HTTP) is not counted; a wall-clock timeout
//!   in [`super::registry`] bounds that.

use super::engine::TICK;
use std::time::Duration;
use wasmtime::{StoreLimits, StoreLimitsBuilder, UpdateDeadline};

/// The trap raised when a call runs out of CPU budget.
#[derive(Debug, thiserror::Error)]
#[error("exceeded its CPU budget of {0:?}")]
pub struct CpuBudgetExceeded(pub Duration);

/// Builds the memory limiter for one store.
pub fn memory_limits(bytes: usize) -> StoreLimits {
    StoreLimitsBuilder::new()
        .memory_size(bytes)
        .instances(16)
        .tables(64)
        .memories(16)
        .trap_on_grow_failure(true)
        .build()
}

/// Counts the epoch ticks a store spends running guest code.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    budget: Duration,
    max_ticks: u64,
    used_ticks: u64,
}

impl CpuMeter {
    /// A meter allowing `budget` of guest execution.
    pub fn new(budget: Duration) -> Self {
        let max_ticks = (budget.as_millis() / TICK.as_millis().max(1)).max(1) as u64;
        CpuMeter {
            budget,
            max_ticks,
            used_ticks: 0,
        }
    }

    /// Starts a new call: the budget is per call, not per instance.
    pub fn reset(&mut self) {
        self.used_ticks = 0;
    }

    /// The epoch callback: yield and continue, or stop the guest.
    pub fn on_tick(&mut self) -> wasmtime::Result<UpdateDeadline> {
        self.used_ticks += 1;
        if self.used_ticks > self.max_ticks {
            return Err(CpuBudgetExceeded(self.budget).into());
        }
        Ok(UpdateDeadline::Yield(1))
    }
}
