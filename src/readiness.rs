//! Readiness: whether this proxy should get traffic now, and why not.
//!
//! `/readyz` answers 200 only when every listener is bound, a certificate is
//! loaded, the proxy is not draining, and the backend of every listener
//! answered its greeting in the last check: an SMTP `220`, an IMAP `* OK` (or
//! `* PREAUTH`), a POP3 `+OK`, read on a fresh connection that is then closed
//! politely with `QUIT` / `LOGOUT`. Otherwise 503 with a plain-text reason
//! that names the listener and the backend.
//!
//! Checks run every `readiness_interval` seconds, but only once something
//! asks: the first request to `/readyz` starts them (and waits briefly for
//! the first round), so a proxy nobody watches opens no extra connections to
//! its backends. Listeners that share a backend (same address, protocol and
//! preamble) share one check. Each round sets
//! `mail_tls_proxy_backend_up{listener}` (1 or 0) for every listener.
//!
//! A listener whose backend the relay guard found open (see
//! [`crate::relay_guard`]) is not ready either, with the guard's reason,
//! until a later guard check finds it closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
/// How long the first `/readyz` waits for the first round of checks.
const FIRST_ROUND_WAIT: Duration = Duration::from_secs(3);

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

/// The outcome of the latest check of one listener's backend.
#[derive(Clone, Debug, PartialEq, Eq)]
enum BackendState {
    /// No round has finished yet.
    Unchecked,
    Up,
    Down(String),
}

/// Shared between the admin endpoint, the proxy's life cycle and the checks.
pub(crate) struct Readiness {
    serving: AtomicBool,
    draining: AtomicBool,
    certificates: Option<Arc<CertificateStore>>,
    probes: Vec<BackendProbe>,
    interval: Duration,
    states: Mutex<Vec<BackendState>>,
    checks_started: AtomicBool,
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
        let states = Mutex::new(vec![BackendState::Unchecked; probes.len()]);
        Arc::new(Self {
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            certificates,
            probes,
            interval,
            states,
            checks_started: AtomicBool::new(false),
            round_finished: Notify::new(),
            relay_open: Mutex::new(Vec::new()),
        })
    }

    /// Every listener is bound and accepting.
    pub(crate) fn set_serving(&self) {
        self.serving.store(true, Ordering::Release);
    }

    /// Shutdown has begun: not ready from now on.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
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
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        for (probe, state) in self.probes.iter().zip(states.iter()) {
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
        drop(states);
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

    /// The `/readyz` answer: starts the backend checks on first use and
    /// waits (briefly) for their first round.
    pub(crate) async fn check(self: &Arc<Self>) -> Result<(), String> {
        if !self.checks_started.swap(true, Ordering::AcqRel) && !self.probes.is_empty() {
            let finished = self.round_finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            tokio::spawn(self.clone().run_checks());
            let _ = tokio::time::timeout(FIRST_ROUND_WAIT, finished).await;
        }
        self.reasons()
    }

    /// Checks every backend now, then every `interval`, until dropped.
    async fn run_checks(self: Arc<Self>) {
        // Listeners with the same backend, protocol and preamble share a check.
        let mut groups: Vec<(BackendProbe, Vec<usize>)> = Vec::new();
        for (index, probe) in self.probes.iter().enumerate() {
            match groups.iter_mut().find(|(first, _)| {
                first.backend == probe.backend
                    && first.protocol == probe.protocol
                    && first.preamble == probe.preamble
            }) {
                Some((_, members)) => members.push(index),
                None => groups.push((probe.clone(), vec![index])),
            }
        }
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let outcomes =
                futures_join_all(groups.iter().map(|(probe, _)| check_backend(probe))).await;
            {
                let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
                for ((probe, members), outcome) in groups.iter().zip(outcomes) {
                    let state = match outcome {
                        Ok(()) => BackendState::Up,
                        Err(why) => BackendState::Down(why),
                    };
                    for &index in members {
                        let listener = &self.probes[index].listener;
                        let up = state == BackendState::Up;
                        metrics::gauge!(BACKEND_UP, "listener" => listener.clone()).set(if up {
                            1.0
                        } else {
                            0.0
                        });
                        match (&states[index], &state) {
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
                        states[index] = state.clone();
                    }
                }
            }
            self.round_finished.notify_waiters();
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
        let reasons = readiness.check().await.unwrap_err();
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
