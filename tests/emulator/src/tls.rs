//! TLS material for `serve --tls` and trust configuration for the device simulator.
//!
//! Exists because real IoT Hub is HTTPS-only: with `--tls` the emulator serves HTTPS with a
//! throw-away CA (written to `ca.pem`) so clients exercise real certificate validation.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

/// A generated CA (PEM) and a server configuration whose certificate it signed.
pub struct TlsMaterial {
    /// The CA certificate, PEM; what clients must trust.
    pub ca_pem: String,
    /// The rustls server configuration (ring provider) for HTTPS (ALPN `http/1.1`).
    pub server_config: Arc<ServerConfig>,
    /// The same certificate without ALPN, for the AMQP endpoint (Event Hubs clients send no
    /// ALPN or their own; rustls would refuse a handshake whose ALPN does not match).
    pub amqp_server_config: Arc<ServerConfig>,
}

/// The host part of a `host[:port]` hub hostname (IPv6 brackets removed).
pub fn host_part(hostname: &str) -> &str {
    if let Some(rest) = hostname.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match hostname.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => hostname,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Generates a CA and a server certificate for `localhost`, `127.0.0.1` and the hub hostname.
pub fn generate(hostname: &str) -> Result<TlsMaterial> {
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Azure IoT Hub Emulator CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let host = host_part(hostname).to_string();
    if !host.is_empty() && !names.contains(&host) {
        names.push(host);
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
        })
        .collect::<Result<Vec<_>, rcgen::Error>>()?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Azure IoT Hub Emulator");
    let key = KeyPair::generate().context("generating the server key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the server certificate")?;

    let chain = vec![cert.der().clone(), ca_cert.der().clone()];
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let amqp_config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key_der.clone_key())?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        ca_pem: ca_cert.pem(),
        server_config: Arc::new(config),
        amqp_server_config: Arc::new(amqp_config),
    })
}

/// A client configuration trusting only the CA certificates in `ca_file`.
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading {}", ca_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", ca_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", ca_file.display());
    }
    for c in certs {
        roots.add(c)?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The rustls server name for a host (DNS name or IP literal).
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .with_context(|| format!("'{host}' is not a valid TLS server name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_parts() {
        assert_eq!(host_part("127.0.0.1:443"), "127.0.0.1");
        assert_eq!(
            host_part("myhub.azure-devices.net"),
            "myhub.azure-devices.net"
        );
        assert_eq!(host_part("[::1]:8080"), "::1");
    }
}
