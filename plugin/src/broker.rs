//! The four broker operations against the hub: create, update, delete, poll.
//!
//! Written against [`Hub`] (and so against any [`Platform`]) so that the
//! flows — idempotent create, etag-checked twin updates, lossless paging —
//! are tested natively; `lib.rs` only converts to and from the WIT types.

use crate::amqp::transport::Connector;
use crate::cursor::{Cursor, PollCursor, Scan};
use crate::error::{self, Failure};
use crate::eventhub::{BUSY_POLL_MS, EventHubConfig, Reader};
use crate::hub::{Hub, Retry};
use crate::platform::{Level, Method, Platform};
use crate::query::{self, Change};
use crate::registry;
use crate::twin;
use serde_json::{Map, Value, json};

/// Re-reads of the twin after an etag mismatch before giving up.
pub const MAX_TWIN_ROUNDS: u32 = 4;

/// Query pages read in one poll; beyond that the poll returns what it has
/// and asks to be called again at once.
pub const MAX_PAGES_PER_POLL: u32 = 500;

/// The parts of a WIT `thing` the operations use.
#[derive(Debug, Clone, Copy)]
pub struct ThingRef<'a> {
    /// Para id.
    pub id: &'a str,
    /// Owning app.
    pub appid: &'a str,
    /// Display name.
    pub name: &'a str,
    /// `deviceState`, a JSON object as text.
    pub device_state: &'a str,
    /// Metadata from an earlier call (JSON object text).
    pub metadata: &'a str,
}

/// What `create` produces (WIT `created`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedOut {
    /// Keys and connection string, shown once.
    pub device_details: String,
    /// Non-secret metadata to store.
    pub metadata: String,
}

/// What `poll` produces (WIT `poll-batch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollOut {
    /// State changes, in the order found.
    pub changes: Vec<Change>,
    /// The next cursor.
    pub cursor: String,
    /// When to poll next, if the broker has a preference.
    pub next_poll_ms: Option<u64>,
}

fn device_id_of(thing: &ThingRef<'_>) -> Result<String, Failure> {
    registry::device_id(thing.appid, thing.id).map_err(Failure::InvalidInput)
}

fn bad_body(what: &str, why: &str) -> Failure {
    Failure::Unavailable(format!(
        "Azure IoT Hub sent an unreadable answer while {what}: {why}; check that para.azure.iot_endpoint points at an IoT hub"
    ))
}

/// Provisions the thing's device with hub-generated keys. Safe to retry: an
/// existing device (409) is read back and returned.
pub fn create<P: Platform>(
    hub: &mut Hub<'_, P>,
    thing: &ThingRef<'_>,
) -> Result<CreatedOut, Failure> {
    let id = device_id_of(thing)?;
    let path = registry::device_path(&id);
    let what = format!("creating device '{id}'");
    hub.log(
        Level::Info,
        &format!("creating device '{id}' for thing {}", thing.id),
    );
    let body = registry::create_body(&id);
    let resp = hub.send(
        Method::Put,
        &path,
        &[],
        Some(&body),
        Retry::Transient,
        &what,
    )?;
    let resp = match resp.status {
        200 | 201 => resp,
        409 => {
            hub.log(
                Level::Info,
                &format!("device '{id}' already exists (a retried create); reading it back"),
            );
            let what = format!("reading existing device '{id}'");
            let got = hub.send(Method::Get, &path, &[], None, Retry::Transient, &what)?;
            if !got.is_success() {
                return Err(error::from_response(&got, &what));
            }
            got
        }
        _ => return Err(error::from_response(&resp, &what)),
    };
    let device = registry::parse_device(&resp.body).map_err(|why| bad_body(&what, &why))?;
    let hostname = &hub.config.hostname;
    let details = registry::device_details(thing.id, thing.name, &device, hostname).map_err(|why| {
        Failure::Conflict(format!(
            "{why}; Para needs a SAS device. Delete device '{id}' in the Azure portal and create the thing again."
        ))
    })?;
    let metadata = registry::metadata(&device.device_id, device.generation_id.as_deref(), hostname);
    hub.log(
        Level::Info,
        &format!(
            "created device '{id}' (generation {})",
            device.generation_id.as_deref().unwrap_or("unknown")
        ),
    );
    Ok(CreatedOut {
        device_details: details.to_string(),
        metadata: metadata.to_string(),
    })
}

/// Makes the twin's desired properties equal the thing's `deviceState`.
/// Returns the metadata to store.
pub fn update<P: Platform>(hub: &mut Hub<'_, P>, thing: &ThingRef<'_>) -> Result<String, Failure> {
    let id = device_id_of(thing)?;
    let state = match serde_json::from_str::<Value>(thing.device_state) {
        Ok(Value::Object(o)) => o,
        Ok(_) => {
            return Err(Failure::InvalidInput(
                "deviceState must be a JSON object to become twin desired properties".into(),
            ));
        }
        Err(e) => {
            return Err(Failure::InvalidInput(format!(
                "deviceState is not valid JSON ({e})"
            )));
        }
    };
    twin::check_limits(&state).map_err(Failure::InvalidInput)?;
    let path = registry::twin_path(&id);
    let metadata = refreshed_metadata(thing.metadata, &id, &hub.config.hostname);
    hub.log(
        Level::Info,
        &format!("updating desired properties of device '{id}'"),
    );

    for round in 1..=MAX_TWIN_ROUNDS {
        let what = format!("reading the twin of device '{id}'");
        let resp = hub.send(Method::Get, &path, &[], None, Retry::Transient, &what)?;
        if !resp.is_success() {
            return Err(error::from_response(&resp, &what));
        }
        let twin_doc: Value =
            serde_json::from_slice(&resp.body).map_err(|e| bad_body(&what, &e.to_string()))?;
        let empty = Map::new();
        let current = twin_doc
            .pointer("/properties/desired")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let patch = twin::desired_patch(current, &state);
        if patch.is_empty() {
            hub.log(
                Level::Info,
                &format!("desired properties of device '{id}' already match deviceState"),
            );
            return Ok(metadata);
        }
        let etag = twin_doc
            .get("etag")
            .and_then(Value::as_str)
            .map(quote_etag)
            .unwrap_or_else(|| "\"*\"".to_string());
        let body = json!({ "properties": { "desired": Value::Object(patch) } });
        let what = format!("updating the twin of device '{id}'");
        let resp = hub.send(
            Method::Patch,
            &path,
            &[("if-match", etag)],
            Some(&body),
            Retry::Transient,
            &what,
        )?;
        match resp.status {
            200..=299 => {
                hub.log(
                    Level::Info,
                    &format!("updated desired properties of device '{id}'"),
                );
                return Ok(metadata);
            }
            412 if round < MAX_TWIN_ROUNDS => {
                hub.log(
                    Level::Info,
                    &format!("the twin of device '{id}' changed meanwhile (412); re-reading it"),
                );
            }
            _ => return Err(error::from_response(&resp, &what)),
        }
    }
    Err(Failure::Conflict(format!(
        "the twin of device '{id}' kept changing while its desired properties were updated ({MAX_TWIN_ROUNDS} etag mismatches); retry the update"
    )))
}

/// Quotes an etag for `If-Match` unless it already is.
fn quote_etag(etag: &str) -> String {
    if etag.starts_with('"') || etag.starts_with("W/\"") {
        etag.to_string()
    } else {
        format!("\"{etag}\"")
    }
}

/// The stored metadata with `deviceId` and `hostname` filled in, and any
/// key material removed should an older version have stored it.
fn refreshed_metadata(existing: &str, device_id: &str, hostname: &str) -> String {
    let mut m = match serde_json::from_str::<Value>(existing) {
        Ok(Value::Object(o)) => o,
        _ => Map::new(),
    };
    for secret in ["primaryKey", "secondaryKey", "connectionString"] {
        m.remove(secret);
    }
    m.insert("deviceId".into(), json!(device_id));
    m.insert("hostname".into(), json!(hostname));
    Value::Object(m).to_string()
}

/// Removes the thing's device. A device that is already gone counts as done.
pub fn delete<P: Platform>(hub: &mut Hub<'_, P>, thing: &ThingRef<'_>) -> Result<(), Failure> {
    let id = device_id_of(thing)?;
    let what = format!("deleting device '{id}'");
    hub.log(Level::Info, &format!("deleting device '{id}'"));
    let resp = hub.send(
        Method::Delete,
        &registry::device_path(&id),
        &[("if-match", "\"*\"".to_string())],
        None,
        Retry::Transient,
        &what,
    )?;
    match resp.status {
        200..=299 => {
            hub.log(Level::Info, &format!("deleted device '{id}'"));
            Ok(())
        }
        404 => {
            hub.log(Level::Info, &format!("device '{id}' was already gone"));
            Ok(())
        }
        _ => Err(error::from_response(&resp, &what)),
    }
}

/// Fetches reported-state changes after `cursor` (twins only: D2C reading
/// off).
pub fn poll<P: Platform>(hub: &mut Hub<'_, P>, cursor: &str) -> Result<PollOut, Failure> {
    poll_with_events(hub, cursor, None)
}

/// The D2C side of a poll: the instance's reader, how it connects, and the
/// validated Event Hub settings.
pub struct Events<'a> {
    /// The long-lived reader (connection and links).
    pub reader: &'a mut Reader,
    /// Opens TLS/TCP streams.
    pub connector: &'a mut dyn Connector,
    /// The Event Hub settings.
    pub config: &'a EventHubConfig,
}

/// Fetches reported-state changes after `cursor` and, with `events`, the
/// device-to-cloud messages after the cursor's partition checkpoints.
///
/// The two sources fail independently: when one fails and the other has
/// changes, those are returned (the failed side's cursor part stays put);
/// when nothing was found, the failure is the result.
pub fn poll_with_events<P: Platform>(
    hub: &mut Hub<'_, P>,
    cursor: &str,
    events: Option<Events<'_>>,
) -> Result<PollOut, Failure> {
    let start = match PollCursor::parse(cursor) {
        Ok(c) => c,
        Err(why) => {
            hub.log(
                Level::Warn,
                &format!(
                    "the stored poll cursor is unusable ({why}); starting from the beginning, which re-delivers every device's current reported state"
                ),
            );
            PollCursor::initial()
        }
    };
    let twins = poll_twins(hub, start.twin.clone());
    let Some(ev) = events else {
        let t = twins?;
        return Ok(PollOut {
            changes: t.changes,
            cursor: PollCursor {
                twin: t.cursor,
                eh: start.eh,
            }
            .to_text(false),
            next_poll_ms: t.next_poll_ms,
        });
    };
    let batch = ev
        .reader
        .poll(&*hub.platform, ev.connector, ev.config, &start.eh);
    let (twin_changes, twin_cursor, twin_next) = match twins {
        Ok(t) => (t.changes, t.cursor, t.next_poll_ms),
        Err(f) => match &batch {
            Ok(b) if !b.changes.is_empty() || b.messages > 0 => {
                hub.log(
                    Level::Warn,
                    &format!(
                        "twin query failed ({f}); returning the device-to-cloud messages only"
                    ),
                );
                (Vec::new(), start.twin.clone(), None)
            }
            _ => return Err(f),
        },
    };
    let (mut changes, eh, events_next) = match batch {
        Ok(b) => {
            let next = (b.messages > 0).then_some(BUSY_POLL_MS);
            let mut changes = twin_changes;
            changes.extend(b.changes);
            (changes, b.checkpoints, next)
        }
        Err(f) if twin_changes.is_empty() => return Err(f),
        Err(f) => {
            hub.log(
                Level::Warn,
                &format!("device-to-cloud messages were not read this poll ({f})"),
            );
            (twin_changes, start.eh.clone(), None)
        }
    };
    changes.shrink_to_fit();
    let next_poll_ms = match (twin_next, events_next) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(PollOut {
        changes,
        cursor: PollCursor {
            twin: twin_cursor,
            eh,
        }
        .to_text(true),
        next_poll_ms,
    })
}

/// What the twin query part of a poll found.
struct TwinPoll {
    changes: Vec<Change>,
    cursor: Cursor,
    next_poll_ms: Option<u64>,
}

fn poll_twins<P: Platform>(hub: &mut Hub<'_, P>, start: Cursor) -> Result<TwinPoll, Failure> {
    let mut scan = Scan::new(start);
    let since = scan.since_text().to_string();
    let body = query::query_body(&scan.query_bound());
    let what = format!("querying twins reported since {since}");
    let mut changes = Vec::new();
    let mut continuation: Option<String> = None;
    let mut pages = 0u32;

    loop {
        let mut headers = vec![("x-ms-max-item-count", query::PAGE_SIZE.to_string())];
        if let Some(c) = &continuation {
            headers.push(("x-ms-continuation", c.clone()));
        }
        let page = hub
            .send(
                Method::Post,
                "/devices/query",
                &headers,
                Some(&body),
                Retry::Never,
                &what,
            )
            .and_then(|resp| {
                if !resp.is_success() {
                    return Err(error::from_response(&resp, &what));
                }
                let items = query::parse_page(&resp.body).map_err(|why| bad_body(&what, &why))?;
                let next = resp
                    .header("x-ms-continuation")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_string);
                Ok((items, next))
            });
        let (items, next) = match page {
            Ok(p) => p,
            Err(failure) if changes.is_empty() => return Err(failure),
            Err(failure) => {
                hub.log(
                    Level::Warn,
                    &format!(
                        "poll stopped after {pages} pages ({failure}); returning {} changes and resuming from the same point next time",
                        changes.len()
                    ),
                );
                let next_poll_ms = match &failure {
                    Failure::Throttled { retry_after_ms, .. } => Some(*retry_after_ms),
                    _ => None,
                };
                return Ok(TwinPoll {
                    changes,
                    cursor: scan.partial(),
                    next_poll_ms,
                });
            }
        };
        query::absorb_page(&mut scan, &items, &mut changes);
        pages += 1;
        match next {
            Some(token) if continuation.as_deref() == Some(token.as_str()) => {
                return Err(Failure::Unavailable(format!(
                    "Azure IoT Hub returned the same continuation token twice while {what}; retry later"
                )));
            }
            Some(_) if pages >= MAX_PAGES_PER_POLL => {
                hub.log(
                    Level::Info,
                    &format!(
                        "poll read {pages} pages ({} changes); returning them and continuing on the next poll",
                        changes.len()
                    ),
                );
                return Ok(TwinPoll {
                    changes,
                    cursor: scan.partial(),
                    next_poll_ms: Some(0),
                });
            }
            Some(token) => continuation = Some(token),
            None => break,
        }
    }
    hub.log(
        Level::Info,
        &format!(
            "poll since {since}: {} changes from {} twins in {pages} pages",
            changes.len(),
            scan.delivered()
        ),
    );
    Ok(TwinPoll {
        changes,
        cursor: scan.complete(),
        next_poll_ms: None,
    })
}

#[cfg(test)]
mod tests;
