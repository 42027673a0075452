//! DANE: the TLSA records (RFC 6698, RFC 7672) that pin the keys the proxy
//! serves, as `mail-tls-proxy tlsa` prints them.
//!
//! One `3 1 1` record (DANE-EE, SubjectPublicKeyInfo, SHA-256) per served
//! certificate, DNS name and SMTP listener port:
//!
//! ```text
//! _25._tcp.mail.example.org. IN TLSA 3 1 1 <64 hex digits>
//! ```
//!
//! A `3 1 1` record survives renewals that keep the key (`reuse_key =
//! true` for ACME entries). A key prepared for the next renewal
//! (`next-privkey.pem` in the entry's folder) gets its records too, under a
//! comment, so they can be published before the key changes. Lines
//! starting with `;` are comments (zone file syntax): names without a
//! record (wildcards, placeholders) and the next keys.

use std::sync::Arc;

use crate::config::Config;
use crate::protocol::Protocol;
use crate::tls::{CertificateError, LoadedCertificate};

/// SHA-256 from the crypto provider.
fn sha256(data: &[u8]) -> Option<Vec<u8>> {
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .map(|suite| suite.common.hash_provider.hash(data).as_ref().to_vec())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The SHA-256 of a leaf certificate's SubjectPublicKeyInfo, in hex.
pub fn spki_sha256_of_certificate(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    sha256(certificate.tbs_certificate.subject_pki.raw).map(|digest| hex(&digest))
}

/// The SHA-256 of a PEM private key's public key (SubjectPublicKeyInfo).
pub fn spki_sha256_of_key(key_pem: &str) -> Option<String> {
    use rcgen::PublicKeyData;
    let key = rcgen::KeyPair::from_pem(key_pem).ok()?;
    sha256(&key.subject_public_key_info()).map(|digest| hex(&digest))
}

/// The ports of the SMTP listeners, each once, in order.
fn smtp_ports(config: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = config
        .listeners
        .iter()
        .filter(|listener| listener.protocol == Protocol::Smtp)
        .map(|listener| listener.listen.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn records(ports: &[u16], names: &[String], digest: &str, lines: &mut Vec<String>) {
    for name in names {
        if name.starts_with("*.") {
            lines.push(format!(
                "; {name}: a wildcard name: publish the record under each host name it serves"
            ));
            continue;
        }
        for port in ports {
            lines.push(format!("_{port}._tcp.{name}. IN TLSA 3 1 1 {digest}"));
        }
    }
}

/// The TLSA lines for what `config` serves now (`served`, in
/// configuration order, as the certificate reload loaded them).
pub fn tlsa_lines(config: &Config, served: &[Arc<LoadedCertificate>]) -> Vec<String> {
    let ports = smtp_ports(config);
    let mut lines = Vec::new();
    if ports.is_empty() {
        lines.push("; no SMTP listener: no TLSA record to publish".to_string());
        return lines;
    }
    for (index, certificate) in served.iter().enumerate() {
        let acme = config.acme.as_ref().and_then(|acme| {
            config.certificates.get(index).and_then(|files| {
                acme.certificates
                    .iter()
                    .find(|certificate| &certificate.files == files)
            })
        });
        let names = match acme {
            Some(acme) => acme.names.clone(),
            None => certificate.names.clone(),
        };
        if certificate.files.is_none() && acme.is_some() {
            lines.push(format!(
                "; {}: no certificate issued yet (a placeholder is served): no record",
                names.join(", ")
            ));
        } else {
            match spki_sha256_of_certificate(&certificate.certified_key.cert[0]) {
                Some(digest) => records(&ports, &certificate.names, &digest, &mut lines),
                None => lines.push(format!(
                    "; {}: the certificate cannot be read",
                    certificate.label()
                )),
            }
        }
        if let Some(acme) = acme {
            let next = acme.files.key.with_file_name(super::schedule::NEXT_PRIVKEY);
            if let Some(digest) = std::fs::read_to_string(&next)
                .ok()
                .and_then(|pem| spki_sha256_of_key(&pem))
            {
                lines.push(format!(
                    "; next key of {} ({}): publish before the next renewal uses it",
                    acme.label(),
                    next.display()
                ));
                records(&ports, &acme.names, &digest, &mut lines);
            }
        }
    }
    lines
}

/// Loads what `config` serves and returns its TLSA lines.
pub fn tlsa_for_config(config: &Config) -> Result<Vec<String>, CertificateError> {
    let reloader = crate::server::load_certificates(config)?;
    Ok(tlsa_lines(config, &reloader.certificates()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_and_key_digests_agree() {
        let pair = crate::tls::generate_pair(&["mail.example.org".into()]).expect("pair");
        let from_certificate = spki_sha256_of_certificate(&pair.cert_der).expect("digest");
        let from_key = spki_sha256_of_key(&pair.key_pem).expect("digest");
        assert_eq!(from_certificate, from_key);
        assert_eq!(from_certificate.len(), 64);
    }
}
