//! Loading certificate/key pairs from PEM files.
//!
//! A pair is only returned once everything about it has been checked: the
//! chain parses and is not empty, every certificate in it is X.509, the key
//! parses (PKCS#8, PKCS#1 or SEC1; RSA, ECDSA P-256/P-384 or Ed25519) and the
//! provider accepts it, and the key matches the leaf certificate. Callers can
//! therefore swap a loaded pair in without further thought.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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

/// A checked pair, ready to serve, with what it was loaded from and what the
/// leaf says about itself.
#[derive(Debug, Clone)]
pub struct LoadedCertificate {
    pub certified_key: Arc<CertifiedKey>,
    /// `None` for the generated self-signed certificate.
    pub files: Option<CertificateFiles>,
    /// The leaf's subjectAltName DNS names, lower case, in certificate order
    /// (wildcards as written, e.g. `*.example.com`).
    pub names: Vec<String>,
    /// The leaf's Not Before, as a Unix time.
    pub(crate) not_before: i64,
    /// The leaf's Not After, as a Unix time.
    pub not_after: i64,
}

impl LoadedCertificate {
    /// A short name for logs and the metrics label: the first DNS name, else
    /// the certificate file's name, else `self-signed`.
    pub(crate) fn label(&self) -> String {
        if let Some(name) = self.names.first() {
            return name.clone();
        }
        match &self.files {
            Some(files) => files
                .cert
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|| files.cert.display().to_string()),
            None => "self-signed".to_string(),
        }
    }

    /// Where the pair came from, for logs.
    pub(crate) fn source(&self) -> String {
        match &self.files {
            Some(files) => files.cert.display().to_string(),
            None => "generated self-signed".to_string(),
        }
    }
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, CertificateError> {
    std::fs::read(path).map_err(|source| CertificateError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses PEM text read from `path` into a chain, leaf first. Other PEM
/// sections (a key in a combined file) are skipped.
pub(crate) fn parse_chain(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CertificateError::BadCertificate {
            path: path.to_path_buf(),
            reason: pem_reason(&error),
        })?;
    if chain.is_empty() {
        return Err(CertificateError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// Parses the first PEM private key (PKCS#8, PKCS#1 or SEC1) in `pem`.
pub(crate) fn parse_key(
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, CertificateError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| CertificateError::BadKey {
        path: path.to_path_buf(),
        reason: match error {
            pem::Error::NoItemsFound => "no PEM private key found".to_string(),
            other => pem_reason(&other),
        },
    })
}

fn pem_reason(error: &pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { .. } => {
            "a PEM section has no END line (truncated or still being written?)".to_string()
        }
        pem::Error::NoItemsFound => "no PEM items found".to_string(),
        other => other.to_string(),
    }
}

/// What the leaf says about itself: DNS names, Not Before, Not After.
pub(super) struct LeafInfo {
    pub(super) names: Vec<String>,
    pub(super) not_before: i64,
    pub(super) not_after: i64,
}

pub(super) fn leaf_info(der: &[u8]) -> Result<LeafInfo, String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| format!("the leaf is not a valid X.509 certificate: {error}"))?;
    let mut names = Vec::new();
    let san = certificate
        .subject_alternative_name()
        .map_err(|error| format!("the leaf's subjectAltName cannot be read: {error}"))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                let dns = dns.trim_end_matches('.').to_ascii_lowercase();
                if !dns.is_empty() && !names.contains(&dns) {
                    names.push(dns);
                }
            }
        }
    }
    let validity = certificate.validity();
    Ok(LeafInfo {
        names,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

/// Checks one pair from the PEM bytes read from `files` (which only name
/// the files in errors).
pub(crate) fn parse_certified_key(
    files: &CertificateFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<LoadedCertificate, CertificateError> {
    let chain = parse_chain(&files.cert, cert_pem)?;
    let info = leaf_info(&chain[0]).map_err(|reason| CertificateError::BadCertificate {
        path: files.cert.clone(),
        reason,
    })?;
    for (index, intermediate) in chain.iter().enumerate().skip(1) {
        x509_parser::parse_x509_certificate(intermediate).map_err(|error| {
            CertificateError::BadCertificate {
                path: files.cert.clone(),
                reason: format!(
                    "certificate {} of the chain is not valid X.509: {error}",
                    index + 1
                ),
            }
        })?;
    }
    let key = parse_key(&files.key, key_pem)?;
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
            reason: mismatch_reason(&error),
        })?;
    Ok(LoadedCertificate {
        certified_key: Arc::new(certified_key),
        files: Some(files.clone()),
        names: info.names,
        not_before: info.not_before,
        not_after: info.not_after,
    })
}

fn mismatch_reason(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the key's public key differs from the leaf certificate's".to_string()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::format_unix_time;
    use crate::tls::generate::generate_pair;
    use crate::tls::provider::provider;
    use rcgen::{CertificateParams, KeyPair, SignatureAlgorithm};

    /// Loads and checks one configured pair from its files.
    fn load_certified_key(
        files: &CertificateFiles,
        provider: &CryptoProvider,
    ) -> Result<LoadedCertificate, CertificateError> {
        let cert_pem = read_file(&files.cert)?;
        let key_pem = read_file(&files.key)?;
        parse_certified_key(files, &cert_pem, &key_pem, provider)
    }

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

    /// The content of the privateKey OCTET STRING of a PKCS#8
    /// PrivateKeyInfo: the PKCS#1 RSAPrivateKey or the SEC1 ECPrivateKey.
    fn pkcs8_inner(pkcs8: &[u8]) -> Vec<u8> {
        fn header(der: &[u8]) -> (u8, usize, usize) {
            let tag = der[0];
            let first = der[1] as usize;
            if first < 0x80 {
                (tag, 2, first)
            } else {
                let count = first & 0x7f;
                let mut length = 0usize;
                for byte in &der[2..2 + count] {
                    length = length << 8 | *byte as usize;
                }
                (tag, 2 + count, length)
            }
        }
        let (tag, start, _) = header(pkcs8);
        assert_eq!(tag, 0x30, "PrivateKeyInfo is a SEQUENCE");
        let mut rest = &pkcs8[start..];
        for expected in [0x02u8, 0x30] {
            let (tag, head, length) = header(rest);
            assert_eq!(tag, expected);
            rest = &rest[head + length..];
        }
        let (tag, head, length) = header(rest);
        assert_eq!(tag, 0x04, "privateKey is an OCTET STRING");
        rest[head..head + length].to_vec()
    }

    fn pem_of(label: &str, der: &[u8]) -> String {
        use std::fmt::Write;
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut base64 = String::new();
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    base64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    base64.push('=');
                }
            }
        }
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in base64.as_bytes().chunks(64) {
            let _ = writeln!(out, "{}", std::str::from_utf8(line).unwrap());
        }
        let _ = writeln!(out, "-----END {label}-----");
        out
    }

    /// A self-signed certificate with a fresh key of `algorithm`; returns the
    /// certificate PEM and the key's PKCS#8 DER.
    fn generate_with(algorithm: &'static SignatureAlgorithm, name: &str) -> (String, Vec<u8>) {
        let key = KeyPair::generate_for(algorithm).expect("generate key");
        let cert = CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("sign");
        (cert.pem(), key.serialize_der())
    }

    #[test]
    fn a_generated_pair_loads_with_its_names_and_dates() {
        let dir = temp_dir("ok");
        let pair = generate_pair(&["Mail.Example".into(), "*.example.org".into()]).expect("gen");
        let files = write_pair(&dir, "ok", &pair.cert_pem, &pair.key_pem);
        let loaded = load_certified_key(&files, &provider()).expect("load");
        assert_eq!(loaded.certified_key.cert.len(), 1);
        assert_eq!(loaded.certified_key.cert[0], pair.cert_der);
        assert_eq!(loaded.names, vec!["mail.example", "*.example.org"]);
        assert_eq!(loaded.label(), "mail.example");
        // rcgen's defaults: 1975-01-01 to 4096-01-01.
        assert_eq!(
            format_unix_time(loaded.not_before),
            "1975-01-01 00:00:00 UTC"
        );
        assert_eq!(
            format_unix_time(loaded.not_after),
            "4096-01-01 00:00:00 UTC"
        );
    }

    #[test]
    fn every_key_format_and_algorithm_loads() {
        let dir = temp_dir("formats");
        let cases: [(&str, &'static SignatureAlgorithm, &str); 4] = [
            ("rsa", &rcgen::PKCS_RSA_SHA256, "RSA PRIVATE KEY"),
            ("p256", &rcgen::PKCS_ECDSA_P256_SHA256, "EC PRIVATE KEY"),
            ("p384", &rcgen::PKCS_ECDSA_P384_SHA384, "EC PRIVATE KEY"),
            ("ed25519", &rcgen::PKCS_ED25519, ""),
        ];
        let mut loaded_count = 0;
        for (name, algorithm, legacy_label) in cases {
            let (cert_pem, pkcs8) = generate_with(algorithm, &format!("{name}.example"));
            let mut keys = vec![("pkcs8", pem_of("PRIVATE KEY", &pkcs8))];
            if !legacy_label.is_empty() {
                keys.push(("legacy", pem_of(legacy_label, &pkcs8_inner(&pkcs8))));
            }
            for (format, key_pem) in keys {
                let label = format!("{name}-{format}");
                let files = write_pair(&dir, &label, &cert_pem, &key_pem);
                let parsed = parse_key(&files.key, key_pem.as_bytes()).expect("key parses");
                let expected_kind = match (format, legacy_label) {
                    ("pkcs8", _) => "pkcs8",
                    (_, "RSA PRIVATE KEY") => "pkcs1",
                    _ => "sec1",
                };
                let kind = match parsed {
                    PrivateKeyDer::Pkcs8(_) => "pkcs8",
                    PrivateKeyDer::Pkcs1(_) => "pkcs1",
                    PrivateKeyDer::Sec1(_) => "sec1",
                    _ => "other",
                };
                assert_eq!(kind, expected_kind, "{label}");
                let loaded = load_certified_key(&files, &provider())
                    .unwrap_or_else(|error| panic!("{label}: {error}"));
                assert_eq!(loaded.names, vec![format!("{name}.example")], "{label}");
                loaded_count += 1;
            }
        }
        assert_eq!(loaded_count, 7, "RSA x2, P-256 x2, P-384 x2, Ed25519 x1");
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
        assert!(message.contains("public key differs"), "{message}");
    }

    #[test]
    fn a_key_of_another_algorithm_is_a_mismatch() {
        let dir = temp_dir("mismatch-alg");
        let (rsa_cert, _) = generate_with(&rcgen::PKCS_RSA_SHA256, "rsa.example");
        let (_, ed_key) = generate_with(&rcgen::PKCS_ED25519, "ed.example");
        let files = write_pair(&dir, "alg", &rsa_cert, &pem_of("PRIVATE KEY", &ed_key));
        let error = load_certified_key(&files, &provider()).expect_err("mismatch");
        assert!(
            matches!(error, CertificateError::Mismatch { .. }),
            "{error}"
        );
    }

    #[test]
    fn empty_garbage_truncated_and_missing_files_are_errors_naming_the_file() {
        let dir = temp_dir("bad");
        let pair = generate_pair(&["a.example".into()]).expect("generate");
        let empty = write_pair(&dir, "empty", "", &pair.key_pem);
        let error = load_certified_key(&empty, &provider()).expect_err("empty");
        assert!(
            matches!(error, CertificateError::NoCertificate { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("empty.crt"), "{error}");

        let garbage_key = write_pair(&dir, "garbage", &pair.cert_pem, "not a key\n");
        let error = load_certified_key(&garbage_key, &provider()).expect_err("garbage");
        assert!(matches!(error, CertificateError::BadKey { .. }), "{error}");
        assert!(error.to_string().contains("garbage.key"), "{error}");
        assert!(error.to_string().contains("no PEM private key"), "{error}");

        let empty_key = write_pair(&dir, "empty-key", &pair.cert_pem, "");
        let error = load_certified_key(&empty_key, &provider()).expect_err("empty key");
        assert!(matches!(error, CertificateError::BadKey { .. }), "{error}");

        let truncated = &pair.cert_pem[..pair.cert_pem.len() / 2];
        let files = write_pair(&dir, "truncated", truncated, &pair.key_pem);
        let error = load_certified_key(&files, &provider()).expect_err("truncated");
        assert!(
            matches!(error, CertificateError::BadCertificate { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("truncated.crt"), "{error}");

        let not_x509 = pem_of("CERTIFICATE", b"definitely not DER");
        let files = write_pair(&dir, "not-x509", &not_x509, &pair.key_pem);
        let error = load_certified_key(&files, &provider()).expect_err("not x509");
        assert!(
            error.to_string().contains("not-x509.crt")
                && error.to_string().contains("not a valid X.509"),
            "{error}"
        );

        let missing = CertificateFiles {
            cert: dir.join("absent.crt"),
            key: dir.join("absent.key"),
        };
        let error = load_certified_key(&missing, &provider()).expect_err("missing");
        assert!(error.to_string().contains("absent.crt"), "{error}");
    }

    #[test]
    fn a_combined_file_with_chain_and_key_loads() {
        let dir = temp_dir("combined");
        let pair = generate_pair(&["a.example".into()]).expect("generate");
        let combined = dir.join("combined.pem");
        std::fs::write(&combined, format!("{}{}", pair.key_pem, pair.cert_pem)).expect("write");
        let files = CertificateFiles {
            cert: combined.clone(),
            key: combined,
        };
        let loaded = load_certified_key(&files, &provider()).expect("load");
        assert_eq!(loaded.certified_key.cert[0], pair.cert_der);
    }
}
