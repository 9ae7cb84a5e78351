//! Deterministic fault injection, controlled by tests through `POST /_emulator/faults`.
//!
//! Exists so the broker's retry and error handling can be tested against throttling, outages,
//! latency and dropped connections without any randomness. Faults are decided before a request
//! is authenticated, parsed or applied, so a faulted request never has a side effect.
//!
//! Rule JSON (unknown fields are rejected):
//! ```json
//! {"method": "PUT", "pathPrefix": "/devices/", "count": 2,
//!  "kind": "status", "status": 429, "retryAfter": 3}
//! ```
//! - `method` (optional): HTTP method, case-insensitive. `pathPrefix` (optional): prefix of the
//!   raw request path (without the query string).
//! - `count` (affect the first N matching requests) or `every` (affect the Nth, 2Nth, …
//!   matching request, forever). Neither: `count` = 1. Both: rejected.
//! - `kind`: `status` (with `status`, optional `errorCode`, `message`, `retryAfter` seconds),
//!   `delayMs` (with `delayMs`; the request then proceeds normally), or `drop` (the connection
//!   is closed without a response).
//!
//! Every rule whose matchers match a request counts it; the first rule (in installation order)
//! that fires decides the fault.
//!
//! AMQP kinds (the Event Hub-compatible endpoint, `amqp.rs`) never match HTTP requests and take
//! no matchers, `count` or `every`; each fires once:
//! - `amqpDrop`: closes every open AMQP connection abruptly (TCP FIN without an AMQP `close`
//!   frame or TLS close_notify): at once when installed, or, with `afterDeliveries: N`, right
//!   after the next N deliveries (counted over all receivers).
//! - `amqpExpireTokens`: treats every connection's CBS token as expired now, so receivers are
//!   detached with `amqp:unauthorized-access` (as when a short-lived token runs out).

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorCode};

/// What a firing rule does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum FaultAction {
    /// Answer with an error status and a classic error body.
    Status {
        /// The HTTP status.
        status: u16,
        /// The `ErrorCode:` name.
        #[serde(rename = "errorCode")]
        error_code: String,
        /// The error text.
        message: String,
        /// `Retry-After` seconds, if any.
        #[serde(rename = "retryAfter", skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
    },
    /// Sleep, then process the request normally.
    DelayMs {
        /// How long to sleep.
        #[serde(rename = "delayMs")]
        delay_ms: u64,
    },
    /// Close the connection without a response.
    Drop,
    /// Close every AMQP connection abruptly, now or after N deliveries.
    AmqpDrop {
        /// Deliveries to let through first (`None`: drop at once).
        #[serde(rename = "afterDeliveries", skip_serializing_if = "Option::is_none")]
        after_deliveries: Option<u64>,
    },
    /// Expire the CBS authorization of every AMQP connection now.
    AmqpExpireTokens,
}

impl FaultAction {
    /// Whether this is an AMQP fault (never applied to HTTP requests).
    pub fn is_amqp(&self) -> bool {
        matches!(
            self,
            FaultAction::AmqpDrop { .. } | FaultAction::AmqpExpireTokens
        )
    }
}

/// The JSON a test posts for one rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultRuleSpec {
    /// Method matcher.
    pub method: Option<String>,
    /// Path prefix matcher.
    pub path_prefix: Option<String>,
    /// Affect the first N matching requests.
    pub count: Option<u64>,
    /// Affect every Nth matching request.
    pub every: Option<u64>,
    /// `status`, `delayMs` or `drop`.
    pub kind: String,
    /// For `status`.
    pub status: Option<u16>,
    /// For `status`: override the error name.
    pub error_code: Option<String>,
    /// For `status`: override the error text.
    pub message: Option<String>,
    /// For `status`: `Retry-After` seconds.
    pub retry_after: Option<u64>,
    /// For `delayMs`.
    pub delay_ms: Option<u64>,
    /// For `amqpDrop`: deliveries to let through before dropping.
    pub after_deliveries: Option<u64>,
}

/// An installed rule with its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultRule {
    /// Position-independent id, for reading `GET /_emulator/faults`.
    pub id: u64,
    /// Method matcher (upper-case).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Path prefix matcher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// First-N limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Every-Nth period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub every: Option<u64>,
    /// What it does.
    pub action: FaultAction,
    /// Matching requests seen so far.
    pub matched: u64,
    /// Requests affected so far.
    pub applied: u64,
}

fn default_error(status: u16) -> (ErrorCode, &'static str) {
    match status {
        408 => (
            ErrorCode::RequestTimeout,
            "Request timed out (injected fault).",
        ),
        429 => (
            ErrorCode::ThrottlingException,
            "The request has been throttled. Wait and try again. (injected fault)",
        ),
        500 => (
            ErrorCode::ServerError,
            "Internal server error (injected fault).",
        ),
        503 => (
            ErrorCode::ServiceUnavailable,
            "Service unavailable (injected fault).",
        ),
        504 => (
            ErrorCode::GatewayTimeout,
            "Gateway timeout (injected fault).",
        ),
        s if s >= 500 => (ErrorCode::ServerError, "Server error (injected fault)."),
        _ => (ErrorCode::InvalidOperation, "Injected fault."),
    }
}

impl FaultRuleSpec {
    /// Validates the spec and turns it into an installed rule.
    pub fn into_rule(self, id: u64) -> Result<FaultRule, String> {
        if self.count.is_some() && self.every.is_some() {
            return Err("a fault rule takes 'count' or 'every', not both".into());
        }
        if self.count == Some(0) || self.every == Some(0) {
            return Err("'count' and 'every' must be at least 1".into());
        }
        let count = if self.every.is_none() {
            Some(self.count.unwrap_or(1))
        } else {
            None
        };
        let only = |allowed: &[&str]| -> Result<(), String> {
            let present = [
                ("status", self.status.is_some()),
                ("errorCode", self.error_code.is_some()),
                ("message", self.message.is_some()),
                ("retryAfter", self.retry_after.is_some()),
                ("delayMs", self.delay_ms.is_some()),
                ("afterDeliveries", self.after_deliveries.is_some()),
            ];
            match present.iter().find(|(n, p)| *p && !allowed.contains(n)) {
                Some((n, _)) => Err(format!(
                    "field '{n}' does not apply to kind '{}'",
                    self.kind
                )),
                None => Ok(()),
            }
        };
        let action = match self.kind.as_str() {
            "status" => {
                only(&["status", "errorCode", "message", "retryAfter"])?;
                let status = self.status.ok_or("kind 'status' needs a 'status'")?;
                if !(400..=599).contains(&status) {
                    return Err(format!("status {status} is not an error status (400-599)"));
                }
                let (code, text) = default_error(status);
                FaultAction::Status {
                    status,
                    error_code: self
                        .error_code
                        .clone()
                        .unwrap_or_else(|| code.name().to_string()),
                    message: self.message.clone().unwrap_or_else(|| text.to_string()),
                    retry_after: self.retry_after,
                }
            }
            "delayMs" => {
                only(&["delayMs"])?;
                let delay_ms = self.delay_ms.ok_or("kind 'delayMs' needs a 'delayMs'")?;
                if delay_ms > 600_000 {
                    return Err("delayMs is limited to 600000".into());
                }
                FaultAction::DelayMs { delay_ms }
            }
            "drop" => {
                only(&[])?;
                FaultAction::Drop
            }
            "amqpDrop" | "amqpExpireTokens" => {
                if self.method.is_some()
                    || self.path_prefix.is_some()
                    || self.every.is_some()
                    || self.count.is_some_and(|c| c != 1)
                {
                    return Err(format!(
                        "kind '{}' takes no method, pathPrefix, count or every (it fires once)",
                        self.kind
                    ));
                }
                if self.kind == "amqpDrop" {
                    only(&["afterDeliveries"])?;
                    if self.after_deliveries == Some(0) {
                        return Err(
                            "afterDeliveries must be at least 1 (omit it to drop at once)".into(),
                        );
                    }
                    FaultAction::AmqpDrop {
                        after_deliveries: self.after_deliveries,
                    }
                } else {
                    only(&[])?;
                    FaultAction::AmqpExpireTokens
                }
            }
            other => {
                return Err(format!(
                    "unknown fault kind '{other}' (expected status, delayMs, drop, amqpDrop or amqpExpireTokens)"
                ));
            }
        };
        Ok(FaultRule {
            id,
            method: self.method.map(|m| m.to_ascii_uppercase()),
            path_prefix: self.path_prefix,
            count,
            every: self.every,
            action,
            matched: 0,
            applied: 0,
        })
    }
}

impl FaultRule {
    fn matches(&self, method: &str, path: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
    }
}

impl FaultAction {
    /// The error a `status` action answers with.
    pub fn to_error(&self) -> Option<ApiError> {
        match self {
            FaultAction::Status {
                status,
                error_code,
                message,
                retry_after,
            } => {
                let mut e = ApiError {
                    status: *status,
                    name: error_code.clone(),
                    message: message.clone(),
                    headers: vec![],
                };
                if let Some(s) = retry_after {
                    e.headers.push(("Retry-After".into(), s.to_string()));
                }
                Some(e)
            }
            _ => None,
        }
    }
}

/// Counts a request against every matching rule and returns the action of the first rule that
/// fires, if any.
pub fn evaluate(rules: &mut [FaultRule], method: &str, path: &str) -> Option<FaultAction> {
    let mut fired = None;
    for r in rules.iter_mut() {
        if r.action.is_amqp() || !r.matches(method, path) {
            continue;
        }
        r.matched += 1;
        let fires = match (r.count, r.every) {
            (_, Some(n)) => r.matched % n == 0,
            (Some(n), None) => r.applied < n,
            (None, None) => false,
        };
        if fires && fired.is_none() {
            r.applied += 1;
            fired = Some(r.action.clone());
        }
    }
    fired
}

/// Parses the body of `POST /_emulator/faults`: `{"rules":[...]}`, a bare array, or one rule.
pub fn parse_specs(body: &[u8]) -> Result<Vec<FaultRuleSpec>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let list = match v {
        serde_json::Value::Object(mut o) if o.contains_key("rules") => {
            if o.len() != 1 {
                return Err("the body takes only 'rules'".into());
            }
            o.remove("rules").unwrap_or_default()
        }
        serde_json::Value::Array(_) => v,
        other @ serde_json::Value::Object(_) => serde_json::Value::Array(vec![other]),
        _ => {
            return Err("expected {\"rules\":[...]}, an array of rules, or one rule object".into());
        }
    };
    serde_json::from_value(list).map_err(|e| format!("invalid fault rule: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(json: &str) -> Vec<FaultRule> {
        parse_specs(json.as_bytes())
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.into_rule(i as u64 + 1).unwrap())
            .collect()
    }

    #[test]
    fn count_and_every() {
        let mut r = rules(
            r#"{"rules":[{"method":"put","pathPrefix":"/devices/","count":2,"kind":"status","status":429,"retryAfter":3},
                         {"pathPrefix":"/twins/","every":3,"kind":"drop"}]}"#,
        );
        let a = evaluate(&mut r, "PUT", "/devices/x").unwrap();
        let e = a.to_error().unwrap();
        assert_eq!((e.status, e.name.as_str()), (429, "ThrottlingException"));
        assert_eq!(
            e.headers,
            vec![("Retry-After".to_string(), "3".to_string())]
        );
        assert!(evaluate(&mut r, "GET", "/devices/x").is_none());
        assert!(evaluate(&mut r, "PUT", "/devices/x").is_some());
        assert!(evaluate(&mut r, "PUT", "/devices/x").is_none());
        let twin: Vec<bool> = (0..7)
            .map(|_| evaluate(&mut r, "GET", "/twins/a").is_some())
            .collect();
        assert_eq!(twin, [false, false, true, false, false, true, false]);
        assert_eq!(r[0].applied, 2);
        assert_eq!(r[0].matched, 3);
    }

    #[test]
    fn amqp_kinds_never_match_http() {
        let mut r = rules(
            r#"[{"kind":"amqpDrop","afterDeliveries":3},{"kind":"amqpExpireTokens"},{"kind":"amqpDrop"}]"#,
        );
        assert_eq!(
            r[0].action,
            FaultAction::AmqpDrop {
                after_deliveries: Some(3)
            }
        );
        assert_eq!(r[1].action, FaultAction::AmqpExpireTokens);
        assert!(evaluate(&mut r, "GET", "/devices/x").is_none());
        assert_eq!(r[0].matched, 0);
        let v = serde_json::to_value(&r[0]).unwrap();
        assert_eq!(v["action"]["kind"], "amqpDrop");
        assert_eq!(v["action"]["afterDeliveries"], 3);
    }

    #[test]
    fn defaults_and_validation() {
        let r = rules(r#"{"kind":"status","status":503}"#);
        assert_eq!(r[0].count, Some(1));
        let e = r[0].action.to_error().unwrap();
        assert_eq!((e.status, e.name.as_str()), (503, "ServiceUnavailable"));
        let r = rules(r#"[{"kind":"delayMs","delayMs":5}]"#);
        assert_eq!(r[0].action, FaultAction::DelayMs { delay_ms: 5 });
        for bad in [
            r#"{"kind":"status"}"#,
            r#"{"kind":"status","status":200}"#,
            r#"{"kind":"drop","status":500}"#,
            r#"{"kind":"explode"}"#,
            r#"{"kind":"drop","count":1,"every":2}"#,
            r#"{"kind":"drop","every":0}"#,
            r#"{"kind":"drop","colour":"red"}"#,
            r#"{"kind":"amqpDrop","afterDeliveries":0}"#,
            r#"{"kind":"amqpDrop","every":2}"#,
            r#"{"kind":"amqpDrop","pathPrefix":"/"}"#,
            r#"{"kind":"amqpExpireTokens","afterDeliveries":1}"#,
            r#"{"kind":"drop","afterDeliveries":1}"#,
        ] {
            let res = parse_specs(bad.as_bytes()).and_then(|s| {
                s.into_iter()
                    .map(|s| s.into_rule(1))
                    .collect::<Result<Vec<_>, _>>()
            });
            assert!(res.is_err(), "{bad}");
        }
    }
}
