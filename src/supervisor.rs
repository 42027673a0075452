//! What the proxy tells whoever supervises it (systemd, a test) about its
//! life cycle: ready to serve, reloading, reloaded, stopping.
//!
//! The server calls these at the moments a service manager needs to know:
//! [`Supervisor::ready`] once every listener is bound and certificates are
//! loaded, [`Supervisor::reloading`] before a configuration reload starts and
//! [`Supervisor::reloaded`] when it has ended (applied or rejected: either
//! way the proxy serves again), [`Supervisor::stopping`] when the drain
//! begins. Each gets a one-line status for humans (`systemctl status`).
//! The library knows nothing of how these are delivered; the binary plugs in
//! systemd's notify protocol.

/// Receives the proxy's life-cycle moments. Every method has a default that
/// does nothing, so an implementation only writes what it uses.
pub trait Supervisor: Send + Sync {
    /// Every listener is bound and certificates are loaded: serving.
    fn ready(&self, _status: &str) {}
    /// A configuration reload has started.
    fn reloading(&self) {}
    /// A configuration reload has ended; `status` says whether it was applied.
    fn reloaded(&self, _status: &str) {}
    /// The drain has begun: listeners stop accepting.
    fn stopping(&self, _status: &str) {}
}

/// Nobody to tell.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unsupervised;

impl Supervisor for Unsupervised {}
