//! The renewal schedule against a fake CA, on paused tokio time.

use std::sync::Mutex;

use super::*;
use crate::acme::client::RenewalWindow;
use crate::acme::settings::{acme_files, KeyType};
use crate::acme::store::tests::temp_state;

/// A CA that fails every order (refusing the nonce of the first
/// `bad_nonces`, then with an optional Retry-After on the next) and records
/// when it was asked.
struct FailingCa {
    asked_at: Mutex<Vec<tokio::time::Instant>>,
    first_retry_after: Option<Duration>,
    bad_nonces: usize,
}

impl FailingCa {
    fn new(first_retry_after: Option<Duration>) -> Arc<FailingCa> {
        FailingCa::refusing_nonces(0, first_retry_after)
    }

    fn refusing_nonces(bad_nonces: usize, first_retry_after: Option<Duration>) -> Arc<FailingCa> {
        Arc::new(FailingCa {
            asked_at: Mutex::new(Vec::new()),
            first_retry_after,
            bad_nonces,
        })
    }

    fn offsets(&self, start: tokio::time::Instant) -> Vec<u64> {
        self.asked_at
            .lock()
            .expect("lock")
            .iter()
            .map(|at| (*at - start).as_secs())
            .collect()
    }
}

impl Issuer for FailingCa {
    async fn issue(&self, _names: &[String], _csr: &[u8]) -> Result<String, OrderFailure> {
        let mut asked = self.asked_at.lock().expect("lock");
        asked.push(tokio::time::Instant::now());
        if asked.len() <= self.bad_nonces {
            return Err(OrderFailure {
                reason: "urn:ietf:params:acme:error:badNonce".into(),
                retry_after: None,
                bad_nonce: true,
            });
        }
        Err(OrderFailure {
            reason: "urn:ietf:params:acme:error:rateLimited".into(),
            retry_after: if asked.len() == self.bad_nonces + 1 {
                self.first_retry_after
            } else {
                None
            },
            bad_nonce: false,
        })
    }

    async fn renewal_window(
        &self,
        _leaf: &rustls_pki_types::CertificateDer<'static>,
    ) -> Option<RenewalWindow> {
        None
    }
}

fn entry(state: &StateDir, names: &[&str]) -> AcmeCertificate {
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    AcmeCertificate {
        files: acme_files(state.root(), &names[0]),
        names,
        key_type: KeyType::EcdsaP256,
        reuse_key: false,
    }
}

/// The longest wait: the jitter picks the ceiling.
fn no_jitter(ceiling: Duration) -> Duration {
    ceiling
}

fn renewal<I: Issuer>(
    issuer: Arc<I>,
    state: &StateDir,
    certificate: AcmeCertificate,
) -> (Renewal<I>, mpsc::UnboundedSender<()>) {
    let (reload, _) = ReloadNow::channel();
    let (requests, receiver) = mpsc::unbounded_channel();
    (
        Renewal {
            issuer,
            certificate,
            renew_before: None,
            state: state.clone(),
            reload,
            jitter: no_jitter,
            requests: receiver,
        },
        requests,
    )
}

#[test]
fn retry_delays_double_from_a_minute_to_six_hours_and_respect_retry_after() {
    let delays: Vec<u64> = (1..=12)
        .map(|attempt| retry_delay(attempt, None, no_jitter).as_secs())
        .collect();
    assert_eq!(
        delays,
        [60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 21600, 21600, 21600]
    );
    assert_eq!(
        retry_delay(1, Some(Duration::from_secs(3600)), no_jitter),
        Duration::from_secs(3600)
    );
    // Full jitter stays between a second and the ceiling.
    for attempt in 1..=12 {
        let ceiling = retry_delay(attempt, None, no_jitter);
        for _ in 0..20 {
            let delay = retry_delay(attempt, None, full_jitter);
            assert!(
                delay >= Duration::from_secs(1) && delay <= ceiling,
                "{delay:?}"
            );
        }
    }
    assert_eq!(
        retry_delay(1, None, |_| Duration::ZERO),
        Duration::from_secs(1)
    );
}

#[test]
fn renewal_is_due_a_third_before_the_end_or_as_configured_or_in_the_window() {
    let day = 86_400;
    assert_eq!(renewal_due(0, 90 * day, None, None, 0.5), 60 * day);
    assert_eq!(
        renewal_due(
            0,
            90 * day,
            Some(Duration::from_secs(10 * day as u64)),
            None,
            0.5
        ),
        80 * day
    );
    let window = RenewalWindow {
        start: 50 * day,
        end: 52 * day,
    };
    assert_eq!(renewal_due(0, 90 * day, None, Some(window), 0.0), 50 * day);
    assert_eq!(renewal_due(0, 90 * day, None, Some(window), 0.5), 51 * day);
    assert_eq!(renewal_due(0, 90 * day, None, Some(window), 1.0), 52 * day);
}

#[tokio::test(start_paused = true)]
async fn failed_orders_are_retried_on_the_backoff_schedule() {
    let state = temp_state("backoff");
    let ca = FailingCa::new(None);
    let (task, _requests) = renewal(ca.clone(), &state, entry(&state, &["mail.example.org"]));
    let start = tokio::time::Instant::now();
    let running = tokio::spawn(task.run());
    // 60 + 120 + ... + 15360 = 32 340 s, then 21 600 s each.
    tokio::time::sleep(Duration::from_secs(32_340 + 2 * 21_600 + 30)).await;
    assert_eq!(
        ca.offsets(start),
        [0, 60, 180, 420, 900, 1860, 3780, 7620, 15300, 30660, 52260, 73860]
    );
    let recorded = state.certificate_state("mail.example.org");
    assert_eq!(
        recorded.last_error.as_deref(),
        Some("urn:ietf:params:acme:error:rateLimited")
    );
    assert!(recorded.next_retry.is_some());
    running.abort();
    let _ = std::fs::remove_dir_all(state.root());
}

#[tokio::test(start_paused = true)]
async fn retry_after_postpones_the_retry_and_a_request_retries_at_once() {
    let state = temp_state("retry-after");
    let ca = FailingCa::new(Some(Duration::from_secs(7200)));
    let (task, requests) = renewal(ca.clone(), &state, entry(&state, &["mail.example.org"]));
    let start = tokio::time::Instant::now();
    let running = tokio::spawn(task.run());
    tokio::time::sleep(Duration::from_secs(7200 + 30)).await;
    assert_eq!(ca.offsets(start), [0, 7200]);
    // `acme renew`: the next try comes now, not after the backoff.
    requests.send(()).expect("send");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ca.offsets(start), [0, 7200, 7230]);
    running.abort();
    let _ = std::fs::remove_dir_all(state.root());
}

#[tokio::test(start_paused = true)]
async fn a_refused_nonce_is_ordered_again_at_once_three_times_then_backs_off() {
    let state = temp_state("bad-nonce");
    let ca = FailingCa::refusing_nonces(5, None);
    let (task, _requests) = renewal(ca.clone(), &state, entry(&state, &["mail.example.org"]));
    let start = tokio::time::Instant::now();
    let running = tokio::spawn(task.run());
    tokio::time::sleep(Duration::from_secs(3 + 60 + 120 + 30)).await;
    // Three quick retries, then the schedule as for any failure, from its
    // first step.
    assert_eq!(ca.offsets(start), [0, 1, 2, 3, 63, 183]);
    running.abort();
    let _ = std::fs::remove_dir_all(state.root());
}

/// A CA that never answers a renewal information request and refuses every
/// order, counting them.
#[derive(Default)]
struct SilentRenewalInfoCa {
    orders: std::sync::atomic::AtomicUsize,
}

impl Issuer for SilentRenewalInfoCa {
    async fn issue(&self, _names: &[String], _csr: &[u8]) -> Result<String, OrderFailure> {
        self.orders
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(OrderFailure::new("refused"))
    }

    async fn renewal_window(
        &self,
        _leaf: &rustls_pki_types::CertificateDer<'static>,
    ) -> Option<RenewalWindow> {
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_ca_that_never_answers_for_the_renewal_window_does_not_stop_renewals() {
    let state = temp_state("silent-renewal-info");
    let certificate = entry(&state, &["mail.example.org"]);
    let pair = crate::tls::generate::generate_pair(&certificate.names).expect("pair");
    state
        .write_pair(
            certificate.label(),
            pair.cert_pem.as_bytes(),
            pair.key_pem.as_bytes(),
        )
        .expect("stored pair");
    let ca = Arc::new(SilentRenewalInfoCa::default());
    let (mut task, _requests) = renewal(ca.clone(), &state, certificate);
    // Due long ago: only the window request stands before the order.
    task.renew_before = Some(Duration::from_secs(10_000 * 365 * 86_400));
    let running = tokio::spawn(task.run());
    tokio::time::sleep(RENEWAL_INFO_TIMEOUT + Duration::from_secs(5)).await;
    assert!(ca.orders.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    running.abort();
    let _ = std::fs::remove_dir_all(state.root());
}
