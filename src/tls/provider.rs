//! The one place that names the cryptography backend (aws-lc-rs).
//!
//! Every rustls configuration is built from [`provider`], never from a process
//! default: two providers in one dependency tree make rustls' default builder
//! panic, and naming it once keeps the choice reviewable.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::ProducesTickets;
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

/// Session ticket encryption with keys rotated every few hours.
pub(crate) fn ticketer() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    rustls::crypto::aws_lc_rs::Ticketer::new()
}
