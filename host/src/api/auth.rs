//! The authentication layer: every `/v1` request must carry Para
//! credentials (SigV4 or an HS256 JWT); the app they name becomes the
//! [`Caller`] that scopes all storage access. The verification logic is in
//! [`crate::auth`]; this file only adapts an HTTP request to it.

use super::error::ApiError;
use super::{ApiState, Caller};
use crate::auth::{
    AuthError, Credentials, app_identifier, credentials_from, jwt, normalize_app_id, sigv4,
};
use crate::model::now_ms;
use crate::store::AppRecord;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

fn refuse(e: AuthError) -> ApiError {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    ApiError::new(status, e.to_string())
}

fn deny(e: AuthError) -> Response {
    refuse(e).into_response()
}

fn app(state: &ApiState, access_key: &str) -> Result<AppRecord, ApiError> {
    let id = normalize_app_id(access_key);
    match state.store.app_get(&id) {
        Ok(Some(app)) if app.active => Ok(app),
        Ok(Some(app)) => Err(refuse(AuthError::AppNotActive { app_id: app.id })),
        Ok(None) => Err(refuse(AuthError::AppNotFound)),
        Err(e) => Err(ApiError::from(e)),
    }
}

/// Authenticates the request, or answers 400/401/403/404 as Para does.
pub async fn authenticate(
    State(state): State<Arc<ApiState>>,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    // The one body-size check of the API: handlers get the buffered body.
    let bytes = match axum::body::to_bytes(body, state.config.max_entity_size).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::bad_request(format!(
                "Request is too large: the limit is {} bytes (para.max_entity_size_bytes).",
                state.config.max_entity_size
            ))
            .into_response();
        }
    };
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let raw_query = parts.uri.query();
    let now = (now_ms() / 1000) as i64;
    let expires = state.config.request_expires_after;
    let app = match credentials_from(&headers, raw_query) {
        Err(e) => return deny(e),
        Ok(Credentials::None) => return deny(AuthError::MissingCredentials),
        Ok(Credentials::Anonymous(_)) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Guest (Anonymous) access is not enabled on this host. Sign the request with SigV4 or send a Bearer JWT.",
            )
            .into_response();
        }
        Ok(Credentials::SigV4 { access_key, .. }) => {
            let signed = sigv4::SignedRequest {
                method: parts.method.as_str(),
                raw_path: parts.uri.path(),
                raw_query,
                headers: &headers,
                body: &bytes,
            };
            if let Err(e) = sigv4::check_date(&signed, now, expires) {
                return deny(e);
            }
            let app = match app(&state, &access_key) {
                Ok(a) => a,
                Err(e) => return e.into_response(),
            };
            if let Err(e) = sigv4::verify(&signed, &state.keys.secret(&app), now, expires) {
                return deny(e);
            }
            app
        }
        Ok(Credentials::Bearer(token)) => {
            let claims = match jwt::peek_claims(&token) {
                Ok(c) => c,
                Err(e) => return deny(e),
            };
            let app = match app(&state, &claims.appid) {
                Ok(a) => a,
                Err(e) => return e.into_response(),
            };
            // No users on this host: every valid app token is a super token.
            if let Err(e) = jwt::verify(&token, &state.keys.secret(&app), now) {
                return deny(e);
            }
            app
        }
    };
    parts.extensions.insert(Caller {
        appid: app_identifier(&app.id).to_string(),
    });
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
