//! Wires the host together and serves it: storage, engine, brokers, the
//! poll loops and the REST API.

use crate::api::{self, ApiState};
use crate::apps::AppKeys;
use crate::config::Config;
use crate::model::IdGenerator;
use crate::poller::{self, PollSettings};
use crate::runtime::engine::{Pooling, new_engine};
use crate::runtime::registry::BrokerRegistry;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;
use anyhow::Context;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Starts the host and runs until SIGINT/SIGTERM.
///
/// When ready it prints one JSON line on stdout,
/// `{"listening":"http://127.0.0.1:PORT"}`, so scripts and tests can use
/// an OS-assigned port.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.db_path)
            .with_context(|| format!("opening database {}", config.db_path.display()))?,
    );
    let keys = app_keys(&config)?;
    if let Some(root) = keys.ensure_root(store.as_ref())? {
        // Shown once, now; the secret is never stored or logged.
        eprintln!(
            "\n  Root app created. Save these credentials now; they are not shown again.\n    access key: {}\n    secret key: {}\n",
            root.access_key, root.secret_key
        );
    }
    let engine = new_engine(Pooling::from_limits(&config.limits))?;
    let registry = Arc::new(BrokerRegistry::load(&engine, &config, store.clone())?);
    if !config.iot_enabled {
        tracing::warn!(
            "IoT is disabled (para.iot_enabled = false): creating things will be refused"
        );
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(ApiState {
        ids: IdGenerator::new(config.worker_id),
        keys,
        config,
        store,
        registry,
    });
    tracing::info!(%addr, "para-host listening");
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{}",
            serde_json::json!({ "listening": format!("http://{addr}") })
        )?;
        out.flush()?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = PollSettings {
        interval: state.config.poll_interval,
        max_backoff: state.config.poll_max_backoff,
        stale_create: if state.config.janitor_after.is_zero() {
            (state.config.limits.call_timeout * 2).max(Duration::from_secs(30))
        } else {
            state
                .config
                .janitor_after
                .max(state.config.limits.call_timeout)
        },
        crash_before_commit: state.config.fault_crash_before_commit,
    };
    let mut pollers = Vec::new();
    if state.config.iot_enabled {
        for broker in state.registry.all() {
            pollers.push(tokio::spawn(poller::run(
                broker.clone(),
                state.store.clone(),
                settings,
                stop_rx.clone(),
            )));
        }
    }

    // Poll loops start after the ready line, so a caller never races them.
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    let _ = stop_tx.send(true);
    for p in pollers {
        let _ = p.await;
    }
    Ok(())
}

/// Loads the master key and the root app's configured secret.
pub fn app_keys(config: &Config) -> anyhow::Result<AppKeys> {
    Ok(AppKeys::load(
        &config.master_key_path(),
        config.master_key_override(),
        &config.app_name,
        config.app_secret_key.clone(),
    )?)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}
