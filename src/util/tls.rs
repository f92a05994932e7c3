//! The MQTT client's TLS configuration, built here rather than by rumqttc: rumqttc's
//! own builder (`TlsConfiguration::Simple`) parses PEM with the unmaintained
//! `rustls-pemfile` and names `rustls-webpki` 0.102 (RUSTSEC-2026-0049, -0098, -0099,
//! -0104). Ours parses PEM with `rustls-pki-types` and verifies through rustls 0.23
//! and its current `rustls-webpki`, so neither of those crates is on our TLS path.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::sync::Arc;

/// Largest CA file read (bytes).
pub const CA_MAX: usize = 1 << 20;

/// A rustls client that trusts the CA certificates of `ca_pem` (ring provider),
/// or why it cannot be built (no certificate, a broken one).
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| format!("not a PEM certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_holds_no_certificate() {
        assert!(client_config(b"").unwrap_err().contains("no PEM"));
        assert!(client_config(b"hello, not a PEM").is_err());
        let broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(client_config(broken).is_err());
    }
}
