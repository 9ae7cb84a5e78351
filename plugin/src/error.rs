//! Failures, and how Azure's errors become them.
//!
//! [`Failure`] mirrors the WIT `broker-error` so the protocol code (and its
//! native tests) need no generated bindings; `lib.rs` converts at the edge.
//! Azure reports errors in three body formats plus an `iothub-errorcode`
//! header; [`parse_error`] reads all of them so every message can quote
//! Azure's code and text and say what to do.

use crate::platform::{Response, TransportError};
use serde_json::{Map, Value};

/// How long to wait after a 429 that did not say (the service's own
/// throttling text says "Wait 10 seconds").
pub const DEFAULT_RETRY_AFTER_MS: u64 = 10_000;

/// How long to wait after the daily message quota ran out. The quota resets
/// at 00:00 UTC, so retrying sooner than hourly only burns requests.
pub const QUOTA_RETRY_AFTER_MS: u64 = 3_600_000;

/// An operation's failure, one case per WIT `broker-error` case. Every
/// message is meant for a person and says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The device does not exist in the hub.
    NotFound(String),
    /// The device exists in a conflicting state.
    Conflict(String),
    /// The hub refused the broker's credentials.
    Unauthorized(String),
    /// The hub is throttling; retry after the delay.
    Throttled {
        /// How long to wait, in ms.
        retry_after_ms: u64,
        /// Why, and what to do.
        message: String,
    },
    /// The hub is unreachable or failed transiently.
    Unavailable(String),
    /// The thing's data cannot be represented in the hub.
    InvalidInput(String),
    /// The broker's configuration is missing or wrong.
    Misconfigured(String),
}

impl Failure {
    /// The case name, for log lines.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::NotFound(_) => "not-found",
            Failure::Conflict(_) => "conflict",
            Failure::Unauthorized(_) => "unauthorized",
            Failure::Throttled { .. } => "throttled",
            Failure::Unavailable(_) => "unavailable",
            Failure::InvalidInput(_) => "invalid-input",
            Failure::Misconfigured(_) => "misconfigured",
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            Failure::NotFound(m)
            | Failure::Conflict(m)
            | Failure::Unauthorized(m)
            | Failure::Unavailable(m)
            | Failure::InvalidInput(m)
            | Failure::Misconfigured(m) => m,
            Failure::Throttled { message, .. } => message,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind(), self.message())
    }
}

/// Azure's error, as far as the response revealed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AzureError {
    /// The HTTP status.
    pub status: u16,
    /// The symbolic code, e.g. `DeviceNotFound`.
    pub code_name: Option<String>,
    /// The six-digit code, e.g. `404001`.
    pub code_number: Option<u32>,
    /// Azure's explanation.
    pub text: String,
    /// Azure's tracking id, which support asks for.
    pub tracking_id: Option<String>,
}

/// Known codes (from the "IoT Hub API common error codes" page), so a
/// message carries both the name and the number whichever one Azure sent.
const CODES: &[(u32, &str)] = &[
    (400001, "InvalidProtocolVersion"),
    (400003, "InvalidOperation"),
    (400004, "ArgumentInvalid"),
    (400005, "ArgumentNull"),
    (400006, "IotHubFormatError"),
    (400011, "DeviceDefinedMultipleTimes"),
    (400013, "BulkRegistryOperationFailure"),
    (401002, "IotHubUnauthorizedAccess"),
    (403002, "IotHubQuotaExceeded"),
    (403004, "DeviceMaximumQueueDepthExceeded"),
    (404001, "DeviceNotFound"),
    (404010, "ModuleNotFound"),
    (404103, "DeviceNotOnline"),
    (408000, "RequestTimeout"),
    (409001, "DeviceAlreadyExists"),
    (409301, "ModuleAlreadyExistsOnDevice"),
    (412001, "PreconditionFailed"),
    (413001, "MessageTooLarge"),
    (413002, "TooManyDevices"),
    (429000, "GenericTooManyRequests"),
    (429001, "ThrottlingException"),
    (429002, "ThrottleBacklogLimitExceeded"),
    (429003, "ThrottlingBacklogTimeout"),
    (429004, "ThrottlingMaxActiveJobCountExceeded"),
    (429005, "DeviceThrottlingLimitExceeded"),
    (500001, "ServerError"),
    (503001, "ServiceUnavailable"),
    (504101, "GatewayTimeout"),
];

const MAX_TEXT: usize = 400;

impl AzureError {
    /// `Name (number)`, whichever parts are known, for messages.
    pub fn code(&self) -> String {
        match (&self.code_name, self.code_number) {
            (Some(n), Some(c)) => format!("{n} ({c})"),
            (Some(n), None) => n.clone(),
            (None, Some(c)) => c.to_string(),
            (None, None) => "no error code".into(),
        }
    }

    /// Whether the error is the given code, by name or number.
    pub fn is(&self, name: &str, number: u32) -> bool {
        self.code_number == Some(number)
            || self
                .code_name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
    }

    fn describe(&self, what: &str) -> String {
        let mut s = format!(
            "Azure IoT Hub answered HTTP {} {} while {what}",
            self.status,
            self.code()
        );
        if !self.text.is_empty() {
            s.push_str(": ");
            s.push_str(&self.text);
        }
        if let Some(t) = &self.tracking_id {
            s.push_str(&format!(" (tracking id {t})"));
        }
        s
    }
}

/// Reads Azure's error from a status, the `iothub-errorcode` header and the
/// body, accepting all three body formats (§7.2): classic
/// `{"Message":"ErrorCode:X;text"}`, `Message` holding escaped JSON, and
/// `Message` (or the top level) as an object with `errorCode`.
pub fn parse_error(status: u16, header_code: Option<&str>, body: &[u8]) -> AzureError {
    let mut e = AzureError {
        status,
        ..AzureError::default()
    };
    if let Some(h) = header_code.map(str::trim).filter(|h| !h.is_empty()) {
        absorb_code(&mut e, h);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => absorb_object(&mut e, &o, 0),
        Ok(Value::String(s)) => absorb_message(&mut e, &s, 0),
        _ => {
            let text = String::from_utf8_lossy(body);
            e.text = text.trim().to_string();
        }
    }
    e.text = truncate(e.text.trim());
    match (&e.code_name, e.code_number) {
        (None, Some(n)) => {
            e.code_name = CODES
                .iter()
                .find(|(c, _)| *c == n)
                .map(|(_, s)| s.to_string());
        }
        (Some(name), None) => {
            e.code_number = CODES
                .iter()
                .find(|(_, s)| s.eq_ignore_ascii_case(name))
                .map(|(c, _)| *c);
        }
        _ => {}
    }
    e
}

fn absorb_code(e: &mut AzureError, code: &str) {
    match code.parse::<u32>() {
        Ok(n) => e.code_number = e.code_number.or(Some(n)),
        Err(_) => {
            if e.code_name.is_none() {
                e.code_name = Some(code.to_string());
            }
        }
    }
}

fn absorb_object(e: &mut AzureError, o: &Map<String, Value>, depth: u8) {
    if depth > 3 {
        return;
    }
    for key in ["errorCode", "ErrorCode", "code"] {
        match o.get(key) {
            Some(Value::Number(n)) => {
                if let Some(n) = n.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    e.code_number = e.code_number.or(Some(n));
                }
            }
            Some(Value::String(s)) if !s.is_empty() => absorb_code(e, s),
            _ => {}
        }
    }
    for key in ["trackingId", "TrackingId"] {
        if let Some(Value::String(t)) = o.get(key) {
            e.tracking_id.get_or_insert_with(|| t.clone());
        }
    }
    if let Some(Value::String(x)) = o.get("ExceptionMessage")
        && let Some(rest) = x.trim().strip_prefix("Tracking ID:")
    {
        let id = rest.split(['-', ' ']).next().unwrap_or_default();
        if !id.is_empty() {
            e.tracking_id.get_or_insert_with(|| id.to_string());
        }
    }
    for key in ["Message", "message"] {
        match o.get(key) {
            Some(Value::String(s)) => {
                absorb_message(e, s, depth + 1);
                break;
            }
            Some(Value::Object(inner)) => {
                absorb_object(e, inner, depth + 1);
                break;
            }
            _ => {}
        }
    }
}

fn absorb_message(e: &mut AzureError, s: &str, depth: u8) {
    let t = s.trim();
    if t.starts_with('{')
        && let Ok(Value::Object(inner)) = serde_json::from_str::<Value>(t)
    {
        absorb_object(e, &inner, depth + 1);
        return;
    }
    if let Some(rest) = t.strip_prefix("ErrorCode:") {
        let (code, text) = rest.split_once(';').unwrap_or((rest, ""));
        absorb_code(e, code.trim());
        e.text = text.trim().to_string();
    } else if e.text.is_empty() {
        e.text = t.to_string();
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_string();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The delay a response asks for: `retry-after-ms`/`x-ms-retry-after-ms`
/// in ms, or `Retry-After` in whole seconds. `None` when absent or not a
/// number (an HTTP-date is not worth a date parser here).
pub fn retry_after_ms(resp: &Response) -> Option<u64> {
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(ms) = resp.header(name).and_then(|v| v.trim().parse::<u64>().ok()) {
            return Some(ms);
        }
    }
    let secs = resp.header("retry-after")?.trim().parse::<u64>().ok()?;
    Some(secs.saturating_mul(1000))
}

/// Whether a status is worth retrying soon: timeouts, throttling and
/// server-side failures.
pub fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// What to tell the operator to check when credentials are refused.
const CREDENTIALS_ADVICE: &str = "Check para.azure.iot_access_key and para.azure.iot_policy_name: the policy needs RegistryRead, RegistryWrite and ServiceConnect permissions, and the host clock must be correct because SAS tokens expire.";

/// Maps an unsuccessful response to a [`Failure`]. `what` describes the
/// operation in the gerund ("creating device 'app:1'").
pub fn from_response(resp: &Response, what: &str) -> Failure {
    let e = parse_error(resp.status, resp.header("iothub-errorcode"), &resp.body);
    from_azure(&e, retry_after_ms(resp), what)
}

/// Maps a parsed Azure error to a [`Failure`] (see [`from_response`]).
pub fn from_azure(e: &AzureError, retry_after: Option<u64>, what: &str) -> Failure {
    let d = e.describe(what);
    match e.status {
        400 => Failure::InvalidInput(format!(
            "{d}. The hub rejected the request as invalid: check the thing's appid, id and deviceState against Azure's rules for device IDs and twins."
        )),
        413 => Failure::InvalidInput(format!(
            "{d}. The request is too large for the hub: make deviceState smaller."
        )),
        403 if e.is("IotHubQuotaExceeded", 403002) => {
            let retry_after_ms = retry_after.unwrap_or(QUOTA_RETRY_AFTER_MS);
            Failure::Throttled {
                retry_after_ms,
                message: format!(
                    "{d}. The hub's daily message quota is used up; it resets at 00:00 UTC, or raise the hub's tier or units."
                ),
            }
        }
        401 | 403 => Failure::Unauthorized(format!("{d}. {CREDENTIALS_ADVICE}")),
        404 => Failure::NotFound(format!(
            "{d}. The device does not exist in the hub (it may have been deleted outside Para); delete the thing and create it again."
        )),
        409 => Failure::Conflict(format!(
            "{d}. The device exists in a conflicting state; check it in the Azure portal."
        )),
        412 => Failure::Conflict(format!(
            "{d}. The device changed at the same time; retry the request."
        )),
        429 => {
            let retry_after_ms = retry_after.unwrap_or(DEFAULT_RETRY_AFTER_MS);
            Failure::Throttled {
                retry_after_ms,
                message: format!(
                    "{d}. The hub is throttling requests; retry after {} s, or add hub units if this persists.",
                    retry_after_ms.div_ceil(1000)
                ),
            }
        }
        s if s == 408 || s >= 500 => Failure::Unavailable(format!(
            "{d}. Azure IoT Hub failed or timed out; retry later, and check the Azure status page if it persists."
        )),
        _ => Failure::Unavailable(format!(
            "{d}. This status is unexpected; check para.azure.iot_endpoint and the hub's state in the Azure portal."
        )),
    }
}

/// Maps a failed exchange (no HTTP response) to a [`Failure`].
/// `authority` is the `host:port` contacted, `what` the operation.
pub fn from_transport(err: &TransportError, authority: &str, what: &str) -> Failure {
    match err {
        TransportError::Denied => Failure::Misconfigured(format!(
            "the host refused the connection to {authority} while {what}; grant it in para.brokers.Azure.allowed_hosts"
        )),
        TransportError::Timeout(d) => Failure::Unavailable(format!(
            "timed out talking to {authority} while {what} ({d}); the hub is slow or unreachable, retry later"
        )),
        TransportError::Connection(d) => Failure::Unavailable(format!(
            "could not reach {authority} while {what} ({d}); check the network, para.azure.iot_hostname and para.azure.iot_endpoint, then retry"
        )),
        TransportError::Dns(d) => Failure::Unavailable(format!(
            "could not resolve {authority} while {what} ({d}); check para.azure.iot_hostname and para.azure.iot_endpoint"
        )),
        TransportError::Tls(d) => Failure::Unavailable(format!(
            "TLS with {authority} failed while {what} ({d}); check para.azure.iot_endpoint points at the hub"
        )),
        TransportError::InvalidRequest(d) => Failure::Misconfigured(format!(
            "the request to {authority} could not be built while {what} ({d}); check para.azure.iot_hostname and para.azure.iot_endpoint"
        )),
        TransportError::Other(d) => Failure::Unavailable(format!(
            "the request to {authority} failed while {what} ({d}); retry later"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn classic_format() {
        let e = parse_error(
            404,
            None,
            br#"{"Message":"ErrorCode:DeviceNotFound;Device abc not registered.","ExceptionMessage":"Tracking ID:0123abcd-G:5-TimeStamp:01/02/2024 10:11:12"}"#,
        );
        assert_eq!(e.code_name.as_deref(), Some("DeviceNotFound"));
        assert_eq!(e.code_number, Some(404001));
        assert_eq!(e.text, "Device abc not registered.");
        assert_eq!(e.tracking_id.as_deref(), Some("0123abcd"));
    }

    #[test]
    fn escaped_json_format() {
        let e = parse_error(
            404,
            None,
            br#"{"Message":"{\"errorCode\":404103,\"trackingId\":\"t1\",\"message\":\"Device is not online\",\"timestampUtc\":\"2024-01-01T00:00:00Z\"}"}"#,
        );
        assert_eq!(e.code_number, Some(404103));
        assert_eq!(e.code_name.as_deref(), Some("DeviceNotOnline"));
        assert_eq!(e.text, "Device is not online");
        assert_eq!(e.tracking_id.as_deref(), Some("t1"));
    }

    #[test]
    fn object_formats() {
        let e = parse_error(
            404,
            None,
            br#"{"Message":{"errorCode":404001,"trackingId":"t2","message":"gone","timestampUtc":"x"}}"#,
        );
        assert_eq!((e.code_number, e.text.as_str()), (Some(404001), "gone"));
        assert_eq!(e.code_name.as_deref(), Some("DeviceNotFound"));
        let e = parse_error(409, None, br#"{"errorCode":409002,"message":"dup"}"#);
        assert_eq!((e.code_number, e.text.as_str()), (Some(409002), "dup"));
    }

    #[test]
    fn header_and_plain_bodies() {
        let e = parse_error(429, Some("ThrottlingException"), b"slow down");
        assert_eq!(e.code_name.as_deref(), Some("ThrottlingException"));
        assert_eq!(e.code_number, Some(429001));
        assert_eq!(e.text, "slow down");
        let e = parse_error(500, None, b"");
        assert_eq!(e.code(), "no error code");
        let long = "x".repeat(2000);
        assert!(parse_error(500, None, long.as_bytes()).text.len() < 500);
    }

    #[test]
    fn status_mapping() {
        let what = "creating device 'a:1'";
        let cases: &[(u16, &str)] = &[
            (400, "invalid-input"),
            (401, "unauthorized"),
            (403, "unauthorized"),
            (404, "not-found"),
            (408, "unavailable"),
            (409, "conflict"),
            (412, "conflict"),
            (413, "invalid-input"),
            (429, "throttled"),
            (500, "unavailable"),
            (503, "unavailable"),
            (504, "unavailable"),
        ];
        for (status, kind) in cases {
            let f = from_response(
                &resp(*status, &[], r#"{"Message":"ErrorCode:X;boom"}"#),
                what,
            );
            assert_eq!(f.kind(), *kind, "status {status}");
            assert!(
                f.message().contains("X") && f.message().contains("boom"),
                "{f}"
            );
            assert!(f.message().contains(what), "{f}");
        }
    }

    #[test]
    fn quota_is_throttled() {
        let f = from_response(
            &resp(403, &[("iothub-errorcode", "IotHubQuotaExceeded")], "{}"),
            "x",
        );
        assert_eq!(f.kind(), "throttled");
        assert!(matches!(
            f,
            Failure::Throttled {
                retry_after_ms: QUOTA_RETRY_AFTER_MS,
                ..
            }
        ));
        let f = from_response(&resp(403, &[], r#"{"Message":{"errorCode":403002}}"#), "x");
        assert_eq!(f.kind(), "throttled");
    }

    #[test]
    fn throttling_retry_after() {
        let f = from_response(&resp(429, &[("Retry-After", "3")], ""), "x");
        assert!(
            matches!(
                f,
                Failure::Throttled {
                    retry_after_ms: 3000,
                    ..
                }
            ),
            "{f:?}"
        );
        let f = from_response(&resp(429, &[], ""), "x");
        assert!(matches!(
            f,
            Failure::Throttled {
                retry_after_ms: DEFAULT_RETRY_AFTER_MS,
                ..
            }
        ));
        let f = from_response(&resp(429, &[("retry-after-ms", "250")], ""), "x");
        assert!(matches!(
            f,
            Failure::Throttled {
                retry_after_ms: 250,
                ..
            }
        ));
        assert_eq!(
            retry_after_ms(&resp(
                429,
                &[("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT")],
                ""
            )),
            None
        );
    }

    #[test]
    fn unauthorized_says_what_to_check() {
        let f = from_response(
            &resp(
                401,
                &[("iothub-errorcode", "IotHubUnauthorizedAccess")],
                r#"{"Message":"ErrorCode:IotHubUnauthorizedAccess;Unauthorized"}"#,
            ),
            "x",
        );
        assert!(
            f.message().contains("IotHubUnauthorizedAccess (401002)"),
            "{f}"
        );
        assert!(f.message().contains("para.azure.iot_access_key"), "{f}");
    }

    #[test]
    fn transport_mapping() {
        let f = from_transport(&TransportError::Denied, "hub:443", "creating device 'a:1'");
        assert_eq!(f.kind(), "misconfigured");
        assert!(f.message().contains("para.brokers.Azure.allowed_hosts"));
        assert!(f.message().contains("hub:443"));
        assert_eq!(
            from_transport(&TransportError::Timeout("connect".into()), "h", "x").kind(),
            "unavailable"
        );
        assert!(TransportError::Connection("refused".into()).is_transient());
        assert!(!TransportError::Denied.is_transient());
    }
}
