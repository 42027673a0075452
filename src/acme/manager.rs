//! One `[acme]` table at work: the issuance lock, one renewal task per
//! ACME certificate while this instance holds the lock, and the renewal
//! requests `mail-tls-proxy acme renew` leaves in the state directory
//! (looked at every second).
//!
//! An instance without the lock issues nothing: it serves the pairs the
//! holder writes (the certificate watch picks them up) and tries to take
//! the lock every minute, so issuance moves to another replica when the
//! holder stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::client::Issuer;
use super::lock::IssuanceLock;
use super::schedule::{current, renewal_due, Jitter, Renewal};
use super::settings::AcmeConfig;
use super::store::StateDir;
use crate::metrics;
use crate::tls::reload::ReloadNow;

/// How often an instance without the lock tries to take it.
pub(crate) const LOCK_RETRY: Duration = Duration::from_secs(60);
/// How often the renewal requests are looked for.
pub(crate) const REQUEST_POLL: Duration = Duration::from_secs(1);

/// The renewal work of one `[acme]` table.
pub(crate) struct Manager<I: Issuer> {
    pub(crate) issuer: Arc<I>,
    pub(crate) config: AcmeConfig,
    pub(crate) reload: ReloadNow,
    pub(crate) jitter: Jitter,
}

impl<I: Issuer> Manager<I> {
    /// Waits for the lock, then renews every certificate when due, until
    /// the task is dropped (which releases the lock).
    pub(crate) async fn run(self) {
        let state = StateDir::new(&self.config.settings.state_dir);
        if let Err(error) = state.create() {
            warn!(%error, "acme: cannot create the state directory; trying again at each step");
        }
        for certificate in &self.config.certificates {
            let due = current(certificate)
                .map(|current| {
                    renewal_due(
                        current.not_before,
                        current.not_after,
                        self.config.settings.renew_before,
                        None,
                        0.0,
                    )
                })
                .unwrap_or(0);
            ::metrics::gauge!(
                metrics::ACME_NEXT_RENEWAL_TIMESTAMP_SECONDS,
                "certificate" => certificate.label().to_string()
            )
            .set(due as f64);
        }
        let lock = self.acquire(&state).await;
        info!(
            lock = %lock.path().display(),
            certificates = %self.config.certificates.iter().map(|c| c.label()).collect::<Vec<_>>().join(","),
            "acme: this instance holds the issuance lock: it orders and renews the certificates"
        );
        let mut tasks = JoinSet::new();
        let mut requests = HashMap::new();
        for certificate in &self.config.certificates {
            let (sender, receiver) = mpsc::unbounded_channel();
            requests.insert(certificate.label().to_string(), sender);
            tasks.spawn(
                Renewal {
                    issuer: self.issuer.clone(),
                    certificate: certificate.clone(),
                    renew_before: self.config.settings.renew_before,
                    state: state.clone(),
                    reload: self.reload.clone(),
                    jitter: self.jitter,
                    requests: receiver,
                }
                .run(),
            );
        }
        let mut poll = tokio::time::interval(REQUEST_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            poll.tick().await;
            for name in state.renewal_requests() {
                state.clear_renewal_request(&name);
                match requests.get(&name) {
                    Some(sender) => {
                        let _ = sender.send(());
                    }
                    None => warn!(
                        certificate = %name,
                        "acme: renewal requested for a certificate this configuration does not have"
                    ),
                }
            }
        }
    }

    async fn acquire(&self, state: &StateDir) -> IssuanceLock {
        let path = state.lock();
        let mut told = false;
        loop {
            match IssuanceLock::try_acquire(&path) {
                Ok(Some(lock)) => return lock,
                Ok(None) if !told => {
                    told = true;
                    info!(
                        lock = %path.display(),
                        "acme: another instance holds the issuance lock: it orders the certificates, this one serves what it writes to the state directory"
                    );
                }
                Ok(None) => {}
                Err(error) => {
                    warn!(%error, "acme: cannot take the issuance lock; trying again");
                }
            }
            tokio::time::sleep(LOCK_RETRY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::client::{OrderFailure, RenewalWindow};
    use crate::acme::settings::{
        acme_files, AcmeCertificate, AcmeSettings, ChallengeKind, KeyType,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A CA that refuses every order and counts them.
    #[derive(Default)]
    struct CountingCa(AtomicUsize);

    impl Issuer for CountingCa {
        async fn issue(&self, _names: &[String], _csr: &[u8]) -> Result<String, OrderFailure> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(OrderFailure::new("refused"))
        }

        async fn renewal_window(
            &self,
            _leaf: &rustls_pki_types::CertificateDer<'static>,
        ) -> Option<RenewalWindow> {
            None
        }
    }

    fn manager(state: &StateDir, issuer: Arc<CountingCa>) -> Manager<CountingCa> {
        let names = vec!["mail.example.org".to_string()];
        Manager {
            issuer,
            config: AcmeConfig {
                settings: AcmeSettings {
                    directory: "https://127.0.0.1:9/directory".into(),
                    contact: None,
                    state_dir: state.root().to_path_buf(),
                    challenge: ChallengeKind::Http01,
                    http_listen: Some("127.0.0.1:0".parse().expect("address")),
                    tls_alpn_listen: None,
                    ca_bundle: None,
                    renew_before: None,
                },
                certificates: vec![AcmeCertificate {
                    files: acme_files(state.root(), &names[0]),
                    names,
                    key_type: KeyType::EcdsaP256,
                    reuse_key: false,
                }],
            },
            reload: ReloadNow::channel().0,
            jitter: |ceiling| ceiling,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn two_managers_on_one_state_directory_order_from_one_only() {
        let state = crate::acme::store::tests::temp_state("two-managers");
        let (first, second) = (
            Arc::new(CountingCa::default()),
            Arc::new(CountingCa::default()),
        );
        let first_task = tokio::spawn(manager(&state, first.clone()).run());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second_task = tokio::spawn(manager(&state, second.clone()).run());
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(first.0.load(Ordering::SeqCst) > 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 0);

        // The holder stops: the other takes over issuance at its next try.
        first_task.abort();
        let _ = first_task.await;
        tokio::time::sleep(LOCK_RETRY + Duration::from_secs(5)).await;
        assert!(second.0.load(Ordering::SeqCst) > 0);

        // A renewal request is picked up (and removed) within a second.
        let before = second.0.load(Ordering::SeqCst);
        state.request_renewal("mail.example.org").expect("request");
        tokio::time::sleep(REQUEST_POLL + Duration::from_millis(100)).await;
        assert!(state.renewal_requests().is_empty());
        assert_eq!(second.0.load(Ordering::SeqCst), before + 1);
        second_task.abort();
        let _ = std::fs::remove_dir_all(state.root());
    }
}
