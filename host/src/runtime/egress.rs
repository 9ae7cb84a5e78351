//! Outgoing HTTP for brokers: an allowlist, checked on every request.
//!
//! A broker reaches only the `scheme://host[:port]` entries its config lists
//! in `para.brokers.<Name>.allowed_hosts` (an empty list denies everything,
//! as in Spin and wasmCloud). Entries may use the broker's own config keys as
//! `{key}`, so `https://{iot_hostname}` follows the hub setting.
//!
//! Plain `http://` entries are accepted only for loopback hosts: that is how
//! tests and the local emulator are reached, and nothing else may be called
//! unencrypted. A denied request reaches the guest as the WASI error
//! `HttpRequestDenied`; the instance keeps running.
//!
//! HTTPS trusts the public web PKI plus, if configured, one extra CA
//! (`para.host.tls_ca_file`), so a broker can reach a private hub or the
//! emulator over TLS.

use super::config::expand;
use http_body_util::BodyExt;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// A bad `allowed_hosts` entry, reported at start.
#[derive(Debug, thiserror::Error)]
#[error("allowed_hosts entry {entry:?} of broker {broker}: {why}")]
pub struct EgressConfigError {
    broker: String,
    entry: String,
    why: String,
}

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    https: bool,
    /// Lowercase host; a leading `*.` matches any subdomain.
    host: String,
    port: u16,
}

/// The destinations one broker may call.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    broker: String,
    allowed: Vec<Allowed>,
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if tail.is_empty() => None,
            None => return None,
        };
        return Some((host.to_lowercase(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_lowercase(), Some(p.parse().ok()?))),
        None => Some((authority.to_lowercase(), None)),
    }
}

impl EgressPolicy {
    /// Parses a broker's allowlist, substituting `{key}` from its config.
    pub fn new(
        broker: &str,
        entries: &[String],
        broker_config: &BTreeMap<String, String>,
    ) -> Result<Self, EgressConfigError> {
        let mut allowed = Vec::new();
        for entry in entries {
            let err = |why: String| EgressConfigError {
                broker: broker.to_string(),
                entry: entry.clone(),
                why,
            };
            let Some(expanded) = expand(entry, broker_config) else {
                // The key is not set (yet): the entry allows nothing, and
                // the broker reports its own missing config on each call.
                tracing::warn!(broker, entry = %entry, "allowed_hosts entry names an unset config key; it allows nothing");
                continue;
            };
            let (https, rest) = if let Some(r) = expanded.strip_prefix("https://") {
                (true, r)
            } else if let Some(r) = expanded.strip_prefix("http://") {
                (false, r)
            } else {
                return Err(err(
                    "must start with https:// (or http:// for loopback)".into()
                ));
            };
            let authority = rest.trim_end_matches('/');
            let (host, port) = split_host_port(authority)
                .filter(|(h, _)| !h.is_empty() && !authority.contains('/'))
                .ok_or_else(|| err("expected scheme://host[:port] with no path".into()))?;
            if !https && !is_loopback(&host) {
                return Err(err(
                    "plain http is allowed only for loopback hosts (127.0.0.1, ::1, localhost); use https://"
                        .into(),
                ));
            }
            allowed.push(Allowed {
                https,
                host,
                port: port.unwrap_or(if https { 443 } else { 80 }),
            });
        }
        Ok(EgressPolicy {
            broker: broker.to_string(),
            allowed,
        })
    }

    /// Whether a request to `uri` may go out.
    pub fn allows(&self, uri: &http::Uri) -> bool {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return false,
        };
        let Some(authority) = uri.authority() else {
            return false;
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_lowercase();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        self.allowed.iter().any(|a| {
            let host_ok = match a.host.strip_prefix("*.") {
                Some(suffix) => host.ends_with(&format!(".{suffix}")),
                None => a.host.trim_start_matches('[').trim_end_matches(']') == host,
            };
            a.https == https && a.port == port && host_ok
        })
    }
}

/// TLS trust for brokers' HTTPS calls, built once at start.
#[derive(Clone)]
pub struct TlsRoots(Arc<tokio_rustls::rustls::ClientConfig>);

impl TlsRoots {
    /// Web PKI roots, plus the PEM certificates in `extra_ca` if given.
    pub fn new(extra_ca: Option<&std::path::Path>) -> anyhow::Result<Self> {
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        if let Some(path) = extra_ca {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("cannot read para.host.tls_ca_file {}: {e}", path.display())
            })?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    anyhow::anyhow!("para.host.tls_ca_file {} is not PEM: {e}", path.display())
                })?;
                roots.add(cert)?;
                added += 1;
            }
            if added == 0 {
                anyhow::bail!(
                    "para.host.tls_ca_file {} holds no certificate",
                    path.display()
                );
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsRoots(Arc::new(config)))
    }
}

/// The `wasi:http` hooks of one broker store: allowlist plus TLS roots.
pub struct EgressHooks {
    /// The allowlist.
    pub policy: Arc<EgressPolicy>,
    /// The trust roots.
    pub tls: TlsRoots,
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                ),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        if !self.policy.allows(request.uri()) {
            let scheme = request.uri().scheme_str().unwrap_or("?").to_string();
            let authority = request
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::warn!(
                broker = %self.policy.broker,
                destination = %format!("{scheme}://{authority}"),
                "egress denied: not in allowed_hosts"
            );
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let tls = self.tls.clone();
        Box::new(async move {
            let (res, io) = send(request, options, tls).await?;
            Ok((res, Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

/// Drives the connection after the response head arrived.
type IoFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), HttpError>> + Send>>;

/// Sends one request over a new connection (HTTP/1.1, TLS for https).
/// Modelled on `wasmtime_wasi_http::default_send_request`, with our roots.
async fn send(
    mut req: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    tls: TlsRoots,
) -> Result<(http::Response<WasiBody>, IoFuture), HttpError> {
    let uri = req.uri().clone();
    let authority = uri.authority().ok_or(HttpError::HttpRequestUriInvalid)?;
    let use_tls = uri.scheme_str() == Some("https");
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority
        .port_u16()
        .unwrap_or(if use_tls { 443 } else { 80 });
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(Duration::from_secs(30));
    let first_byte_timeout = options
        .and_then(|o| o.first_byte_timeout)
        .unwrap_or(Duration::from_secs(60));

    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(HttpError::Connect)?;
    let _ = tcp.set_nodelay(true);

    *req.uri_mut() = http::Uri::builder()
        .path_and_query(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .build()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;

    macro_rules! finish {
        ($stream:expr) => {{
            let (mut sender, conn) = tokio::time::timeout(
                connect_timeout,
                hyper::client::conn::http1::handshake(TokioIo::new($stream)),
            )
            .await
            .map_err(|_| HttpError::ConnectionTimeout)?
            .map_err(HttpError::from)?;
            let conn = tokio::spawn(conn);
            let res = tokio::time::timeout(first_byte_timeout, sender.send_request(req))
                .await
                .map_err(|_| HttpError::ConnectionReadTimeout)?
                .map_err(HttpError::from)?;
            let res = res.map(|body| body.map_err(HttpError::from).boxed_unsync());
            let io: IoFuture = Box::pin(async move {
                match conn.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(HttpError::from(e)),
                    Err(_) => Err(HttpError::ConnectionTerminated),
                }
            });
            Ok((res, io))
        }};
    }

    if use_tls {
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(HttpError::InvalidDnsNameError)?;
        let connector = tokio_rustls::TlsConnector::from(tls.0.clone());
        let stream = tokio::time::timeout(connect_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| HttpError::ConnectionTimeout)?
            .map_err(HttpError::Tls)?;
        finish!(stream)
    } else {
        finish!(tcp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> Result<EgressPolicy, EgressConfigError> {
        let mut cfg = BTreeMap::new();
        cfg.insert(
            "iot_hostname".to_string(),
            "hub.azure-devices.net".to_string(),
        );
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        EgressPolicy::new("Azure", &entries, &cfg)
    }

    #[test]
    fn allowlist_matches_scheme_host_and_port() {
        let p = policy(&[
            "https://{iot_hostname}",
            "http://127.0.0.1:8081",
            "https://*.example.com",
        ])
        .unwrap();
        let ok = |u: &str| p.allows(&u.parse().unwrap());
        assert!(ok("https://hub.azure-devices.net/devices/x"));
        assert!(ok("https://HUB.azure-devices.net:443/"));
        assert!(!ok("http://hub.azure-devices.net/"));
        assert!(!ok("https://hub.azure-devices.net:8443/"));
        assert!(ok("http://127.0.0.1:8081/x"));
        assert!(!ok("http://127.0.0.1:8082/x"));
        assert!(ok("https://a.example.com/"));
        assert!(!ok("https://example.com.evil.net/"));
        assert!(!ok("https://evil.net/"));
    }

    #[test]
    fn empty_list_denies_everything() {
        let p = policy(&[]).unwrap();
        assert!(!p.allows(&"https://hub.azure-devices.net/".parse().unwrap()));
    }

    #[test]
    fn plain_http_only_for_loopback() {
        let err = policy(&["http://hub.azure-devices.net"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
        assert!(policy(&["http://localhost:9"]).is_ok());
        assert!(policy(&["http://[::1]:9"]).is_ok());
        let unset = policy(&["https://{nope}"]).unwrap();
        assert!(!unset.allows(&"https://nope/".parse().unwrap()));
    }
}
