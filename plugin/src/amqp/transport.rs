//! Byte-stream transports for AMQP: the [`ByteStream`] trait, TLS over any
//! byte stream (rustls with ring), and plain TCP for native builds.
//!
//! Reads take a wait bound so that a poll never blocks forever: the wasm
//! build waits on WASI pollables with a monotonic-clock timeout
//! (`wasi_tcp.rs`); the native build uses `set_read_timeout`.

use crate::platform::TransportError;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use std::sync::Arc;

/// A connected, bidirectional byte stream.
pub trait ByteStream {
    /// Reads what is available into `buf`, waiting at most `wait_ms` for the
    /// first byte. `Ok(0)` means nothing arrived in time; a closed stream is
    /// an error.
    fn read(&mut self, buf: &mut [u8], wait_ms: u64) -> Result<usize, TransportError>;
    /// Writes and flushes all of `data`.
    fn write_all(&mut self, data: &[u8]) -> Result<(), TransportError>;
}

impl<S: ByteStream + ?Sized> ByteStream for Box<S> {
    fn read(&mut self, buf: &mut [u8], wait_ms: u64) -> Result<usize, TransportError> {
        (**self).read(buf, wait_ms)
    }
    fn write_all(&mut self, data: &[u8]) -> Result<(), TransportError> {
        (**self).write_all(data)
    }
}

/// Opens byte streams; the seam that keeps sockets and TLS swappable.
pub trait Connector {
    /// Connects to `host:port`, over TLS when `tls` (trusting the web PKI
    /// roots plus the PEM certificates in `ca_pem`).
    fn connect(
        &mut self,
        host: &str,
        port: u16,
        tls: bool,
        ca_pem: Option<&str>,
    ) -> Result<Box<dyn ByteStream>, TransportError>;
}

/// Builds the rustls client configuration: web PKI roots plus any extra
/// PEM certificates (`para.host.tls_ca_file`, injected as `tls_ca_pem`).
pub fn tls_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| {
                TransportError::Tls(format!("the tls_ca_pem certificates are not PEM ({e})"))
            })?;
            roots.add(cert).map_err(|e| {
                TransportError::Tls(format!("a tls_ca_pem certificate is unusable ({e})"))
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(TransportError::Tls(
                "tls_ca_pem holds no certificate".into(),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(format!("TLS setup failed ({e})")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// TLS over any [`ByteStream`].
pub struct TlsStream<S: ByteStream> {
    inner: S,
    conn: rustls::ClientConnection,
}

fn tls_error(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(format!("TLS failed: {e}"))
}

impl<S: ByteStream> TlsStream<S> {
    /// Runs the handshake with `host` over `inner`, waiting at most
    /// `timeout_ms` for each read.
    pub fn connect(
        inner: S,
        host: &str,
        config: Arc<rustls::ClientConfig>,
        timeout_ms: u64,
    ) -> Result<Self, TransportError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| TransportError::Tls(format!("'{host}' is not a valid TLS server name")))?;
        let conn = rustls::ClientConnection::new(config, name).map_err(tls_error)?;
        let mut s = TlsStream { inner, conn };
        while s.conn.is_handshaking() {
            s.flush_tls()?;
            if s.conn.is_handshaking() && s.conn.wants_read() && s.fill(timeout_ms)? == 0 {
                return Err(TransportError::Timeout(
                    "the TLS handshake timed out".into(),
                ));
            }
        }
        s.flush_tls()?;
        Ok(s)
    }

    fn flush_tls(&mut self) -> Result<(), TransportError> {
        while self.conn.wants_write() {
            let mut out = Vec::new();
            self.conn.write_tls(&mut out).map_err(tls_error)?;
            self.inner.write_all(&out)?;
        }
        Ok(())
    }

    /// Reads TLS records from the inner stream; returns the bytes read.
    fn fill(&mut self, wait_ms: u64) -> Result<usize, TransportError> {
        let mut buf = [0u8; 16 * 1024];
        let n = self.inner.read(&mut buf, wait_ms)?;
        if n > 0 {
            let mut slice = &buf[..n];
            while !slice.is_empty() {
                self.conn.read_tls(&mut slice).map_err(tls_error)?;
                self.conn.process_new_packets().map_err(tls_error)?;
            }
            // Alerts and session tickets may need answering.
            self.flush_tls()?;
        }
        Ok(n)
    }
}

impl<S: ByteStream> ByteStream for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8], wait_ms: u64) -> Result<usize, TransportError> {
        use std::io::Read;
        let mut waited = false;
        loop {
            match self.conn.reader().read(buf) {
                Ok(0) => {
                    return Err(TransportError::Connection(
                        "the peer closed the TLS session".into(),
                    ));
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(TransportError::Connection(format!("TLS read failed: {e}"))),
            }
            if waited {
                return Ok(0);
            }
            // Several records may be needed for one plaintext chunk; later
            // reads do not wait again once the first arrived.
            if self.fill(wait_ms)? == 0 {
                waited = true;
            }
        }
    }

    fn write_all(&mut self, data: &[u8]) -> Result<(), TransportError> {
        use std::io::Write;
        self.conn.writer().write_all(data).map_err(tls_error)?;
        self.flush_tls()
    }
}

/// Plain TCP through `std::net` (native builds: tests and tools).
#[cfg(not(target_arch = "wasm32"))]
pub struct StdTcp {
    stream: std::net::TcpStream,
}

#[cfg(not(target_arch = "wasm32"))]
impl StdTcp {
    /// Connects to `host:port` within `timeout_ms`.
    pub fn connect(host: &str, port: u16, timeout_ms: u64) -> Result<Self, TransportError> {
        use std::net::ToSocketAddrs;
        let addrs = (host, port)
            .to_socket_addrs()
            .map_err(|e| TransportError::Dns(format!("{host}: {e}")))?;
        let mut last = TransportError::Dns(format!("{host} has no address"));
        for addr in addrs {
            match std::net::TcpStream::connect_timeout(
                &addr,
                std::time::Duration::from_millis(timeout_ms),
            ) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(StdTcp { stream });
                }
                Err(e) => last = TransportError::Connection(format!("connecting to {addr}: {e}")),
            }
        }
        Err(last)
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl ByteStream for StdTcp {
    fn read(&mut self, buf: &mut [u8], wait_ms: u64) -> Result<usize, TransportError> {
        use std::io::{ErrorKind, Read};
        let _ = self
            .stream
            .set_read_timeout(Some(std::time::Duration::from_millis(wait_ms.max(1))));
        match self.stream.read(buf) {
            Ok(0) => Err(TransportError::Connection(
                "the peer closed the connection".into(),
            )),
            Ok(n) => Ok(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(0),
            Err(e) => Err(TransportError::Connection(format!("read failed: {e}"))),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> Result<(), TransportError> {
        use std::io::Write;
        self.stream
            .write_all(data)
            .map_err(|e| TransportError::Connection(format!("write failed: {e}")))
    }
}

/// The native connector: `std::net` TCP, rustls on top when asked.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug, Default)]
pub struct StdConnector;

#[cfg(not(target_arch = "wasm32"))]
impl Connector for StdConnector {
    fn connect(
        &mut self,
        host: &str,
        port: u16,
        tls: bool,
        ca_pem: Option<&str>,
    ) -> Result<Box<dyn ByteStream>, TransportError> {
        let tcp = StdTcp::connect(host, port, 5_000)?;
        if tls {
            let config = tls_config(ca_pem)?;
            Ok(Box::new(TlsStream::connect(tcp, host, config, 5_000)?))
        } else {
            Ok(Box::new(tcp))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_config_accepts_pem_and_rejects_junk() {
        assert!(tls_config(None).is_ok());
        assert!(matches!(
            tls_config(Some("not a certificate")),
            Err(TransportError::Tls(_))
        ));
    }
}
