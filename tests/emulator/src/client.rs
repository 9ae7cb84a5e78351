//! A minimal HTTP/1.1 client (hyper's connection API, optional rustls) for the device simulator.
//!
//! Exists so `azure-iot-hub-emulator device ...` can talk to the emulator (or any IoT Hub-shaped
//! endpoint) over HTTP or HTTPS with a private CA, without a large client crate.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// True for `https`.
    pub tls: bool,
    /// Host as written (IPv6 without brackets).
    pub host: String,
    /// Port (default 80/443).
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    /// Path and query, at least `/`.
    pub path_and_query: String,
}

/// Parses an absolute http(s) URL.
pub fn parse_url(url: &str) -> Result<Url> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("URL '{url}' must start with http:// or https://");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("URL '{url}' has no host");
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| anyhow!("bad IPv6 literal in '{url}'"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().with_context(|| format!("bad port in '{url}'"))?,
            None => default_port,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().with_context(|| format!("bad port in '{url}'"))?,
            ),
            None => (authority.to_string(), default_port),
        }
    };
    Ok(Url {
        tls,
        host,
        port,
        authority: authority.to_string(),
        path_and_query: path.to_string(),
    })
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn exchange<S>(io: S, req: Request<Full<Bytes>>) -> Result<Response>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let driver = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .context("sending the request")?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the response body")?
        .to_bytes()
        .to_vec();
    drop(sender);
    driver.abort();
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Sends one request on a fresh connection and returns the whole response.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    ca_file: Option<&Path>,
) -> Result<Response> {
    let u = parse_url(url)?;
    let mut b = Request::builder()
        .method(method)
        .uri(&u.path_and_query)
        .header("host", &u.authority);
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let req = b.body(Full::new(Bytes::from(body)))?;
    let tcp = TcpStream::connect((u.host.as_str(), u.port))
        .await
        .with_context(|| format!("connecting to {}:{}", u.host, u.port))?;
    if u.tls {
        let ca = ca_file.ok_or_else(|| anyhow!("https needs --ca-file (the emulator's ca.pem); no other trust anchors are configured"))?;
        let connector = tokio_rustls::TlsConnector::from(crate::tls::client_config(ca)?);
        let tls = connector
            .connect(crate::tls::server_name(&u.host)?, tcp)
            .await
            .context("TLS handshake")?;
        exchange(tls, req).await
    } else {
        exchange(tcp, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("http://127.0.0.1:8080/devices/a?api-version=x").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path_and_query.as_str()),
            (false, "127.0.0.1", 8080, "/devices/a?api-version=x")
        );
        let u = parse_url("https://hub.example").unwrap();
        assert_eq!((u.port, u.path_and_query.as_str()), (443, "/"));
        let u = parse_url("https://[::1]:9/x").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.authority.as_str()),
            ("::1", 9, "[::1]:9")
        );
        assert!(parse_url("ftp://x").is_err());
    }
}
