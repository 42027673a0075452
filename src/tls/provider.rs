//! The one place that names the cryptography backend (aws-lc-rs).
//!
//! Every rustls configuration is built from [`provider`], never from a process
//! default: two providers in one dependency tree make rustls' default builder
//! panic, and naming it once keeps the choice reviewable.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::SupportedProtocolVersion;

/// TLS 1.3 and 1.2 only: rustls implements nothing older, by design
/// (RFC 8996 deprecates TLS 1.0 and 1.1).
pub(crate) const PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// For listeners configured with `min_tls_version = "1.3"`.
pub(crate) const TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// aws-lc-rs with its default suites: all AEAD (AES-GCM, ChaCha20-Poly1305)
/// with ephemeral key exchange, i.e. forward secrecy.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The session ticket AEAD: AES-256-GCM, its key derived from a ticket
/// key's secret bytes with HKDF-SHA256, a random 96-bit nonce per ticket.
///
/// [`super::tickets`] builds tickets from it and never names the backend.
pub(crate) struct TicketCipher {
    key: aws_lc_rs::aead::LessSafeKey,
    random: &'static dyn rustls::crypto::SecureRandom,
}

/// The HKDF `info` that binds a derived key to this one use.
const TICKET_KEY_INFO: &[u8] = b"mail-tls-proxy session ticket AES-256-GCM v1";

impl TicketCipher {
    /// Bytes a sealed message adds to its plaintext: the nonce before it
    /// and the tag after it.
    pub(crate) const OVERHEAD: usize = aws_lc_rs::aead::NONCE_LEN + aws_lc_rs::aead::MAX_TAG_LEN;

    /// The cipher for `secret` (any length; the file format gives 64 bytes).
    pub(crate) fn from_secret(secret: &[u8]) -> Option<TicketCipher> {
        use aws_lc_rs::{aead, hkdf};
        let pseudo_random_key = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(secret);
        let derived = pseudo_random_key
            .expand(&[TICKET_KEY_INFO], &aead::AES_256_GCM)
            .ok()?;
        Some(TicketCipher {
            key: aead::LessSafeKey::new(aead::UnboundKey::from(derived)),
            random: provider().secure_random,
        })
    }

    /// `nonce || ciphertext || tag`, authenticating `context` too; `None`
    /// if no random nonce could be had.
    pub(crate) fn seal(&self, context: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
        use aws_lc_rs::aead::{Aad, Nonce, NONCE_LEN};
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut sealed = Vec::with_capacity(plaintext.len() + Self::OVERHEAD);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);
        let mut body = sealed.split_off(NONCE_LEN);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut body,
            )
            .ok()?;
        sealed.append(&mut body);
        Some(sealed)
    }

    /// The plaintext of what [`TicketCipher::seal`] made with this key and
    /// `context`; `None` for anything else (wrong key, altered bytes, too
    /// short).
    pub(crate) fn open(&self, context: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        use aws_lc_rs::aead::{Aad, Nonce, NONCE_LEN};
        if sealed.len() < Self::OVERHEAD {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::from(context), &mut body)
            .ok()?;
        Some(plaintext.to_vec())
    }
}

impl std::fmt::Debug for TicketCipher {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        formatter.write_str("TicketCipher(AES-256-GCM)")
    }
}

/// Fills `bytes` from the provider's secure random generator.
pub(crate) fn fill_random(bytes: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
    provider().secure_random.fill(bytes)
}
