//! TCP inside the component through `wasi:sockets`, with reads bounded by
//! a monotonic-clock pollable.
//!
//! `std::net::TcpStream` also connects on wasm32-wasip2, but whether its
//! `set_read_timeout`/`set_nonblocking` are honoured depends on wasi-libc's
//! socket emulation; waiting on the input stream's pollable together with a
//! `monotonic-clock` timer is explicit and cannot block a poll forever.

use super::transport::{ByteStream, Connector, TlsStream, tls_config};
use crate::platform::TransportError;
use ::wasi::clocks::monotonic_clock;
use ::wasi::io::poll;
use ::wasi::io::streams::{InputStream, OutputStream, StreamError};
use ::wasi::sockets::network::{
    ErrorCode, IpAddress, IpAddressFamily, IpSocketAddress, Ipv4SocketAddress, Ipv6SocketAddress,
};
use ::wasi::sockets::tcp::TcpSocket;
use ::wasi::sockets::{instance_network, ip_name_lookup, tcp_create_socket};

/// How long connecting (name lookup, TCP and TLS handshakes) may take.
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// `blocking-write-and-flush` accepts at most 4096 bytes per call.
const WRITE_CHUNK: usize = 4096;

/// A connected TCP socket. Field order is drop order: the streams are
/// children of the socket and must go first.
pub struct WasiTcp {
    input: InputStream,
    output: OutputStream,
    _socket: TcpSocket,
}

fn sock_err(what: &str, e: ErrorCode) -> TransportError {
    match e {
        ErrorCode::AccessDenied | ErrorCode::NotSupported => TransportError::Denied,
        ErrorCode::Timeout => TransportError::Timeout(format!("{what}: timed out")),
        ErrorCode::NameUnresolvable | ErrorCode::TemporaryResolverFailure => {
            TransportError::Dns(format!("{what}: {e:?}"))
        }
        _ => TransportError::Connection(format!("{what}: {e:?}")),
    }
}

/// Waits for `pollable` at most `ms`; returns whether it became ready.
fn wait(pollable: &::wasi::io::poll::Pollable, ms: u64) -> bool {
    let timer = monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000));
    let ready = poll::poll(&[pollable, &timer]);
    ready.contains(&0)
}

fn resolve(host: &str) -> Result<Vec<IpAddress>, TransportError> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(vec![match ip {
            std::net::IpAddr::V4(v4) => {
                let o = v4.octets();
                IpAddress::Ipv4((o[0], o[1], o[2], o[3]))
            }
            std::net::IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddress::Ipv6((s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]))
            }
        }]);
    }
    let network = instance_network::instance_network();
    let stream = ip_name_lookup::resolve_addresses(&network, host)
        .map_err(|e| sock_err(&format!("resolving {host}"), e))?;
    let mut out = Vec::new();
    loop {
        match stream.resolve_next_address() {
            Ok(Some(a)) => out.push(a),
            Ok(None) => break,
            Err(ErrorCode::WouldBlock) => {
                if !wait(&stream.subscribe(), CONNECT_TIMEOUT_MS) {
                    return Err(TransportError::Dns(format!("resolving {host} timed out")));
                }
            }
            Err(e) => return Err(sock_err(&format!("resolving {host}"), e)),
        }
    }
    if out.is_empty() {
        return Err(TransportError::Dns(format!("{host} has no address")));
    }
    Ok(out)
}

impl WasiTcp {
    /// Connects to `host:port`.
    pub fn connect(host: &str, port: u16) -> Result<Self, TransportError> {
        let mut last = TransportError::Dns(format!("{host} has no address"));
        for ip in resolve(host)? {
            match Self::connect_addr(ip, port) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn connect_addr(ip: IpAddress, port: u16) -> Result<Self, TransportError> {
        let (family, addr) = match ip {
            IpAddress::Ipv4(address) => (
                IpAddressFamily::Ipv4,
                IpSocketAddress::Ipv4(Ipv4SocketAddress { port, address }),
            ),
            IpAddress::Ipv6(address) => (
                IpAddressFamily::Ipv6,
                IpSocketAddress::Ipv6(Ipv6SocketAddress {
                    port,
                    flow_info: 0,
                    address,
                    scope_id: 0,
                }),
            ),
        };
        let what = format!("connecting to {addr:?}");
        let socket =
            tcp_create_socket::create_tcp_socket(family).map_err(|e| sock_err(&what, e))?;
        let network = instance_network::instance_network();
        socket
            .start_connect(&network, addr)
            .map_err(|e| sock_err(&what, e))?;
        let pollable = socket.subscribe();
        loop {
            match socket.finish_connect() {
                Ok((input, output)) => {
                    drop(pollable);
                    return Ok(WasiTcp {
                        input,
                        output,
                        _socket: socket,
                    });
                }
                Err(ErrorCode::WouldBlock) => {
                    if !wait(&pollable, CONNECT_TIMEOUT_MS) {
                        return Err(TransportError::Timeout(format!("{what}: timed out")));
                    }
                }
                Err(e) => return Err(sock_err(&what, e)),
            }
        }
    }
}

fn stream_err(what: &str, e: StreamError) -> TransportError {
    match e {
        StreamError::Closed => TransportError::Connection("the peer closed the connection".into()),
        StreamError::LastOperationFailed(e) => {
            TransportError::Connection(format!("{what} failed: {}", e.to_debug_string()))
        }
    }
}

impl ByteStream for WasiTcp {
    fn read(&mut self, buf: &mut [u8], wait_ms: u64) -> Result<usize, TransportError> {
        let mut waited = false;
        loop {
            let chunk = self
                .input
                .read(buf.len() as u64)
                .map_err(|e| stream_err("reading", e))?;
            if !chunk.is_empty() {
                buf[..chunk.len()].copy_from_slice(&chunk);
                return Ok(chunk.len());
            }
            if waited {
                return Ok(0);
            }
            // One bounded wait: ready data is read on the next turn, and a
            // timeout ends the read empty-handed.
            wait(&self.input.subscribe(), wait_ms);
            waited = true;
        }
    }

    fn write_all(&mut self, data: &[u8]) -> Result<(), TransportError> {
        for chunk in data.chunks(WRITE_CHUNK) {
            self.output
                .blocking_write_and_flush(chunk)
                .map_err(|e| stream_err("writing", e))?;
        }
        Ok(())
    }
}

/// The component's connector: `wasi:sockets` TCP, rustls on top.
#[derive(Debug, Default)]
pub struct WasiConnector;

impl Connector for WasiConnector {
    fn connect(
        &mut self,
        host: &str,
        port: u16,
        tls: bool,
        ca_pem: Option<&str>,
    ) -> Result<Box<dyn ByteStream>, TransportError> {
        let tcp = WasiTcp::connect(host, port)?;
        if tls {
            let config = tls_config(ca_pem)?;
            let name = host.trim_matches(['[', ']']);
            Ok(Box::new(TlsStream::connect(
                tcp,
                name,
                config,
                CONNECT_TIMEOUT_MS,
            )?))
        } else {
            Ok(Box::new(tcp))
        }
    }
}
