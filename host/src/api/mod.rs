//! The REST API: Para's `/v1` routes for things.
//!
//! Routes take the plural and the singular type (`/v1/things`,
//! `/v1/thing`), as Para's clients use both. Every error is JSON
//! `{"code","message"}` ([`error::ApiError`]).

pub mod auth;
pub mod batch;
pub mod error;
pub mod things;

use crate::apps::AppKeys;
use crate::config::Config;
use crate::model::IdGenerator;
use crate::runtime::registry::BrokerRegistry;
use crate::store::Store;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use error::ApiError;
use std::sync::Arc;

/// What every handler shares.
pub struct ApiState {
    /// The host config.
    pub config: Config,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Loaded brokers.
    pub registry: Arc<BrokerRegistry>,
    /// Para id generator.
    pub ids: IdGenerator,
    /// Derives app secrets for authentication.
    pub keys: AppKeys,
}

/// Who is calling: every storage access is scoped by this app.
#[derive(Debug, Clone)]
pub struct Caller {
    /// App id without the `app:` prefix.
    pub appid: String,
}

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/{type}", get(things::list).post(things::create))
        .route(
            "/v1/{type}/{id}",
            get(things::read)
                .put(things::put)
                .patch(things::patch)
                .delete(things::delete),
        )
        .route(
            "/v1/_batch",
            get(batch::read)
                .post(batch::create)
                .put(batch::put)
                .patch(batch::patch)
                .delete(batch::delete),
        )
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "No such route. This host serves /v1/things and /v1/things/{id}.",
            )
        })
        .layer(middleware::from_fn(json_errors))
        // The auth layer reads every /v1 body once, within
        // para.max_entity_size_bytes (Para's 400), and hands it on whole.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Turns axum's own plain-text rejections (405, bad paths) into
/// Para's JSON error shape.
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let res = next.run(req).await;
    let is_json = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if res.status().is_success() || is_json {
        return res;
    }
    let status = res.status();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "Method {method} is not allowed here. Things take GET, POST on /v1/things and GET, PUT, PATCH, DELETE on /v1/things/{{id}}."
        ),
        other => other
            .canonical_reason()
            .unwrap_or("Request failed")
            .to_string(),
    };
    ApiError::new(status, message).into_response()
}
