//! QUIC endpoint configurations with mutual TLS, from PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;

use crate::ALPN;

/// A TLS setup that cannot be built.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file is missing or unreadable.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the material.
    #[error("tls: {0}")]
    Rustls(String),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |reason: String| TlsError::Read { path: path.to_path_buf(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(read("no certificate in file".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read { path: path.to_path_buf(), reason: e.to_string() })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Rustls(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// Keep-alives every 2 s and a 10 s idle timeout: a vanished peer (a crashed coordinator, a
/// device out of coverage) is noticed within seconds, and its reconnect logic takes over.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    // Fedge speaks on bidirectional streams only: a peer may open no unidirectional stream
    // (whose data would otherwise sit in memory, never read).
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(10)).expect("10 s is a valid idle timeout"),
    ));
    Arc::new(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side: present `cert`/`key`; require a client certificate chained to `ca` and absent
/// from the revocation list `crl` (if given).
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key_path: &Path,
    crl: Option<&Path>,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut crls = Vec::new();
    if let Some(crl) = crl {
        for c in CertificateRevocationListDer::pem_file_iter(crl)
            .map_err(|e| TlsError::Read { path: crl.to_path_buf(), reason: e.to_string() })?
        {
            crls.push(c.map_err(|e| TlsError::Read { path: crl.to_path_buf(), reason: e.to_string() })?);
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

/// Client side: trust only `ca`; authenticate with `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key_path: &Path) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}
