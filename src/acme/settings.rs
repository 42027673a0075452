//! The `[acme]` table and the ACME keys of a `[[certificate]]` entry
//! (`acme`, `key_type`, `reuse_key`): what the file says, checked, as the
//! typed settings the rest of [`crate::acme`] reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::CertificateFiles;

/// The `[acme]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAcme {
    directory: String,
    contact: Option<String>,
    state_dir: PathBuf,
    challenge: RawChallenge,
    http_listen: Option<String>,
    tls_alpn_listen: Option<String>,
    ca_bundle: Option<PathBuf>,
    renew_before_days: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum RawChallenge {
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// The key type of an ACME certificate's private key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum KeyType {
    /// ECDSA on P-256 (the default: small, fast, accepted everywhere).
    #[default]
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// RSA 2048 bits, for clients that know no ECDSA.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

impl KeyType {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }
}

/// How the ACME server checks that the proxy answers for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// RFC 8555 8.3: `GET http://NAME/.well-known/acme-challenge/TOKEN`
    /// on port 80.
    Http01,
    /// RFC 8737: a TLS handshake on port 443 with ALPN `acme-tls/1`.
    TlsAlpn01,
}

impl ChallengeKind {
    /// The name used in the configuration file and by ACME.
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// The validated `[acme]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// The RFC 8555 directory URL (https).
    pub directory: String,
    /// `mailto:` contact for the account, if any.
    pub contact: Option<String>,
    /// Account key, orders, issued pairs, the lock.
    pub state_dir: PathBuf,
    pub challenge: ChallengeKind,
    /// Where the HTTP-01 responder listens (challenge = "http-01").
    pub http_listen: Option<SocketAddr>,
    /// Where the TLS-ALPN-01 responder listens (challenge = "tls-alpn-01").
    pub tls_alpn_listen: Option<SocketAddr>,
    /// Roots trusted for the directory's HTTPS instead of the system's.
    pub ca_bundle: Option<PathBuf>,
    /// Renew when less than this is left; `None`: a third of the lifetime.
    pub renew_before: Option<Duration>,
}

/// One `[[certificate]]` entry with `acme = [...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeCertificate {
    /// The DNS names, lower case, in configuration order; the first names
    /// the entry's folder in the state directory.
    pub names: Vec<String>,
    pub key_type: KeyType,
    /// Keep the private key across renewals (a stable DANE 3 1 1 record).
    pub reuse_key: bool,
    /// Where the issued pair lives: `state_dir/certificates/<first name>/`.
    pub files: CertificateFiles,
}

impl AcmeCertificate {
    /// The entry's name in logs, metrics, the state directory and the
    /// command line: its first DNS name.
    pub fn label(&self) -> &str {
        &self.names[0]
    }
}

/// The `[acme]` table with the ACME `[[certificate]]` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub settings: AcmeSettings,
    pub certificates: Vec<AcmeCertificate>,
}

/// A configuration problem: the key (as `acme.http_listen`) and the reason.
pub(crate) type Invalid = (String, String);

/// Checks the `[acme]` table; relative paths are relative to `base`.
pub(crate) fn parse_acme(raw: RawAcme, base: &Path) -> Result<AcmeSettings, Invalid> {
    let invalid = |key: &str, reason: String| (format!("acme.{key}"), reason);
    if !raw.directory.starts_with("https://") || raw.directory.len() <= "https://".len() {
        return Err(invalid(
            "directory",
            format!("{:?} is not an https:// URL", raw.directory),
        ));
    }
    if let Some(contact) = &raw.contact {
        if !contact.starts_with("mailto:") || contact.len() <= "mailto:".len() {
            return Err(invalid(
                "contact",
                format!(
                    "{contact:?} is not a mailto: URL (e.g. \"mailto:postmaster@example.org\")"
                ),
            ));
        }
    }
    let address = |key: &str, value: &Option<String>| -> Result<Option<SocketAddr>, Invalid> {
        value
            .as_ref()
            .map(|text| {
                text.parse::<SocketAddr>().map_err(|_| {
                    invalid(
                        key,
                        format!("{text:?} is not an address and port (e.g. 0.0.0.0:80 or [::]:80)"),
                    )
                })
            })
            .transpose()
    };
    let http_listen = address("http_listen", &raw.http_listen)?;
    let tls_alpn_listen = address("tls_alpn_listen", &raw.tls_alpn_listen)?;
    let challenge = match raw.challenge {
        RawChallenge::Http01 => ChallengeKind::Http01,
        RawChallenge::TlsAlpn01 => ChallengeKind::TlsAlpn01,
    };
    match challenge {
        ChallengeKind::Http01 if http_listen.is_none() => {
            return Err(invalid(
                "http_listen",
                "challenge = \"http-01\" needs the address the HTTP-01 responder listens on (e.g. \"0.0.0.0:80\")".into(),
            ))
        }
        ChallengeKind::Http01 if tls_alpn_listen.is_some() => {
            return Err(invalid(
                "tls_alpn_listen",
                "applies to challenge = \"tls-alpn-01\" only".into(),
            ))
        }
        ChallengeKind::TlsAlpn01 if tls_alpn_listen.is_none() => {
            return Err(invalid(
                "tls_alpn_listen",
                "challenge = \"tls-alpn-01\" needs the address the TLS-ALPN-01 responder listens on (e.g. \"0.0.0.0:443\")".into(),
            ))
        }
        ChallengeKind::TlsAlpn01 if http_listen.is_some() => {
            return Err(invalid(
                "http_listen",
                "applies to challenge = \"http-01\" only".into(),
            ))
        }
        _ => {}
    }
    let renew_before = match raw.renew_before_days {
        Some(0) => return Err(invalid("renew_before_days", "must be at least 1".into())),
        Some(days) => Some(Duration::from_secs(days.saturating_mul(86_400))),
        None => None,
    };
    Ok(AcmeSettings {
        directory: raw.directory,
        contact: raw.contact,
        state_dir: base.join(raw.state_dir),
        challenge,
        http_listen,
        tls_alpn_listen,
        ca_bundle: raw.ca_bundle.map(|path| base.join(path)),
        renew_before,
    })
}

/// Checks the names of one `[[certificate]]` entry's `acme` list: DNS
/// names an HTTP-01 or TLS-ALPN-01 challenge can prove (no wildcards),
/// each once. Returns them in lower case.
pub(crate) fn parse_acme_names(names: &[String]) -> Result<Vec<String>, String> {
    if names.is_empty() {
        return Err("needs at least one DNS name".into());
    }
    let mut checked: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        if lower.starts_with("*.") {
            return Err(format!(
                "{name:?}: a wildcard name can only be proved with DNS-01, which the proxy does not do"
            ));
        }
        let valid = !lower.is_empty()
            && lower.len() <= 253
            && lower.contains('.')
            && lower.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!("{name:?} is not a fully qualified DNS host name"));
        }
        if checked.contains(&lower) {
            return Err(format!("{name:?} is listed twice"));
        }
        checked.push(lower);
    }
    Ok(checked)
}

/// The files of an ACME entry whose first name is `first_name`.
pub(crate) fn acme_files(state_dir: &Path, first_name: &str) -> CertificateFiles {
    let folder = super::store::StateDir::new(state_dir).certificate_dir(first_name);
    CertificateFiles {
        cert: folder.join(super::store::FULLCHAIN),
        key: folder.join(super::store::PRIVKEY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acme_names_are_checked_and_lowered() {
        assert_eq!(
            parse_acme_names(&["Mail.Example.org".into(), "smtp.example.org.".into()]),
            Ok(vec![
                "mail.example.org".to_string(),
                "smtp.example.org".to_string()
            ])
        );
        for (names, expected) in [
            (vec![], "at least one"),
            (vec!["*.example.org".to_string()], "wildcard"),
            (vec!["localhost".to_string()], "fully qualified"),
            (vec!["bad_name.example".to_string()], "fully qualified"),
            (
                vec!["a.example".to_string(), "A.example".to_string()],
                "twice",
            ),
        ] {
            let error = parse_acme_names(&names).expect_err("invalid");
            assert!(error.contains(expected), "{names:?}: {error}");
        }
    }
}
