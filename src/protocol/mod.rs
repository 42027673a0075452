//! Sans-IO protocol inspection: one state machine per mail protocol.
//!
//! The machines own every decision about *what* crosses the proxy during the
//! short plaintext (or freshly encrypted) dialogue before a session is handed to
//! unparsed copying; the session driver (`crate::session`) owns *how*: sockets,
//! TLS and timers. A machine is fed one complete line at a time, from either
//! side, writes the bytes that must go out into an [`Output`], and returns a
//! [`Next`] telling the driver what to do once those bytes are written.
//!
//! Nothing here performs I/O, allocates per line on the steady path (the
//! output buffers are reused), or panics on any byte input: the machines are
//! unit-tested with exact bytes, property-tested and fuzzed.
//!
//! Layout: one folder per protocol ([`smtp`], [`imap`], [`pop3`]), each
//! holding everything the proxy knows about that protocol: the machine
//! (`mod.rs`), its capability rewrite, its replies and error-reply judge
//! (`replies.rs`), what the readiness check expects of its backends
//! (`probe.rs`), and its tests (`tests.rs`). Each fills in one `Spec`
//! (`spec.rs`), which [`Protocol`]'s methods hand to the rest of the proxy.
//! Shared by all three: the STARTTLS gate and pre-TLS line policy
//! (`gate.rs`), the line buffer ([`line`](mod@line)), the PROXY protocol
//! header ([`proxy_header`]), and the contract every machine is tested
//! against (`contract.rs`).

#[cfg(test)]
mod contract;
mod gate;
pub mod imap;
pub mod line;
pub mod pop3;
pub mod proxy_header;
pub mod smtp;
mod spec;
#[cfg(test)]
mod testing;

pub(crate) use gate::{StartTlsReplies, TlsGate, UnsafeLine};
pub(crate) use spec::{starts_with_ignore_case, Greeting, Replies, Spec, DOVECOT_PROXY_HEADER};

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

/// Which mail protocol a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Smtp,
    Imap,
    Pop3,
}

impl Protocol {
    /// Every protocol, for the tests that check them all.
    #[cfg(test)]
    pub(crate) const ALL: [Protocol; 3] = [Protocol::Smtp, Protocol::Imap, Protocol::Pop3];

    /// The name used in configuration files, logs and metrics.
    pub fn as_str(self) -> &'static str {
        self.spec().name
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a listener gets to TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// TLS first, then the protocol (SMTPS 465, IMAPS 993, POP3S 995).
    Implicit,
    /// Plaintext first; the proxy offers and answers STARTTLS/STLS itself.
    StartTls,
}

impl TlsMode {
    /// The name used in configuration files, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Implicit => "implicit",
            TlsMode::StartTls => "starttls",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a STARTTLS listener lets through before the client has TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RequireTls {
    /// Credentials never cross in clear: AUTH/LOGIN/USER and friends are
    /// refused and not advertised before TLS; unauthenticated mail still
    /// flows (port 25).
    #[default]
    Auth,
    /// Only the commands that lead to TLS are served before it.
    All,
    /// Opportunistic: everything the backend offers, TLS if the client asks.
    None,
}

impl RequireTls {
    pub fn as_str(self) -> &'static str {
        match self {
            RequireTls::Auth => "auth",
            RequireTls::All => "all",
            RequireTls::None => "none",
        }
    }
}

/// How a listener tells its backend who the client is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ClientIdentity {
    /// Not at all: the backend sees the proxy's address.
    #[default]
    None,
    /// A PROXY protocol version 1 (text) header starts every backend connection.
    ProxyV1,
    /// A PROXY protocol version 2 (binary) header starts every backend
    /// connection; on implicit-TLS listeners it carries the TLS facts.
    ProxyV2,
    /// SMTP only: the proxy sends `XCLIENT` after the backend's greeting.
    Xclient,
}

impl ClientIdentity {
    /// The name used in configuration files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientIdentity::None => "none",
            ClientIdentity::ProxyV1 => "proxy-v1",
            ClientIdentity::ProxyV2 => "proxy-v2",
            ClientIdentity::Xclient => "xclient",
        }
    }

    /// Whether a PROXY protocol header starts each backend connection.
    pub fn sends_proxy_header(self) -> bool {
        matches!(self, ClientIdentity::ProxyV1 | ClientIdentity::ProxyV2)
    }

    /// What the backend of a `protocol` listener must be configured with to
    /// accept this identity (`check` prints it), or `None` for `none`.
    pub fn backend_requirement(self, protocol: Protocol) -> Option<&'static str> {
        match (self, protocol) {
            (ClientIdentity::None, _) => None,
            (ClientIdentity::ProxyV1 | ClientIdentity::ProxyV2, _) => {
                Some(protocol.spec().proxy_header_requirement)
            }
            (ClientIdentity::Xclient, _) => Some(
                "Postfix: the proxy's address in smtpd_authorized_xclient_hosts (without it \
                 sessions still work, but the backend sees the proxy's address)",
            ),
        }
    }
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a machine is built from: the listener's settings and, for
/// `XCLIENT`, the connection's addresses.
#[derive(Clone, Debug)]
pub struct InspectorOptions {
    pub mode: TlsMode,
    pub require_tls: RequireTls,
    pub client_identity: ClientIdentity,
    /// The client's address (the accepted socket's peer).
    pub client: Option<SocketAddr>,
    /// The address the client connected to (the accepted socket's local end).
    pub server: Option<SocketAddr>,
    /// The proxy's host name: the EHLO it sends before `XCLIENT`.
    pub hostname: Arc<str>,
}

impl InspectorOptions {
    /// A listener's TLS settings, with no client identity.
    pub fn new(mode: TlsMode, require_tls: RequireTls) -> Self {
        Self {
            mode,
            require_tls,
            client_identity: ClientIdentity::None,
            client: None,
            server: None,
            hostname: Arc::from("localhost"),
        }
    }
}

/// Something a machine noticed that the operator should hear about; the
/// driver logs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The backend's EHLO reply does not offer XCLIENT; the session goes on
    /// without it (the backend sees the proxy's address).
    XclientNotOffered,
    /// The backend answered XCLIENT with this error code; the session goes
    /// on without it.
    XclientRefused(u16),
    /// The backend accepted XCLIENT and greeted again.
    XclientAccepted,
}

/// Why the proxy ends a session that is still in inspection; picks the
/// protocol's wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goodbye {
    /// A client line exceeded the cap.
    LineTooLong,
    /// More commands before TLS or login than any real client needs.
    TooManyCommands,
    /// The client was silent for the listener's idle timeout.
    IdleTimeout,
    /// The proxy is shutting down.
    ShuttingDown,
}

/// Bytes a machine wants sent, filled by each call and drained by the driver.
///
/// The driver writes `to_backend` first, then `to_client`, and clears both
/// (keeping their capacity) before the next call.
#[derive(Debug, Default)]
pub struct Output {
    pub to_client: Vec<u8>,
    pub to_backend: Vec<u8>,
    /// Set when the machine refused a command by policy (the metric label).
    pub refused: Option<&'static str>,
    /// Client bytes to discard, unread, before the next client line (the
    /// body of a refused non-synchronizing IMAP literal).
    pub skip_client_bytes: u64,
    /// Something for the operator's log.
    pub notice: Option<Notice>,
}

impl Output {
    pub fn clear(&mut self) {
        self.to_client.clear();
        self.to_backend.clear();
        self.refused = None;
        self.skip_client_bytes = 0;
        self.notice = None;
    }

    pub fn is_empty(&self) -> bool {
        self.to_client.is_empty() && self.to_backend.is_empty()
    }
}

/// What the driver does after writing the [`Output`] of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep feeding lines.
    Continue,
    /// Upgrade the client connection to TLS now. Bytes the client sent after
    /// the upgrade command are never commands: they are the first bytes of the
    /// TLS handshake. Backend bytes still buffered are discarded. After the
    /// handshake the driver calls [`Inspector::tls_established`].
    StartTls,
    /// Inspection is over: copy bytes in both directions without parsing,
    /// starting with whatever either side has already sent.
    Passthrough,
    /// Close both connections.
    Close,
}

/// Why the session cannot reach its backend; picks the wording of the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendFailure {
    /// Connecting failed or timed out.
    Unreachable,
    /// The backend closed the connection in the middle of the dialogue.
    Closed,
    /// The backend sent a line longer than the proxy accepts.
    LineTooLong,
}

/// One protocol's inspection state machine, as the session driver sees it.
pub trait Inspector: Send {
    /// Whether the machine is ready for the next client line. While it waits
    /// for a backend reply, client lines stay buffered (pipelined commands are
    /// handled one by one, which also keeps a command sent behind STARTTLS
    /// from ever being read as a command).
    fn wants_client_line(&self) -> bool;

    /// A complete client line, terminator included.
    fn client_line(&mut self, line: &[u8], out: &mut Output) -> Next;

    /// A complete backend line, terminator included.
    fn backend_line(&mut self, line: &[u8], out: &mut Output) -> Next;

    /// The client finished the TLS handshake that [`Next::StartTls`] asked for.
    fn tls_established(&mut self);

    /// The proxy ends the session; the reply is the protocol's goodbye
    /// (nothing while a TLS handshake is pending) and the driver closes.
    fn goodbye(&mut self, reason: Goodbye, out: &mut Output);

    /// The backend cannot be used; the reply is the protocol's temporary
    /// failure, sent only if the client still expects an answer.
    fn backend_failed(&mut self, failure: BackendFailure, out: &mut Output);

    /// Whether the machine wants raw client bytes (an SMTP message body or
    /// BDAT chunk) instead of lines. Such bytes are never bound by the line
    /// cap.
    fn wants_client_bytes(&self) -> bool {
        false
    }

    /// Raw client bytes, as many as have arrived; returns how many the
    /// machine took. The rest stays buffered for the next call, or for the
    /// next line once the machine wants lines again.
    fn client_bytes(&mut self, _bytes: &[u8], _out: &mut Output) -> usize {
        0
    }

    /// Whether the machine relays the whole session command by command
    /// instead of handing it to pass-through (SMTP with XCLIENT). Its
    /// commands then do not count against the inspection cap, and a
    /// shutdown waits until it is between commands.
    fn relaying(&self) -> bool {
        false
    }
}

/// Why a connection is turned away before any dialogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The backend cannot be reached.
    BackendUnavailable,
    /// A connection limit is reached.
    TooManyConnections,
    /// The client sent a PROXY protocol header (only trusted proxies may).
    ClientProxyHeader,
    /// The relay guard found that the backend would relay for anyone
    /// arriving through this listener ([`crate::relay_guard`]): a temporary
    /// refusal, so a sending server retries once it is fixed. The reply
    /// does not say why: that is for the operator, not the internet.
    OpenRelay,
}

/// The reply a client gets when it is turned away before any machine exists
/// (backend unreachable, connection limits).
pub(crate) fn refusal_reply(protocol: Protocol, refusal: Refusal) -> &'static [u8] {
    protocol.refusal_reply(refusal)
}

/// Whether a backend line is an error answer in `protocol`'s words. The
/// session uses it to recognise a backend that did not expect the PROXY
/// protocol header it was sent: such a backend answers the header's bytes
/// with errors before the client has said anything.
pub(crate) fn is_error_reply(protocol: Protocol, line: &[u8]) -> bool {
    protocol.is_error_reply(line)
}

/// Builds the inspector for a connection.
pub fn new_inspector(protocol: Protocol, options: &InspectorOptions) -> Box<dyn Inspector> {
    protocol.new_inspector(options)
}

/// A fixed label for a refused command (metrics must not take arbitrary
/// client bytes as label values).
pub(crate) fn command_label(verb: &[u8]) -> &'static str {
    const KNOWN: &[&str] = &[
        "AUTH",
        "MAIL",
        "RCPT",
        "DATA",
        "BDAT",
        "VRFY",
        "EXPN",
        "HELP",
        "ETRN",
        "TURN",
        "LOGIN",
        "AUTHENTICATE",
        "ID",
        "SELECT",
        "EXAMINE",
        "LIST",
        "USER",
        "PASS",
        "APOP",
        "RETR",
        "STAT",
        "TOP",
        "UIDL",
        "DELE",
        "XCLIENT",
        "XFORWARD",
        "PROXY",
    ];
    KNOWN
        .iter()
        .find(|known| verb.eq_ignore_ascii_case(known.as_bytes()))
        .copied()
        .unwrap_or("other")
}

/// A line without its trailing CRLF or bare LF.
pub(crate) fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The line's terminator as the peer sent it (CRLF, LF, or none).
pub(crate) fn eol_of(line: &[u8]) -> &[u8] {
    &line[trim_eol(line).len()..]
}

/// Separators a lenient server skips around command words (Postfix's
/// tokenizer, and many others: SP, HT, VT, FF).
pub(crate) fn is_blank(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | 0x0b | 0x0c)
}

/// The command word and its argument as a lenient server might read them:
/// leading blanks skipped, the word up to the first byte that is not a
/// letter (`LOGIN\talice`, `\x0cUSER joe`, ` AUTH PLAIN` are LOGIN, USER and
/// AUTH), the argument after the blanks that follow it. The policy checks
/// use it so that no spelling a backend would accept slips credentials past
/// them.
pub(crate) fn lenient_command(text: &[u8]) -> (&[u8], &[u8]) {
    let start = text
        .iter()
        .position(|&b| !is_blank(b))
        .unwrap_or(text.len());
    let text = &text[start..];
    let end = text
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let rest = &text[end..];
    let skip = rest.iter().take_while(|&&b| is_blank(b)).count();
    (&text[..end], &rest[skip..])
}

/// The command word of [`lenient_command`].
pub(crate) fn lenient_verb(text: &[u8]) -> &[u8] {
    lenient_command(text).0
}

/// Splits off the first space-separated word; the rest has its leading spaces
/// removed. Works on bytes: mail lines are not guaranteed UTF-8.
pub(crate) fn split_word(text: &[u8]) -> (&[u8], &[u8]) {
    match text.iter().position(|&b| b == b' ') {
        Some(i) => {
            let rest = &text[i + 1..];
            let skip = rest.iter().take_while(|&&b| b == b' ').count();
            (&text[..i], &rest[skip..])
        }
        None => (text, &[]),
    }
}
