//! Loading certificate/key pairs from PEM files, and generating the
//! self-signed default.
//!
//! A pair is only returned once everything about it has been checked: the
//! chain parses and is not empty, the key parses (PKCS#8, PKCS#1 or SEC1) and
//! the provider accepts it, and the key matches the leaf certificate. Callers
//! can therefore swap a loaded pair in without further thought.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::CertificateFiles;

/// Why a certificate pair cannot be used; each names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found (expected a chain, leaf first)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a valid PEM certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: no usable private key (expected PKCS#8, PKCS#1 or SEC1 PEM): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{key}: the private key does not belong to the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot generate a self-signed certificate for {name:?}: {reason}")]
    Generate { name: String, reason: String },
}

/// A checked pair, ready to serve, with what it was loaded from.
#[derive(Debug, Clone)]
pub struct LoadedCertificate {
    pub certified_key: Arc<CertifiedKey>,
    /// `None` for the generated self-signed certificate.
    pub files: Option<CertificateFiles>,
}

fn read(path: &Path) -> Result<Vec<u8>, CertificateError> {
    std::fs::read(path).map_err(|source| CertificateError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a PEM chain, leaf first.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CertificateError::BadCertificate {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertificateError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// Reads a PEM private key in any of the formats rustls knows.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertificateError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| CertificateError::BadKey {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })
}

/// Loads and checks one configured pair.
pub fn load_certified_key(
    files: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<LoadedCertificate, CertificateError> {
    let chain = read_chain(&files.cert)?;
    let key = read_key(&files.key)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| CertificateError::BadKey {
            path: files.key.clone(),
            reason: error.to_string(),
        })?;
    let certified_key = CertifiedKey::new(chain, signing_key);
    certified_key
        .keys_match()
        .map_err(|error| CertificateError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: error.to_string(),
        })?;
    Ok(LoadedCertificate {
        certified_key: Arc::new(certified_key),
        files: Some(files.clone()),
    })
}

/// A PEM pair generated in memory, for development and tests.
#[derive(Debug, Clone)]
pub struct GeneratedPair {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

/// Generates an ECDSA P-256 self-signed certificate for `names`.
pub fn generate_pair(names: &[String]) -> Result<GeneratedPair, CertificateError> {
    let generated = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|error| {
        CertificateError::Generate {
            name: names.join(","),
            reason: error.to_string(),
        }
    })?;
    Ok(GeneratedPair {
        cert_pem: generated.cert.pem(),
        key_pem: generated.signing_key.serialize_pem(),
        cert_der: generated.cert.der().clone(),
        key_der: generated.signing_key.serialize_der(),
    })
}

/// The default when no certificate is configured: self-signed for `hostname`
/// (and `localhost`), generated at start-up and never written to disk.
pub fn self_signed(
    hostname: &str,
    provider: &CryptoProvider,
) -> Result<LoadedCertificate, CertificateError> {
    let mut names = vec![hostname.to_string()];
    if hostname != "localhost" {
        names.push("localhost".to_string());
    }
    let pair = generate_pair(&names)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.key_der));
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| CertificateError::Generate {
            name: hostname.to_string(),
            reason: error.to_string(),
        })?;
    Ok(LoadedCertificate {
        certified_key: Arc::new(CertifiedKey::new(vec![pair.cert_der], signing_key)),
        files: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::provider::provider;

    fn write_pair(dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> CertificateFiles {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, cert_pem).expect("write cert");
        std::fs::write(&key, key_pem).expect("write key");
        CertificateFiles { cert, key }
    }

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "mail-tls-proxy-certs-{label}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn a_generated_pair_loads() {
        let dir = temp_dir("ok");
        let pair = generate_pair(&["mail.example".into()]).expect("generate");
        let files = write_pair(&dir, "ok", &pair.cert_pem, &pair.key_pem);
        let loaded = load_certified_key(&files, &provider()).expect("load");
        assert_eq!(loaded.certified_key.cert.len(), 1);
        assert_eq!(loaded.certified_key.cert[0], pair.cert_der);
    }

    #[test]
    fn a_key_of_another_certificate_is_a_mismatch_naming_both_files() {
        let dir = temp_dir("mismatch");
        let first = generate_pair(&["a.example".into()]).expect("generate");
        let second = generate_pair(&["b.example".into()]).expect("generate");
        let files = write_pair(&dir, "mismatch", &first.cert_pem, &second.key_pem);
        let error = load_certified_key(&files, &provider()).expect_err("mismatch");
        assert!(
            matches!(error, CertificateError::Mismatch { .. }),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("mismatch.key") && message.contains("mismatch.crt"),
            "{message}"
        );
    }

    #[test]
    fn empty_garbage_and_missing_files_are_errors_naming_the_file() {
        let dir = temp_dir("bad");
        let pair = generate_pair(&["a.example".into()]).expect("generate");
        let empty = write_pair(&dir, "empty", "", &pair.key_pem);
        assert!(matches!(
            load_certified_key(&empty, &provider()),
            Err(CertificateError::NoCertificate { .. })
        ));
        let garbage_key = write_pair(&dir, "garbage", &pair.cert_pem, "not a key\n");
        let error = load_certified_key(&garbage_key, &provider()).expect_err("garbage");
        assert!(matches!(error, CertificateError::BadKey { .. }), "{error}");
        assert!(error.to_string().contains("garbage.key"));
        let missing = CertificateFiles {
            cert: dir.join("absent.crt"),
            key: dir.join("absent.key"),
        };
        let error = load_certified_key(&missing, &provider()).expect_err("missing");
        assert!(error.to_string().contains("absent.crt"), "{error}");
    }

    #[test]
    fn the_self_signed_default_names_the_host() {
        let loaded = self_signed("mx.example.org", &provider()).expect("generate");
        assert!(loaded.files.is_none());
        assert_eq!(loaded.certified_key.cert.len(), 1);
        loaded
            .certified_key
            .keys_match()
            .expect("generated key matches");
    }
}
