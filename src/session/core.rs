//! The session core: one connection's inspection dialogue as a sans-IO state
//! machine, in the style of rustls and quinn-proto.
//!
//! The core owns every decision the session makes while it inspects: which
//! buffered line goes to the protocol machine next, the per-session caps
//! (line length, command count), the pre-TLS PROXY-header refusal, the
//! detection of a backend that did not expect the proxy's PROXY header, the
//! dropping of backend lines that arrive between STARTTLS and the client's
//! next command, idle and shutdown goodbyes. It never touches a socket, a
//! timer or a task: the driver (`session::dialogue`) feeds it what arrived
//! (bytes, end of stream, the TLS handshake's end, a shutdown request, the
//! idle deadline passing) and carries out what [`SessionCore::poll`] asks:
//! write the pending bytes, wait for more input (and until when), or end
//! the inspection phase. Unit tests and the fuzz targets drive this same
//! core with exact bytes.

use std::time::{Duration, Instant};

use crate::protocol::line::LineBuffer;
use crate::protocol::proxy_header::{self, ClientHeader};
use crate::protocol::{
    self, BackendFailure, ClientIdentity, Goodbye, Inspector, Next, Notice, Output, Protocol,
    Refusal,
};

/// The listener's settings the core decides by.
#[derive(Clone, Debug)]
pub struct CoreSettings {
    pub protocol: Protocol,
    /// How the backend learns who the client is: with a PROXY header the
    /// backend's first answers tell whether it expected one, and a client's
    /// own header must never reach it.
    pub client_identity: ClientIdentity,
    /// Client lines read before the session is handed over.
    pub max_inspected_commands: usize,
    /// Silence tolerated, counted in complete lines.
    pub idle_timeout: Duration,
    pub max_client_line: usize,
    pub max_backend_line: usize,
}

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Log [`SessionCore::take_observations`], write
    /// [`SessionCore::to_backend`] to the backend, then
    /// `SessionCore::to_client` to the client, then call
    /// [`SessionCore::written`].
    Write,
    /// Nothing to do until something arrives: read the backend, the client
    /// too when `read_client` (otherwise its bytes stay in the socket, so
    /// nothing sent behind a command is read before that command's answer),
    /// and call [`SessionCore::idle_timeout`] at `deadline`.
    Wait {
        read_client: bool,
        deadline: Instant,
    },
    /// The inspection phase is over; every byte it produced has been asked
    /// for with [`Action::Write`] before.
    End(Ending),
}

/// How an inspection phase ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Upgrade the client connection now, then call
    /// [`SessionCore::tls_established`] and go on polling.
    StartTls,
    /// Copy bytes without parsing from now on, starting with
    /// `SessionCore::into_pending`.
    Passthrough,
    /// The dialogue is over (a peer closed, or the machine said so).
    Closed,
    /// The proxy ended the session; the client got the protocol's answer.
    Failed(Failure),
}

/// Why the proxy ended a session during inspection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A client line over the cap (bytes).
    ClientLineTooLong(usize),
    /// A backend line over the cap (bytes).
    BackendLineTooLong(usize),
    /// More client lines than the cap before hand-over.
    TooManyCommands(usize),
    /// No complete line either way for the idle timeout.
    IdleTimeout(Duration),
    /// The client sent a PROXY protocol header.
    ClientProxyHeader,
    /// The backend's first answer says it did not expect the proxy's PROXY
    /// header; `evidence` says what it did.
    ProxyHeaderRejected { evidence: String },
}

/// Something the driver logs or counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A command refused by the listener's TLS policy (the metric label).
    PolicyRefusal(&'static str),
    /// What the protocol machine noticed.
    Notice(Notice),
    /// A backend line that arrived after STARTTLS before the client's first
    /// command was dropped.
    DroppedBackendLine { bytes: usize },
}

/// One connection's inspection state.
pub struct SessionCore {
    settings: CoreSettings,
    inspector: Box<dyn Inspector>,
    client_lines: LineBuffer,
    backend_lines: LineBuffer,
    out: Output,
    observations: Vec<Observation>,
    ending: Option<Ending>,
    deadline: Instant,
    /// Client lines read so far, against the cap.
    commands: usize,
    /// Client bytes still to discard (a refused literal's body).
    skip_client_bytes: u64,
    /// The client has not sent a line yet (its first bytes are checked for
    /// a PROXY header; a backend error before it means a refused header).
    client_silent: bool,
    /// The backend has not sent a line yet.
    backend_silent: bool,
    /// Set by a STARTTLS upgrade until the client's first command after it.
    /// The server never speaks first after STARTTLS in any of the three
    /// protocols, so whatever the backend sends meanwhile can only be an
    /// unsolicited or injected line, and is dropped rather than delivered
    /// inside TLS.
    drop_backend_until_client_speaks: bool,
    shutdown_requested: bool,
}

/// Whether a step made progress or the core must wait for input.
enum Progress {
    Again,
    Wait,
}

impl SessionCore {
    pub fn new(settings: CoreSettings, inspector: Box<dyn Inspector>, now: Instant) -> Self {
        Self {
            client_lines: LineBuffer::new(settings.max_client_line),
            backend_lines: LineBuffer::new(settings.max_backend_line),
            deadline: now + settings.idle_timeout,
            settings,
            inspector,
            out: Output::default(),
            observations: Vec::new(),
            ending: None,
            commands: 0,
            skip_client_bytes: 0,
            client_silent: true,
            backend_silent: true,
            drop_backend_until_client_speaks: false,
            shutdown_requested: false,
        }
    }

    /// What to do next; `now` restarts the idle deadline when a line is
    /// processed.
    pub fn poll(&mut self, now: Instant) -> Action {
        loop {
            if !self.out.is_empty() || !self.observations.is_empty() {
                return Action::Write;
            }
            if let Some(ending) = self.ending.take() {
                return Action::End(ending);
            }
            if let Progress::Wait = self.step(now) {
                if !self.observations.is_empty() {
                    return Action::Write;
                }
                let read_client = self.inspector.wants_client_line()
                    || self.inspector.wants_client_bytes()
                    || self.skip_client_bytes > 0;
                // Waiting holds no read buffers.
                self.backend_lines.release_if_empty();
                self.client_lines.release_if_empty();
                return Action::Wait {
                    read_client,
                    deadline: self.deadline,
                };
            }
        }
    }

    /// Bytes for the backend, to be written before `Self::to_client`.
    pub fn to_backend(&self) -> &[u8] {
        &self.out.to_backend
    }

    pub(crate) fn to_client(&self) -> &[u8] {
        &self.out.to_client
    }

    /// What happened since the last call, for logs and metrics.
    pub fn take_observations(&mut self) -> std::vec::Drain<'_, Observation> {
        self.observations.drain(..)
    }

    /// The bytes of the last [`Action::Write`] are out.
    pub fn written(&mut self) {
        self.out.clear();
    }

    pub fn client_received(&mut self, bytes: &[u8]) {
        self.client_lines.append(bytes);
    }

    pub fn backend_received(&mut self, bytes: &[u8]) {
        self.backend_lines.append(bytes);
    }

    /// The (client, backend) input buffers, for a driver that reads into
    /// them in place; the same as [`Self::client_received`] and
    /// [`Self::backend_received`] without a copy.
    pub(crate) fn input_buffers(&mut self) -> (&mut LineBuffer, &mut LineBuffer) {
        (&mut self.client_lines, &mut self.backend_lines)
    }

    /// The client closed its side.
    pub(crate) fn client_closed(&mut self) {
        self.ending = Some(Ending::Closed);
    }

    /// The backend closed its side (or its connection failed): the client
    /// gets the protocol's temporary failure if it still expects an answer.
    pub fn backend_closed(&mut self) {
        self.inspector
            .backend_failed(BackendFailure::Closed, &mut self.out);
        self.collect_notice();
        // Closed without a word right after the header: it was refused
        // (malformed for it, or the proxy's address is not trusted to send
        // one).
        self.ending = Some(if self.header_unconfirmed() && self.backend_silent {
            Ending::Failed(Failure::ProxyHeaderRejected {
                evidence: "it closed the connection without a greeting".into(),
            })
        } else {
            Ending::Closed
        });
    }

    /// The idle deadline of the last [`Action::Wait`] passed.
    pub fn idle_timeout(&mut self) {
        self.goodbye(
            Goodbye::IdleTimeout,
            Failure::IdleTimeout(self.settings.idle_timeout),
        );
    }

    /// The proxy is shutting down: the session ends with the protocol's
    /// goodbye as soon as it is between commands.
    pub fn shutdown_requested(&mut self) {
        self.shutdown_requested = true;
    }

    /// The client finished the TLS handshake [`Ending::StartTls`] asked for.
    pub fn tls_established(&mut self, now: Instant) {
        self.inspector.tls_established();
        self.drop_backend_until_client_speaks = true;
        self.deadline = now + self.settings.idle_timeout;
    }

    /// The client's bytes after the upgrade command (the handshake's start).
    pub fn take_client_pending(&mut self) -> Vec<u8> {
        self.client_lines.take_pending()
    }

    /// Drops the backend's unread bytes; returns how many.
    pub fn discard_backend_pending(&mut self) -> usize {
        self.backend_lines.discard_pending()
    }

    /// The unconsumed bytes of (client, backend), for pass-through.
    pub(crate) fn into_pending(mut self) -> (Vec<u8>, Vec<u8>) {
        (
            self.client_lines.take_pending(),
            self.backend_lines.take_pending(),
        )
    }

    /// Whether this connection started with a PROXY header the backend may
    /// not have expected, and nothing since tells otherwise.
    fn header_unconfirmed(&self) -> bool {
        self.settings.client_identity.sends_proxy_header() && self.client_silent
    }

    fn goodbye(&mut self, reason: Goodbye, failure: Failure) {
        self.inspector.goodbye(reason, &mut self.out);
        self.ending = Some(Ending::Failed(failure));
    }

    fn collect_notice(&mut self) {
        if let Some(notice) = self.out.notice.take() {
            self.observations.push(Observation::Notice(notice));
        }
    }

    /// Backend lines first (replies, and unsolicited lines the machine
    /// decides about), then one client command at a time, then a pending
    /// shutdown.
    fn step(&mut self, now: Instant) -> Progress {
        if let Some(progress) = self.backend_step(now) {
            return progress;
        }
        // One client command at a time: the rest stays buffered until the
        // machine has its reply, so nothing behind STARTTLS is ever parsed.
        if self.skip_client_bytes > 0 {
            self.skip_client_bytes = self.client_lines.skip(self.skip_client_bytes);
        }
        // A message body or BDAT chunk: raw bytes, no line cap.
        if self.inspector.wants_client_bytes() && self.skip_client_bytes == 0 {
            let pending = self.client_lines.pending();
            if !pending.is_empty() {
                let taken = self.inspector.client_bytes(pending, &mut self.out);
                if taken > 0 {
                    self.client_lines.skip(taken as u64);
                    self.deadline = now + self.settings.idle_timeout;
                    self.collect_notice();
                    return Progress::Again;
                }
            }
        }
        // Only a trusted proxy may send a PROXY header, and clients are not
        // that: one is refused before anything reaches the backend.
        let mut undecided = false;
        if self.client_silent
            && self.settings.client_identity != ClientIdentity::None
            && self.inspector.wants_client_line()
        {
            match proxy_header::client_header(self.client_lines.pending()) {
                ClientHeader::Present => {
                    self.observations.push(Observation::PolicyRefusal("PROXY"));
                    self.out
                        .to_client
                        .extend_from_slice(protocol::refusal_reply(
                            self.settings.protocol,
                            Refusal::ClientProxyHeader,
                        ));
                    self.ending = Some(Ending::Failed(Failure::ClientProxyHeader));
                    return Progress::Again;
                }
                ClientHeader::Undecided => undecided = true,
                ClientHeader::Absent => {}
            }
        }
        if self.inspector.wants_client_line() && self.skip_client_bytes == 0 && !undecided {
            match self.client_lines.next_line() {
                Ok(Some(line)) => {
                    self.deadline = now + self.settings.idle_timeout;
                    self.client_silent = false;
                    self.drop_backend_until_client_speaks = false;
                    // A relaying machine reads commands for the whole
                    // session; the cap is for the inspection phase.
                    if !self.inspector.relaying() {
                        self.commands += 1;
                    }
                    if self.commands > self.settings.max_inspected_commands {
                        self.goodbye(
                            Goodbye::TooManyCommands,
                            Failure::TooManyCommands(self.settings.max_inspected_commands),
                        );
                        return Progress::Again;
                    }
                    let next = self.inspector.client_line(line, &mut self.out);
                    if let Some(command) = self.out.refused.take() {
                        self.observations.push(Observation::PolicyRefusal(command));
                    }
                    self.skip_client_bytes = std::mem::take(&mut self.out.skip_client_bytes);
                    self.collect_notice();
                    self.ending = ending_of(next);
                    return Progress::Again;
                }
                Ok(None) => {}
                Err(too_long) => {
                    self.goodbye(
                        Goodbye::LineTooLong,
                        Failure::ClientLineTooLong(too_long.max),
                    );
                    return Progress::Again;
                }
            }
        }
        // A relaying machine in the middle of a command (a message body, a
        // reply on its way) finishes it first, as pass-through does.
        let mid_command = self.inspector.relaying() && !self.inspector.wants_client_line();
        if self.shutdown_requested && !mid_command {
            self.inspector.goodbye(Goodbye::ShuttingDown, &mut self.out);
            self.ending = Some(Ending::Closed);
            return Progress::Again;
        }
        Progress::Wait
    }

    /// Takes every complete backend line; `None` when there was none left
    /// and nothing to write.
    fn backend_step(&mut self, now: Instant) -> Option<Progress> {
        loop {
            let header_unconfirmed = self.header_unconfirmed();
            let line = match self.backend_lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => {
                    // The lines of one reply (EHLO, CAPABILITY) that arrived
                    // together go out in one write (one TLS record, one
                    // packet) instead of one each.
                    return (!self.out.is_empty()).then_some(Progress::Again);
                }
                Err(too_long) => {
                    self.inspector
                        .backend_failed(BackendFailure::LineTooLong, &mut self.out);
                    self.collect_notice();
                    self.ending = Some(Ending::Failed(Failure::BackendLineTooLong(too_long.max)));
                    return Some(Progress::Again);
                }
            };
            if self.drop_backend_until_client_speaks {
                self.observations
                    .push(Observation::DroppedBackendLine { bytes: line.len() });
                continue;
            }
            self.deadline = now + self.settings.idle_timeout;
            self.backend_silent = false;
            // A backend that did not expect the PROXY header answers its
            // bytes with errors right after its greeting, before the client
            // has said anything.
            if header_unconfirmed
                && self.inspector.wants_client_line()
                && protocol::is_error_reply(self.settings.protocol, line)
            {
                let evidence = format!(
                    "it answered {:?} before the client's first command",
                    String::from_utf8_lossy(protocol::trim_eol(line))
                );
                self.out
                    .to_client
                    .extend_from_slice(protocol::refusal_reply(
                        self.settings.protocol,
                        Refusal::BackendUnavailable,
                    ));
                self.ending = Some(Ending::Failed(Failure::ProxyHeaderRejected { evidence }));
                return Some(Progress::Again);
            }
            let next = self.inspector.backend_line(line, &mut self.out);
            let noticed = self.out.notice.is_some();
            self.collect_notice();
            let ending = ending_of(next);
            if ending.is_some() || noticed {
                self.ending = ending;
                return Some(Progress::Again);
            }
        }
    }
}

fn ending_of(next: Next) -> Option<Ending> {
    match next {
        Next::Continue => None,
        Next::StartTls => Some(Ending::StartTls),
        Next::Passthrough => Some(Ending::Passthrough),
        Next::Close => Some(Ending::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{new_inspector, InspectorOptions, RequireTls, TlsMode};

    const IDLE: Duration = Duration::from_secs(60);

    fn core_for(
        protocol: Protocol,
        mode: TlsMode,
        identity: ClientIdentity,
    ) -> (SessionCore, Instant) {
        let now = Instant::now();
        let settings = CoreSettings {
            protocol,
            client_identity: identity,
            max_inspected_commands: 3,
            idle_timeout: IDLE,
            max_client_line: 64,
            max_backend_line: 256,
        };
        let options = InspectorOptions::new(mode, RequireTls::Auth);
        (
            SessionCore::new(settings, new_inspector(protocol, &options), now),
            now,
        )
    }

    /// What the driver would write, in order, until the core waits or ends:
    /// `B:` backend bytes, `C:` client bytes, then the final action.
    fn run(core: &mut SessionCore, now: Instant) -> (String, Action) {
        let mut log = String::new();
        loop {
            match core.poll(now) {
                Action::Write => {
                    core.take_observations().for_each(drop);
                    if !core.to_backend().is_empty() {
                        log.push_str(&format!("B:{}", String::from_utf8_lossy(core.to_backend())));
                    }
                    if !core.to_client().is_empty() {
                        log.push_str(&format!("C:{}", String::from_utf8_lossy(core.to_client())));
                    }
                    core.written();
                }
                other => return (log, other),
            }
        }
    }

    fn waiting(read_client: bool, since: Instant) -> Action {
        Action::Wait {
            read_client,
            deadline: since + IDLE,
        }
    }

    #[test]
    fn a_starttls_dialogue_offers_tls_answers_the_upgrade_and_holds_what_follows() {
        let (mut core, now) = core_for(Protocol::Smtp, TlsMode::StartTls, ClientIdentity::None);
        // Nothing is read from the client before the backend's greeting.
        assert_eq!(run(&mut core, now), (String::new(), waiting(false, now)));
        core.backend_received(b"220 mx ESMTP\r\n");
        assert_eq!(
            run(&mut core, now),
            ("C:220 mx ESMTP\r\n".into(), waiting(true, now))
        );
        // Two commands at once: the second waits for the first's answer.
        core.client_received(b"EHLO a\r\nSTARTTLS\r\n\x16\x03\x01");
        assert_eq!(
            run(&mut core, now),
            ("B:EHLO a\r\n".into(), waiting(false, now))
        );
        core.backend_received(b"250-mx\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n");
        let (written, action) = run(&mut core, now);
        assert_eq!(
            written,
            "C:250-mx\r\n250-8BITMIME\r\n250 STARTTLS\r\nC:220 2.0.0 Ready to start TLS\r\n"
        );
        assert_eq!(action, Action::End(Ending::StartTls));
        assert_eq!(core.take_client_pending(), b"\x16\x03\x01");
    }

    #[test]
    fn a_backend_line_between_starttls_and_the_clients_next_command_is_dropped() {
        let (mut core, now) = core_for(Protocol::Pop3, TlsMode::StartTls, ClientIdentity::None);
        core.backend_received(b"+OK ready\r\n");
        core.client_received(b"STLS\r\n");
        let (_, action) = run(&mut core, now);
        assert_eq!(action, Action::End(Ending::StartTls));
        let later = now + Duration::from_secs(5);
        core.tls_established(later);
        core.backend_received(b"+OK injected\r\n");
        assert_eq!(core.poll(later), Action::Write);
        assert_eq!(
            core.take_observations().collect::<Vec<_>>(),
            [Observation::DroppedBackendLine { bytes: 14 }]
        );
        assert_eq!((core.to_backend(), core.to_client()), (&b""[..], &b""[..]));
        core.written();
        assert_eq!(run(&mut core, later), (String::new(), waiting(true, later)));
        core.client_received(b"CAPA\r\n");
        assert_eq!(
            run(&mut core, later),
            ("B:CAPA\r\n".into(), waiting(false, later))
        );
    }

    #[test]
    fn a_client_proxy_header_is_refused_before_the_backend_sees_a_byte() {
        let (mut core, now) = core_for(Protocol::Imap, TlsMode::StartTls, ClientIdentity::ProxyV2);
        core.backend_received(b"* OK ready\r\n");
        core.client_received(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\na LOGIN x y\r\n");
        let (written, action) = run(&mut core, now);
        assert_eq!(
            written,
            "C:* OK ready\r\nC:* BYE PROXY protocol headers are not accepted from clients\r\n"
        );
        assert_eq!(
            action,
            Action::End(Ending::Failed(Failure::ClientProxyHeader))
        );
    }

    #[test]
    fn a_blank_first_line_could_start_a_v2_signature_and_waits_for_more() {
        let (mut core, now) = core_for(Protocol::Smtp, TlsMode::StartTls, ClientIdentity::ProxyV1);
        core.backend_received(b"220 mx\r\n");
        core.client_received(b"\r\n");
        // A blank line could be the start of a version 2 signature.
        assert_eq!(
            run(&mut core, now),
            ("C:220 mx\r\n".into(), waiting(true, now))
        );
        core.client_received(b"NOOP\r\n");
        assert_eq!(run(&mut core, now), ("B:\r\n".into(), waiting(false, now)));
    }

    #[test]
    fn a_backend_that_did_not_expect_the_header_is_recognised() {
        let (mut core, now) = core_for(Protocol::Smtp, TlsMode::StartTls, ClientIdentity::ProxyV1);
        core.backend_received(b"220 mx\r\n500 5.5.2 Error: bad syntax\r\n");
        let (written, action) = run(&mut core, now);
        assert_eq!(
            written,
            "C:220 mx\r\n421 4.3.2 Service not available, closing transmission channel\r\n"
        );
        assert_eq!(
            action,
            Action::End(Ending::Failed(Failure::ProxyHeaderRejected {
                evidence:
                    "it answered \"500 5.5.2 Error: bad syntax\" before the client's first command"
                        .into()
            }))
        );

        let (mut core, now) = core_for(Protocol::Pop3, TlsMode::StartTls, ClientIdentity::ProxyV2);
        core.backend_closed();
        assert_eq!(
            run(&mut core, now),
            (
                "C:-ERR [SYS/TEMP] Backend server not available\r\n".into(),
                Action::End(Ending::Failed(Failure::ProxyHeaderRejected {
                    evidence: "it closed the connection without a greeting".into()
                }))
            )
        );
    }

    #[test]
    fn caps_end_the_session_with_the_protocols_goodbye() {
        let (mut core, now) = core_for(Protocol::Pop3, TlsMode::StartTls, ClientIdentity::None);
        core.backend_received(b"+OK ready\r\n");
        run(&mut core, now);
        for _ in 0..3 {
            core.client_received(b"NOOP\r\n");
            run(&mut core, now);
            core.backend_received(b"+OK\r\n");
            run(&mut core, now);
        }
        core.client_received(b"NOOP\r\n");
        let (written, action) = run(&mut core, now);
        assert_eq!(written, "C:-ERR Too many commands\r\n");
        assert_eq!(
            action,
            Action::End(Ending::Failed(Failure::TooManyCommands(3)))
        );

        let (mut core, now) = core_for(Protocol::Pop3, TlsMode::StartTls, ClientIdentity::None);
        core.backend_received(b"+OK ready\r\n");
        core.client_received(&[b'x'; 65]);
        let (written, action) = run(&mut core, now);
        assert!(written.starts_with("C:+OK ready\r\nC:-ERR"), "{written}");
        assert_eq!(
            action,
            Action::End(Ending::Failed(Failure::ClientLineTooLong(64)))
        );

        let (mut core, now) = core_for(Protocol::Pop3, TlsMode::StartTls, ClientIdentity::None);
        core.backend_received(&[b'+'; 257]);
        let (written, action) = run(&mut core, now);
        assert_eq!(
            written,
            "C:-ERR [SYS/TEMP] Backend server not available\r\n"
        );
        assert_eq!(
            action,
            Action::End(Ending::Failed(Failure::BackendLineTooLong(256)))
        );
    }

    #[test]
    fn the_idle_deadline_moves_with_each_line_and_ends_in_a_goodbye() {
        let (mut core, now) = core_for(Protocol::Smtp, TlsMode::StartTls, ClientIdentity::None);
        let later = now + Duration::from_secs(30);
        core.backend_received(b"220 mx\r\n");
        assert_eq!(run(&mut core, later).1, waiting(true, later));
        // A partial line moves nothing.
        core.client_received(b"NO");
        assert_eq!(run(&mut core, later + IDLE).1, waiting(true, later));
        core.idle_timeout();
        let (written, action) = run(&mut core, later + IDLE);
        assert_eq!(written, "C:421 4.4.2 Idle timeout, closing connection\r\n");
        assert_eq!(
            action,
            Action::End(Ending::Failed(Failure::IdleTimeout(IDLE)))
        );
    }

    #[test]
    fn shutdown_says_goodbye_between_commands() {
        let (mut core, now) = core_for(Protocol::Smtp, TlsMode::StartTls, ClientIdentity::None);
        core.backend_received(b"220 mx\r\n");
        core.client_received(b"NOOP\r\n");
        run(&mut core, now);
        core.shutdown_requested();
        // The pending reply is delivered first.
        core.backend_received(b"250 2.0.0 Ok\r\n");
        let (written, action) = run(&mut core, now);
        assert_eq!(
            written,
            "C:250 2.0.0 Ok\r\nC:421 4.3.2 Service shutting down, closing connection\r\n"
        );
        assert_eq!(action, Action::End(Ending::Closed));
    }

    #[test]
    fn closes_and_pass_through_hand_over_what_is_unread() {
        // Implicit TLS: the login is the last command inspected.
        let (mut core, now) = core_for(Protocol::Imap, TlsMode::Implicit, ClientIdentity::None);
        core.backend_received(b"* OK ready\r\n");
        run(&mut core, now);
        core.client_received(b"a LOGIN u p\r\nb SELECT INBOX\r\n");
        core.backend_received(b"* early\r\n");
        let (written, action) = run(&mut core, now);
        assert_eq!(written, "C:* early\r\nB:a LOGIN u p\r\n");
        assert_eq!(action, Action::End(Ending::Passthrough));
        assert_eq!(
            core.into_pending(),
            (b"b SELECT INBOX\r\n".to_vec(), Vec::new())
        );

        let (mut core, now) = core_for(Protocol::Imap, TlsMode::Implicit, ClientIdentity::None);
        core.client_closed();
        assert_eq!(
            run(&mut core, now),
            (String::new(), Action::End(Ending::Closed))
        );
    }
}
