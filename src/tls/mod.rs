//! Everything TLS: the crypto provider, certificate loading, and the rustls
//! server configuration each listener accepts with.
//!
//! Certificates live behind a `CertificateStore` that rustls asks at every
//! handshake, so a reload swaps one pointer and new handshakes see the new
//! pair while established sessions keep theirs.
//!
//! One concept per (crate-private) module:
//! - `certs`: loading and checking a pair from its PEM files.
//! - `generate`: self-signed pairs (the default without certificates).
//! - `expiry`: validity over time and the warnings about it.
//! - `resolver`: the swappable store and SNI selection.
//! - `reload`: whether and what to swap; `watch`: what sets a reload off
//!   (directory watch, SIGHUP).
//! - `acceptor`: a listener's handshake with its SNI policy; `cork`: the
//!   TLS 1.3 session tickets sent with the session's first write;
//!   `client_hello`: whether a client asks to resume (how many tickets);
//!   `provider`: the crypto backend.
//! - `tickets`: session resumption: the process's one ticketer, the shared
//!   `ticket_keys` file, its reloads and its rotation.

pub(crate) mod acceptor;
pub(crate) mod certs;
pub mod client_hello;
pub(crate) mod cork;
pub(crate) mod expiry;
pub(crate) mod generate;
pub(crate) mod provider;
pub(crate) mod reload;
pub(crate) mod resolver;
pub mod tickets;
pub(crate) mod watch;

use std::sync::Arc;

use rustls::server::{ProducesTickets, StoresServerSessions};
use rustls::ServerConfig;

use crate::config::TlsVersion;
use crate::protocol::Protocol;

pub use certs::{CertificateError, LoadedCertificate};
pub use expiry::Expiry;
pub use generate::{generate_pair, GeneratedPair};
pub(crate) use reload::count_reload;
pub use reload::{ReloadStats, Reloader};
pub use tickets::{SessionTicketer, TicketKeyError, TicketKeyReloads, TicketKeys};

pub(crate) use acceptor::Acceptor;
pub(crate) use resolver::CertificateStore;

/// One listener's server configuration: TLS 1.2 and 1.3 only (or 1.3 only),
/// the provider's AEAD, forward-secret suites, certificates from `store`, and
/// ALPN restricted to the listener's protocol, and session tickets from
/// `ticketer` (the process's one: see [`tickets`]), and TLS 1.2 session IDs
/// from `session_ids` (the process's one: [`session_id_cache`]).
///
/// ALPN defends against cross-protocol attacks (ALPACA): a client that offers
/// ALPN must offer this listener's protocol id, or rustls refuses the
/// handshake with the no_application_protocol alert. A client offering no
/// ALPN at all (most mail clients) is served.
pub(crate) fn server_config(
    store: Arc<CertificateStore>,
    min_version: TlsVersion,
    protocol: Protocol,
    ticketer: Arc<dyn ProducesTickets>,
    session_ids: Arc<dyn StoresServerSessions>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let versions = match min_version {
        TlsVersion::Tls12 => provider::PROTOCOL_VERSIONS,
        TlsVersion::Tls13 => provider::TLS13_ONLY,
    };
    let mut config = ServerConfig::builder_with_provider(provider::provider())
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![protocol.as_str().as_bytes().to_vec()];
    // Mail clients keep long sessions; resumption mostly helps reconnect
    // storms. Stateless tickets keep no per-client memory on the proxy, and
    // replicas sharing `ticket_keys` resume each other's sessions.
    config.ticketer = ticketer;
    config.session_storage = session_ids;
    config.send_tls13_tickets = 2;
    Ok(Arc::new(config))
}

/// TLS 1.2 sessions a client without ticket support resumes by session ID:
/// one cache for every listener, kept for the life of the process (across
/// configuration reloads, like the ticketer). Bounded: the least recently
/// used entries make room (each holds a session's secret and parameters,
/// a few hundred bytes).
pub(crate) fn session_id_cache() -> Arc<dyn StoresServerSessions> {
    rustls::server::ServerSessionMemoryCache::new(SESSION_IDS_KEPT)
}

/// How many TLS 1.2 session IDs [`session_id_cache`] keeps.
const SESSION_IDS_KEPT: usize = 4096;
