//! The challenges being answered now: HTTP-01 key authorizations by token,
//! TLS-ALPN-01 certificates by name. The order flow publishes one for as
//! long as the CA may check it (the returned [`Published`] withdraws it
//! when dropped); the responders answer only what is published.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::sign::CertifiedKey;

/// The challenges published now, shared by the order flows and the
/// responders for the life of the process.
#[derive(Debug, Default)]
pub(crate) struct PendingChallenges {
    http01: Mutex<HashMap<String, String>>,
    tls_alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding it leaves a map that is still valid.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PendingChallenges {
    pub(crate) fn new() -> Arc<PendingChallenges> {
        Arc::new(PendingChallenges::default())
    }

    /// Answers `GET /.well-known/acme-challenge/<token>` with
    /// `key_authorization` until the result is dropped.
    pub(crate) fn publish_http01(
        self: &Arc<Self>,
        token: &str,
        key_authorization: &str,
    ) -> Published {
        locked(&self.http01).insert(token.to_string(), key_authorization.to_string());
        Published {
            challenges: self.clone(),
            key: Key::Http01(token.to_string()),
        }
    }

    /// Completes `acme-tls/1` handshakes for `name` with `certificate`
    /// until the result is dropped.
    pub(crate) fn publish_tls_alpn01(
        self: &Arc<Self>,
        name: &str,
        certificate: Arc<CertifiedKey>,
    ) -> Published {
        let name = name.to_ascii_lowercase();
        locked(&self.tls_alpn01).insert(name.clone(), certificate);
        Published {
            challenges: self.clone(),
            key: Key::TlsAlpn01(name),
        }
    }

    /// The key authorization for an HTTP-01 token, if one is published.
    pub(crate) fn http01(&self, token: &str) -> Option<String> {
        locked(&self.http01).get(token).cloned()
    }

    /// The challenge certificate for a name, if one is published.
    pub(crate) fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        locked(&self.tls_alpn01)
            .get(&name.trim_end_matches('.').to_ascii_lowercase())
            .cloned()
    }
}

#[derive(Debug)]
enum Key {
    Http01(String),
    TlsAlpn01(String),
}

/// A published challenge; dropping it withdraws it.
#[derive(Debug)]
pub(crate) struct Published {
    challenges: Arc<PendingChallenges>,
    key: Key,
}

impl Drop for Published {
    fn drop(&mut self) {
        match &self.key {
            Key::Http01(token) => {
                locked(&self.challenges.http01).remove(token);
            }
            Key::TlsAlpn01(name) => {
                locked(&self.challenges.tls_alpn01).remove(name);
            }
        }
    }
}

/// The RFC 8737 challenge certificate for `name`: self-signed, a fresh
/// P-256 key, the name as its only subjectAltName, and the critical
/// acmeIdentifier extension (1.3.6.1.5.5.7.1.31) holding the SHA-256 of the
/// key authorization.
pub(crate) fn tls_alpn01_certificate(
    name: &str,
    key_authorization_digest: &[u8],
) -> Result<Arc<CertifiedKey>, String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|error| format!("challenge key: {error}"))?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|error| format!("challenge certificate for {name:?}: {error}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(
        key_authorization_digest,
    )];
    let certificate = params
        .self_signed(&key)
        .map_err(|error| format!("challenge certificate for {name:?}: {error}"))?;
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing_key = crate::tls::provider::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|error| format!("challenge key: {error}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![certificate.der().clone()],
        signing_key,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_challenges_are_withdrawn_when_dropped() {
        let challenges = PendingChallenges::new();
        let published = challenges.publish_http01("token-1", "token-1.thumb");
        assert_eq!(
            challenges.http01("token-1").as_deref(),
            Some("token-1.thumb")
        );
        assert_eq!(challenges.http01("token-2"), None);
        drop(published);
        assert_eq!(challenges.http01("token-1"), None);

        let certificate = tls_alpn01_certificate("mail.example.org", &[7; 32]).expect("cert");
        let published = challenges.publish_tls_alpn01("Mail.Example.org", certificate);
        assert!(challenges.tls_alpn01("mail.example.org.").is_some());
        drop(published);
        assert!(challenges.tls_alpn01("mail.example.org").is_none());
    }

    #[test]
    fn the_challenge_certificate_carries_the_critical_acme_identifier() {
        let digest = [0xabu8; 32];
        let certificate = tls_alpn01_certificate("mail.example.org", &digest).expect("cert");
        let (_, parsed) = x509_parser::parse_x509_certificate(&certificate.cert[0]).expect("parse");
        let extension = parsed
            .extensions()
            .iter()
            .find(|extension| extension.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(extension.critical);
        // An OCTET STRING of 32 bytes: the digest.
        assert_eq!(extension.value[..2], [0x04, 0x20]);
        assert_eq!(&extension.value[2..], &digest);
    }
}
