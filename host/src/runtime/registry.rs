//! The broker registry: loads each configured component once, checks it
//! against the contract, and runs calls in fresh, limited stores.
//!
//! * One `Engine` for the process; each component is compiled once and
//!   pre-instantiated once (`InstancePre`).
//! * `create`, `update` and `delete` each get a fresh store, so calls run
//!   concurrently and a trap never poisons the next call.
//! * `poll` runs in a long-lived [`PollInstance`], rebuilt after a trap.
//! * Traps, CPU overruns, memory exhaustion and timeouts become
//!   [`CallError`]s that name the broker; the host keeps serving.

use super::bindings::{BrokerGuest, BrokerGuestPre};
use super::egress::{EgressConfigError, EgressHooks, EgressPolicy, TlsRoots};
use super::limits::{CpuBudgetExceeded, CpuMeter, memory_limits};
use super::sockets::SocketGrants;
use super::state::{BrokerContext, BrokerState};
use super::{CONTRACT_PACKAGE, CONTRACT_VERSION};
use crate::config::{BUILTIN_AZURE, BrokerConfig, Config, Limits};
use crate::model::Thing;
use crate::store::Store as HostStore;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi_http::WasiHttpCtx;

pub use super::bindings::para::broker::types::{
    BrokerError, Created, PollBatch, StateChange, Thing as WitThing, Throttle,
};

/// The Azure broker component, built from `plugin/` by `build.rs`.
pub static AZURE_COMPONENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/azure_broker.wasm"));

/// The functions every broker must export.
pub const REQUIRED_FUNCTIONS: &[&str] = &["create", "update", "delete", "poll"];

/// Why a component could not be loaded. Reported at start, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("broker {broker}: cannot read component {path}: {source}")]
    Read {
        /// Broker name.
        broker: String,
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a wasm component, or it failed to compile.
    #[error("broker {broker}: {path} is not a valid wasm component: {message}")]
    Compile {
        /// Broker name.
        broker: String,
        /// The path.
        path: String,
        /// What wasmtime said.
        message: String,
    },
    /// The component does not implement the contract.
    #[error(
        "broker {broker}: {path} does not implement {CONTRACT_PACKAGE}/thing-broker@{CONTRACT_VERSION}: {message}"
    )]
    Contract {
        /// Broker name.
        broker: String,
        /// The path.
        path: String,
        /// What is missing or wrong.
        message: String,
    },
    /// The allowlist is malformed.
    #[error(transparent)]
    Egress(#[from] EgressConfigError),
    /// Anything else while setting up.
    #[error("broker {broker}: {message}")]
    Other {
        /// Broker name.
        broker: String,
        /// What failed.
        message: String,
    },
}

/// A failed broker call, as the API and poller see it.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The broker answered with a contract error.
    #[error("broker {broker}: {error:?}")]
    Broker {
        /// Broker name.
        broker: String,
        /// The error it returned.
        error: BrokerError,
    },
    /// The broker trapped (crashed).
    #[error("broker {broker} crashed: {message}")]
    Trap {
        /// Broker name.
        broker: String,
        /// The trap.
        message: String,
    },
    /// The broker used more than its CPU budget.
    #[error("broker {broker} {source}")]
    Cpu {
        /// Broker name.
        broker: String,
        /// The budget.
        source: CpuBudgetExceeded,
    },
    /// The broker tried to use more memory than allowed.
    #[error(
        "broker {broker} ran out of memory: it asked for more than its limit of {limit_mb} MiB"
    )]
    Memory {
        /// Broker name.
        broker: String,
        /// The cap.
        limit_mb: usize,
    },
    /// The call did not finish in time.
    #[error("broker {broker} did not answer within {after:?}")]
    Timeout {
        /// Broker name.
        broker: String,
        /// The timeout.
        after: Duration,
    },
}

/// What `para-host broker check` reports.
#[derive(Debug, Clone)]
pub struct ContractReport {
    /// The full export name, e.g. `para:broker/thing-broker@0.1.0`.
    pub export: String,
    /// The contract version the component was built against.
    pub version: String,
    /// What the component imports.
    pub imports: Vec<String>,
}

/// A loaded, checked broker component.
pub struct LoadedBroker {
    /// Identity, config and storage shared by its stores.
    pub context: Arc<BrokerContext>,
    /// The contract version it was built against.
    pub version: String,
    engine: Engine,
    pre: BrokerGuestPre<BrokerState>,
    policy: Arc<EgressPolicy>,
    sockets: SocketGrants,
    tls: TlsRoots,
    limits: Limits,
    /// Live-store slots shared by every broker: at most
    /// `para.host.max_concurrent_calls` stores exist at once (the size of
    /// the instance pool); further calls wait for a slot.
    slots: Arc<Semaphore>,
}

/// Every configured broker, by name.
pub struct BrokerRegistry {
    brokers: BTreeMap<String, Arc<LoadedBroker>>,
}

fn linker(engine: &Engine) -> anyhow::Result<Linker<BrokerState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    BrokerGuest::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// Checks that a component exports a compatible `thing-broker` with every
/// required function, and that the host can satisfy all of its imports.
pub fn check_component(engine: &Engine, component: &Component) -> Result<ContractReport, String> {
    let ty = component.component_type();
    let prefix = format!("{CONTRACT_PACKAGE}/thing-broker@");
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let Some((name, item)) = ty.exports(engine).find(|(n, _)| n.starts_with(&prefix)) else {
        return Err(format!(
            "it exports no {prefix}* interface (its exports: [{}])",
            exports.join(", ")
        ));
    };
    let version = name.trim_start_matches(&prefix).to_string();
    let compatible = version
        .split('.')
        .take(2)
        .eq(CONTRACT_VERSION.split('.').take(2));
    if !compatible {
        return Err(format!(
            "it was built for contract version {version}; this host serves {}.x",
            CONTRACT_VERSION
                .rsplit_once('.')
                .map(|(a, _)| a)
                .unwrap_or(CONTRACT_VERSION)
        ));
    }
    let ComponentItem::ComponentInstance(instance) = &item.ty else {
        return Err(format!("{name} is not an interface instance"));
    };
    let missing: Vec<&str> = REQUIRED_FUNCTIONS
        .iter()
        .copied()
        .filter(|f| {
            !matches!(
                instance.get_export(engine, f).map(|e| e.ty),
                Some(ComponentItem::ComponentFunc(_))
            )
        })
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "its export {name} is missing function(s): {}",
            missing.join(", ")
        ));
    }
    let imports = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    Ok(ContractReport {
        export: name.to_string(),
        version,
        imports,
    })
}

/// Compiles and checks a component file (used by `broker check` and at load).
pub fn inspect(
    engine: &Engine,
    broker: &str,
    path: &Path,
) -> Result<(Component, BrokerGuestPre<BrokerState>, ContractReport), LoadError> {
    let shown = path.display().to_string();
    let bytes = if path == Path::new(BUILTIN_AZURE) {
        AZURE_COMPONENT.to_vec()
    } else {
        std::fs::read(path).map_err(|source| LoadError::Read {
            broker: broker.into(),
            path: shown.clone(),
            source,
        })?
    };
    let component = Component::new(engine, &bytes).map_err(|e| LoadError::Compile {
        broker: broker.into(),
        path: shown.clone(),
        message: format!("{e:#}"),
    })?;
    let contract = |message: String| LoadError::Contract {
        broker: broker.into(),
        path: shown.clone(),
        message,
    };
    let report = check_component(engine, &component).map_err(contract)?;
    let linker = linker(engine).map_err(|e| LoadError::Other {
        broker: broker.into(),
        message: format!("{e:#}"),
    })?;
    let instance_pre = linker.instantiate_pre(&component).map_err(|e| {
        contract(format!(
            "it needs something this host does not provide: {e:#}"
        ))
    })?;
    let pre = BrokerGuestPre::new(instance_pre).map_err(|e| contract(format!("{e:#}")))?;
    Ok((component, pre, report))
}

impl BrokerRegistry {
    /// Loads every broker in the config table. Any bad component stops the
    /// start with a message naming it.
    pub fn load(
        engine: &Engine,
        config: &Config,
        store: Arc<dyn HostStore>,
    ) -> Result<Self, LoadError> {
        let tls = TlsRoots::new(config.tls_ca_file.as_deref()).map_err(|e| LoadError::Other {
            broker: "*".into(),
            message: format!("{e:#}"),
        })?;
        let slots = Arc::new(Semaphore::new(config.limits.max_concurrent.max(1) as usize));
        let mut brokers = BTreeMap::new();
        for (name, bc) in &config.brokers {
            let loaded = LoadedBroker::load(
                engine,
                bc,
                config,
                store.clone(),
                tls.clone(),
                slots.clone(),
            )?;
            tracing::info!(broker = %name, version = %loaded.version, component = %bc.component.display(), "broker loaded");
            brokers.insert(name.clone(), Arc::new(loaded));
        }
        Ok(BrokerRegistry { brokers })
    }

    /// Finds a broker by `serviceBroker` value, case-insensitively (Para
    /// normalised `azure` to `Azure`).
    pub fn get(&self, name: &str) -> Option<&Arc<LoadedBroker>> {
        self.brokers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The configured broker names, for error messages.
    pub fn names(&self) -> Vec<String> {
        self.brokers.keys().cloned().collect()
    }

    /// Every loaded broker.
    pub fn all(&self) -> impl Iterator<Item = &Arc<LoadedBroker>> {
        self.brokers.values()
    }
}

fn wit_thing(t: &Thing) -> WitThing {
    WitThing {
        id: t.id.clone(),
        appid: t.appid.clone(),
        name: t.name.clone(),
        service_broker: t.service_broker.clone(),
        device_state: serde_json::Value::Object(t.device_state.clone()).to_string(),
        metadata: serde_json::Value::Object(t.metadata.clone()).to_string(),
        state_updated: t.state_updated,
    }
}

/// Runs one export call in a fresh store: waits for a slot, instantiates,
/// calls, and maps traps, limits and the timeout to a [`CallError`].
macro_rules! call_fresh {
    ($broker:expr, $method:ident, $arg:expr) => {{
        let broker = $broker;
        let work = async {
            let _slot = broker.slot().await?;
            let mut store = broker.new_store();
            let guest = broker.pre.instantiate_async(&mut store).await?;
            guest
                .para_broker_thing_broker()
                .$method(&mut store, $arg)
                .await
        };
        broker.finish(tokio::time::timeout(broker.limits.call_timeout, work).await)
    }};
}

impl LoadedBroker {
    fn load(
        engine: &Engine,
        bc: &BrokerConfig,
        config: &Config,
        store: Arc<dyn HostStore>,
        tls: TlsRoots,
        slots: Arc<Semaphore>,
    ) -> Result<Self, LoadError> {
        let (_component, pre, report) = inspect(engine, &bc.name, &bc.component)?;
        let mut keys = config.broker_keys(&bc.namespace);
        let policy = EgressPolicy::new(&bc.name, &bc.allowed_hosts, &keys)?;
        let sockets = SocketGrants::resolve(&bc.name, &bc.allowed_sockets, &keys);
        if let Some(ca) = &config.tls_ca_file {
            // Brokers that speak TLS themselves (AMQP) trust the same extra CA.
            let pem = std::fs::read_to_string(ca).map_err(|e| LoadError::Other {
                broker: bc.name.clone(),
                message: format!("cannot read para.host.tls_ca_file {}: {e}", ca.display()),
            })?;
            keys.insert("tls_ca_pem".into(), pem);
        }
        Ok(LoadedBroker {
            context: Arc::new(BrokerContext {
                name: bc.name.clone(),
                config: keys,
                store,
            }),
            version: report.version,
            engine: engine.clone(),
            pre,
            policy: Arc::new(policy),
            sockets,
            tls,
            limits: config.limits,
            slots,
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.context.name
    }

    fn new_store(&self) -> Store<BrokerState> {
        let mut builder = WasiCtxBuilder::new();
        self.sockets.apply(&mut builder, self.name());
        let wasi = builder.build();
        let state = BrokerState {
            broker: self.context.clone(),
            wasi,
            http: WasiHttpCtx::new(),
            egress: EgressHooks {
                policy: self.policy.clone(),
                tls: self.tls.clone(),
            },
            table: Default::default(),
            limits: memory_limits(self.limits.memory_bytes),
            cpu: CpuMeter::new(self.limits.cpu_budget),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| ctx.data_mut().cpu.on_tick());
        store
    }

    /// Waits for a free store slot (the wait counts against the call's
    /// timeout).
    async fn slot(&self) -> wasmtime::Result<OwnedSemaphorePermit> {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| wasmtime::Error::msg("the host is shutting down"))
    }

    fn classify(&self, err: wasmtime::Error) -> CallError {
        let broker = self.name().to_string();
        if let Some(cpu) = err.downcast_ref::<CpuBudgetExceeded>() {
            return CallError::Cpu {
                broker,
                source: CpuBudgetExceeded(cpu.0),
            };
        }
        let text = format!("{err:#}");
        if text.contains("forcing trap when growing memory") {
            return CallError::Memory {
                broker,
                limit_mb: self.limits.memory_bytes / (1024 * 1024),
            };
        }
        let message = text.lines().next().unwrap_or("trap").to_string();
        CallError::Trap { broker, message }
    }

    /// Turns a timed, trapping, fallible call into one [`CallError`].
    fn finish<T>(
        &self,
        result: Result<wasmtime::Result<Result<T, BrokerError>>, tokio::time::error::Elapsed>,
    ) -> Result<T, CallError> {
        match result {
            Err(_) => Err(CallError::Timeout {
                broker: self.name().to_string(),
                after: self.limits.call_timeout,
            }),
            Ok(Err(trap)) => Err(self.classify(trap)),
            Ok(Ok(Err(error))) => Err(CallError::Broker {
                broker: self.name().to_string(),
                error,
            }),
            Ok(Ok(Ok(answer))) => Ok(answer),
        }
    }

    /// Provisions the device for a new thing.
    pub async fn create(&self, thing: &Thing) -> Result<Created, CallError> {
        call_fresh!(self, call_create, &wit_thing(thing))
    }

    /// Pushes the thing's state to its device; returns the new metadata.
    pub async fn update(&self, thing: &Thing) -> Result<String, CallError> {
        call_fresh!(self, call_update, &wit_thing(thing))
    }

    /// Removes the thing's device.
    pub async fn delete(&self, thing: &Thing) -> Result<(), CallError> {
        call_fresh!(self, call_delete, &wit_thing(thing))
    }

    /// A long-lived instance for polling.
    pub fn poll_instance(self: &Arc<Self>) -> PollInstance {
        PollInstance {
            broker: self.clone(),
            live: None,
        }
    }
}

/// The long-lived instance a broker's poll loop uses. It keeps the guest's
/// in-memory state (connections, cached tokens) between polls, and is
/// rebuilt from the `InstancePre` after any trap or timeout.
pub struct PollInstance {
    broker: Arc<LoadedBroker>,
    live: Option<(Store<BrokerState>, BrokerGuest, OwnedSemaphorePermit)>,
}

impl PollInstance {
    /// Runs one `poll(cursor)` within the call limits.
    pub async fn poll(&mut self, cursor: &str) -> Result<PollBatch, CallError> {
        let broker = self.broker.clone();
        let live = &mut self.live;
        let work = async {
            let instance = match live.take() {
                Some(instance) => instance,
                None => {
                    let slot = broker.slot().await?;
                    let mut store = broker.new_store();
                    let guest = broker.pre.instantiate_async(&mut store).await?;
                    (store, guest, slot)
                }
            };
            let (store, guest, _) = live.insert(instance);
            store.data_mut().cpu.reset();
            guest
                .para_broker_thing_broker()
                .call_poll(&mut *store, cursor)
                .await
        };
        let outcome = broker.finish(tokio::time::timeout(broker.limits.call_timeout, work).await);
        if matches!(
            outcome,
            Err(CallError::Trap { .. }
                | CallError::Cpu { .. }
                | CallError::Memory { .. }
                | CallError::Timeout { .. })
        ) {
            // A trapped or interrupted store must never be entered again.
            self.live = None;
        }
        outcome
    }
}
