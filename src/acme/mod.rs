//! Certificates from an ACME CA (RFC 8555) for the `[[certificate]]`
//! entries that list `acme = [names]`, proved with HTTP-01 or TLS-ALPN-01.
//!
//! An ACME entry is a certificate source like a file pair, whose files are
//! in the state directory: the certificate reload ([`crate::tls::Reloader`])
//! serves and swaps them, with a self-signed placeholder until the first
//! issuance. This module gets them there:
//! - `settings`: the `[acme]` table and the entries' keys, checked.
//! - `store`: the state directory's layout and atomic writes.
//! - `lock`: which instance issues (`state_dir/lock`).
//! - `client`: orders at the CA (`instant-acme`), behind a trait.
//! - `schedule`: when to renew, backoff, and one renewal.
//! - `manager`: the lock, one renewal task per entry, renewal requests.
//! - `challenges`, `http01`, `tls_alpn01`: the challenges being answered
//!   and the two responders.
//! - `tlsa`: DANE records for the served keys; `operator`: what the
//!   command line reads and asks (`check`, `acme renew`).

pub(crate) mod challenges;
pub(crate) mod client;
pub(crate) mod http01;
pub(crate) mod lock;
pub(crate) mod manager;
pub mod operator;
pub(crate) mod schedule;
pub mod settings;
pub mod store;
pub(crate) mod tls_alpn01;
pub mod tlsa;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::listeners::PlanError;
use crate::tls::reload::{ReloadNow, SourceSpec};
use challenges::PendingChallenges;
use settings::ChallengeKind;

/// Connections one challenge responder serves at once. A CA validates from
/// a few vantage points at a time; further connections (a scan, a flood on
/// the open port 80 or 443) are closed at once instead of each holding a
/// file descriptor and a task the proxy's mail listeners need.
pub(crate) const RESPONDER_CONNECTIONS: usize = 64;

/// Every `[[certificate]]` of `config` as the certificate reload takes
/// them: ACME entries with their placeholder names.
pub(crate) fn certificate_sources(config: &Config) -> Vec<SourceSpec> {
    config
        .certificates
        .iter()
        .map(|files| SourceSpec {
            files: files.clone(),
            placeholder_names: config.acme.as_ref().and_then(|acme| {
                acme.certificates
                    .iter()
                    .find(|certificate| &certificate.files == files)
                    .map(|certificate| certificate.names.clone())
            }),
        })
        .collect()
}

/// The challenge responder a configuration needs: which kind, where.
type ResponderAddress = (ChallengeKind, SocketAddr);

fn responder_address(config: &Config) -> Option<ResponderAddress> {
    let settings = &config.acme.as_ref()?.settings;
    match settings.challenge {
        ChallengeKind::Http01 => settings
            .http_listen
            .map(|address| (ChallengeKind::Http01, address)),
        ChallengeKind::TlsAlpn01 => settings
            .tls_alpn_listen
            .map(|address| (ChallengeKind::TlsAlpn01, address)),
    }
}

/// The responder socket of a configuration about to be applied.
pub(crate) enum PreparedResponder {
    /// The running responder stays (same kind, same address).
    Keep,
    /// A new one, bound, to replace the running one.
    Bound(ResponderAddress, TcpListener),
    /// The configuration has none.
    Nothing,
}

/// The ACME work of the configuration being served: the challenge
/// responder and the renewal manager. Challenges in flight are shared for
/// the life of the process.
pub(crate) struct AcmeService {
    challenges: Arc<PendingChallenges>,
    responder: Option<(ResponderAddress, JoinSet<()>)>,
    manager: JoinSet<()>,
}

impl AcmeService {
    pub(crate) fn new() -> AcmeService {
        AcmeService {
            challenges: PendingChallenges::new(),
            responder: None,
            manager: JoinSet::new(),
        }
    }

    /// Binds the challenge responder `config` needs unless one serves that
    /// address already; changes nothing yet (dropping the result closes
    /// what it bound).
    pub(crate) async fn prepare(&self, config: &Config) -> Result<PreparedResponder, PlanError> {
        let Some(wanted) = responder_address(config) else {
            return Ok(PreparedResponder::Nothing);
        };
        if self.responder.as_ref().map(|(running, _)| *running) == Some(wanted) {
            return Ok(PreparedResponder::Keep);
        }
        let (kind, address) = wanted;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| PlanError::Bind {
                name: format!("acme-{}", kind.as_str()),
                address,
                source,
            })?;
        Ok(PreparedResponder::Bound(wanted, listener))
    }

    /// Serves `config`'s ACME work from now on: its responder (`prepared`)
    /// and its renewal manager, which asks `reload` to pick up new pairs.
    /// The previous configuration's manager stops (an order in flight is
    /// abandoned; the next one starts over).
    pub(crate) async fn apply(
        &mut self,
        config: &Config,
        prepared: PreparedResponder,
        reload: ReloadNow,
    ) {
        match prepared {
            PreparedResponder::Keep => {}
            PreparedResponder::Nothing => {
                if let Some((_, mut task)) = self.responder.take() {
                    task.shutdown().await;
                }
            }
            PreparedResponder::Bound(address, listener) => {
                if let Some((_, mut task)) = self.responder.take() {
                    task.shutdown().await;
                }
                let mut task = JoinSet::new();
                match address.0 {
                    ChallengeKind::Http01 => {
                        task.spawn(http01::serve(listener, self.challenges.clone()))
                    }
                    ChallengeKind::TlsAlpn01 => {
                        task.spawn(tls_alpn01::serve(listener, self.challenges.clone()))
                    }
                };
                self.responder = Some((address, task));
            }
        }
        self.manager.shutdown().await;
        if let Some(acme) = &config.acme {
            if !acme.certificates.is_empty() {
                let issuer = Arc::new(client::AcmeIssuer::new(
                    acme.settings.clone(),
                    self.challenges.clone(),
                ));
                self.manager.spawn(
                    manager::Manager {
                        issuer,
                        config: acme.clone(),
                        reload,
                        jitter: schedule::full_jitter,
                    }
                    .run(),
                );
            }
        }
    }

    /// Stops the responder and the renewals.
    pub(crate) async fn stop(&mut self) {
        self.manager.shutdown().await;
        if let Some((_, mut task)) = self.responder.take() {
            task.shutdown().await;
        }
    }
}
