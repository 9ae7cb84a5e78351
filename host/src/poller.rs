//! The timers: one poll loop per loaded broker.
//!
//! Each round:
//! 1. finishes any delete the API could not (the janitor; at most twice per
//!    `stale_create` period),
//! 2. calls `poll(cursor)` on the broker's long-lived instance,
//! 3. commits the returned changes and the new cursor in ONE transaction.
//!
//! A crash between 2 and 3 leaves the old cursor in place, so the broker
//! re-delivers the batch on the next start; nothing is lost. The loop
//! follows `para.host.poll_interval_ms`, honours the broker's
//! `next-poll-ms` hint and throttling, and backs off exponentially on
//! errors up to `para.host.poll_max_backoff_ms`.

use crate::model::now_ms;
use crate::runtime::registry::{BrokerError, CallError, LoadedBroker, PollBatch};
use crate::store::{Lifecycle, StateUpdate, Store};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How a poll loop is paced.
#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    /// The normal wait between polls.
    pub interval: Duration,
    /// The longest wait after errors.
    pub max_backoff: Duration,
    /// How old a `creating` row must be before the janitor undoes it.
    pub stale_create: Duration,
    /// Test-only fault: abort the process after a poll returned changes and
    /// before they are committed (`para.host.fault_crash_before_commit`).
    pub crash_before_commit: bool,
}

/// Runs one broker's poll loop until `shutdown` turns true.
pub async fn run(
    broker: Arc<LoadedBroker>,
    store: Arc<dyn Store>,
    settings: PollSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = broker.name().to_string();
    let mut instance = broker.poll_instance();
    let mut failures: u32 = 0;
    // Nothing can be stale for `stale_create`, so looking twice per that
    // period is enough; polls themselves may run every few milliseconds.
    let janitor_every = (settings.stale_create / 2).max(Duration::from_secs(1));
    let mut next_janitor = Instant::now();
    loop {
        if Instant::now() >= next_janitor {
            janitor(&broker, store.as_ref(), settings.stale_create).await;
            next_janitor = Instant::now() + janitor_every;
        }
        let delay = match round(&mut instance, &name, store.as_ref(), settings).await {
            Ok(hint) => {
                failures = 0;
                hint.unwrap_or(settings.interval)
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let backoff = settings
                    .interval
                    .saturating_mul(2u32.saturating_pow(failures.min(16)))
                    .min(settings.max_backoff);
                let delay = match &e {
                    RoundError::Call(CallError::Broker {
                        error: BrokerError::Throttled(t),
                        ..
                    }) => Duration::from_millis(t.retry_after_ms).max(backoff),
                    _ => backoff,
                };
                tracing::warn!(broker = %name, error = %e, retry_in = ?delay, "poll failed");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay.max(Duration::from_millis(10))) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("{0}")]
    Call(CallError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// One poll and commit. Returns the broker's hint for the next poll.
async fn round(
    instance: &mut crate::runtime::registry::PollInstance,
    name: &str,
    store: &dyn Store,
    settings: PollSettings,
) -> Result<Option<Duration>, RoundError> {
    let cursor = store.cursor(name)?;
    let batch: PollBatch = instance.poll(&cursor).await.map_err(RoundError::Call)?;
    let mut updates = Vec::with_capacity(batch.changes.len());
    for c in &batch.changes {
        match serde_json::from_str::<Value>(&c.state) {
            Ok(Value::Object(state)) => updates.push(StateUpdate {
                thing_id: c.thing_id.clone(),
                appid: c.appid.clone(),
                state,
                written_at: c.written_at,
            }),
            _ => {
                tracing::warn!(broker = %name, thing = %c.thing_id, "skipped a change whose state is not a JSON object")
            }
        }
    }
    if settings.crash_before_commit && !updates.is_empty() {
        tracing::error!(broker = %name, "fault injection: crashing before commit");
        std::process::abort();
    }
    let outcome = store.commit_poll(name, &updates, &batch.cursor)?;
    if outcome.applied > 0 || outcome.skipped > 0 {
        tracing::info!(broker = %name, applied = outcome.applied, skipped = outcome.skipped, "poll committed");
    }
    Ok(batch.next_poll_ms.map(Duration::from_millis))
}

/// Finishes deletes that the API left undone: things stuck `deleting`, and
/// `creating` rows whose create neither finished nor was undone.
async fn janitor(broker: &LoadedBroker, store: &dyn Store, stale_create: Duration) {
    let rows = match store.unfinished(stale_create.as_millis() as u64) {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(broker = %broker.name(), error = %e, "janitor could not read unfinished things");
            return;
        }
    };
    for (thing, lifecycle) in rows
        .into_iter()
        .filter(|(t, _)| t.service_broker == broker.name())
    {
        match broker.delete(&thing).await {
            Ok(()) => {
                if let Err(e) = store.remove(&thing.appid, &thing.id) {
                    tracing::warn!(thing = %thing.id, error = %e, "janitor could not remove a row");
                } else {
                    tracing::info!(thing = %thing.id, state = ?lifecycle, age_ms = now_ms().saturating_sub(thing.timestamp), "janitor finished an interrupted operation");
                }
            }
            Err(e) => {
                if lifecycle == Lifecycle::Deleting {
                    tracing::warn!(thing = %thing.id, error = %e, "janitor delete failed; will retry");
                }
            }
        }
    }
}
