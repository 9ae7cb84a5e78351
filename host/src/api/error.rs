//! API errors in Para's shape: `{"code": <status>, "message": "<text>"}`.
//!
//! Every message says what went wrong and what to do about it.

use crate::runtime::registry::{BrokerError, CallError};
use crate::store::StoreError;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer of the REST API.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do.
    pub message: String,
    /// Seconds to send in `Retry-After`, for throttling.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 for a thing id this app does not have.
    pub fn thing_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("Thing '{id}' not found. Check the id; GET /v1/things lists your things."),
        )
    }

    /// Maps a failed broker call; `action` says what the host was doing,
    /// e.g. "create the device for thing 123".
    pub fn from_call(err: CallError, action: &str) -> Self {
        let (status, message, retry) = match &err {
            CallError::Broker { broker, error } => {
                let (status, detail, retry) = match error {
                    BrokerError::NotFound(m) => (StatusCode::NOT_FOUND, m.clone(), None),
                    BrokerError::Conflict(m) => (StatusCode::CONFLICT, m.clone(), None),
                    BrokerError::Unauthorized(m) => (
                        StatusCode::BAD_GATEWAY,
                        format!("{m} (check the broker's credentials in the host config)"),
                        None,
                    ),
                    BrokerError::Throttled(t) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{} (retry after {} ms)", t.message, t.retry_after_ms),
                        Some(t.retry_after_ms.div_ceil(1000).max(1)),
                    ),
                    BrokerError::Unavailable(m) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{m} (the cloud is unreachable; retry later)"),
                        None,
                    ),
                    BrokerError::InvalidInput(m) => (StatusCode::BAD_REQUEST, m.clone(), None),
                    BrokerError::Misconfigured(m) => (
                        StatusCode::BAD_GATEWAY,
                        format!("{m} (fix the broker's configuration and restart the host)"),
                        None,
                    ),
                };
                (
                    status,
                    format!("Broker {broker} could not {action}: {detail}"),
                    retry,
                )
            }
            CallError::Trap { .. } | CallError::Memory { .. } => (
                StatusCode::BAD_GATEWAY,
                format!(
                    "Could not {action}: {err}. The host discarded that instance and keeps serving."
                ),
                None,
            ),
            CallError::Cpu { .. } | CallError::Timeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("Could not {action}: {err}. The host stopped it and keeps serving."),
                None,
            ),
        };
        ApiError {
            status,
            message,
            retry_after: retry,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ApiError::thing_not_found(&id),
            other => {
                tracing::error!(error = %other, "storage failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Storage failed: {other}. Nothing was changed; retry the request."),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = axum::Json(json!({ "code": self.status.as_u16(), "message": self.message }));
        let mut res = (self.status, body).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            res.headers_mut().insert("retry-after", v);
        }
        res
    }
}
