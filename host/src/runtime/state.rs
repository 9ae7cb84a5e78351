//! The data each broker store carries: WASI contexts, the broker's
//! identity and capabilities, and its limits.

use super::egress::EgressHooks;
use super::limits::CpuMeter;
use crate::store::Store;
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// What one broker is allowed to see and do, shared by all its stores.
pub struct BrokerContext {
    /// The configured broker name, e.g. `Azure`.
    pub name: String,
    /// The broker's own config keys (`para.<ns>.*`, prefix stripped).
    pub config: BTreeMap<String, String>,
    /// Durable storage; the host scopes every key by `name`.
    pub store: Arc<dyn Store>,
}

/// The `T` of `wasmtime::Store<T>` for broker components.
pub struct BrokerState {
    /// Which broker this store belongs to.
    pub broker: Arc<BrokerContext>,
    /// WASI: clocks and random only; no files, env, args or sockets.
    pub wasi: WasiCtx,
    /// `wasi:http` state.
    pub http: WasiHttpCtx,
    /// Egress allowlist and TLS roots.
    pub egress: EgressHooks,
    /// Resources handed to the guest.
    pub table: ResourceTable,
    /// Memory cap.
    pub limits: StoreLimits,
    /// CPU accounting for the current call.
    pub cpu: CpuMeter,
}

impl WasiView for BrokerState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for BrokerState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.egress,
        }
    }
}
