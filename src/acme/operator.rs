//! What the command line reads from and asks of the ACME state: `check`'s
//! lines about each ACME certificate, and `acme renew`'s requests to the
//! running proxy.

use std::path::PathBuf;

use super::schedule::current;
use super::store::StateDir;
use crate::config::Config;
use crate::time::format_unix_time;

/// Why `acme renew` cannot ask for a renewal.
#[derive(Debug, thiserror::Error)]
pub enum RenewRequestError {
    #[error("the configuration has no [acme] table")]
    NoAcme,
    #[error("no acme certificate names {0:?} (acme certificates: {1})")]
    UnknownName(String, String),
    #[error(transparent)]
    State(#[from] super::store::StateError),
}

/// Asks the running proxy (the instance holding the issuance lock) to
/// renew the ACME certificate that names `name`, or every one; returns the
/// request files written (the proxy removes each within a second or so).
pub fn request_renewal(
    config: &Config,
    name: Option<&str>,
) -> Result<Vec<(String, PathBuf)>, RenewRequestError> {
    let acme = config.acme.as_ref().ok_or(RenewRequestError::NoAcme)?;
    let state = StateDir::new(&acme.settings.state_dir);
    let selected: Vec<&super::settings::AcmeCertificate> = match name {
        None => acme.certificates.iter().collect(),
        Some(name) => {
            let wanted = name.trim_end_matches('.').to_ascii_lowercase();
            let found: Vec<_> = acme
                .certificates
                .iter()
                .filter(|certificate| certificate.names.contains(&wanted))
                .collect();
            if found.is_empty() {
                let known: Vec<&str> = acme.certificates.iter().map(|c| c.label()).collect();
                return Err(RenewRequestError::UnknownName(
                    name.to_string(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    },
                ));
            }
            found
        }
    };
    selected
        .into_iter()
        .map(|certificate| {
            state
                .request_renewal(certificate.label())
                .map(|path| (certificate.label().to_string(), path))
                .map_err(RenewRequestError::from)
        })
        .collect()
}

/// `check`'s lines about the ACME table and each ACME certificate: what
/// is issued until when, when it is renewed next, the last error.
pub fn status_lines(config: &Config) -> Vec<String> {
    let Some(acme) = &config.acme else {
        return Vec::new();
    };
    let settings = &acme.settings;
    let listen = settings.http_listen.or(settings.tls_alpn_listen);
    let mut lines = vec![format!(
        "acme: {} ({} challenge on {}), state in {}{}",
        settings.directory,
        settings.challenge.as_str(),
        listen
            .map(|address| address.to_string())
            .unwrap_or_default(),
        settings.state_dir.display(),
        settings
            .ca_bundle
            .as_ref()
            .map(|bundle| format!(", trusting {}", bundle.display()))
            .unwrap_or_default()
    )];
    let state = StateDir::new(&settings.state_dir);
    for certificate in &acme.certificates {
        let recorded = state.certificate_state(certificate.label());
        let mut line = format!(
            "acme certificate {} ({}; {}{}): ",
            certificate.label(),
            certificate.names.join(", "),
            certificate.key_type.as_str(),
            if certificate.reuse_key {
                ", key reused"
            } else {
                ""
            }
        );
        match current(certificate) {
            Some(current) => {
                line.push_str(&format!(
                    "issued until {}",
                    format_unix_time(current.not_after)
                ));
                let next = recorded.next_renewal.unwrap_or_else(|| {
                    super::schedule::renewal_due(
                        current.not_before,
                        current.not_after,
                        settings.renew_before,
                        None,
                        0.0,
                    )
                });
                line.push_str(&format!(", next renewal at {}", format_unix_time(next)));
            }
            None => line.push_str(
                "not issued yet (a self-signed placeholder is served until the first issuance)",
            ),
        }
        match (&recorded.last_error, recorded.last_error_at) {
            (Some(error), at) => {
                line.push_str(", last error");
                if let Some(at) = at {
                    line.push_str(&format!(" at {}", format_unix_time(at)));
                }
                line.push_str(&format!(": {error}"));
                if let Some(retry) = recorded.next_retry {
                    line.push_str(&format!(" (next retry at {})", format_unix_time(retry)));
                }
            }
            (None, _) => line.push_str(", last error: none"),
        }
        lines.push(line);
    }
    lines
}
