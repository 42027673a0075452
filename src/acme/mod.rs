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
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;

use crate::config::Config;
use crate::listeners::PlanError;
use crate::tls::reload::{ReloadNow, SourceSpec};
use challenges::PendingChallenges;
use settings::{AcmeConfig, ChallengeKind};

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

/// What a renewal manager serves: the `[acme]` table with its entries, and
/// the content of the CA bundle it names (a reload re-reads the files a
/// configuration names, so a new bundle under the same path is a change).
#[derive(Debug, PartialEq)]
struct Managed {
    config: AcmeConfig,
    ca_bundle: Option<Vec<u8>>,
}

impl Managed {
    fn of(config: &AcmeConfig) -> Managed {
        Managed {
            config: config.clone(),
            // Unreadable reads as empty: the manager that starts reports it.
            ca_bundle: config
                .settings
                .ca_bundle
                .as_deref()
                .map(|path| std::fs::read(path).unwrap_or_default()),
        }
    }
}

/// The ACME work of the configuration being served: the challenge
/// responder and the renewal manager. Challenges in flight are shared for
/// the life of the process.
pub(crate) struct AcmeService {
    challenges: Arc<PendingChallenges>,
    responder: Option<(ResponderAddress, JoinSet<()>)>,
    manager: JoinSet<()>,
    /// What the running manager serves.
    managed: Option<Managed>,
    /// Where the manager's requests to pick up a new pair go: the
    /// certificate reload of the configuration being served, replaced at
    /// each reload while the manager runs on.
    reload_target: watch::Sender<ReloadNow>,
    /// Managers started (for tests).
    #[cfg(test)]
    managers_started: usize,
}

impl AcmeService {
    pub(crate) fn new() -> AcmeService {
        AcmeService {
            challenges: PendingChallenges::new(),
            responder: None,
            manager: JoinSet::new(),
            managed: None,
            reload_target: watch::Sender::new(ReloadNow::channel().0),
            #[cfg(test)]
            managers_started: 0,
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
    /// A manager serving the same `[acme]` table and entries runs on (an
    /// order in flight goes on, nothing is asked of the CA again); for a
    /// changed one the previous manager stops (an order in flight is
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
        self.reload_target.send_replace(reload);
        let wanted = config
            .acme
            .as_ref()
            .filter(|acme| !acme.certificates.is_empty())
            .map(Managed::of);
        if wanted.is_some() && wanted == self.managed {
            info!("acme: [acme] and its certificates unchanged; renewals go on");
            return;
        }
        self.manager.shutdown().await;
        self.managed = None;
        if let Some(managed) = wanted {
            let acme = &managed.config;
            let issuer = Arc::new(client::AcmeIssuer::new(
                acme.settings.clone(),
                self.challenges.clone(),
            ));
            let reload = self.forwarded_reloads();
            self.manager.spawn(
                manager::Manager {
                    issuer,
                    config: acme.clone(),
                    reload,
                    jitter: schedule::full_jitter,
                }
                .run(),
            );
            self.managed = Some(managed);
            #[cfg(test)]
            {
                self.managers_started += 1;
            }
        }
    }

    /// A reload handle for a manager: its requests go to whichever
    /// certificate reload is current (forwarded by a task of the manager's).
    fn forwarded_reloads(&mut self) -> ReloadNow {
        let (reload, mut requests) = ReloadNow::channel();
        let target = self.reload_target.subscribe();
        self.manager.spawn(async move {
            while requests.recv().await.is_some() {
                target.borrow().request();
            }
        });
        reload
    }

    /// Stops the responder and the renewals.
    pub(crate) async fn stop(&mut self) {
        self.manager.shutdown().await;
        self.managed = None;
        if let Some((_, mut task)) = self.responder.take() {
            task.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A configuration with an `[acme]` table (its CA never answers) and
    /// `certificates` (TOML `[[certificate]]` tables).
    fn config(state: &std::path::Path, backend: &str, certificates: &str) -> Config {
        let text = format!(
            r#"hostname = "proxy.test"

[acme]
directory = "https://127.0.0.1:9/directory"
contact = "mailto:postmaster@example.org"
state_dir = {state:?}
ca_bundle = {bundle:?}
challenge = "http-01"
http_listen = "127.0.0.1:0"

{certificates}

[[listener]]
name = "imaps"
protocol = "imap"
tls = "implicit"
listen = "127.0.0.1:0"
backend = "{backend}"
"#,
            state = state.display().to_string(),
            bundle = state.with_file_name("ca.pem").display().to_string(),
        );
        Config::parse(&text, std::path::Path::new("config.toml")).expect("valid configuration")
    }

    const ONE: &str = "[[certificate]]\nacme = [\"mail.example.test\"]\n";
    const TWO: &str = "[[certificate]]\nacme = [\"mail.example.test\"]\n\n[[certificate]]\nacme = [\"smtp.example.test\"]\n";

    async fn apply(service: &mut AcmeService, config: Config) {
        let prepared = service.prepare(&config).await.expect("prepare");
        service
            .apply(&config, prepared, ReloadNow::channel().0)
            .await;
    }

    #[tokio::test]
    async fn a_reload_that_leaves_acme_as_it_was_keeps_the_renewals_going() {
        let dir = crate::test_dir::TestDir::new("acme-keep");
        let state = dir.join("state");
        std::fs::write(dir.join("ca.pem"), "first bundle").expect("write");
        let mut service = AcmeService::new();
        apply(&mut service, config(&state, "127.0.0.1:143", ONE)).await;
        assert_eq!(service.managers_started, 1);
        // Another backend, the same [acme] and entries: the manager runs on.
        apply(&mut service, config(&state, "127.0.0.1:1143", ONE)).await;
        assert_eq!(service.managers_started, 1);
        // An entry more: a manager for the new set.
        apply(&mut service, config(&state, "127.0.0.1:1143", TWO)).await;
        assert_eq!(service.managers_started, 2);
        // A new CA bundle under the same path: a manager that reads it.
        std::fs::write(dir.join("ca.pem"), "second bundle").expect("write");
        apply(&mut service, config(&state, "127.0.0.1:1143", TWO)).await;
        assert_eq!(service.managers_started, 3);
        // No ACME entry left: no manager.
        apply(&mut service, config(&state, "127.0.0.1:1143", "")).await;
        assert!(service.manager.is_empty());
        assert_eq!(service.managed, None);
        apply(&mut service, config(&state, "127.0.0.1:1143", ONE)).await;
        assert_eq!(service.managers_started, 4);
        service.stop().await;
    }

    #[tokio::test]
    async fn a_running_manager_asks_the_current_certificate_reload() {
        let mut service = AcmeService::new();
        let (first, mut first_requests) = ReloadNow::channel();
        service.reload_target.send_replace(first);
        let manager = service.forwarded_reloads();
        manager.request();
        let within = Duration::from_secs(5);
        tokio::time::timeout(within, first_requests.recv())
            .await
            .expect("forwarded in time")
            .expect("a request");
        // A reload replaces the certificate reload the manager asks.
        let (second, mut second_requests) = ReloadNow::channel();
        service.reload_target.send_replace(second);
        manager.request();
        tokio::time::timeout(within, second_requests.recv())
            .await
            .expect("forwarded in time")
            .expect("a request");
        assert!(
            first_requests.try_recv().is_err(),
            "the old reload is not asked"
        );
        service.stop().await;
    }
}
