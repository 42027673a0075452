//! Readiness: whether this proxy should get traffic now, and why not.
//!
//! `/readyz` answers 200 only when every listener is bound, a certificate is
//! loaded, the proxy is not draining, and the backend of every listener
//! answered its greeting in the last check: an SMTP `220`, an IMAP `* OK` (or
//! `* PREAUTH`), a POP3 `+OK`, read on a fresh connection that is then closed
//! politely with `QUIT` / `LOGOUT`. Otherwise 503 with a plain-text reason
//! that names the listener and the backend.
//!
//! The backend checks run in the background from start-up
//! ([`Readiness::run_checks`]), every `readiness_interval`, whether or not
//! anything asks; each round sets `mail_tls_proxy_backend_up{listener}` (1 or
//! 0) for every listener, so the series exists from the first round.
//! Listeners that share a backend (same address, protocol and preamble)
//! share one check. A `/readyz` request that arrives while some backend has
//! not been checked yet (just after start-up, or after
//! [`Readiness::set_probes`] added a listener) waits up to 3 s for the round
//! that checks it, rather than answering 503 for a backend nobody has looked
//! at; a backend still unchecked after that is reported as such.
//!
//! A listener whose backend the relay guard found open (see
//! [`crate::relay_guard`]) is not ready either, with the guard's reason,
//! until a later guard check finds it closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::metrics::BACKEND_UP;
use crate::protocol::{Greeting, Protocol};
use crate::tls::CertificateStore;

/// What a backend expecting a PROXY protocol v1 header gets before a health
/// check: the form the specification reserves for connections that do not
/// relay a client (health checks).
pub(crate) const PROXY_V1_HEALTH_CHECK: &[u8] = b"PROXY UNKNOWN\r\n";

/// The PROXY protocol v2 `LOCAL` command with no addresses: "the connection
/// was established on purpose by the proxy without being relayed", as a
/// health check is.
pub(crate) const PROXY_V2_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// The longest greeting line read (longer is a failure, not a wait).
const MAX_GREETING_LINE: u64 = 8 * 1024;
/// Continuation lines accepted in a multi-line SMTP greeting.
const MAX_GREETING_LINES: usize = 32;
/// How long a backend may take to greet once connected.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/readyz` waits for a round that checks a backend not checked
/// yet.
const UNCHECKED_WAIT: Duration = Duration::from_secs(3);

/// One listener's backend, as the readiness check sees it.
#[derive(Clone, Debug)]
pub(crate) struct BackendProbe {
    pub(crate) listener: String,
    pub(crate) protocol: Protocol,
    /// `host:port`, resolved at each check.
    pub(crate) backend: String,
    pub(crate) connect_timeout: Duration,
    /// Bytes sent before the greeting is read (a PROXY protocol header for
    /// backends that expect one; empty otherwise).
    pub(crate) preamble: Vec<u8>,
}

impl BackendProbe {
    /// Whether one check answers for both: same backend, protocol and
    /// preamble.
    fn same_check(&self, other: &BackendProbe) -> bool {
        self.backend == other.backend
            && self.protocol == other.protocol
            && self.preamble == other.preamble
    }

    /// Whether `other` is this listener checked the same way (a result for
    /// one is a result for the other).
    fn same_listener_and_check(&self, other: &BackendProbe) -> bool {
        self.listener == other.listener && self.same_check(other)
    }
}

/// The outcome of the latest check of one listener's backend.
#[derive(Clone, Debug, PartialEq, Eq)]
enum BackendState {
    /// No round has checked it yet.
    Unchecked,
    Up,
    Down(String),
}

/// The backends checked, each with its latest outcome.
#[derive(Default)]
struct Backends {
    checked: Vec<(BackendProbe, BackendState)>,
}

impl Backends {
    fn any_unchecked(&self) -> bool {
        self.checked
            .iter()
            .any(|(_, state)| *state == BackendState::Unchecked)
    }
}

/// Shared between the admin endpoint, the proxy's life cycle and the checks.
pub(crate) struct Readiness {
    serving: AtomicBool,
    draining: AtomicBool,
    certificates: Option<Arc<CertificateStore>>,
    interval: Duration,
    backends: Mutex<Backends>,
    /// Woken when the set of backends changes: the check loop runs a round
    /// at once.
    probes_changed: Notify,
    round_finished: Notify,
    /// Listeners the relay guard stopped serving, with the reason, in the
    /// order they were found.
    relay_open: Mutex<Vec<(String, String)>>,
}

impl Readiness {
    pub(crate) fn new(
        certificates: Option<Arc<CertificateStore>>,
        probes: Vec<BackendProbe>,
        interval: Duration,
    ) -> Arc<Self> {
        let checked = probes
            .into_iter()
            .map(|probe| (probe, BackendState::Unchecked))
            .collect();
        Arc::new(Self {
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            certificates,
            interval,
            backends: Mutex::new(Backends { checked }),
            probes_changed: Notify::new(),
            round_finished: Notify::new(),
            relay_open: Mutex::new(Vec::new()),
        })
    }

    fn backends(&self) -> MutexGuard<'_, Backends> {
        self.backends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every listener is bound and accepting.
    pub(crate) fn set_serving(&self) {
        self.serving.store(true, Ordering::Release);
    }

    /// Shutdown has begun: not ready from now on.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Replaces the backends checked (after a configuration reload): a
    /// listener checked the same way keeps its latest outcome; a new
    /// listener, or one whose backend, protocol or preamble changed, is
    /// unchecked until the next round, which starts at once. Listeners no
    /// longer present are forgotten, with what the relay guard said of them.
    pub(crate) fn set_probes(&self, probes: Vec<BackendProbe>) {
        {
            let mut backends = self.backends();
            let previous = std::mem::take(&mut backends.checked);
            backends.checked = probes
                .into_iter()
                .map(|probe| {
                    let state = previous
                        .iter()
                        .find(|(old, _)| old.same_listener_and_check(&probe))
                        .map(|(_, state)| state.clone())
                        .unwrap_or(BackendState::Unchecked);
                    (probe, state)
                })
                .collect();
            let mut relay_open = self.relay_open.lock().unwrap_or_else(|e| e.into_inner());
            relay_open.retain(|(listener, _)| {
                backends
                    .checked
                    .iter()
                    .any(|(probe, _)| probe.listener == *listener)
            });
        }
        // Stores a permit when the loop is mid-round: it runs another right
        // after.
        self.probes_changed.notify_one();
    }

    /// The relay guard found `listener`'s backend open (`Some(reason)`):
    /// not ready, for that reason; or closed again (`None`).
    pub(crate) fn set_relay_open(&self, listener: &str, reason: Option<String>) {
        let mut open = self.relay_open.lock().unwrap_or_else(|e| e.into_inner());
        let at = open.iter().position(|(name, _)| name == listener);
        match (at, reason) {
            (Some(at), Some(reason)) => open[at].1 = reason,
            (None, Some(reason)) => open.push((listener.to_string(), reason)),
            (Some(at), None) => {
                open.remove(at);
            }
            (None, None) => {}
        }
    }

    /// `Ok(())` when ready, else every reason it is not, one per line.
    pub(crate) fn reasons(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining: the proxy is shutting down".into());
        }
        let mut reasons = Vec::new();
        if !self.serving.load(Ordering::Acquire) {
            reasons.push("starting: listeners are not all bound yet".to_string());
        }
        if let Some(store) = &self.certificates {
            if store.current().entries().is_empty() {
                reasons.push("no certificate is loaded".to_string());
            }
        }
        let backends = self.backends();
        for (probe, state) in &backends.checked {
            match state {
                BackendState::Up => {}
                BackendState::Unchecked => reasons.push(format!(
                    "listener {}: backend {} ({}) not checked yet",
                    probe.listener, probe.backend, probe.protocol
                )),
                BackendState::Down(why) => reasons.push(format!(
                    "listener {}: backend {} ({}): {why}",
                    probe.listener, probe.backend, probe.protocol
                )),
            }
        }
        drop(backends);
        let relay_open = self.relay_open.lock().unwrap_or_else(|e| e.into_inner());
        for (listener, reason) in relay_open.iter() {
            reasons.push(format!("listener {listener}: {reason}"));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("\n"))
        }
    }

    /// The `/readyz` answer. While some backend has not been checked yet
    /// (start-up, or a listener just added), waits up to [`UNCHECKED_WAIT`]
    /// for the rounds that check it.
    pub(crate) async fn check(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + UNCHECKED_WAIT;
        while !self.draining.load(Ordering::Acquire) {
            let finished = self.round_finished.notified();
            tokio::pin!(finished);
            // Registered before looking, so a round ending in between is
            // not missed.
            finished.as_mut().enable();
            if !self.backends().any_unchecked() {
                break;
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                break;
            }
        }
        self.reasons()
    }

    /// Checks every backend now, then every `interval` and whenever
    /// [`Readiness::set_probes`] changes the set, forever (the caller owns
    /// the task and ends it by dropping it).
    pub(crate) async fn run_checks(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.probes_changed.notified() => ticker.reset(),
            }
            self.run_round().await;
            self.round_finished.notify_waiters();
        }
    }

    /// One round: every distinct check once, at the same time; each outcome
    /// recorded for the listeners that are still checked that way.
    async fn run_round(&self) {
        // Listeners with the same backend, protocol and preamble share a check.
        let mut groups: Vec<(BackendProbe, Vec<BackendProbe>)> = Vec::new();
        for (probe, _) in &self.backends().checked {
            match groups.iter_mut().find(|(first, _)| first.same_check(probe)) {
                Some((_, members)) => members.push(probe.clone()),
                None => groups.push((probe.clone(), vec![probe.clone()])),
            }
        }
        if groups.is_empty() {
            return;
        }
        let outcomes = futures_join_all(groups.iter().map(|(probe, _)| check_backend(probe))).await;
        let mut backends = self.backends();
        for ((probe, members), outcome) in groups.iter().zip(outcomes) {
            let state = match outcome {
                Ok(()) => BackendState::Up,
                Err(why) => BackendState::Down(why),
            };
            for member in members {
                // The set may have changed during the round: a listener no
                // longer checked this way keeps its own state.
                let Some((_, previous)) = backends
                    .checked
                    .iter_mut()
                    .find(|(current, _)| current.same_listener_and_check(member))
                else {
                    continue;
                };
                let listener = &member.listener;
                let up = state == BackendState::Up;
                metrics::gauge!(BACKEND_UP, "listener" => listener.clone()).set(if up {
                    1.0
                } else {
                    0.0
                });
                match (&*previous, &state) {
                    (BackendState::Up, BackendState::Down(why))
                    | (BackendState::Unchecked, BackendState::Down(why)) => warn!(
                        listener = %listener,
                        backend = %probe.backend,
                        reason = %why,
                        "backend check failed: not ready"
                    ),
                    (BackendState::Down(_), BackendState::Up) => info!(
                        listener = %listener,
                        backend = %probe.backend,
                        "backend check passed again"
                    ),
                    _ => {}
                }
                *previous = state.clone();
            }
        }
    }
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join_all<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        match handle.await {
            Ok(output) => outputs.push(output),
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    outputs
}

/// One check: connect, send the preamble, read the greeting, say goodbye.
pub(crate) fn check_backend(
    probe: &BackendProbe,
) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
    let probe = probe.clone();
    async move {
        let mut stream =
            match tokio::time::timeout(probe.connect_timeout, TcpStream::connect(&probe.backend))
                .await
            {
                Err(_) => {
                    return Err(format!(
                        "connect timed out after {} s",
                        probe.connect_timeout.as_secs()
                    ))
                }
                Ok(Err(error)) => return Err(format!("connect failed: {error}")),
                Ok(Ok(stream)) => stream,
            };
        let _ = stream.set_nodelay(true);
        if !probe.preamble.is_empty() {
            stream
                .write_all(&probe.preamble)
                .await
                .map_err(|error| format!("cannot send the PROXY header: {error}"))?;
        }
        let verdict = match tokio::time::timeout(
            GREETING_TIMEOUT,
            read_greeting(&mut stream, probe.protocol),
        )
        .await
        {
            Err(_) => Err(format!(
                "no greeting within {} s",
                GREETING_TIMEOUT.as_secs()
            )),
            Ok(verdict) => verdict,
        };
        if verdict.is_ok() {
            // Politely: the backend logs a normal logout, not a dropped client.
            if stream.write_all(probe.protocol.polite_quit()).await.is_ok() {
                let mut sink = [0u8; 512];
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Ok(n) = stream.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        let _ = stream.shutdown().await;
        verdict
    }
}

/// Reads the greeting and judges it by the protocol's rules.
async fn read_greeting(stream: &mut TcpStream, protocol: Protocol) -> Result<(), String> {
    let mut reader = BufReader::new(stream);
    for _ in 0..MAX_GREETING_LINES {
        let mut line = Vec::new();
        let read = (&mut reader)
            .take(MAX_GREETING_LINE)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|error| format!("reading the greeting failed: {error}"))?;
        if read == 0 {
            return Err("closed the connection without a greeting".into());
        }
        if !line.ends_with(b"\n") {
            return Err(format!(
                "greeting line longer than {MAX_GREETING_LINE} bytes"
            ));
        }
        match protocol.judge_greeting(&line) {
            Greeting::Good => return Ok(()),
            Greeting::More => continue,
            Greeting::Bad => {
                let shown = String::from_utf8_lossy(&line);
                return Err(format!(
                    "greeting {:?} is not {}",
                    shown.trim_end(),
                    protocol.expected_greeting()
                ));
            }
        }
    }
    Err(format!("greeting longer than {MAX_GREETING_LINES} lines"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn the_proxy_v2_local_header_is_well_formed() {
        assert_eq!(PROXY_V2_LOCAL.len(), 16);
        assert_eq!(&PROXY_V2_LOCAL[..12], b"\r\n\r\n\0\r\nQUIT\n");
        // Version 2, command LOCAL; family unspecified; no address bytes.
        assert_eq!(&PROXY_V2_LOCAL[12..], &[0x20, 0x00, 0x00, 0x00]);
    }

    /// A backend that sends `greeting`, records what it receives, and closes
    /// when the client does.
    async fn backend(greeting: &'static [u8]) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(greeting).await.unwrap();
            let mut received = Vec::new();
            let mut buffer = [0u8; 256];
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        received.extend_from_slice(&buffer[..n]);
                        if received.ends_with(b"\r\n") && !received.starts_with(b"PROXY")
                            || received.ends_with(b"QUIT\r\n")
                        {
                            let _ = stream.write_all(b"221 bye\r\n").await;
                            break;
                        }
                    }
                }
            }
            received
        });
        (address, task)
    }

    fn probe(protocol: Protocol, backend: String, preamble: &[u8]) -> BackendProbe {
        BackendProbe {
            listener: "test".into(),
            protocol,
            backend,
            connect_timeout: Duration::from_secs(2),
            preamble: preamble.to_vec(),
        }
    }

    #[tokio::test]
    async fn a_good_greeting_passes_and_the_backend_gets_a_polite_goodbye() {
        let (address, received) = backend(b"220-mx.example ESMTP\r\n220 ready\r\n").await;
        assert_eq!(
            check_backend(&probe(Protocol::Smtp, address, b"")).await,
            Ok(())
        );
        assert_eq!(received.await.unwrap(), b"QUIT\r\n");

        let (address, received) = backend(b"* OK ready\r\n").await;
        assert_eq!(
            check_backend(&probe(Protocol::Imap, address, b"")).await,
            Ok(())
        );
        assert_eq!(received.await.unwrap(), b"r1 LOGOUT\r\n");
    }

    #[tokio::test]
    async fn a_proxy_header_goes_first() {
        let (address, received) = backend(b"+OK ready\r\n").await;
        assert_eq!(
            check_backend(&probe(Protocol::Pop3, address, PROXY_V1_HEALTH_CHECK)).await,
            Ok(())
        );
        assert_eq!(received.await.unwrap(), b"PROXY UNKNOWN\r\nQUIT\r\n");
    }

    #[tokio::test]
    async fn failures_say_why() {
        let (address, _received) = backend(b"-ERR [SYS/TEMP] overloaded\r\n").await;
        let error = check_backend(&probe(Protocol::Pop3, address, b""))
            .await
            .unwrap_err();
        assert_eq!(error, "greeting \"-ERR [SYS/TEMP] overloaded\" is not +OK");

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = closed.local_addr().unwrap().to_string();
        drop(closed);
        let error = check_backend(&probe(Protocol::Smtp, address, b""))
            .await
            .unwrap_err();
        assert!(error.starts_with("connect failed: "), "{error}");
    }

    #[tokio::test]
    async fn readiness_names_the_failing_listener_and_turns_false_when_draining() {
        let (good, _g) = backend(b"* OK ready\r\n").await;
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bad = closed.local_addr().unwrap().to_string();
        drop(closed);
        let mut down = probe(Protocol::Smtp, bad.clone(), b"");
        down.listener = "submission".into();
        let readiness = Readiness::new(
            None,
            vec![probe(Protocol::Imap, good, b""), down],
            Duration::from_secs(60),
        );
        assert_eq!(
            readiness.reasons().unwrap_err().lines().next(),
            Some("starting: listeners are not all bound yet")
        );
        readiness.set_serving();
        let checks = tokio::spawn(readiness.clone().run_checks());
        let reasons = readiness.check().await.unwrap_err();
        checks.abort();
        assert!(
            reasons.starts_with(&format!(
                "listener submission: backend {bad} (smtp): connect failed"
            )),
            "{reasons}"
        );
        assert_eq!(reasons.lines().count(), 1, "{reasons}");
        readiness.set_draining();
        assert_eq!(
            readiness.reasons(),
            Err("draining: the proxy is shutting down".into())
        );
    }

    /// A backend that greets every connection with `greeting` and answers
    /// the goodbye, for as long as the test runs.
    async fn greeting_backend(greeting: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = stream.write_all(greeting).await;
                    let mut buffer = [0u8; 256];
                    if let Ok(n) = stream.read(&mut buffer).await {
                        if n > 0 {
                            let _ = stream.write_all(b"+OK bye\r\n").await;
                        }
                    }
                });
            }
        });
        address
    }

    fn named(listener: &str, protocol: Protocol, backend: &str) -> BackendProbe {
        let mut probe = probe(protocol, backend.to_string(), b"");
        probe.listener = listener.into();
        probe
    }

    #[tokio::test]
    async fn set_probes_keeps_outcomes_of_unchanged_listeners_and_forgets_removed_ones() {
        let good = greeting_backend(b"+OK ready\r\n").await;
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap().to_string();
        drop(closed);
        let readiness = Readiness::new(
            None,
            vec![
                named("kept", Protocol::Pop3, &good),
                named("removed", Protocol::Pop3, &dead),
                named("moved", Protocol::Pop3, &good),
            ],
            Duration::from_secs(3600),
        );
        readiness.set_serving();
        readiness.run_round().await;
        readiness.set_relay_open("kept", Some("kept would relay".into()));
        readiness.set_relay_open("removed", Some("removed would relay".into()));
        let reasons = readiness.reasons().unwrap_err();
        assert!(reasons.contains("listener removed: backend"), "{reasons}");

        readiness.set_probes(vec![
            named("kept", Protocol::Pop3, &good),
            named("moved", Protocol::Pop3, &dead),
            named("added", Protocol::Pop3, &good),
        ]);
        assert_eq!(
            readiness.reasons(),
            Err(format!(
                "listener moved: backend {dead} (pop3) not checked yet\n\
                 listener added: backend {good} (pop3) not checked yet\n\
                 listener kept: kept would relay"
            ))
        );
        // The check loop is told to run a round at once.
        tokio::time::timeout(Duration::from_secs(1), readiness.probes_changed.notified())
            .await
            .expect("the loop is woken");

        readiness.run_round().await;
        readiness.set_relay_open("kept", None);
        let reasons = readiness.reasons().unwrap_err();
        assert!(
            reasons.starts_with(&format!(
                "listener moved: backend {dead} (pop3): connect failed"
            )),
            "{reasons}"
        );
        assert_eq!(reasons.lines().count(), 1, "{reasons}");
    }

    #[tokio::test]
    async fn checks_run_without_a_request_and_a_new_listener_is_checked_at_once() {
        let good = greeting_backend(b"* OK ready\r\n").await;
        let readiness = Readiness::new(
            None,
            vec![named("first", Protocol::Imap, &good)],
            Duration::from_secs(3600),
        );
        readiness.set_serving();
        let finished = readiness.round_finished.notified();
        let checks = tokio::spawn(readiness.clone().run_checks());
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the first round runs at start");
        assert_eq!(readiness.reasons(), Ok(()));

        // Far from the next tick (an hour away), the new listener is
        // checked at once: /readyz waits for that round, not for the hour.
        readiness.set_probes(vec![
            named("first", Protocol::Imap, &good),
            named("second", Protocol::Imap, &good),
        ]);
        let answer = tokio::time::timeout(Duration::from_secs(5), readiness.check())
            .await
            .expect("answered within the wait");
        assert_eq!(answer, Ok(()));
        checks.abort();
    }

    #[tokio::test]
    async fn readyz_says_unchecked_when_no_round_comes_in_time() {
        let readiness = Readiness::new(
            None,
            vec![named("lonely", Protocol::Smtp, "127.0.0.1:25")],
            Duration::from_secs(3600),
        );
        readiness.set_serving();
        tokio::time::pause();
        assert_eq!(
            readiness.check().await,
            Err("listener lonely: backend 127.0.0.1:25 (smtp) not checked yet".into())
        );
    }

    #[test]
    fn a_listener_the_relay_guard_stopped_is_not_ready_until_it_clears() {
        let readiness = Readiness::new(None, Vec::new(), Duration::from_secs(60));
        readiness.set_serving();
        assert_eq!(readiness.reasons(), Ok(()));
        readiness.set_relay_open("mx", Some("backend b:25 would relay".into()));
        readiness.set_relay_open("submission", Some("first".into()));
        readiness.set_relay_open("submission", Some("backend c:25 would relay".into()));
        assert_eq!(
            readiness.reasons(),
            Err(
                "listener mx: backend b:25 would relay\nlistener submission: backend c:25 would relay"
                    .into()
            )
        );
        readiness.set_relay_open("mx", None);
        readiness.set_relay_open("other", None);
        assert_eq!(
            readiness.reasons(),
            Err("listener submission: backend c:25 would relay".into())
        );
        readiness.set_relay_open("submission", None);
        assert_eq!(readiness.reasons(), Ok(()));
    }
}
