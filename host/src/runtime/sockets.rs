//! Raw TCP for brokers: granted only to the endpoints config names.
//!
//! Some clouds speak more than HTTP (Azure's Event Hub-compatible endpoint
//! is AMQP over TLS on 5671), so a broker may open TCP connections — but
//! only to the addresses listed in `para.brokers.<Name>.allowed_sockets`.
//! Entries are `host:port`, `sb://host[:port]/`, `amqps://host[:port]`, or a
//! connection string containing `Endpoint=sb://…` (port 5671 by default),
//! and may use the broker's config keys as `{key}`, so
//! `["{iot_eventhub_endpoint}"]` follows the Event Hub setting. Names are
//! resolved once, at start; the guest may then connect only to those
//! addresses. An empty list grants no sockets at all (the default), and
//! UDP is never granted.

use super::config::expand;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::sockets::SocketAddrUse;

/// The addresses one broker may connect to.
#[derive(Debug, Clone, Default)]
pub struct SocketGrants {
    addrs: Arc<Vec<SocketAddr>>,
}

/// Extracts `host:port` from an entry, defaulting the port to 5671 (AMQPS).
fn host_port(entry: &str) -> Option<String> {
    let mut s = entry.trim();
    if let Some(pos) = s.find("Endpoint=") {
        s = s[pos + "Endpoint=".len()..]
            .split(';')
            .next()
            .unwrap_or_default();
    }
    for scheme in ["sb://", "amqps://", "amqp://"] {
        if let Some(rest) = s.strip_prefix(scheme) {
            s = rest;
        }
    }
    let s = s.split('/').next().unwrap_or_default();
    if s.is_empty() {
        return None;
    }
    let has_port = if s.starts_with('[') {
        s.contains("]:")
    } else {
        s.contains(':')
    };
    Some(if has_port {
        s.to_string()
    } else {
        format!("{s}:5671")
    })
}

impl SocketGrants {
    /// Resolves a broker's `allowed_sockets`, substituting `{key}` from its
    /// config. An entry naming an unset key, or a name that does not
    /// resolve, grants nothing (with a warning), as for `allowed_hosts`.
    pub fn resolve(
        broker: &str,
        entries: &[String],
        broker_config: &BTreeMap<String, String>,
    ) -> Self {
        let mut addrs = Vec::new();
        for entry in entries {
            let Some(expanded) = expand(entry, broker_config) else {
                tracing::warn!(broker, entry = %entry, "allowed_sockets entry names an unset config key; it grants nothing");
                continue;
            };
            let Some(target) = host_port(&expanded) else {
                tracing::warn!(broker, entry = %entry, "allowed_sockets entry is not host:port; it grants nothing");
                continue;
            };
            match target.to_socket_addrs() {
                Ok(found) => addrs.extend(found),
                Err(e) => {
                    tracing::warn!(broker, %target, error = %e, "allowed_sockets entry does not resolve; it grants nothing")
                }
            }
        }
        SocketGrants {
            addrs: Arc::new(addrs),
        }
    }

    /// Whether any socket is granted.
    pub fn any(&self) -> bool {
        !self.addrs.is_empty()
    }

    /// Whether the guest may use `addr` this way.
    pub fn allows(&self, addr: SocketAddr, usage: SocketAddrUse) -> bool {
        match usage {
            SocketAddrUse::TcpConnect => self.addrs.contains(&addr),
            // The implicit bind before a connect is to the wildcard address.
            SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0 && self.any(),
            _ => false,
        }
    }

    /// Applies the grant to a WASI context under construction.
    pub fn apply(&self, builder: &mut WasiCtxBuilder, broker: &str) {
        builder.allow_udp(false);
        if !self.any() {
            builder.allow_tcp(false).allow_ip_name_lookup(false);
            return;
        }
        let grants = self.clone();
        let broker = broker.to_string();
        builder
            .allow_tcp(true)
            // The guest resolves the granted name itself; connecting is
            // still limited to the addresses resolved here.
            .allow_ip_name_lookup(true)
            .socket_addr_check(move |addr, usage| {
                let ok = grants.allows(addr, usage);
                if !ok {
                    tracing::warn!(broker = %broker, %addr, ?usage, "socket denied: not in allowed_sockets");
                }
                Box::pin(async move { ok })
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_only_named_addresses_connect() {
        assert_eq!(
            host_port("sb://ns.servicebus.windows.net/").as_deref(),
            Some("ns.servicebus.windows.net:5671")
        );
        assert_eq!(
            host_port("amqps://127.0.0.1:4000").as_deref(),
            Some("127.0.0.1:4000")
        );
        assert_eq!(
            host_port(
                "Endpoint=sb://127.0.0.1:4001/;SharedAccessKeyName=x;SharedAccessKey=y;EntityPath=h"
            )
            .as_deref(),
            Some("127.0.0.1:4001")
        );
        let mut cfg = BTreeMap::new();
        cfg.insert(
            "iot_eventhub_endpoint".to_string(),
            "sb://127.0.0.1:4002/".to_string(),
        );
        let g = SocketGrants::resolve(
            "Azure",
            &["{iot_eventhub_endpoint}".to_string(), "{unset}".to_string()],
            &cfg,
        );
        assert!(g.allows("127.0.0.1:4002".parse().unwrap(), SocketAddrUse::TcpConnect));
        assert!(!g.allows("127.0.0.1:4003".parse().unwrap(), SocketAddrUse::TcpConnect));
        assert!(!g.allows("127.0.0.1:4002".parse().unwrap(), SocketAddrUse::UdpBind));
        assert!(g.allows("0.0.0.0:0".parse().unwrap(), SocketAddrUse::TcpBind));
        assert!(!g.allows("0.0.0.0:80".parse().unwrap(), SocketAddrUse::TcpBind));
        assert!(!SocketGrants::default().any());
    }
}
