//! What the host's safety costs per broker call.
//!
//! Baseline: a bare wasmtime call — fresh store from the same `InstancePre`,
//! no limiter, no CPU meter, no timeout, no error mapping.
//! Host path: `LoadedBroker::delete`, the path every API request takes
//! (fresh store with memory limits, epoch CPU metering, egress hooks, wall
//! clock timeout, error classification).
//!
//! Host path with the pooling allocator: the same, with instance memory
//! reused from wasmtime's pool (the host's default).
//!
//! All call `delete` on the bundled Azure component with no config, which
//! answers `misconfigured` without any network I/O, so the differences are
//! the host's own work. Run: `cargo bench -p para-host --bench broker_call`.

use para_host::config::Config;
use para_host::model::Thing;
use para_host::runtime::egress::{EgressHooks, EgressPolicy, TlsRoots};
use para_host::runtime::engine::{Pooling, new_engine};
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

/// One engine's pieces: the host's broker and a bare pre-instance.
struct Setup {
    engine: wasmtime::Engine,
    broker: Arc<para_host::runtime::registry::LoadedBroker>,
    pre: para_host::runtime::bindings::BrokerGuestPre<BrokerState>,
}

fn setup(pooling: bool) -> anyhow::Result<Setup> {
    let mut raw = BTreeMap::new();
    raw.insert("para.host.pooling".to_string(), pooling.to_string());
    let config = Config::from_raw(raw, Vec::new())?;
    let engine = new_engine(Pooling::from_limits(&config.limits))?;
    let store: Arc<dyn para_host::store::Store> = Arc::new(SqliteStore::in_memory()?);
    let registry = BrokerRegistry::load(&engine, &config, store)?;
    let broker = registry
        .get("Azure")
        .ok_or_else(|| anyhow::anyhow!("no Azure"))?
        .clone();
    let (_, pre, _) = inspect(
        &engine,
        "Azure",
        Path::new(para_host::config::BUILTIN_AZURE),
    )?;
    Ok(Setup {
        engine,
        broker,
        pre,
    })
}

/// Per-call time of `calls` bare wasmtime calls (no limits, no host path).
async fn bare(
    s: &Setup,
    ctx: &Arc<BrokerContext>,
    tls: &TlsRoots,
    wit: &WitThing,
) -> anyhow::Result<Duration> {
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
        let mut st = wasmtime::Store::new(&s.engine, state);
        st.set_epoch_deadline(u64::MAX / 2);
        let g = s.pre.instantiate_async(&mut st).await?;
        let _ = g
            .para_broker_thing_broker()
            .call_delete(&mut st, wit)
            .await?;
    }
    Ok(start.elapsed() / CALLS as u32)
}

/// Per-call time of `calls` calls through the host's broker path.
async fn host(s: &Setup, t: &Thing) -> Duration {
    let start = Instant::now();
    for _ in 0..CALLS {
        let _ = s.broker.delete(t).await;
    }
    start.elapsed() / CALLS as u32
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let on_demand = setup(false)?;
        let pooled = setup(true)?;
        let ctx = Arc::new(BrokerContext {
            name: "Azure".into(),
            config: BTreeMap::new(),
            store: Arc::new(SqliteStore::in_memory()?),
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
        let (mut b, mut h, mut p) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            b.push(bare(&on_demand, &ctx, &tls, &wit).await?);
            h.push(host(&on_demand, &t).await);
            p.push(host(&pooled, &t).await);
        }
        let (b, h, p) = (median(b), median(h), median(p));
        println!("median of {ROUNDS} rounds x {CALLS} calls");
        println!("bare wasmtime call, on-demand allocation (baseline): {b:?}");
        println!(
            "host call path, on-demand allocation:                {h:?}  ratio {:.2}",
            h.as_secs_f64() / b.as_secs_f64()
        );
        println!(
            "host call path, pooling allocator (the default):     {p:?}  ratio {:.2}",
            p.as_secs_f64() / b.as_secs_f64()
        );
        anyhow::Ok(())
    })
}
