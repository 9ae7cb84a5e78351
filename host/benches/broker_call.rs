//! What the host's safety costs per broker call.
//!
//! Baseline: a bare wasmtime call — fresh store from the same `InstancePre`,
//! no limiter, no CPU meter, no timeout, no error mapping.
//! Host path: `LoadedBroker::delete`, the path every API request takes
//! (fresh store with memory limits, epoch CPU metering, egress hooks, wall
//! clock timeout, error classification).
//!
//! Both call `delete` on the bundled Azure component with no config, which
//! answers `misconfigured` without any network I/O, so the difference is
//! the host's own overhead. Run: `cargo bench -p para-host --bench broker_call`.

use para_host::config::Config;
use para_host::model::Thing;
use para_host::runtime::egress::{EgressHooks, EgressPolicy, TlsRoots};
use para_host::runtime::engine::new_engine;
use para_host::runtime::limits::{CpuMeter, memory_limits};
use para_host::runtime::registry::{BrokerRegistry, WitThing, inspect};
use para_host::runtime::state::{BrokerContext, BrokerState};
use para_host::store::sqlite::SqliteStore;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const CALLS: usize = 400;

fn thing() -> Thing {
    Thing {
        id: "1".into(),
        appid: "bench".into(),
        name: "b".into(),
        service_broker: "Azure".into(),
        device_state: Default::default(),
        metadata: Default::default(),
        timestamp: 0,
        updated: None,
        version: 0,
        state_updated: 0,
        extra: Default::default(),
    }
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let engine = new_engine()?;
        let store: Arc<dyn para_host::store::Store> = Arc::new(SqliteStore::in_memory()?);
        let config = Config::from_raw(BTreeMap::new(), Vec::new())?;
        let registry = BrokerRegistry::load(&engine, &config, store.clone())?;
        let broker = registry
            .get("Azure")
            .ok_or_else(|| anyhow::anyhow!("no Azure"))?
            .clone();
        let (_, pre, _) = inspect(
            &engine,
            "Azure",
            Path::new(para_host::config::BUILTIN_AZURE),
        )?;
        let ctx = Arc::new(BrokerContext {
            name: "Azure".into(),
            config: BTreeMap::new(),
            store,
        });
        let tls = TlsRoots::new(None)?;
        let wit = WitThing {
            id: "1".into(),
            appid: "bench".into(),
            name: "b".into(),
            service_broker: "Azure".into(),
            device_state: "{}".into(),
            metadata: "{}".into(),
            state_updated: 0,
        };
        let t = thing();
        let mut base = Vec::new();
        let mut host = Vec::new();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..CALLS {
                let state = BrokerState {
                    broker: ctx.clone(),
                    wasi: wasmtime_wasi::WasiCtxBuilder::new().build(),
                    http: wasmtime_wasi_http::WasiHttpCtx::new(),
                    egress: EgressHooks {
                        policy: Arc::new(EgressPolicy::default()),
                        tls: tls.clone(),
                    },
                    table: Default::default(),
                    limits: memory_limits(usize::MAX / 2),
                    cpu: CpuMeter::new(Duration::from_secs(3600)),
                };
                let mut s = wasmtime::Store::new(&engine, state);
                s.set_epoch_deadline(u64::MAX / 2);
                let g = pre.instantiate_async(&mut s).await?;
                let _ = g
                    .para_broker_thing_broker()
                    .call_delete(&mut s, &wit)
                    .await?;
            }
            base.push(start.elapsed() / CALLS as u32);
            let start = Instant::now();
            for _ in 0..CALLS {
                let _ = broker.delete(&t).await;
            }
            host.push(start.elapsed() / CALLS as u32);
        }
        base.sort();
        host.sort();
        let (b, h) = (base[ROUNDS / 2], host[ROUNDS / 2]);
        println!(
            "bare wasmtime call (baseline): {b:?} per call (median of {ROUNDS} rounds x {CALLS})"
        );
        println!("host call path:                {h:?} per call");
        println!(
            "ratio host/baseline:           {:.2}",
            h.as_secs_f64() / b.as_secs_f64()
        );
        anyhow::Ok(())
    })
}
