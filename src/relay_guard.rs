//! The relay guard: asks each SMTP listener's backend whether it would relay
//! mail for a stranger arriving through the proxy, and acts on the answer.
//!
//! Why: a backend that trusts the proxy's address (Postfix `mynetworks`
//! holding 127.0.0.1, Exim `relay_from_hosts`, ...) relays for *anyone* who
//! reaches it through the proxy with `client_identity = "none"`, because
//! every client then arrives with the proxy's address. Putting a TLS front
//! door before a closed mail server must never turn it into an open relay.
//!
//! How: a short SMTP dialogue on a fresh backend connection, presented the
//! way that listener's clients arrive (a PROXY header naming the
//! documentation address `PROBE_CLIENT`, or `XCLIENT ADDR=` that address,
//! or nothing): `EHLO`, `MAIL FROM:<>`, `RCPT TO:<random@random.invalid>`,
//! then `RSET` and `QUIT`; never `DATA`, so nothing is ever sent. A 2xx to
//! the recipient means the backend would relay ([`Verdict::Open`]); 4xx/5xx
//! means it would not ([`Verdict::Closed`]); anything else, or a backend
//! that cannot be asked, is [`Verdict::Unknown`]. (A backend that checks
//! recipient domains in DNS before its relay policy answers `.invalid` with
//! a refusal and counts as closed: the reply text says which it was.)
//!
//! This module owns the dialogue (`Probe`: sans-IO, fed backend bytes,
//! returns bytes to send and finally a verdict), its thin async runner
//! (`probe`), the start-up judgement (`Proxy::bind` fails with
//! [`OpenRelay`] under `relay_check = "refuse"`), and the periodic re-check
//! (`Guard`): an open finding sets `ListenerContext::relay_open`, which
//! makes the accept loop answer new connections with the protocol's
//! temporary refusal (`turn_away`) and `/readyz` answer 503, until a later
//! check finds the backend closed again. Established sessions are never
//! touched. Every check sets `mail_tls_proxy_relay_check{listener, result}`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, error, info, warn};

use crate::config::{Config, ListenerConfig, RelayCheck};
use crate::protocol::line::LineBuffer;
use crate::protocol::smtp::{parse_reply_line, xclient_command, xclient_offer};
use crate::protocol::{proxy_header, trim_eol, ClientIdentity};
use crate::readiness::Readiness;
use crate::session::ListenerContext;

/// Who the probe says it is: an address reserved for documentation
/// (RFC 5737), so it is in no backend's trusted networks, with a port from
/// the dynamic range.
pub(crate) const PROBE_CLIENT: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 50000));
/// The longest backend line the probe reads (EHLO lines are far shorter).
const MAX_LINE: usize = 4096;
/// Lines in one multi-line reply (an EHLO reply has a dozen or two).
const MAX_REPLY_LINES: usize = 64;
/// How long each backend reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole dialogue may take (a backend that drips bytes).
const DIALOGUE_TIMEOUT: Duration = Duration::from_secs(30);
/// While a check cannot tell, the next one comes at most this much later.
const UNKNOWN_RETRY: Duration = Duration::from_secs(30);
/// A backend reply is shown (logs, `/readyz`, errors) up to this many characters.
const MAX_SHOWN: usize = 300;

/// What a check found, as a label (the `result` of the metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RelayResult {
    /// The backend refused a stranger's relay recipient.
    Closed,
    /// The backend accepted it: it would relay for anyone.
    Open,
    /// The check could not tell.
    Unknown,
}

impl RelayResult {
    pub(crate) const ALL: [RelayResult; 3] =
        [RelayResult::Closed, RelayResult::Open, RelayResult::Unknown];

    /// The metric label and the word `check` prints.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RelayResult::Closed => "closed",
            RelayResult::Open => "open",
            RelayResult::Unknown => "unknown",
        }
    }
}

impl fmt::Display for RelayResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one check, with the evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The recipient was refused (4xx or 5xx): `reply` is the backend's
    /// reply to RCPT, as shown to people.
    Closed { reply: String },
    /// The recipient was accepted (2xx).
    Open { reply: String },
    /// Why the check could not tell.
    Unknown { reason: String },
}

impl Verdict {
    pub(crate) fn result(&self) -> RelayResult {
        match self {
            Verdict::Closed { .. } => RelayResult::Closed,
            Verdict::Open { .. } => RelayResult::Open,
            Verdict::Unknown { .. } => RelayResult::Unknown,
        }
    }

    fn unknown(reason: impl Into<String>) -> Verdict {
        Verdict::Unknown {
            reason: reason.into(),
        }
    }
}

/// `closed (backend replied "554 5.7.1 ...")`, `unknown (reason)`.
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Closed { reply } | Verdict::Open { reply } => {
                write!(f, "{} (backend replied \"{reply}\")", self.result())
            }
            Verdict::Unknown { reason } => write!(f, "unknown ({reason})"),
        }
    }
}

/// One listener's backend as the guard asks it.
#[derive(Clone, Debug)]
pub struct Target {
    pub listener: String,
    /// `host:port`, resolved at each check.
    pub(crate) backend: String,
    /// What to do with an open finding.
    pub(crate) check: RelayCheck,
    /// How the probe presents itself: as the listener's sessions do.
    pub(crate) client_identity: ClientIdentity,
    /// The name the probe gives in `EHLO` (the proxy's `hostname`).
    pub(crate) hostname: Arc<str>,
    /// The address the probe says it connected to: the listener's, with an
    /// unspecified address (`0.0.0.0`, `[::]`) replaced by 127.0.0.1.
    pub(crate) destination: SocketAddr,
    pub(crate) connect_timeout: Duration,
}

impl Target {
    /// The target for a listener listening on `listening_on`, or `None` when
    /// the guard does not check it (not SMTP, or `relay_check = "off"`).
    pub(crate) fn for_listener(
        listener: &ListenerConfig,
        hostname: &str,
        listening_on: SocketAddr,
    ) -> Option<Target> {
        if !listener.protocol.relays_mail() || listener.relay_check == RelayCheck::Off {
            return None;
        }
        let mut destination = listening_on;
        if destination.ip().is_unspecified() {
            destination.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        Some(Target {
            listener: listener.name.clone(),
            backend: listener.backend.clone(),
            check: listener.relay_check,
            client_identity: listener.client_identity,
            hostname: Arc::from(hostname),
            destination,
            connect_timeout: listener.backend_connect_timeout,
        })
    }
}

/// Every listener the guard checks, with its configured address (for
/// `check`, which binds nothing).
pub fn targets(config: &Config) -> Vec<Target> {
    config
        .listeners
        .iter()
        .filter_map(|listener| Target::for_listener(listener, &config.hostname, listener.listen))
        .collect()
}

/// A target and what its check found.
#[derive(Clone, Debug)]
pub struct Finding {
    pub target: Target,
    pub verdict: Verdict,
}

impl Finding {
    /// The error that stops `run` and fails `check`: an open backend under
    /// `relay_check = "refuse"`.
    pub fn refusal(&self) -> Option<OpenRelay> {
        match (&self.verdict, self.target.check) {
            (Verdict::Open { reply }, RelayCheck::Refuse) => Some(OpenRelay {
                listener: self.target.listener.clone(),
                backend: self.target.backend.clone(),
                client_identity: self.target.client_identity,
                reply: reply.clone(),
            }),
            _ => None,
        }
    }
}

/// A backend that would relay for anyone arriving through the listener,
/// with `relay_check = "refuse"`; the message says how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "listener {listener}: backend {backend} would relay mail for anyone who connects through \
     this proxy: it accepted an outside recipient from an unauthenticated stranger (probe from \
     {probe_client}, client_identity = \"{client_identity}\") with \"{reply}\". It trusts the \
     address it sees, and with client_identity = \"none\" that is the proxy's address for every \
     client. Fix one of: (1) tell the backend who the client is: client_identity = \"proxy-v2\" \
     with Postfix smtpd_upstream_proxy_protocol = haproxy on that smtpd, or client_identity = \
     \"xclient\" with the proxy's address in Postfix smtpd_authorized_xclient_hosts; (2) stop the \
     backend trusting the proxy's address: Postfix mynetworks, Exim relay_from_hosts, Sendmail's \
     access db Connect: RELAY entries, OpenSMTPD `match from local ... action relay`; (3) if \
     this is intended, set relay_check = \"warn\" (log and serve) or relay_check = \"off\" on \
     this listener",
    probe_client = PROBE_CLIENT.ip()
)]
pub struct OpenRelay {
    pub(crate) listener: String,
    pub(crate) backend: String,
    pub(crate) client_identity: ClientIdentity,
    /// The backend's reply to RCPT.
    pub(crate) reply: String,
}

/// Checks every target at once; one finding per target, in their order.
pub async fn check_all(targets: Vec<Target>) -> Vec<Finding> {
    let handles: Vec<_> = targets
        .iter()
        .map(|target| {
            let target = target.clone();
            tokio::spawn(async move { probe(&target).await })
        })
        .collect();
    let mut findings = Vec::with_capacity(handles.len());
    for (target, handle) in targets.into_iter().zip(handles) {
        let verdict = match handle.await {
            Ok(verdict) => verdict,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => Verdict::unknown("the check was cancelled"),
        };
        findings.push(Finding { target, verdict });
    }
    findings
}

/// Logs what the checks of a configuration about to be served (at start-up
/// or on reload) found and sets their metrics; the first open backend under
/// `relay_check = "refuse"` is the error.
pub(crate) fn judge_at_start(findings: &[Finding]) -> Result<(), OpenRelay> {
    let mut refusal = None;
    for finding in findings {
        let target = &finding.target;
        crate::metrics::set_relay_check(&target.listener, finding.verdict.result());
        match (&finding.verdict, finding.refusal()) {
            (Verdict::Closed { reply }, _) => info!(
                listener = %target.listener,
                backend = %target.backend,
                %reply,
                "relay check: closed (the backend refused a stranger's outside recipient)"
            ),
            (Verdict::Open { reply }, Some(open)) => {
                error!(
                    listener = %target.listener,
                    backend = %target.backend,
                    %reply,
                    "relay check: the backend would relay mail for anyone arriving through this listener; refusing this configuration"
                );
                refusal.get_or_insert(open);
            }
            (Verdict::Open { reply }, None) => error!(
                listener = %target.listener,
                backend = %target.backend,
                %reply,
                "relay check: the backend would relay mail for anyone arriving through this listener (relay_check = \"warn\": serving anyway)"
            ),
            (Verdict::Unknown { reason }, _) => warn!(
                listener = %target.listener,
                backend = %target.backend,
                %reason,
                "relay check: cannot tell whether the backend would relay for anyone (not a reason to refuse to start); asking again soon"
            ),
        }
    }
    match refusal {
        Some(open) => Err(open),
        None => Ok(()),
    }
}

/// When the next check of a listener comes: after `interval`, or sooner
/// while the last check could not tell.
pub(crate) fn next_check_in(last: RelayResult, interval: Duration) -> Duration {
    match last {
        RelayResult::Unknown => interval.min(UNKNOWN_RETRY),
        RelayResult::Closed | RelayResult::Open => interval,
    }
}

/// One listener's periodic re-check, for the life of the proxy.
pub(crate) struct Guard {
    target: Target,
    context: Arc<ListenerContext>,
    readiness: Arc<Readiness>,
    last: RelayResult,
}

impl Guard {
    /// Starts from the start-up finding `first`.
    pub(crate) fn new(
        target: Target,
        context: Arc<ListenerContext>,
        readiness: Arc<Readiness>,
        first: RelayResult,
    ) -> Guard {
        Guard {
            target,
            context,
            readiness,
            last: first,
        }
    }

    /// Checks again every `interval` (sooner while it cannot tell) until
    /// the task is dropped.
    pub(crate) async fn run(mut self, interval: Duration) {
        loop {
            tokio::time::sleep(next_check_in(self.last, interval)).await;
            let verdict = probe(&self.target).await;
            self.apply(&verdict);
        }
    }

    fn apply(&mut self, verdict: &Verdict) {
        let target = &self.target;
        let result = verdict.result();
        crate::metrics::set_relay_check(&target.listener, result);
        match verdict {
            Verdict::Open { reply } if target.check == RelayCheck::Refuse => {
                let reason = format!(
                    "backend {} would relay mail for anyone arriving here (it accepted a \
                     stranger's outside recipient with \"{reply}\"); new connections get a \
                     temporary refusal until a relay check finds it closed",
                    target.backend
                );
                self.readiness
                    .set_relay_open(&target.listener, Some(reason));
                let already = self.context.relay_open.swap(true, Ordering::AcqRel);
                error!(
                    listener = %target.listener,
                    backend = %target.backend,
                    %reply,
                    "relay check: the backend would relay mail for anyone arriving through this listener; {}",
                    if already {
                        "still refusing new connections"
                    } else {
                        "refusing new connections (established sessions go on) until a check finds it closed"
                    }
                );
            }
            Verdict::Open { reply } => error!(
                listener = %target.listener,
                backend = %target.backend,
                %reply,
                "relay check: the backend would relay mail for anyone arriving through this listener (relay_check = \"warn\": serving anyway)"
            ),
            Verdict::Closed { reply } => {
                if self.context.relay_open.swap(false, Ordering::AcqRel) {
                    self.readiness.set_relay_open(&target.listener, None);
                    info!(
                        listener = %target.listener,
                        backend = %target.backend,
                        %reply,
                        "relay check: the backend refuses to relay again; serving new connections"
                    );
                } else if self.last != RelayResult::Closed {
                    info!(
                        listener = %target.listener,
                        backend = %target.backend,
                        %reply,
                        "relay check: closed"
                    );
                } else {
                    debug!(listener = %target.listener, %reply, "relay check: closed");
                }
            }
            Verdict::Unknown { reason } => warn!(
                listener = %target.listener,
                backend = %target.backend,
                %reason,
                refusing = self.context.relay_open.load(Ordering::Acquire),
                "relay check: cannot tell whether the backend would relay for anyone; asking again soon"
            ),
        }
        self.last = result;
    }
}

/// Runs one check against the target's backend.
pub(crate) async fn probe(target: &Target) -> Verdict {
    let recipient = match random_recipient() {
        Ok(recipient) => recipient,
        Err(reason) => return Verdict::unknown(reason),
    };
    let mut probe = Probe::new(
        target.client_identity,
        target.hostname.clone(),
        target.destination,
        recipient,
    );
    let connect = TcpStream::connect(target.backend.as_str());
    let mut stream = match tokio::time::timeout(target.connect_timeout, connect).await {
        Err(_) => {
            return Verdict::unknown(format!(
                "cannot connect to the backend: no answer within {} s",
                target.connect_timeout.as_secs()
            ))
        }
        Ok(Err(error)) => {
            return Verdict::unknown(format!("cannot connect to the backend: {error}"))
        }
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    let verdict =
        match tokio::time::timeout(DIALOGUE_TIMEOUT, converse(&mut stream, &mut probe)).await {
            Ok(Ok(())) => probe.into_verdict(),
            Ok(Err(interruption)) => probe.interrupted(interruption),
            Err(_) => probe.interrupted(Interruption::TooSlow(DIALOGUE_TIMEOUT)),
        };
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    verdict
}

/// Drives the dialogue over the connection until it is over.
async fn converse(stream: &mut TcpStream, probe: &mut Probe) -> Result<(), Interruption> {
    let opening = probe.opening();
    if !opening.is_empty() {
        stream.write_all(&opening).await.map_err(Interruption::io)?;
    }
    let mut buffer = [0u8; 1024];
    loop {
        let read = match tokio::time::timeout(REPLY_TIMEOUT, stream.read(&mut buffer)).await {
            Err(_) => return Err(Interruption::Silent(REPLY_TIMEOUT)),
            Ok(Err(error)) => return Err(Interruption::io(error)),
            Ok(Ok(0)) => return Err(Interruption::Closed),
            Ok(Ok(read)) => read,
        };
        let progress = probe.received(&buffer[..read]);
        if !progress.send.is_empty() {
            stream
                .write_all(&progress.send)
                .await
                .map_err(Interruption::io)?;
        }
        if progress.finished {
            return Ok(());
        }
    }
}

/// `RCPT TO` address no backend can deliver locally: a random local part at
/// a random label under `.invalid` (RFC 2606), from the crypto provider's
/// secure random source so no one can predict it and pre-arrange a reply.
fn random_recipient() -> Result<String, String> {
    let mut bytes = [0u8; 14];
    crate::tls::provider::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| "no random bytes for the probe's recipient".to_string())?;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    Ok(format!("{}@{}.invalid", hex(&bytes[..8]), hex(&bytes[8..])))
}

/// Why a dialogue stopped before it was over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Interruption {
    /// The backend closed the connection.
    Closed,
    /// No reply within the time each reply gets.
    Silent(Duration),
    /// The whole dialogue took longer than it may.
    TooSlow(Duration),
    /// Reading or writing failed.
    Io(String),
}

impl Interruption {
    fn io(error: std::io::Error) -> Interruption {
        Interruption::Io(error.to_string())
    }
}

/// What the dialogue waits for: the reply to the command it last sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Awaiting {
    Greeting,
    /// `client_identity = "xclient"`: the reply to the EHLO that asks
    /// whether XCLIENT is offered.
    IdentifyingEhlo,
    Xclient,
    Ehlo,
    Mail,
    Rcpt,
    Rset,
    Quit,
    /// The dialogue is over.
    Done,
}

impl Awaiting {
    /// What is awaited, in words.
    fn describe(self) -> &'static str {
        match self {
            Awaiting::Greeting => "the greeting",
            Awaiting::IdentifyingEhlo | Awaiting::Ehlo => "the reply to EHLO",
            Awaiting::Xclient => "the reply to XCLIENT",
            Awaiting::Mail => "the reply to MAIL FROM:<>",
            Awaiting::Rcpt => "the reply to RCPT TO",
            Awaiting::Rset => "the reply to RSET",
            Awaiting::Quit => "the reply to QUIT",
            Awaiting::Done => "nothing",
        }
    }
}

/// What to do after feeding [`Probe::received`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Bytes to send to the backend now.
    pub(crate) send: Vec<u8>,
    /// The dialogue is over (after sending `send`): close the connection.
    pub(crate) finished: bool,
}

/// The probe's SMTP dialogue, sans-IO: no sockets, no timers. The runner
/// sends [`Probe::opening`], then feeds every byte the backend sends to
/// [`Probe::received`] and sends what it returns, until it says finished;
/// the verdict is then [`Probe::into_verdict`] (or [`Probe::interrupted`]
/// if the connection failed first).
///
/// It sends one command at a time and reads whole replies (multi-line
/// `250-` forms included). Lines are capped at [`MAX_LINE`] bytes and
/// replies at [`MAX_REPLY_LINES`] lines; a line that is not an SMTP reply,
/// a reply whose lines disagree on the code, or bytes the backend sends
/// before the probe has asked anything make the verdict unknown.
pub(crate) struct Probe {
    identity: ClientIdentity,
    hostname: Arc<str>,
    destination: SocketAddr,
    recipient: String,
    awaiting: Awaiting,
    lines: LineBuffer,
    /// The reply being collected, lines with their terminators.
    reply: Vec<u8>,
    reply_lines: usize,
    reply_code: u16,
    verdict: Option<Verdict>,
}

impl Probe {
    pub(crate) fn new(
        identity: ClientIdentity,
        hostname: Arc<str>,
        destination: SocketAddr,
        recipient: String,
    ) -> Probe {
        Probe {
            identity,
            hostname,
            destination,
            recipient,
            awaiting: Awaiting::Greeting,
            lines: LineBuffer::new(MAX_LINE),
            reply: Vec::new(),
            reply_lines: 0,
            reply_code: 0,
            verdict: None,
        }
    }

    /// What to send as soon as the connection is up: the PROXY header that
    /// starts the listener's sessions, if any.
    pub(crate) fn opening(&self) -> Vec<u8> {
        match self.identity {
            ClientIdentity::ProxyV1 => proxy_header::v1(PROBE_CLIENT, self.destination),
            ClientIdentity::ProxyV2 => proxy_header::v2(PROBE_CLIENT, self.destination, None),
            ClientIdentity::None | ClientIdentity::Xclient => Vec::new(),
        }
    }

    /// Bytes from the backend, as they came; returns what to send.
    pub(crate) fn received(&mut self, bytes: &[u8]) -> Progress {
        let mut progress = Progress::default();
        if self.awaiting == Awaiting::Done {
            progress.finished = true;
            return progress;
        }
        self.lines.extend(bytes);
        loop {
            let (code, last) = match self.lines.next_line() {
                Ok(Some(line)) => {
                    self.reply.extend_from_slice(line);
                    parse_reply_line(line)
                }
                Ok(None) => return progress,
                Err(_) => {
                    self.settle(format!(
                        "the backend sent a line longer than {MAX_LINE} bytes while the probe waited for {}",
                        self.awaiting.describe()
                    ));
                    return self.finish(progress);
                }
            };
            self.reply_lines += 1;
            if self.reply_lines == 1 {
                self.reply_code = code;
            }
            if code == 0 || code != self.reply_code {
                let reason = format!(
                    "{} is not an SMTP reply: \"{}\"",
                    self.awaiting.describe(),
                    shown(&self.reply)
                );
                self.settle(reason);
                return self.finish(progress);
            }
            if !last {
                if self.reply_lines >= MAX_REPLY_LINES {
                    let reason = format!(
                        "{} is longer than {MAX_REPLY_LINES} lines",
                        self.awaiting.describe()
                    );
                    self.settle(reason);
                    return self.finish(progress);
                }
                continue;
            }
            let completed = self.awaiting;
            self.reply_complete(code, &mut progress.send);
            self.reply.clear();
            self.reply_lines = 0;
            if self.awaiting == Awaiting::Done {
                return self.finish(progress);
            }
            if !self.lines.pending().is_empty() {
                // A server speaks when spoken to; these bytes were sent
                // before the command just produced could have been read.
                self.settle(format!(
                    "the backend sent more than {} before it was asked anything else",
                    completed.describe()
                ));
                progress.send.clear();
                return self.finish(progress);
            }
        }
    }

    /// The verdict once [`Probe::received`] said finished.
    pub(crate) fn into_verdict(self) -> Verdict {
        let awaiting = self.awaiting;
        self.verdict.unwrap_or_else(|| {
            Verdict::unknown(format!(
                "the dialogue ended while waiting for {}",
                awaiting.describe()
            ))
        })
    }

    /// The verdict when the connection failed before the dialogue was over:
    /// the one already reached (the RCPT reply decides; RSET and QUIT are
    /// courtesy), else unknown.
    pub(crate) fn interrupted(self, interruption: Interruption) -> Verdict {
        if let Some(verdict) = self.verdict {
            return verdict;
        }
        let awaiting = self.awaiting.describe();
        Verdict::unknown(match interruption {
            Interruption::Closed => {
                format!("the backend closed the connection while the probe waited for {awaiting}")
            }
            Interruption::Silent(limit) => format!(
                "no answer within {} s while the probe waited for {awaiting}",
                limit.as_secs()
            ),
            Interruption::TooSlow(limit) => format!(
                "the dialogue took longer than {} s (waiting for {awaiting})",
                limit.as_secs()
            ),
            Interruption::Io(error) => {
                format!("the connection failed while the probe waited for {awaiting}: {error}")
            }
        })
    }

    /// Records an unknown verdict unless the RCPT reply already decided.
    fn settle(&mut self, reason: String) {
        if self.verdict.is_none() {
            self.verdict = Some(Verdict::unknown(reason));
        }
    }

    fn finish(&mut self, mut progress: Progress) -> Progress {
        self.awaiting = Awaiting::Done;
        progress.finished = true;
        progress
    }

    /// Acts on a whole reply; appends the next command to `send`.
    fn reply_complete(&mut self, code: u16, send: &mut Vec<u8>) {
        let positive = (200..300).contains(&code);
        match self.awaiting {
            Awaiting::Greeting if code == 220 => {
                self.ehlo(send);
                self.awaiting = if self.identity == ClientIdentity::Xclient {
                    Awaiting::IdentifyingEhlo
                } else {
                    Awaiting::Ehlo
                };
            }
            Awaiting::Greeting => {
                let reason = format!("the greeting \"{}\" is not 220", shown(&self.reply));
                self.give_up(reason, send);
            }
            Awaiting::IdentifyingEhlo => {
                // As sessions do: XCLIENT when offered with ADDR; otherwise
                // on without it (the client's own EHLO comes next).
                let command = if positive {
                    xclient_offer(self.reply.split_inclusive(|&b| b == b'\n')).and_then(|offered| {
                        xclient_command(offered, PROBE_CLIENT, Some(self.destination))
                    })
                } else {
                    None
                };
                match command {
                    Some(command) => {
                        send.extend_from_slice(&command);
                        self.awaiting = Awaiting::Xclient;
                    }
                    None => {
                        self.ehlo(send);
                        self.awaiting = Awaiting::Ehlo;
                    }
                }
            }
            // A session ends here too: the client hears this 421.
            Awaiting::Xclient if code == 421 => {
                let reason = format!(
                    "the backend answered XCLIENT with \"{}\" and closes",
                    shown(&self.reply)
                );
                self.settle(reason);
                self.awaiting = Awaiting::Done;
            }
            // 220: the new greeting. Anything else: refused, and sessions
            // go on without it (the backend sees the proxy's address).
            Awaiting::Xclient => {
                self.ehlo(send);
                self.awaiting = Awaiting::Ehlo;
            }
            Awaiting::Ehlo if positive => {
                send.extend_from_slice(b"MAIL FROM:<>\r\n");
                self.awaiting = Awaiting::Mail;
            }
            Awaiting::Ehlo => {
                let reason = format!("EHLO was refused: \"{}\"", shown(&self.reply));
                self.give_up(reason, send);
            }
            Awaiting::Mail if positive => {
                send.extend_from_slice(b"RCPT TO:<");
                send.extend_from_slice(self.recipient.as_bytes());
                send.extend_from_slice(b">\r\n");
                self.awaiting = Awaiting::Rcpt;
            }
            Awaiting::Mail => {
                let reason = format!("MAIL FROM:<> was refused: \"{}\"", shown(&self.reply));
                self.give_up(reason, send);
            }
            Awaiting::Rcpt => {
                let reply = shown(&self.reply);
                self.verdict = Some(match code / 100 {
                    2 => Verdict::Open { reply },
                    4 | 5 => Verdict::Closed { reply },
                    _ => Verdict::unknown(format!(
                        "the reply to RCPT TO \"{reply}\" neither accepts nor refuses"
                    )),
                });
                send.extend_from_slice(b"RSET\r\n");
                self.awaiting = Awaiting::Rset;
            }
            Awaiting::Rset => {
                send.extend_from_slice(b"QUIT\r\n");
                self.awaiting = Awaiting::Quit;
            }
            Awaiting::Quit | Awaiting::Done => self.awaiting = Awaiting::Done,
        }
    }

    fn ehlo(&self, send: &mut Vec<u8>) {
        send.extend_from_slice(b"EHLO ");
        send.extend_from_slice(self.hostname.as_bytes());
        send.extend_from_slice(b"\r\n");
    }

    /// The dialogue cannot go on: unknown, and a polite QUIT.
    fn give_up(&mut self, reason: String, send: &mut Vec<u8>) {
        self.settle(reason);
        send.extend_from_slice(b"QUIT\r\n");
        self.awaiting = Awaiting::Quit;
    }
}

/// A reply as people see it: its lines without terminators, joined by a
/// space, as text with control characters escaped, at most [`MAX_SHOWN`]
/// characters.
fn shown(reply: &[u8]) -> String {
    let mut text = String::new();
    for line in reply.split_inclusive(|&b| b == b'\n') {
        if !text.is_empty() {
            text.push(' ');
        }
        for c in String::from_utf8_lossy(trim_eol(line)).chars() {
            if c.is_control() || c == '"' {
                text.extend(c.escape_default());
            } else {
                text.push(c);
            }
        }
    }
    if text.chars().count() > MAX_SHOWN {
        text = text.chars().take(MAX_SHOWN).collect();
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPIENT: &str = "0123456789abcdef@a1b2c3d4e5f6.invalid";

    fn new_probe(identity: ClientIdentity) -> Probe {
        Probe::new(
            identity,
            Arc::from("proxy.example"),
            "127.0.0.1:2525".parse().expect("address"),
            RECIPIENT.to_string(),
        )
    }

    /// Feeds each backend chunk in turn, checking what the probe sends back.
    fn converse(probe: &mut Probe, steps: &[(&[u8], &[u8])]) {
        for (index, (backend, expected)) in steps.iter().enumerate() {
            let progress = probe.received(backend);
            assert_eq!(
                String::from_utf8_lossy(&progress.send),
                String::from_utf8_lossy(expected),
                "step {index}: after {:?}",
                String::from_utf8_lossy(backend)
            );
            assert!(!progress.finished, "step {index} finished early");
        }
    }

    /// The courtesy steps after RCPT and the verdict.
    fn finish(mut probe: Probe) -> Verdict {
        converse(&mut probe, &[(b"250 2.0.0 Ok\r\n", b"QUIT\r\n")]);
        let progress = probe.received(b"221 2.0.0 Bye\r\n");
        assert_eq!(
            progress,
            Progress {
                send: Vec::new(),
                finished: true
            }
        );
        probe.into_verdict()
    }

    const RCPT: &[u8] = b"RCPT TO:<0123456789abcdef@a1b2c3d4e5f6.invalid>\r\n";

    /// Greeting, EHLO, MAIL and RCPT, for an identity that sends nothing
    /// before EHLO.
    fn through_mail(identity: ClientIdentity) -> Probe {
        let mut probe = new_probe(identity);
        converse(
            &mut probe,
            &[
                (b"220 mx.example ESMTP\r\n", b"EHLO proxy.example\r\n"),
                (
                    b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                    b"MAIL FROM:<>\r\n",
                ),
                (b"250 2.1.0 Ok\r\n", RCPT),
            ],
        );
        probe
    }

    #[test]
    fn a_refused_recipient_is_closed_and_the_dialogue_ends_with_rset_and_quit() {
        let mut probe = through_mail(ClientIdentity::None);
        converse(
            &mut probe,
            &[(
                b"554 5.7.1 <0123456789abcdef@a1b2c3d4e5f6.invalid>: Relay access denied\r\n",
                b"RSET\r\n",
            )],
        );
        assert_eq!(
            finish(probe),
            Verdict::Closed {
                reply: "554 5.7.1 <0123456789abcdef@a1b2c3d4e5f6.invalid>: Relay access denied"
                    .into()
            }
        );
    }

    #[test]
    fn a_temporary_refusal_is_closed_too() {
        let mut probe = through_mail(ClientIdentity::None);
        converse(
            &mut probe,
            &[(b"450 4.7.1 Try again later\r\n", b"RSET\r\n")],
        );
        assert_eq!(
            finish(probe),
            Verdict::Closed {
                reply: "450 4.7.1 Try again later".into()
            }
        );
    }

    #[test]
    fn an_accepted_recipient_is_open() {
        let mut probe = through_mail(ClientIdentity::None);
        converse(&mut probe, &[(b"250 2.1.5 Ok\r\n", b"RSET\r\n")]);
        let verdict = finish(probe);
        assert_eq!(
            verdict,
            Verdict::Open {
                reply: "250 2.1.5 Ok".into()
            }
        );
        assert_eq!(
            verdict.to_string(),
            "open (backend replied \"250 2.1.5 Ok\")"
        );
        assert_eq!(verdict.result().as_str(), "open");
    }

    #[test]
    fn a_rcpt_reply_that_neither_accepts_nor_refuses_is_unknown() {
        let mut probe = through_mail(ClientIdentity::None);
        converse(&mut probe, &[(b"354 go ahead\r\n", b"RSET\r\n")]);
        assert_eq!(
            finish(probe),
            Verdict::Unknown {
                reason: "the reply to RCPT TO \"354 go ahead\" neither accepts nor refuses".into()
            }
        );
    }

    #[test]
    fn multi_line_replies_are_read_whole_even_split_anywhere() {
        let mut probe = new_probe(ClientIdentity::None);
        // Split inside lines and between them: nothing is sent before a
        // reply's last line.
        converse(
            &mut probe,
            &[
                (b"220-mx.example ESMTP\r\n220-", b""),
                (b"second line\r", b""),
                (b"\n220 last\r\n", b"EHLO proxy.example\r\n"),
                (b"250-mx.example\r\n250-SIZE 1000", b""),
                (b"0\r\n250 8BITMIME\r\n", b"MAIL FROM:<>\r\n"),
                (b"250 Ok\r\n", RCPT),
                (
                    b"550-5.7.1 Relaying denied.\r\n550 5.7.1 See the policy.\r\n",
                    b"RSET\r\n",
                ),
            ],
        );
        assert_eq!(
            finish(probe),
            Verdict::Closed {
                reply: "550-5.7.1 Relaying denied. 550 5.7.1 See the policy.".into()
            }
        );
    }

    #[test]
    fn a_greeting_ehlo_or_mail_not_accepted_is_unknown_and_the_probe_quits() {
        let cases: &[(&[&[u8]], &str)] = &[
            (
                &[b"554 5.7.1 no service\r\n"],
                "the greeting \"554 5.7.1 no service\" is not 220",
            ),
            (
                &[
                    b"220 mx\r\n",
                    b"502 5.5.2 Error: command not recognized\r\n",
                ],
                "EHLO was refused: \"502 5.5.2 Error: command not recognized\"",
            ),
            (
                &[
                    b"220 mx\r\n",
                    b"250 mx\r\n",
                    b"553 5.1.8 sender refused\r\n",
                ],
                "MAIL FROM:<> was refused: \"553 5.1.8 sender refused\"",
            ),
        ];
        for (replies, reason) in cases {
            let mut probe = new_probe(ClientIdentity::None);
            let (last, before) = replies.split_last().expect("replies");
            for reply in before {
                let progress = probe.received(reply);
                assert!(!progress.finished);
            }
            let progress = probe.received(last);
            assert_eq!(progress.send, b"QUIT\r\n", "{reason}");
            assert!(!progress.finished);
            let progress = probe.received(b"221 Bye\r\n");
            assert!(progress.finished && progress.send.is_empty());
            assert_eq!(
                probe.into_verdict(),
                Verdict::Unknown {
                    reason: reason.to_string()
                }
            );
        }
    }

    #[test]
    fn a_proxy_header_comes_first_naming_the_probe_client_and_the_listener() {
        let probe = new_probe(ClientIdentity::ProxyV1);
        assert_eq!(
            probe.opening(),
            b"PROXY TCP4 192.0.2.1 127.0.0.1 50000 2525\r\n"
        );
        let mut probe = Probe::new(
            ClientIdentity::ProxyV2,
            Arc::from("proxy.example"),
            "127.0.0.1:465".parse().expect("address"),
            RECIPIENT.into(),
        );
        let mut expected = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        expected.extend_from_slice(&[192, 0, 2, 1, 127, 0, 0, 1]);
        expected.extend_from_slice(&[0xC3, 0x50, 0x01, 0xD1]); // 50000, 465
        assert_eq!(probe.opening(), expected);
        // Then the same dialogue as without one.
        converse(
            &mut probe,
            &[
                (b"220 mx\r\n", b"EHLO proxy.example\r\n"),
                (b"250 mx\r\n", b"MAIL FROM:<>\r\n"),
                (b"250 Ok\r\n", RCPT),
                (b"554 5.7.1 Relay access denied\r\n", b"RSET\r\n"),
            ],
        );
        assert_eq!(finish(probe).result(), RelayResult::Closed);
        assert_eq!(
            new_probe(ClientIdentity::None).opening(),
            b"",
            "no identity: nothing before the greeting"
        );
        assert_eq!(new_probe(ClientIdentity::Xclient).opening(), b"");
    }

    const POSTFIX_EHLO: &[u8] = b"250-mx.example\r\n250-PIPELINING\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250 CHUNKING\r\n";

    #[test]
    fn xclient_offered_names_the_probe_client_and_the_new_greeting_starts_over() {
        let mut probe = new_probe(ClientIdentity::Xclient);
        converse(
            &mut probe,
            &[
                (b"220 mx.example ESMTP\r\n", b"EHLO proxy.example\r\n"),
                (
                    POSTFIX_EHLO,
                    b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.1 PORT=50000 DESTADDR=127.0.0.1 DESTPORT=2525\r\n",
                ),
                (b"220 mx.example ESMTP\r\n", b"EHLO proxy.example\r\n"),
                (b"250-mx.example\r\n250 PIPELINING\r\n", b"MAIL FROM:<>\r\n"),
                (b"250 2.1.0 Ok\r\n", RCPT),
                (b"554 5.7.1 Relay access denied\r\n", b"RSET\r\n"),
            ],
        );
        assert_eq!(finish(probe).result(), RelayResult::Closed);
    }

    #[test]
    fn xclient_not_offered_or_refused_goes_on_without_it_as_sessions_do() {
        // Not offered (or without ADDR), or EHLO refused: the client's own
        // EHLO comes next.
        for ehlo_reply in [
            &b"250-mx.example\r\n250 8BITMIME\r\n"[..],
            b"250-mx.example\r\n250 XCLIENT NAME HELO\r\n",
            b"502 5.5.2 Error: command not recognized\r\n",
        ] {
            let mut probe = new_probe(ClientIdentity::Xclient);
            converse(
                &mut probe,
                &[
                    (b"220 mx\r\n", b"EHLO proxy.example\r\n"),
                    (ehlo_reply, b"EHLO proxy.example\r\n"),
                    (b"250 mx\r\n", b"MAIL FROM:<>\r\n"),
                    (b"250 Ok\r\n", RCPT),
                    (b"250 2.1.5 Ok\r\n", b"RSET\r\n"),
                ],
            );
            assert_eq!(finish(probe).result(), RelayResult::Open);
        }
        // Refused: likewise.
        let mut probe = new_probe(ClientIdentity::Xclient);
        converse(
            &mut probe,
            &[
                (b"220 mx\r\n", b"EHLO proxy.example\r\n"),
                (
                    b"250-mx\r\n250 XCLIENT ADDR\r\n",
                    b"XCLIENT ADDR=192.0.2.1\r\n",
                ),
                (
                    b"550 5.7.0 Error: insufficient authorization\r\n",
                    b"EHLO proxy.example\r\n",
                ),
                (b"250 mx\r\n", b"MAIL FROM:<>\r\n"),
                (b"250 Ok\r\n", RCPT),
                (b"250 2.1.5 Ok\r\n", b"RSET\r\n"),
            ],
        );
        assert_eq!(finish(probe).result(), RelayResult::Open);
    }

    #[test]
    fn a_421_to_xclient_ends_the_dialogue_unknown() {
        let mut probe = new_probe(ClientIdentity::Xclient);
        converse(
            &mut probe,
            &[
                (b"220 mx\r\n", b"EHLO proxy.example\r\n"),
                (POSTFIX_EHLO, b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.1 PORT=50000 DESTADDR=127.0.0.1 DESTPORT=2525\r\n"),
            ],
        );
        let progress = probe.received(b"421 4.7.0 unable to proceed\r\n");
        assert_eq!(
            progress,
            Progress {
                send: Vec::new(),
                finished: true
            }
        );
        assert_eq!(
            probe.into_verdict(),
            Verdict::Unknown {
                reason:
                    "the backend answered XCLIENT with \"421 4.7.0 unable to proceed\" and closes"
                        .into()
            }
        );
    }

    #[test]
    fn garbage_is_unknown_and_ends_the_dialogue_at_once() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"HTTP/1.1 400 Bad Request\r\n",
                "the greeting is not an SMTP reply: \"HTTP/1.1 400 Bad Request\"",
            ),
            (
                b"\xff\xfe\x00garbage\n",
                "the greeting is not an SMTP reply: \"\u{fffd}\u{fffd}\\u{0}garbage\"",
            ),
            (
                b"220-mx\r\n250 mixed\r\n",
                "the greeting is not an SMTP reply: \"220-mx 250 mixed\"",
            ),
            (b"22\r\n", "the greeting is not an SMTP reply: \"22\""),
        ];
        for (bytes, reason) in cases {
            let mut probe = new_probe(ClientIdentity::None);
            let progress = probe.received(bytes);
            assert_eq!(
                progress,
                Progress {
                    send: Vec::new(),
                    finished: true
                },
                "{reason}"
            );
            // Nothing more is read once it is over.
            assert!(probe.received(b"220 late\r\n").finished);
            assert_eq!(
                probe.into_verdict(),
                Verdict::Unknown {
                    reason: reason.to_string()
                }
            );
        }
    }

    #[test]
    fn overlong_lines_and_endless_replies_are_unknown() {
        let mut probe = new_probe(ClientIdentity::None);
        let mut flood = b"220 ".to_vec();
        flood.resize(MAX_LINE + 1, b'x');
        let progress = probe.received(&flood);
        assert!(progress.finished && progress.send.is_empty());
        assert_eq!(
            probe.into_verdict(),
            Verdict::Unknown {
                reason: "the backend sent a line longer than 4096 bytes while the probe waited for the greeting".into()
            }
        );

        let mut probe = new_probe(ClientIdentity::None);
        let mut finished = false;
        for _ in 0..MAX_REPLY_LINES {
            let progress = probe.received(b"220-more\r\n");
            assert!(progress.send.is_empty());
            finished = progress.finished;
        }
        assert!(finished);
        assert_eq!(
            probe.into_verdict(),
            Verdict::Unknown {
                reason: "the greeting is longer than 64 lines".into()
            }
        );
    }

    #[test]
    fn bytes_the_probe_did_not_ask_for_are_unknown() {
        let mut probe = new_probe(ClientIdentity::None);
        let progress = probe.received(b"220 mx\r\n250 unsolicited\r\n");
        assert_eq!(
            progress,
            Progress {
                send: Vec::new(),
                finished: true
            }
        );
        assert_eq!(
            probe.into_verdict(),
            Verdict::Unknown {
                reason: "the backend sent more than the greeting before it was asked anything else"
                    .into()
            }
        );
    }

    #[test]
    fn an_interrupted_dialogue_keeps_a_decided_verdict_and_is_unknown_otherwise() {
        let mut probe = through_mail(ClientIdentity::None);
        converse(&mut probe, &[(b"250 2.1.5 Ok\r\n", b"RSET\r\n")]);
        assert_eq!(
            probe.interrupted(Interruption::Closed),
            Verdict::Open {
                reply: "250 2.1.5 Ok".into()
            }
        );
        let probe = through_mail(ClientIdentity::None);
        assert_eq!(
            probe.interrupted(Interruption::Silent(Duration::from_secs(5))),
            Verdict::Unknown {
                reason: "no answer within 5 s while the probe waited for the reply to RCPT TO"
                    .into()
            }
        );
        let probe = probe_after_greeting();
        assert_eq!(
            probe.interrupted(Interruption::Closed),
            Verdict::Unknown {
                reason:
                    "the backend closed the connection while the probe waited for the reply to EHLO"
                        .into()
            }
        );
    }

    fn probe_after_greeting() -> Probe {
        let mut probe = new_probe(ClientIdentity::None);
        converse(&mut probe, &[(b"220 mx\r\n", b"EHLO proxy.example\r\n")]);
        probe
    }

    #[test]
    fn replies_are_shown_escaped_and_bounded() {
        assert_eq!(shown(b"250 a \"b\"\tc\r\n"), "250 a \\\"b\\\"\\tc");
        let long = vec![b'x'; 1000];
        let text = shown(&long);
        assert_eq!(text.len(), MAX_SHOWN + 3);
        assert!(text.ends_with("..."));
    }

    #[test]
    fn targets_are_smtp_listeners_with_the_check_on_and_a_routable_destination() {
        let text = r#"
hostname = "proxy.example"
[[listener]]
name = "imaps"
protocol = "imap"
tls = "implicit"
listen = "0.0.0.0:993"
backend = "127.0.0.1:143"

[[listener]]
name = "submission"
protocol = "smtp"
tls = "starttls"
listen = "[::]:587"
backend = "mail:25"
client_identity = "proxy-v1"

[[listener]]
name = "smtps"
protocol = "smtp"
tls = "implicit"
listen = "192.0.2.25:465"
backend = "mail:25"
relay_check = "warn"

[[listener]]
name = "mx"
protocol = "smtp"
tls = "starttls"
listen = "0.0.0.0:25"
backend = "mail:25"
relay_check = "off"
"#;
        let config = Config::parse(text, std::path::Path::new("/etc/x.toml")).expect("valid");
        let targets = targets(&config);
        let summary: Vec<(&str, RelayCheck, String, ClientIdentity)> = targets
            .iter()
            .map(|target| {
                (
                    target.listener.as_str(),
                    target.check,
                    target.destination.to_string(),
                    target.client_identity,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "submission",
                    RelayCheck::Refuse,
                    "127.0.0.1:587".to_string(),
                    ClientIdentity::ProxyV1
                ),
                (
                    "smtps",
                    RelayCheck::Warn,
                    "192.0.2.25:465".to_string(),
                    ClientIdentity::None
                ),
            ]
        );
        assert_eq!(&*targets[0].hostname, "proxy.example");
    }

    #[test]
    fn unknown_is_asked_again_sooner() {
        let hour = Duration::from_secs(3600);
        assert_eq!(next_check_in(RelayResult::Closed, hour), hour);
        assert_eq!(next_check_in(RelayResult::Open, hour), hour);
        assert_eq!(next_check_in(RelayResult::Unknown, hour), UNKNOWN_RETRY);
        let second = Duration::from_secs(1);
        assert_eq!(next_check_in(RelayResult::Unknown, second), second);
    }

    #[test]
    fn recipients_are_random_and_invalid() {
        let first = random_recipient().expect("random");
        let second = random_recipient().expect("random");
        assert_ne!(first, second);
        let (local, domain) = first.split_once('@').expect("an address");
        assert_eq!(local.len(), 16);
        assert!(local.bytes().all(|b| b.is_ascii_hexdigit()));
        let label = domain.strip_suffix(".invalid").expect(".invalid");
        assert_eq!(label.len(), 12);
        assert!(label.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn the_open_relay_error_names_listener_backend_reply_and_fixes() {
        let message = OpenRelay {
            listener: "submission".into(),
            backend: "mail:25".into(),
            client_identity: ClientIdentity::None,
            reply: "250 2.1.5 Ok".into(),
        }
        .to_string();
        for part in [
            "listener submission: backend mail:25 would relay mail for anyone",
            "probe from 192.0.2.1, client_identity = \"none\") with \"250 2.1.5 Ok\"",
            "client_identity = \"proxy-v2\" with Postfix smtpd_upstream_proxy_protocol = haproxy",
            "client_identity = \"xclient\" with the proxy's address in Postfix smtpd_authorized_xclient_hosts",
            "Postfix mynetworks, Exim relay_from_hosts, Sendmail's access db Connect: RELAY entries, OpenSMTPD `match from local ... action relay`",
            "relay_check = \"warn\" (log and serve) or relay_check = \"off\"",
        ] {
            assert!(message.contains(part), "{part:?} missing from {message}");
        }
    }
}
