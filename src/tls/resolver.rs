//! The certificate rustls serves, swappable at run time.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Holds the certificate currently served; rustls consults it on every
/// handshake. Replacing it is one atomic pointer swap: handshakes that already
/// picked a certificate, and established sessions, are unaffected.
pub struct CertificateStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertificateStore {
    pub fn new(initial: Arc<CertifiedKey>) -> Self {
        Self {
            current: ArcSwap::new(initial),
        }
    }

    /// Serves `next` to every handshake from now on.
    pub fn replace(&self, next: Arc<CertifiedKey>) {
        self.current.store(next);
    }

    /// The certificate served right now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore")
            .field("chain_length", &self.current.load().cert.len())
            .finish()
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
