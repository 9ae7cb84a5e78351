//! The component's [`Platform`]: WASI HTTP, clocks and the host's log.
//!
//! Only built for wasm32. Uses the blocking `outgoing_handler::handle` →
//! `subscribe().block()` → `get()` pattern, which keeps the component small
//! and has proved reliable.

use crate::bindings::para::broker::log as host_log;
use crate::platform::{Level, Method, Platform, Request, Response, Scheme, TransportError};
use ::wasi::http::outgoing_handler;
use ::wasi::http::types::{
    ErrorCode, Fields, Method as WasiMethod, OutgoingBody, OutgoingRequest, RequestOptions,
    Scheme as WasiScheme,
};
use ::wasi::io::streams::StreamError;

/// Connect timeout: a hub that cannot be reached in this time is reported
/// as unavailable rather than hanging an API call.
const CONNECT_TIMEOUT_NS: u64 = 5_000_000_000;
/// Time allowed for the first byte of the response.
const FIRST_BYTE_TIMEOUT_NS: u64 = 5_000_000_000;
/// Time allowed between response body chunks.
const BETWEEN_BYTES_TIMEOUT_NS: u64 = 5_000_000_000;
/// Largest response body read; a query page of 100 twins is far smaller.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// `blocking-write-and-flush` accepts at most 4096 bytes per call.
const WRITE_CHUNK: usize = 4096;

/// The real platform inside the component.
pub struct Wasi;

impl Platform for Wasi {
    fn send(&mut self, request: &Request) -> Result<Response, TransportError> {
        send(request)
    }

    fn unix_secs(&self) -> u64 {
        ::wasi::clocks::wall_clock::now().seconds
    }

    fn monotonic_ms(&self) -> u64 {
        ::wasi::clocks::monotonic_clock::now() / 1_000_000
    }

    fn sleep_ms(&mut self, ms: u64) {
        ::wasi::clocks::monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => host_log::Level::Debug,
            Level::Info => host_log::Level::Info,
            Level::Warn => host_log::Level::Warn,
            Level::Error => host_log::Level::Error,
        };
        host_log::log(level, message);
    }
}

fn send(request: &Request) -> Result<Response, TransportError> {
    let entries: Vec<(String, Vec<u8>)> = request
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
        .collect();
    let headers = Fields::from_list(&entries)
        .map_err(|_| TransportError::InvalidRequest("a request header was rejected".into()))?;
    let outgoing = OutgoingRequest::new(headers);
    let method = match request.method {
        Method::Get => WasiMethod::Get,
        Method::Put => WasiMethod::Put,
        Method::Patch => WasiMethod::Patch,
        Method::Delete => WasiMethod::Delete,
        Method::Post => WasiMethod::Post,
    };
    let scheme = match request.scheme {
        Scheme::Http => WasiScheme::Http,
        Scheme::Https => WasiScheme::Https,
    };
    let invalid = |what: &str| TransportError::InvalidRequest(format!("invalid {what}"));
    outgoing
        .set_method(&method)
        .map_err(|()| invalid("method"))?;
    outgoing
        .set_scheme(Some(&scheme))
        .map_err(|()| invalid("scheme"))?;
    outgoing
        .set_authority(Some(&request.authority))
        .map_err(|()| invalid("authority"))?;
    outgoing
        .set_path_with_query(Some(&request.path_and_query))
        .map_err(|()| invalid("path"))?;

    let options = RequestOptions::new();
    // An error means the host does not support that timeout; carry on.
    let _ = options.set_connect_timeout(Some(CONNECT_TIMEOUT_NS));
    let _ = options.set_first_byte_timeout(Some(FIRST_BYTE_TIMEOUT_NS));
    let _ = options.set_between_bytes_timeout(Some(BETWEEN_BYTES_TIMEOUT_NS));

    // The body resource must be taken before the request is handed over.
    let body = match &request.body {
        Some(_) => Some(
            outgoing
                .body()
                .map_err(|()| TransportError::Other("request body unavailable".into()))?,
        ),
        None => None,
    };
    let future = outgoing_handler::handle(outgoing, Some(options)).map_err(map_error_code)?;

    if let (Some(body), Some(bytes)) = (body, &request.body) {
        let written = write_body(&body, bytes);
        match written {
            Ok(()) => OutgoingBody::finish(body, None).map_err(map_error_code)?,
            Err(write_error) => {
                // A denied or failed request closes the body stream; the
                // real reason is on the response future.
                drop(body);
                future.subscribe().block();
                return match future.get() {
                    Some(Ok(Err(code))) => Err(map_error_code(code)),
                    _ => Err(TransportError::Connection(format!(
                        "sending the request body failed: {write_error}"
                    ))),
                };
            }
        }
    }

    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(code))) => return Err(map_error_code(code)),
        Some(Err(())) => return Err(TransportError::Other("response already taken".into())),
        None => {
            return Err(TransportError::Other(
                "response not ready after waiting".into(),
            ));
        }
    };
    let status = response.status();
    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect();
    let incoming = response
        .consume()
        .map_err(|()| TransportError::Other("response body unavailable".into()))?;
    let stream = incoming
        .stream()
        .map_err(|()| TransportError::Other("response body stream unavailable".into()))?;
    let mut body = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(TransportError::Other(format!(
                        "response body larger than {MAX_BODY_BYTES} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                let detail = match ::wasi::http::types::http_error_code(&e) {
                    Some(code) => return Err(map_error_code(code)),
                    None => e.to_debug_string(),
                };
                return Err(TransportError::Connection(format!(
                    "reading the response body failed: {detail}"
                )));
            }
        }
    }
    drop(stream);
    drop(incoming);
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn write_body(body: &OutgoingBody, bytes: &[u8]) -> Result<(), String> {
    let stream = body
        .write()
        .map_err(|()| "body stream unavailable".to_string())?;
    for chunk in bytes.chunks(WRITE_CHUNK) {
        match stream.blocking_write_and_flush(chunk) {
            Ok(()) => {}
            Err(StreamError::Closed) => return Err("the connection was closed".into()),
            Err(StreamError::LastOperationFailed(e)) => return Err(e.to_debug_string()),
        }
    }
    Ok(())
}

fn map_error_code(code: ErrorCode) -> TransportError {
    use ErrorCode as E;
    let name = code_name(&code);
    match code {
        E::HttpRequestDenied => TransportError::Denied,
        E::DnsTimeout
        | E::ConnectionTimeout
        | E::ConnectionReadTimeout
        | E::ConnectionWriteTimeout
        | E::HttpResponseTimeout => TransportError::Timeout(name.into()),
        E::DnsError(p) => TransportError::Dns(match p.rcode {
            Some(rcode) => format!("{name} {rcode}"),
            None => name.into(),
        }),
        E::DestinationNotFound => TransportError::Dns(name.into()),
        E::ConnectionRefused
        | E::ConnectionTerminated
        | E::DestinationUnavailable
        | E::DestinationIpProhibited
        | E::DestinationIpUnroutable
        | E::ConnectionLimitReached
        | E::HttpResponseIncomplete => TransportError::Connection(name.into()),
        E::TlsProtocolError | E::TlsCertificateError | E::TlsAlertReceived(_) => {
            TransportError::Tls(name.into())
        }
        E::HttpRequestUriInvalid | E::HttpRequestMethodInvalid | E::HttpRequestUriTooLong => {
            TransportError::InvalidRequest(name.into())
        }
        E::InternalError(Some(m)) => TransportError::Other(format!("{name}: {m}")),
        _ => TransportError::Other(name.into()),
    }
}

/// The WASI error's name, without pulling in the generated `Debug` impl.
fn code_name(code: &ErrorCode) -> &'static str {
    use ErrorCode as E;
    match code {
        E::DnsTimeout => "DNS timeout",
        E::DnsError(_) => "DNS error",
        E::DestinationNotFound => "destination not found",
        E::DestinationUnavailable => "destination unavailable",
        E::DestinationIpProhibited => "destination IP prohibited",
        E::DestinationIpUnroutable => "destination IP unroutable",
        E::ConnectionRefused => "connection refused",
        E::ConnectionTerminated => "connection terminated",
        E::ConnectionTimeout => "connect timed out",
        E::ConnectionReadTimeout => "read timed out",
        E::ConnectionWriteTimeout => "write timed out",
        E::ConnectionLimitReached => "connection limit reached",
        E::TlsProtocolError => "TLS protocol error",
        E::TlsCertificateError => "TLS certificate error",
        E::TlsAlertReceived(_) => "TLS alert received",
        E::HttpRequestDenied => "request denied by the host",
        E::HttpRequestLengthRequired => "request length required",
        E::HttpRequestBodySize(_) => "request body size",
        E::HttpRequestMethodInvalid => "request method invalid",
        E::HttpRequestUriInvalid => "request URI invalid",
        E::HttpRequestUriTooLong => "request URI too long",
        E::HttpRequestHeaderSectionSize(_) | E::HttpRequestHeaderSize(_) => {
            "request headers too large"
        }
        E::HttpRequestTrailerSectionSize(_) | E::HttpRequestTrailerSize(_) => {
            "request trailers too large"
        }
        E::HttpResponseIncomplete => "response incomplete",
        E::HttpResponseHeaderSectionSize(_) | E::HttpResponseHeaderSize(_) => {
            "response headers too large"
        }
        E::HttpResponseBodySize(_) => "response body too large",
        E::HttpResponseTrailerSectionSize(_) | E::HttpResponseTrailerSize(_) => {
            "response trailers too large"
        }
        E::HttpResponseTransferCoding(_) => "response transfer coding",
        E::HttpResponseContentCoding(_) => "response content coding",
        E::HttpResponseTimeout => "response timed out",
        E::HttpUpgradeFailed => "HTTP upgrade failed",
        E::HttpProtocolError => "HTTP protocol error",
        E::LoopDetected => "loop detected",
        E::ConfigurationError => "configuration error",
        E::InternalError(_) => "internal error",
    }
}
