//! Everything TLS: the crypto provider, certificate loading, and the rustls
//! server configuration each listener accepts with.
//!
//! Certificates live behind a [`CertificateStore`] that rustls asks at every
//! handshake, so a reload swaps one pointer and new handshakes see the new
//! pair while established sessions keep theirs.

pub mod certs;
pub mod provider;
pub mod resolver;

use std::sync::Arc;

use rustls::ServerConfig;

pub use certs::{load_certified_key, self_signed, CertificateError, LoadedCertificate};
pub use resolver::CertificateStore;

/// The server configuration shared by every listener: TLS 1.2 and 1.3 only,
/// the provider's AEAD, forward-secret suites, certificates from `store`.
pub fn server_config(store: Arc<CertificateStore>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider::provider())
        .with_protocol_versions(provider::PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    // Mail clients keep long sessions; resumption mostly helps reconnect
    // storms. Stateless tickets keep no per-client memory on the proxy.
    config.ticketer = provider::ticketer()?;
    config.send_tls13_tickets = 2;
    Ok(Arc::new(config))
}
