//! What the broker needs from its surroundings: one HTTP exchange, clocks,
//! sleeping and logging.
//!
//! The protocol logic is written against the [`Platform`] trait so that it
//! runs unchanged inside the component (where `http.rs` implements it with
//! WASI) and in native unit tests (where a scripted fake implements it).

/// The HTTP methods the IoT Hub REST API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Read a device or twin.
    Get,
    /// Create a device.
    Put,
    /// Merge-patch a twin.
    Patch,
    /// Delete a device.
    Delete,
    /// Run a query.
    Post,
}

impl Method {
    /// The method as it appears on the wire and in log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Post => "POST",
        }
    }
}

/// One fully prepared request: everything the transport needs, nothing it
/// has to decide.
#[derive(Debug, Clone)]
pub struct Request {
    /// The HTTP method.
    pub method: Method,
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host[:port]` to connect to.
    pub authority: String,
    /// Path and query string, starting with `/`.
    pub path_and_query: String,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body, if the method carries one.
    pub body: Option<Vec<u8>>,
}

/// The URL scheme of the hub endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (the local emulator).
    Http,
    /// HTTPS (the real service).
    Https,
}

/// A complete response: status, headers and the whole body.
#[derive(Debug, Clone, Default)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The response body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of a header, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why an HTTP exchange produced no response. Kept separate from HTTP error
/// statuses because the remedies differ (grant egress, fix the endpoint,
/// wait for the network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The host's egress policy refused the connection.
    Denied,
    /// A connect, first-byte or read timeout.
    Timeout(String),
    /// The connection could not be made or broke off.
    Connection(String),
    /// The host name did not resolve.
    Dns(String),
    /// TLS failed (certificate or protocol).
    Tls(String),
    /// The request was malformed (bad URI, bad header); a configuration bug.
    InvalidRequest(String),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportError::Denied => f.write_str("denied by the host"),
            TransportError::Timeout(d)
            | TransportError::Connection(d)
            | TransportError::Dns(d)
            | TransportError::Tls(d)
            | TransportError::InvalidRequest(d)
            | TransportError::Other(d) => f.write_str(d),
        }
    }
}

impl TransportError {
    /// Whether trying again soon may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TransportError::Timeout(_) | TransportError::Connection(_)
        )
    }
}

/// Log levels, mirroring the host's `log` interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Detail for debugging.
    Debug,
    /// Normal operations.
    Info,
    /// Something went wrong but was handled.
    Warn,
    /// An operation failed.
    Error,
}

/// The broker's view of the outside world.
pub trait Platform {
    /// Perform one HTTP exchange.
    fn send(&mut self, request: &Request) -> Result<Response, TransportError>;
    /// Seconds since the Unix epoch (wall clock), for SAS expiry.
    fn unix_secs(&self) -> u64;
    /// A monotonic clock in milliseconds, for retry budgets.
    fn monotonic_ms(&self) -> u64;
    /// Block for `ms` milliseconds.
    fn sleep_ms(&mut self, ms: u64);
    /// Write a line to the host log. Never pass secrets.
    fn log(&self, level: Level, message: &str);
}
