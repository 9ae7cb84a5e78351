//! `/v1/things` handlers. Each write goes through the thing's broker, and
//! no failure leaves a thing without its device or a device without its
//! thing:
//!
//! * POST writes the thing as `creating` (invisible), calls `create`, then
//!   activates it. If `create` fails the host calls `delete` to undo any
//!   partial device and removes the row; if that undo fails too, the row
//!   stays `creating` and the poller's janitor retries the delete.
//! * DELETE marks the thing `deleting`, calls `delete`, then removes it; on
//!   failure it is active again and the caller sees the error.
//! * PATCH and PUT call `update` first and store the result after, so the
//!   stored thing never claims a state the device was not sent.

use super::error::ApiError;
use super::{ApiState, Caller};
use crate::model::{Thing, ThingInput, now_ms};
use crate::runtime::registry::{BrokerError, CallError, LoadedBroker};
use crate::store::{Lifecycle, ListQuery, SortField};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;

type ApiResult = Result<Response, ApiError>;

fn check_type(ty: &str) -> Result<(), ApiError> {
    if ty == "things" || ty == "thing" {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Unknown type '{ty}'. This host serves things: use /v1/things or /v1/thing."),
        ))
    }
}

/// Parses and type-checks a request body as a thing.
/// (The auth layer has already refused bodies over
/// `para.max_entity_size_bytes`.)
pub fn parse_body(body: &Bytes) -> Result<ThingInput, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "Malformed JSON in the request body: {e}. Send a JSON object such as {{\"name\":\"MyThing\",\"serviceBroker\":\"Azure\"}}."
        ))
    })?;
    ThingInput::from_json(value).map_err(|e| ApiError::bad_request(e.0))
}

fn broker_for(state: &ApiState, name: &str) -> Result<Arc<LoadedBroker>, ApiError> {
    if !state.config.iot_enabled {
        return Err(ApiError::bad_request(
            "IoT is disabled on this host. Set para.iot_enabled = true in the config file (or PARA_IOT_ENABLED=true) and restart.",
        ));
    }
    state.registry.get(name).cloned().ok_or_else(|| {
        let names = state.registry.names();
        ApiError::bad_request(if names.is_empty() {
            format!(
                "Unknown serviceBroker '{name}': no brokers are configured. Add para.brokers.<Name>.component to the config."
            )
        } else {
            format!(
                "Unknown serviceBroker '{name}'. Configured brokers: {}.",
                names.join(", ")
            )
        })
    })
}

fn json_object(text: &str, what: &str) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("The broker returned {what} that is not a JSON object; the broker is faulty."),
        )),
    }
}

/// `POST /v1/things`: create the thing and its device; show `deviceDetails` once.
pub async fn create(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(ty): Path<String>,
    body: Bytes,
) -> ApiResult {
    check_type(&ty)?;
    let input = parse_body(&body)?;
    let out = create_one(&state, &caller, input).await?;
    let location = format!("/v1/things/{}", out["id"].as_str().unwrap_or_default());
    Ok((
        StatusCode::CREATED,
        [("location", location)],
        axum::Json(out),
    )
        .into_response())
}

/// Creates one thing and its device; returns the thing JSON with
/// `deviceDetails`. Shared by POST and the batch endpoint.
pub async fn create_one(
    state: &ApiState,
    caller: &Caller,
    input: ThingInput,
) -> Result<Value, ApiError> {
    let name = input
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("'name' must not be blank. Give the thing a name."))?;
    let broker_name = input
        .service_broker
        .clone()
        .filter(|b| !b.trim().is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "'serviceBroker' must not be blank. Name the broker, e.g. \"Azure\".",
            )
        })?;
    let broker = broker_for(state, &broker_name)?;
    let now = now_ms();
    let mut thing = Thing {
        id: state.ids.next(),
        appid: caller.appid.clone(),
        name,
        service_broker: broker.name().to_string(),
        device_state: input.device_state.clone().unwrap_or_default(),
        metadata: Map::new(),
        timestamp: now,
        updated: None,
        version: 0,
        state_updated: now,
        extra: input
            .extra
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    state.store.insert(&thing, Lifecycle::Creating)?;
    let created = match broker.create(&thing).await {
        Ok(c) => c,
        Err(err) => {
            let outcome_known = matches!(
                &err,
                CallError::Broker {
                    error: BrokerError::NotFound(_)
                        | BrokerError::Conflict(_)
                        | BrokerError::Unauthorized(_)
                        | BrokerError::InvalidInput(_)
                        | BrokerError::Misconfigured(_),
                    ..
                }
            );
            undo_create(&broker, state, &thing, outcome_known).await;
            return Err(ApiError::from_call(
                err,
                &format!("create the device for thing {}", thing.id),
            ));
        }
    };
    let details = json_object(&created.device_details, "deviceDetails");
    let metadata = json_object(&created.metadata, "metadata");
    let (details, metadata) = match (details, metadata) {
        (Ok(d), Ok(m)) => (d, m),
        (Err(e), _) | (_, Err(e)) => {
            undo_create(&broker, state, &thing, true).await;
            return Err(e);
        }
    };
    thing.metadata = metadata;
    if let Err(e) = state.store.insert(&thing, Lifecycle::Active) {
        undo_create(&broker, state, &thing, true).await;
        return Err(e.into());
    }
    tracing::info!(thing = %thing.id, broker = %thing.service_broker, "thing created");
    let mut out = thing.to_json();
    if let Value::Object(obj) = &mut out {
        obj.insert("deviceDetails".into(), Value::Object(details));
    }
    Ok(out)
}

/// Undoes a failed create: delete whatever device exists, then the row.
///
/// When the outcome of `create` is unknown (a timeout, a crash, a dropped
/// connection), the cloud may still apply the request after this delete, so
/// the row stays `creating` and the janitor deletes the device again once
/// the row is older than any call could take. Likewise if the delete fails.
async fn undo_create(broker: &LoadedBroker, state: &ApiState, thing: &Thing, outcome_known: bool) {
    match broker.delete(thing).await {
        Ok(()) if !outcome_known => {
            tracing::info!(thing = %thing.id, "create outcome unknown; the janitor will delete the device again later");
        }
        Ok(()) => {
            if let Err(e) = state.store.remove(&thing.appid, &thing.id) {
                tracing::error!(thing = %thing.id, error = %e, "could not remove the row of a failed create; the janitor will");
            }
        }
        Err(e) => {
            tracing::warn!(thing = %thing.id, error = %e, "undo of a failed create failed; the janitor will retry");
        }
    }
}

/// `GET /v1/things/{id}`: never shows `deviceDetails` or broker metadata.
pub async fn read(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path((ty, id)): Path<(String, String)>,
) -> ApiResult {
    check_type(&ty)?;
    Ok(axum::Json(read_one(&state, &caller, &id)?).into_response())
}

/// Reads one thing of the caller's app as JSON.
pub fn read_one(state: &ApiState, caller: &Caller, id: &str) -> Result<Value, ApiError> {
    let thing = state
        .store
        .get(&caller.appid, id)?
        .ok_or_else(|| ApiError::thing_not_found(id))?;
    Ok(thing.to_json())
}

/// PATCH (merge) or PUT (overwrite) one thing through its broker.
pub async fn write_through(
    state: &ApiState,
    caller: &Caller,
    id: &str,
    input: ThingInput,
    overwrite: bool,
) -> Result<Value, ApiError> {
    let current = state
        .store
        .get(&caller.appid, id)?
        .ok_or_else(|| ApiError::thing_not_found(id))?;
    let broker = broker_for(state, &current.service_broker)?;
    let now = now_ms();
    let apply = |t: &mut Thing| {
        if overwrite {
            t.apply_overwrite(&input, now);
        } else {
            t.apply_patch(&input, now);
        }
    };
    let mut next = current.clone();
    apply(&mut next);
    let metadata_text = broker
        .update(&next)
        .await
        .map_err(|e| ApiError::from_call(e, &format!("update the device of thing {id}")))?;
    let metadata = json_object(&metadata_text, "metadata")?;
    let saved = state.store.modify(&caller.appid, id, &mut |t| {
        apply(t);
        t.metadata = metadata.clone();
    })?;
    Ok(saved.to_json())
}

/// `PATCH /v1/things/{id}`: shallow merge; `deviceState` replaced whole and
/// sent to the device's shadow.
pub async fn patch(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path((ty, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    update(&state, &caller, &ty, &id, &body, false).await
}

/// `PUT /v1/things/{id}`: overwrite; unlike Para, it goes through the broker.
/// It does not create a missing thing: devices are created by POST only.
pub async fn put(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path((ty, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    update(&state, &caller, &ty, &id, &body, true).await
}

async fn update(
    state: &ApiState,
    caller: &Caller,
    ty: &str,
    id: &str,
    body: &Bytes,
    overwrite: bool,
) -> ApiResult {
    check_type(ty)?;
    let input = parse_body(body)?;
    Ok(axum::Json(write_through(state, caller, id, input, overwrite).await?).into_response())
}

/// `DELETE /v1/things/{id}`: delete the device, then the thing.
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path((ty, id)): Path<(String, String)>,
) -> ApiResult {
    check_type(&ty)?;
    delete_one(&state, &caller, &id).await?;
    Ok(StatusCode::OK.into_response())
}

/// Deletes one thing's device, then the thing.
pub async fn delete_one(state: &ApiState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    let thing = state
        .store
        .get(&caller.appid, id)?
        .ok_or_else(|| ApiError::thing_not_found(id))?;
    let broker = broker_for(state, &thing.service_broker)?;
    state
        .store
        .set_lifecycle(&caller.appid, id, Lifecycle::Deleting)?;
    if let Err(err) = broker.delete(&thing).await {
        state
            .store
            .set_lifecycle(&caller.appid, id, Lifecycle::Active)?;
        return Err(ApiError::from_call(
            err,
            &format!("delete the device of thing {id}"),
        ));
    }
    state.store.remove(&caller.appid, id)?;
    tracing::info!(thing = %id, "thing deleted");
    Ok(())
}

/// `GET /v1/things`: Para's `{items, page, totalHits, lastKey}`.
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(ty): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult {
    check_type(&ty)?;
    let number = |key: &str, default: usize| -> Result<usize, ApiError> {
        match params.get(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| {
                ApiError::bad_request(format!("'{key}' must be a whole number, got '{v}'."))
            }),
        }
    };
    let limit =
        number("limit", state.config.default_page_size)?.clamp(1, state.config.max_page_limit);
    let page = number("page", 1)?.min(1000);
    let sort = match params.get("sort").map(String::as_str) {
        None | Some("timestamp") => SortField::Timestamp,
        Some("updated") => SortField::Updated,
        Some("name") => SortField::Name,
        Some("id") => SortField::Id,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Cannot sort by '{other}'. Use timestamp, updated, name or id."
            )));
        }
    };
    let desc = match params.get("desc").map(String::as_str) {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'desc' must be true or false, got '{other}'."
            )));
        }
    };
    let last_key = params.get("lastKey").filter(|k| !k.is_empty()).cloned();
    let query = ListQuery {
        limit,
        page,
        sort,
        desc,
        last_key,
    };
    let result = state.store.list(&caller.appid, &query)?;
    let mut body = json!({
        "items": result.items.iter().map(Thing::to_json).collect::<Vec<_>>(),
        "page": page,
        "totalHits": result.total,
    });
    if let (Some(last), Value::Object(obj)) = (result.items.last(), &mut body) {
        obj.insert("lastKey".into(), json!(last.id));
    }
    Ok(axum::Json(body).into_response())
}
