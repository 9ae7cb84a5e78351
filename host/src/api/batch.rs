//! `/v1/_batch` for things. Unlike Para, whose batch path bypassed the
//! IoT services, every thing here still goes through its broker, one by
//! one, with the same no-half-state guarantees as the single routes.
//!
//! As in Para, the answer is 200 with the array of things that succeeded.
//! Failures are not silent: each is listed in the `X-Para-Batch-Errors`
//! header (JSON `[{"index"|"id", "code", "message"}]`), and when every item
//! fails the answer is the first failure's status and message.

use super::error::ApiError;
use super::things::{create_one, delete_one, read_one, write_through};
use super::{ApiState, Caller};
use crate::model::ThingInput;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;

/// The most items one batch may carry.
pub const MAX_BATCH: usize = 100;

fn items(body: &Bytes) -> Result<Vec<Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "Malformed JSON in the request body: {e}. Send a JSON array of things."
        ))
    })?;
    let Value::Array(items) = value else {
        return Err(ApiError::bad_request(
            "The batch body must be a JSON array of things.",
        ));
    };
    if items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "A batch holds at most {MAX_BATCH} items; this one has {}. Split it.",
            items.len()
        )));
    }
    Ok(items)
}

fn ids(query: Option<String>) -> Result<Vec<String>, ApiError> {
    let ids: Vec<String> = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "ids" || *k == "ids[]")
        .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .collect();
    if ids.is_empty() {
        return Err(ApiError::bad_request(
            "Missing ids. Pass them as ?ids=1&ids=2.",
        ));
    }
    if ids.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "At most {MAX_BATCH} ids per batch."
        )));
    }
    Ok(ids)
}

fn answer(ok: Vec<Value>, errors: Vec<(Value, ApiError)>) -> Result<Response, ApiError> {
    if ok.is_empty() && !errors.is_empty() {
        if let Some((_, first)) = errors.into_iter().next() {
            return Err(first);
        }
        return Ok(StatusCode::OK.into_response());
    }
    let list: Vec<Value> = errors
        .iter()
        .map(|(key, e)| {
            let mut v = json!({"code": e.status.as_u16(), "message": e.message});
            if let (Value::Object(m), Value::Object(k)) = (&mut v, key) {
                m.extend(k.clone());
            }
            v
        })
        .collect();
    let mut res = (StatusCode::OK, axum::Json(Value::Array(ok))).into_response();
    if !list.is_empty()
        && let Ok(h) = HeaderValue::from_str(&Value::Array(list).to_string())
    {
        res.headers_mut().insert("x-para-batch-errors", h);
    }
    Ok(res)
}

fn input_of(item: Value) -> Result<(ThingInput, Option<String>), ApiError> {
    let ty = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("thing")
        .to_string();
    if ty != "thing" {
        return Err(ApiError::bad_request(format!(
            "Type '{ty}' is not served here; this host's batch takes things."
        )));
    }
    let id = item.get("id").and_then(Value::as_str).map(str::to_string);
    let input = ThingInput::from_json(item).map_err(|e| ApiError::bad_request(e.0))?;
    Ok((input, id))
}

/// `POST /v1/_batch`: create each thing through its broker.
pub async fn create(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (index, item) in items(&body)?.into_iter().enumerate() {
        let result = match input_of(item) {
            Ok((input, _)) => create_one(&state, &caller, input).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => ok.push(v),
            Err(e) => errors.push((json!({"index": index}), e)),
        }
    }
    answer(ok, errors)
}

/// `PATCH /v1/_batch` (merge) and `PUT /v1/_batch` (overwrite, or create
/// items without an id, as Para's clients do).
async fn update(
    state: Arc<ApiState>,
    caller: Caller,
    body: Bytes,
    overwrite: bool,
) -> Result<Response, ApiError> {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (index, item) in items(&body)?.into_iter().enumerate() {
        let result = match input_of(item) {
            Ok((input, Some(id))) => write_through(&state, &caller, &id, input, overwrite).await,
            Ok((input, None)) if overwrite => create_one(&state, &caller, input).await,
            Ok((_, None)) => Err(ApiError::bad_request(
                "Each item of a PATCH batch needs its 'id'.",
            )),
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => ok.push(v),
            Err(e) => errors.push((json!({"index": index}), e)),
        }
    }
    answer(ok, errors)
}

/// `PATCH /v1/_batch`.
pub async fn patch(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    update(state, caller, body, false).await
}

/// `PUT /v1/_batch`.
pub async fn put(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    update(state, caller, body, true).await
}

/// `GET /v1/_batch?ids=..`: the things of the caller's app among the ids;
/// ids of other apps are simply absent, as unknown ones are.
pub async fn read(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let found: Vec<Value> = ids(query)?
        .iter()
        .filter_map(|id| read_one(&state, &caller, id).ok())
        .collect();
    Ok(axum::Json(Value::Array(found)).into_response())
}

/// `DELETE /v1/_batch?ids=..`: delete each thing's device, then the thing.
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    for id in ids(query)? {
        if let Err(e) = delete_one(&state, &caller, &id).await
            && e.status != StatusCode::NOT_FOUND
        {
            errors.push((json!({"id": id}), e));
        }
    }
    let mut res = StatusCode::OK.into_response();
    if let Some((_, first)) = errors.first() {
        let list: Vec<Value> = errors
            .iter()
            .map(|(k, e)| json!({"id": k["id"], "code": e.status.as_u16(), "message": e.message}))
            .collect();
        if let Ok(h) = HeaderValue::from_str(&Value::Array(list).to_string()) {
            res.headers_mut().insert("x-para-batch-errors", h);
        }
        tracing::warn!(failed = errors.len(), first = %first.message, "batch delete had failures");
    }
    Ok(res)
}
