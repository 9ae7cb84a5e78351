//! Authenticated requests to the hub's REST API, with retries.
//!
//! Every request gets `api-version`, a cached SAS token and JSON headers
//! here, so the operations in `broker.rs` only say what they want. Transient
//! failures are retried per `retry.rs` when the caller asks; what is left
//! comes back as the final response (for the caller to interpret) or as a
//! [`Failure`] when no response arrived.

use crate::config::Config;
use crate::error::{self, Failure};
use crate::platform::{Level, Method, Platform, Request, Response, TransportError};
use crate::retry;
use crate::sas::TokenCache;
use serde_json::Value;

/// The service API version every request names (current GA).
pub const API_VERSION: &str = "2021-04-12";

/// Sent as `User-Agent`, so hub diagnostics can tell this broker apart.
pub const USER_AGENT: &str = concat!("para-azure-broker/", env!("CARGO_PKG_VERSION"));

/// A connection to one hub for the duration of one operation.
pub struct Hub<'a, P: Platform> {
    /// The validated configuration.
    pub config: &'a Config,
    /// HTTP, clocks and logging.
    pub platform: &'a mut P,
    tokens: &'a mut TokenCache,
}

/// Whether a request may be retried when it fails transiently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Up to [`retry::MAX_ATTEMPTS`] attempts within [`retry::BUDGET_MS`].
    Transient,
    /// One attempt (polling: the host polls again anyway).
    Never,
}

impl<'a, P: Platform> Hub<'a, P> {
    /// Binds a configuration, a platform and the instance's token cache.
    pub fn new(config: &'a Config, platform: &'a mut P, tokens: &'a mut TokenCache) -> Self {
        Hub {
            config,
            platform,
            tokens,
        }
    }

    /// Logs through the platform.
    pub fn log(&self, level: Level, message: &str) {
        self.platform.log(level, message);
    }

    fn build(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Request {
        let now = self.platform.unix_secs();
        let token = self
            .tokens
            .token(
                &self.config.hostname,
                &self.config.policy,
                &self.config.key,
                now,
            )
            .to_string();
        let mut all = vec![
            ("authorization".to_string(), token),
            ("accept".to_string(), "application/json".to_string()),
            ("user-agent".to_string(), USER_AGENT.to_string()),
        ];
        if let Some(b) = body {
            all.push((
                "content-type".to_string(),
                "application/json; charset=utf-8".to_string(),
            ));
            all.push(("content-length".to_string(), b.len().to_string()));
        }
        all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let endpoint = &self.config.endpoint;
        Request {
            method,
            scheme: endpoint.scheme,
            authority: endpoint.authority.clone(),
            path_and_query: format!("{}{path}?api-version={API_VERSION}", endpoint.base_path),
            headers: all,
            body: body.map(<[u8]>::to_vec),
        }
    }

    /// Sends a request (JSON `body` if any) and returns the final response,
    /// whatever its status. `what` names the operation for messages
    /// ("creating device 'app:1'"). `Err` only when no response arrived.
    pub fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
        retry: Retry,
        what: &str,
    ) -> Result<Response, Failure> {
        let body = body.map(|b| b.to_string().into_bytes());
        let started = self.platform.monotonic_ms();
        let mut attempt = 1u32;
        loop {
            let request = self.build(method, path, headers, body.as_deref());
            let outcome = self.platform.send(&request);
            let (transient, retry_after, summary) = match &outcome {
                Ok(resp) => {
                    if resp.status == 401 {
                        // Mint a fresh token next time, in case this one
                        // was rejected for its age.
                        self.tokens.invalidate();
                    }
                    (
                        error::is_transient_status(resp.status),
                        error::retry_after_ms(resp),
                        format!("HTTP {}", resp.status),
                    )
                }
                Err(e) => (e.is_transient(), None, e.to_string()),
            };
            if transient && retry == Retry::Transient {
                let elapsed = self.platform.monotonic_ms().saturating_sub(started);
                if let Some(delay) = retry::next_delay(attempt, retry_after, elapsed) {
                    self.log(
                        Level::Warn,
                        &format!(
                            "{} {path} got {summary} while {what}; retrying in {delay} ms (attempt {} of {})",
                            method.as_str(),
                            attempt + 1,
                            retry::MAX_ATTEMPTS
                        ),
                    );
                    self.platform.sleep_ms(delay);
                    attempt += 1;
                    continue;
                }
            }
            return outcome.map_err(|e| self.transport_failure(&e, what));
        }
    }

    fn transport_failure(&self, e: &TransportError, what: &str) -> Failure {
        error::from_transport(e, &self.config.endpoint.authority, what)
    }
}
