//! Generated self-signed certificates: the default served when no
//! `[[certificate]]` is configured, the placeholder of an ACME entry
//! before its first issuance, and the pairs `mail-tls-proxy cert
//! self-signed` and the tests write. Nothing here is ever trusted by a
//! client; it only lets a proxy start (and a test run) without a CA.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::certs::{leaf_info, CertificateError, LoadedCertificate};

/// A PEM pair generated in memory, for development and tests.
#[derive(Debug, Clone)]
pub struct GeneratedPair {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub(crate) key_der: Vec<u8>,
}

/// Generates an ECDSA P-256 self-signed certificate for `names`, its
/// subject's common name the first of them.
pub fn generate_pair(names: &[String]) -> Result<GeneratedPair, CertificateError> {
    let failed = |reason: String| CertificateError::Generate {
        name: names.join(","),
        reason,
    };
    let mut params =
        rcgen::CertificateParams::new(names.to_vec()).map_err(|error| failed(error.to_string()))?;
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, first.as_str());
    }
    let signing_key = rcgen::KeyPair::generate().map_err(|error| failed(error.to_string()))?;
    let cert = params
        .self_signed(&signing_key)
        .map_err(|error| failed(error.to_string()))?;
    Ok(GeneratedPair {
        cert_pem: cert.pem(),
        key_pem: signing_key.serialize_pem(),
        cert_der: cert.der().clone(),
        key_der: signing_key.serialize_der(),
    })
}

/// The default when no certificate is configured: self-signed for `hostname`
/// (and `localhost`), generated at start-up and never written to disk.
pub(crate) fn self_signed(
    hostname: &str,
    provider: &CryptoProvider,
) -> Result<LoadedCertificate, CertificateError> {
    let mut names = vec![hostname.to_string()];
    if hostname != "localhost" {
        names.push("localhost".to_string());
    }
    generated_in_memory(&names, provider)
}

/// What an ACME entry serves until its first certificate is issued:
/// self-signed for its `names`, generated in memory, never written.
pub(crate) fn placeholder(
    names: &[String],
    provider: &CryptoProvider,
) -> Result<LoadedCertificate, CertificateError> {
    generated_in_memory(names, provider)
}

/// A self-signed pair for `names`, ready to serve, never written to disk.
fn generated_in_memory(
    names: &[String],
    provider: &CryptoProvider,
) -> Result<LoadedCertificate, CertificateError> {
    let failed = |reason: String| CertificateError::Generate {
        name: names.join(","),
        reason,
    };
    let pair = generate_pair(names)?;
    let info = leaf_info(&pair.cert_der).map_err(failed)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.key_der));
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| failed(error.to_string()))?;
    Ok(LoadedCertificate {
        certified_key: Arc::new(CertifiedKey::new(vec![pair.cert_der], signing_key)),
        files: None,
        names: info.names,
        not_before: info.not_before,
        not_after: info.not_after,
    })
}
