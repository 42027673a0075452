//! SMTP inspection (RFC 5321, STARTTLS per RFC 3207).
//!
//! Life of a session:
//! 1. `ExpectGreeting`: the backend's 220 greeting (possibly multi-line) is
//!    relayed as it comes.
//! 2. `Idle`: the machine reads one client command. EHLO, HELO, NOOP, RSET,
//!    HELP and QUIT are forwarded and their reply awaited (`ExpectReply`);
//!    STARTTLS is answered by the proxy and the session upgrades; any other
//!    command is forwarded and ends inspection (`Passthrough`).
//! 3. The EHLO reply is rewritten: the backend's own STARTTLS line is always
//!    removed, and before TLS on a STARTTLS listener the proxy's STARTTLS is
//!    added, keeping the `250-`/`250 ` continuation form correct.
//!
//! Old backends: one that rejects EHLO (RFC 821, HELO only) gets a HELO
//! instead and the client a synthesized EHLO reply; one that refuses the
//! second EHLO after TLS has the client served the capabilities it announced
//! before TLS (minus STARTTLS), so the client always gets a valid post-TLS
//! EHLO reply.
//!
//! Client identity by XCLIENT (`client_identity = "xclient"`, Postfix's
//! XCLIENT_README): the backend's greeting is held, the proxy sends
//! `EHLO <its host name>` and, if the reply offers XCLIENT, `XCLIENT
//! NAME=[UNAVAILABLE] ADDR=<client> PORT=<port>` (plus `DESTADDR`/`DESTPORT`
//! when offered; only offered attributes are sent). The backend's answer
//! to XCLIENT is a new 220 greeting, which the client gets as *the*
//! greeting. Without XCLIENT on offer, or when it is refused, the client
//! gets the original greeting and the driver logs a [`Notice`].
//!
//! Such a backend trusts XCLIENT from the proxy's address, so a client's own
//! XCLIENT or XFORWARD must never reach it: the machine refuses both itself
//! (`550 5.7.1`) and, in XCLIENT mode, never hands the session to
//! pass-through. It relays the whole session command by command: DATA's body
//! is relayed as raw bytes up to the `CRLF.CRLF` that ends it (any line
//! length), BDAT chunks by their byte count, AUTH continuation lines
//! uninterpreted, and then it reads commands again. A dot line next to a
//! bare LF (`\n.\n`, `\r\n.\n`, `\n.\r\n`), which some servers take for the
//! end of the data and this machine does not, is dot-stuffed on the way
//! through, so no byte after it can be read by the backend as a command the
//! proxy has not seen (SMTP smuggling).
//! XCLIENT/XFORWARD are refused in every mode while the machine inspects;
//! they are never offered to clients in EHLO replies.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::{
    command_label, is_blank, split_word, trim_eol, BackendFailure, ClientIdentity, Goodbye,
    Inspector, InspectorOptions, Next, Notice, Output, RequireTls, TlsMode,
};

/// Reply to a client whose backend cannot be reached.
pub const SERVICE_UNAVAILABLE: &[u8] =
    b"421 4.3.2 Service not available, closing transmission channel\r\n";
/// Reply to STARTTLS; the handshake starts right after it.
pub const READY_TO_START_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
/// Reply to STARTTLS once TLS is already active (implicit TLS or a second STARTTLS).
pub const TLS_ALREADY_ACTIVE: &[u8] = b"503 5.5.1 TLS already active\r\n";
/// Reply to STARTTLS with parameters (RFC 3207 section 4).
pub const STARTTLS_SYNTAX: &[u8] = b"501 5.5.4 Syntax error (no parameters allowed)\r\n";
/// Reply to a client line over the cap, before the connection is closed.
pub const LINE_TOO_LONG: &[u8] = b"421 4.7.0 Line too long, closing connection\r\n";
/// Reply to commands the listener's TLS policy refuses before STARTTLS (RFC 3207).
pub const MUST_STARTTLS: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
/// Goodbyes for sessions the proxy ends during inspection.
pub const TOO_MANY_COMMANDS: &[u8] = b"421 4.7.0 Too many commands, closing connection\r\n";
pub const IDLE_TIMEOUT: &[u8] = b"421 4.4.2 Idle timeout, closing connection\r\n";
pub const SHUTTING_DOWN: &[u8] = b"421 4.3.2 Service shutting down, closing connection\r\n";
/// Reply to a client's own XCLIENT or XFORWARD: only the proxy may tell the
/// backend who the client is.
pub const IDENTITY_COMMAND_REFUSED: &[u8] =
    b"550 5.7.1 XCLIENT and XFORWARD are not accepted from clients\r\n";
/// Reply to a BDAT whose size cannot be read (the chunk cannot be framed).
pub const BDAT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n";
/// Reply to a command line holding a bare CR while the proxy reads the
/// session: a backend that ends lines at CR would see a second command.
pub const BARE_CR: &[u8] = b"500 5.5.2 Syntax error: bare CR in a command line\r\n";

/// What the machine waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The backend's greeting.
    ExpectGreeting,
    /// A client command.
    Idle,
    /// The reply to a command the client sent.
    ExpectReply(Pending),
    /// The 220 to STARTTLS is out; the handshake runs in the driver.
    AwaitTlsHandshake,
    /// XCLIENT mode: the proxy identifies the client before the client
    /// hears the greeting.
    Identify(Step),
    /// XCLIENT mode: a message body after DATA's 354, as raw bytes.
    Body(BodyScan),
    /// XCLIENT mode: the bytes of a BDAT chunk still to relay.
    Chunk(u64),
    /// XCLIENT mode: after a 334, the client's next line is an AUTH
    /// continuation, relayed without being read as a command.
    Continuation,
    /// Inspection is over or the session is closing; no more lines expected.
    Done,
}

/// Where the XCLIENT exchange is; each step collects one whole reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The backend's greeting, held back.
    Greeting,
    /// The reply to the proxy's EHLO.
    Ehlo,
    /// The reply to XCLIENT: a new greeting, or an error.
    Xclient,
}

/// The command whose reply is awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// EHLO: the reply is collected whole and rewritten.
    Ehlo,
    /// The HELO the proxy sent because the backend rejected EHLO; its reply
    /// becomes a synthesized EHLO reply.
    HeloFallback,
    /// HELO, NOOP, RSET, HELP, QUIT (and, in XCLIENT mode, every other
    /// command): the reply is relayed line by line.
    Relay,
    /// XCLIENT mode: DATA; a 354 starts the body.
    Data,
}

/// The SMTP inspection state machine.
#[derive(Debug)]
pub struct SmtpInspector {
    mode: TlsMode,
    require_tls: RequireTls,
    identity: ClientIdentity,
    client: Option<SocketAddr>,
    server: Option<SocketAddr>,
    hostname: Arc<str>,
    /// XCLIENT mode is past the point where inspection would have ended:
    /// every command from here on is relayed and inspected.
    relaying: bool,
    /// XCLIENT mode: the backend's first greeting, held while the proxy
    /// identifies the client.
    held_greeting: Vec<u8>,
    /// XCLIENT mode: the DATA command line ended in CRLF (which counts as the
    /// CRLF before the dot of an empty body).
    data_line_crlf: bool,
    tls_active: bool,
    state: State,
    /// The lines of the reply being collected (EHLO and HELO fallback).
    reply: Vec<u8>,
    /// Line boundaries inside `reply`.
    reply_line_ends: Vec<usize>,
    /// The EHLO argument, for the HELO fallback.
    ehlo_domain: Vec<u8>,
    /// The backend's pre-TLS EHLO reply, STARTTLS removed, `\r\n`-terminated
    /// text after the code of each line; served after TLS if the backend
    /// refuses a second EHLO.
    capabilities_before_tls: Option<Vec<u8>>,
}

impl SmtpInspector {
    pub fn new(options: InspectorOptions) -> Self {
        // XCLIENT needs the client's address; without one there is nothing
        // to tell the backend.
        let identify =
            options.client_identity == ClientIdentity::Xclient && options.client.is_some();
        Self {
            mode: options.mode,
            require_tls: options.require_tls,
            identity: options.client_identity,
            client: options.client,
            server: options.server,
            hostname: options.hostname,
            relaying: false,
            held_greeting: Vec::new(),
            data_line_crlf: true,
            tls_active: options.mode == TlsMode::Implicit,
            state: if identify {
                State::Identify(Step::Greeting)
            } else {
                State::ExpectGreeting
            },
            reply: Vec::new(),
            reply_line_ends: Vec::new(),
            ehlo_domain: Vec::new(),
            capabilities_before_tls: None,
        }
    }

    /// Whether the machine relays the session command by command instead of
    /// handing it to pass-through: always with XCLIENT (a client XCLIENT
    /// after the first transaction would be trusted), and before TLS under
    /// `require_tls = "auth" | "all"` (an AUTH after a refused MAIL must not
    /// cross in clear; plaintext mail still flows, bodies relayed raw).
    fn relays_everything(&self) -> bool {
        self.identity == ClientIdentity::Xclient || self.hides_auth()
    }

    /// Whether EHLO replies must offer the proxy's STARTTLS right now.
    fn offers_starttls(&self) -> bool {
        self.mode == TlsMode::StartTls && !self.tls_active
    }

    /// Whether AUTH must be hidden and refused right now.
    fn hides_auth(&self) -> bool {
        self.offers_starttls() && self.require_tls != RequireTls::None
    }

    /// Whether the listener's policy lets `verb` through before TLS.
    fn allowed_before_tls(&self, verb: &[u8]) -> bool {
        if !self.offers_starttls() {
            return true;
        }
        match self.require_tls {
            RequireTls::None => true,
            RequireTls::Auth => verb != b"AUTH",
            RequireTls::All => matches!(
                verb,
                b"EHLO" | b"HELO" | b"NOOP" | b"RSET" | b"QUIT" | b"STARTTLS"
            ),
        }
    }

    fn command(&mut self, line: &[u8], out: &mut Output) -> Next {
        let text = trim_eol(line);
        if self.relays_everything() && text.contains(&b'\r') {
            out.to_client.extend_from_slice(BARE_CR);
            out.refused = Some("other");
            return Next::Continue;
        }
        let (verb, argument) = command_verb(text);
        let verb = verb.to_ascii_uppercase();
        if !self.allowed_before_tls(&verb) {
            out.to_client.extend_from_slice(MUST_STARTTLS);
            out.refused = Some(command_label(&verb));
            if verb == b"BDAT" {
                // The chunk follows the command without waiting for a reply
                // (RFC 3030): it is data, to be thrown away unread. A chunk
                // whose size cannot be read cannot be skipped: close.
                match bdat_size(argument) {
                    Some(size) => out.skip_client_bytes = size,
                    None => {
                        self.state = State::Done;
                        return Next::Close;
                    }
                }
            }
            return Next::Continue;
        }
        match verb.as_slice() {
            b"XCLIENT" | b"XFORWARD" => {
                out.to_client.extend_from_slice(IDENTITY_COMMAND_REFUSED);
                out.refused = Some(command_label(&verb));
                Next::Continue
            }
            b"STARTTLS" => {
                if !argument.is_empty() {
                    out.to_client.extend_from_slice(STARTTLS_SYNTAX);
                    Next::Continue
                } else if self.tls_active {
                    out.to_client.extend_from_slice(TLS_ALREADY_ACTIVE);
                    Next::Continue
                } else {
                    out.to_client.extend_from_slice(READY_TO_START_TLS);
                    self.state = State::AwaitTlsHandshake;
                    Next::StartTls
                }
            }
            b"EHLO" => {
                self.ehlo_domain.clear();
                self.ehlo_domain.extend_from_slice(argument);
                out.to_backend.extend_from_slice(line);
                self.start_collecting(Pending::Ehlo);
                Next::Continue
            }
            b"HELO" | b"NOOP" | b"RSET" | b"HELP" | b"QUIT" => {
                out.to_backend.extend_from_slice(line);
                self.state = State::ExpectReply(Pending::Relay);
                Next::Continue
            }
            _ if self.relays_everything() => {
                self.relaying = true;
                self.relay_command(&verb, argument, line, out)
            }
            _ => {
                // MAIL, AUTH, DATA, BDAT, unknown words, garbage: the backend
                // judges them, and nothing after them is parsed.
                out.to_backend.extend_from_slice(line);
                self.state = State::Done;
                Next::Passthrough
            }
        }
    }

    /// XCLIENT mode: forwards one command and awaits its reply; DATA and
    /// BDAT are followed by raw bytes.
    fn relay_command(
        &mut self,
        verb: &[u8],
        argument: &[u8],
        line: &[u8],
        out: &mut Output,
    ) -> Next {
        match verb {
            b"DATA" => {
                out.to_backend.extend_from_slice(line);
                self.data_line_crlf = line.ends_with(b"\r\n");
                self.state = State::ExpectReply(Pending::Data);
            }
            b"BDAT" => match bdat_size(argument) {
                Some(size) => {
                    out.to_backend.extend_from_slice(line);
                    self.state = if size == 0 {
                        State::ExpectReply(Pending::Relay)
                    } else {
                        State::Chunk(size)
                    };
                }
                // The chunk cannot be framed: it never reaches the backend,
                // and since its data follows at once and could only be read
                // as commands, the session ends here.
                None => {
                    out.to_client.extend_from_slice(BDAT_SYNTAX);
                    self.state = State::Done;
                    return Next::Close;
                }
            },
            _ => {
                out.to_backend.extend_from_slice(line);
                self.state = State::ExpectReply(Pending::Relay);
            }
        }
        Next::Continue
    }

    fn start_collecting(&mut self, pending: Pending) {
        self.reply.clear();
        self.reply_line_ends.clear();
        self.state = State::ExpectReply(pending);
    }

    fn collected_lines(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.reply_line_ends.iter().map(move |&end| {
            let line = &self.reply[start..end];
            start = end;
            line
        })
    }

    /// Handles the complete reply to EHLO.
    fn finish_ehlo(&mut self, code: u16, out: &mut Output) -> Next {
        if (200..300).contains(&code) {
            let mut texts = Vec::with_capacity(self.reply.len() + 16);
            for (index, line) in self.collected_lines().enumerate() {
                let text = reply_text(line);
                // The first line is the server's name, never an extension.
                let hidden = index > 0
                    && (is_keyword(text, b"STARTTLS")
                        || is_keyword(text, b"XCLIENT")
                        || is_keyword(text, b"XFORWARD"));
                if !hidden {
                    texts.extend_from_slice(text);
                    texts.extend_from_slice(b"\r\n");
                }
            }
            if !self.tls_active {
                self.capabilities_before_tls = Some(texts.clone());
            }
            write_ehlo_reply(&texts, self.offers_starttls(), self.hides_auth(), out);
            self.state = State::Idle;
            return Next::Continue;
        }
        let refused = matches!(code, 500 | 502 | 503 | 504);
        if refused && self.tls_active {
            if let Some(texts) = &self.capabilities_before_tls {
                // RFC 3207 wants a fresh EHLO after TLS; a backend that does
                // not allow a second one still has the session it greeted,
                // so its earlier answer stands (STARTTLS already removed).
                write_ehlo_reply(texts, false, false, out);
                self.state = State::Idle;
                return Next::Continue;
            }
        }
        if matches!(code, 500 | 502 | 504) {
            // An RFC 821 backend: greet it with HELO and answer EHLO ourselves.
            out.to_backend.extend_from_slice(b"HELO ");
            out.to_backend.extend_from_slice(&self.ehlo_domain);
            out.to_backend.extend_from_slice(b"\r\n");
            self.start_collecting(Pending::HeloFallback);
            return Next::Continue;
        }
        self.relay_collected(out);
        self.state = State::Idle;
        Next::Continue
    }

    /// Handles the complete reply to the HELO sent in place of EHLO.
    fn finish_helo_fallback(&mut self, code: u16, out: &mut Output) -> Next {
        if (200..300).contains(&code) {
            let mut texts = Vec::with_capacity(64);
            if let Some(first) = self.collected_lines().next() {
                texts.extend_from_slice(reply_text(first));
            }
            texts.extend_from_slice(b"\r\n");
            write_ehlo_reply(&texts, self.offers_starttls(), false, out);
        } else {
            self.relay_collected(out);
        }
        self.state = State::Idle;
        Next::Continue
    }

    fn relay_collected(&self, out: &mut Output) {
        for line in self.collected_lines() {
            out.to_client.extend_from_slice(line);
        }
    }

    /// XCLIENT mode: one whole reply of the identification exchange.
    fn finish_identify(&mut self, step: Step, code: u16, out: &mut Output) -> Next {
        match step {
            Step::Greeting if code == 220 => {
                self.held_greeting.clear();
                self.held_greeting.extend_from_slice(&self.reply);
                out.to_backend.extend_from_slice(b"EHLO ");
                out.to_backend.extend_from_slice(self.hostname.as_bytes());
                out.to_backend.extend_from_slice(b"\r\n");
                self.start_collecting_step(Step::Ehlo);
                return Next::Continue;
            }
            // A refusal at connect (554, 421): the client hears it as is.
            Step::Greeting => self.relay_collected(out),
            Step::Ehlo => {
                let offered = match (self.client, (200..300).contains(&code)) {
                    (Some(client), true) => xclient_offer(self.collected_lines())
                        .and_then(|offered| xclient_command(offered, client, self.server)),
                    _ => None,
                };
                match offered {
                    Some(command) => {
                        out.to_backend.extend_from_slice(&command);
                        self.start_collecting_step(Step::Xclient);
                        return Next::Continue;
                    }
                    None => {
                        out.to_client.extend_from_slice(&self.held_greeting);
                        out.notice = Some(Notice::XclientNotOffered);
                    }
                }
            }
            // The new greeting, said as if the client had just connected.
            Step::Xclient if code == 220 => {
                self.relay_collected(out);
                out.notice = Some(Notice::XclientAccepted);
            }
            // "421 unable to proceed, disconnecting": the client hears it.
            Step::Xclient if code == 421 => self.relay_collected(out),
            Step::Xclient => {
                out.to_client.extend_from_slice(&self.held_greeting);
                out.notice = Some(Notice::XclientRefused(code));
            }
        }
        self.held_greeting = Vec::new();
        self.state = State::Idle;
        Next::Continue
    }

    fn start_collecting_step(&mut self, step: Step) {
        self.reply.clear();
        self.reply_line_ends.clear();
        self.state = State::Identify(step);
    }
}

/// The attributes an EHLO reply (all its lines, the first being the
/// greeting line) offers after the XCLIENT keyword, if it offers XCLIENT.
pub(crate) fn xclient_offer<'a>(ehlo_reply: impl Iterator<Item = &'a [u8]>) -> Option<&'a [u8]> {
    ehlo_reply
        .skip(1)
        .map(reply_text)
        .find(|text| is_keyword(text, b"XCLIENT"))
        .map(|text| split_word(text).1)
}

/// `XCLIENT` with the attributes the backend offers (`offered`, from
/// [`xclient_offer`]) for a client at `client` that connected to `server`,
/// or `None` when the backend does not take ADDR. The values need no xtext
/// encoding: digits, dots, colons, `IPV6:` and `[UNAVAILABLE]` are all plain
/// xtext characters. Also what the relay guard's probe sends
/// ([`crate::relay_guard`]), so it presents itself as sessions do.
///
/// NAME is `[UNAVAILABLE]`: the proxy does not look up host names, and
/// leaving NAME out would keep the name the backend found for the
/// *proxy's* address (`localhost`, say) next to the client's address.
/// HELO, PROTO and LOGIN are not sent: the client's own EHLO/HELO and
/// AUTH, which come after the new greeting, set them.
pub(crate) fn xclient_command(
    offered: &[u8],
    client: SocketAddr,
    server: Option<SocketAddr>,
) -> Option<Vec<u8>> {
    let offers = |name: &[u8]| {
        offered
            .split(|&b| b == b' ')
            .any(|word| word.eq_ignore_ascii_case(name))
    };
    if !offers(b"ADDR") {
        return None;
    }
    let mut command = String::from("XCLIENT");
    if offers(b"NAME") {
        command.push_str(" NAME=[UNAVAILABLE]");
    }
    command.push_str(&format!(" ADDR={}", xclient_address(client.ip())));
    if offers(b"PORT") {
        command.push_str(&format!(" PORT={}", client.port()));
    }
    if let Some(server) = server {
        if offers(b"DESTADDR") {
            command.push_str(&format!(" DESTADDR={}", xclient_address(server.ip())));
        }
        if offers(b"DESTPORT") {
            command.push_str(&format!(" DESTPORT={}", server.port()));
        }
    }
    command.push_str("\r\n");
    Some(command.into_bytes())
}

/// An address as XCLIENT wants it: IPv4 dotted, IPv6 with an `IPV6:` prefix
/// (XCLIENT_README), an IPv4-mapped IPv6 address as the IPv4 it is.
fn xclient_address(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("IPV6:{ip}"),
    }
}

/// The size of `BDAT chunk-size [LAST]` (RFC 3030), if the argument is that.
/// The command word and its argument. Leading blanks are skipped and the
/// word ends at the first byte that is not a letter, the way a lenient
/// backend reads it: `AUTH\tPLAIN`, ` AUTH PLAIN` and `\x0cAUTH` are AUTH.
fn command_verb(text: &[u8]) -> (&[u8], &[u8]) {
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

fn bdat_size(argument: &[u8]) -> Option<u64> {
    let (size, rest) = split_word(argument);
    let last_ok = rest.is_empty() || rest.eq_ignore_ascii_case(b"LAST");
    if size.is_empty() || size.len() > 19 || !size.iter().all(u8::is_ascii_digit) || !last_ok {
        return None;
    }
    std::str::from_utf8(size).ok()?.parse().ok()
}

/// Where a message body's scan is, carried from one read to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BodyScan {
    at: LinePosition,
    /// The line before this one ended in CRLF (not a bare LF).
    previous_crlf: bool,
    /// The last byte relayed was a CR (a CRLF may straddle two reads).
    last_cr: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinePosition {
    /// Nothing of the line is seen yet.
    Start,
    /// The line so far is ".", held back.
    Dot,
    /// The line so far is ".\r", held back.
    DotCr,
    /// Anywhere else in a line.
    Middle,
}

impl BodyScan {
    /// After the DATA command's own line, whose terminator counts as the
    /// CRLF before a `.` that ends an empty body.
    fn new(command_line_crlf: bool) -> Self {
        Self {
            at: LinePosition::Start,
            previous_crlf: command_line_crlf,
            last_cr: false,
        }
    }

    /// Copies body bytes to `to_backend` and returns how many were taken
    /// and whether they ended the body (`CRLF.CRLF`, the terminator
    /// included). Ambiguous dot lines are stuffed (see the module notes).
    fn relay(&mut self, bytes: &[u8], to_backend: &mut Vec<u8>) -> (usize, bool) {
        let mut index = 0;
        while index < bytes.len() {
            let byte = bytes[index];
            match self.at {
                LinePosition::Start if byte == b'.' => {
                    self.at = LinePosition::Dot;
                    index += 1;
                }
                LinePosition::Start => self.at = LinePosition::Middle,
                LinePosition::Dot => match byte {
                    b'\r' => {
                        self.at = LinePosition::DotCr;
                        index += 1;
                    }
                    b'\n' => {
                        // ".\n": an end of data only to lenient servers.
                        to_backend.extend_from_slice(b"..\n");
                        index += 1;
                        self.line_ended(false);
                    }
                    _ => {
                        to_backend.push(b'.');
                        self.last_cr = false;
                        self.at = LinePosition::Middle;
                    }
                },
                LinePosition::DotCr if byte == b'\n' => {
                    index += 1;
                    if self.previous_crlf {
                        to_backend.extend_from_slice(b".\r\n");
                        return (index, true);
                    }
                    // "\n.\r\n": an end of data only to lenient servers.
                    to_backend.extend_from_slice(b"..\r\n");
                    self.line_ended(true);
                }
                LinePosition::DotCr => {
                    to_backend.extend_from_slice(b".\r");
                    self.last_cr = true;
                    self.at = LinePosition::Middle;
                }
                LinePosition::Middle => {
                    let rest = &bytes[index..];
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(end) => {
                            let crlf = match end {
                                0 => self.last_cr,
                                _ => rest[end - 1] == b'\r',
                            };
                            to_backend.extend_from_slice(&rest[..=end]);
                            index += end + 1;
                            self.line_ended(crlf);
                        }
                        None => {
                            to_backend.extend_from_slice(rest);
                            self.last_cr = rest.last() == Some(&b'\r');
                            index = bytes.len();
                        }
                    }
                }
            }
        }
        (index, false)
    }

    fn line_ended(&mut self, crlf: bool) {
        self.previous_crlf = crlf;
        self.last_cr = false;
        self.at = LinePosition::Start;
    }
}

impl Inspector for SmtpInspector {
    fn wants_client_line(&self) -> bool {
        matches!(self.state, State::Idle | State::Continuation)
    }

    fn client_line(&mut self, line: &[u8], out: &mut Output) -> Next {
        match self.state {
            State::Idle => self.command(line, out),
            State::Continuation => {
                out.to_backend.extend_from_slice(line);
                self.state = State::ExpectReply(Pending::Relay);
                Next::Continue
            }
            // The driver only feeds client lines when asked; a line in any
            // other state is not a command the machine may act on.
            _ => Next::Continue,
        }
    }

    fn backend_line(&mut self, line: &[u8], out: &mut Output) -> Next {
        let (code, last) = parse_reply_line(line);
        match self.state {
            State::ExpectGreeting => {
                out.to_client.extend_from_slice(line);
                if last {
                    self.state = State::Idle;
                }
                Next::Continue
            }
            State::ExpectReply(pending @ (Pending::Relay | Pending::Data)) => {
                out.to_client.extend_from_slice(line);
                if last {
                    self.state = match (pending, code) {
                        (Pending::Data, 354) => State::Body(BodyScan::new(self.data_line_crlf)),
                        (_, 334) if self.relaying => State::Continuation,
                        _ => State::Idle,
                    };
                }
                Next::Continue
            }
            State::Identify(step) => {
                self.reply.extend_from_slice(line);
                self.reply_line_ends.push(self.reply.len());
                if !last {
                    return Next::Continue;
                }
                self.finish_identify(step, code, out)
            }
            State::ExpectReply(pending) => {
                self.reply.extend_from_slice(line);
                self.reply_line_ends.push(self.reply.len());
                if !last {
                    return Next::Continue;
                }
                match pending {
                    Pending::Ehlo => self.finish_ehlo(code, out),
                    _ => self.finish_helo_fallback(code, out),
                }
            }
            // Unsolicited (e.g. a 421 on the backend's idle timeout): relay.
            State::Idle | State::Continuation | State::Body(_) | State::Chunk(_) => {
                out.to_client.extend_from_slice(line);
                Next::Continue
            }
            // After the 220 for STARTTLS nothing from the backend may reach
            // the client: it would be read as a reply inside TLS.
            State::AwaitTlsHandshake | State::Done => Next::Continue,
        }
    }

    fn tls_established(&mut self) {
        self.tls_active = true;
        self.state = State::Idle;
        // Before TLS the session may have been relayed command by command
        // (require_tls); after it, only XCLIENT mode keeps doing so.
        self.relaying = self.relaying && self.identity == ClientIdentity::Xclient;
    }

    fn goodbye(&mut self, reason: Goodbye, out: &mut Output) {
        if self.state != State::AwaitTlsHandshake {
            out.to_client.extend_from_slice(match reason {
                Goodbye::LineTooLong => LINE_TOO_LONG,
                Goodbye::TooManyCommands => TOO_MANY_COMMANDS,
                Goodbye::IdleTimeout => IDLE_TIMEOUT,
                Goodbye::ShuttingDown => SHUTTING_DOWN,
            });
        }
        self.state = State::Done;
    }

    fn backend_failed(&mut self, _failure: BackendFailure, out: &mut Output) {
        // Only a client that still waits for a reply is told; after a 221 to
        // QUIT, say, the close is the expected end.
        if matches!(
            self.state,
            State::ExpectGreeting
                | State::ExpectReply(_)
                | State::Identify(_)
                | State::Body(_)
                | State::Chunk(_)
        ) {
            out.to_client.extend_from_slice(SERVICE_UNAVAILABLE);
        }
        self.state = State::Done;
    }

    fn wants_client_bytes(&self) -> bool {
        matches!(self.state, State::Body(_) | State::Chunk(_))
    }

    fn client_bytes(&mut self, bytes: &[u8], out: &mut Output) -> usize {
        match &mut self.state {
            State::Body(scan) => {
                let (taken, ended) = scan.relay(bytes, &mut out.to_backend);
                if ended {
                    self.state = State::ExpectReply(Pending::Relay);
                }
                taken
            }
            State::Chunk(remaining) => {
                let taken = bytes
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                out.to_backend.extend_from_slice(&bytes[..taken]);
                *remaining -= taken as u64;
                if *remaining == 0 {
                    self.state = State::ExpectReply(Pending::Relay);
                }
                taken
            }
            _ => 0,
        }
    }

    fn relaying(&self) -> bool {
        self.relaying
    }
}

/// The reply code and whether this is the reply's last line. A line that is
/// not `ddd`, `ddd text` or `ddd-text` ends the reply (code 0), so a broken
/// backend cannot keep the machine collecting forever.
pub(crate) fn parse_reply_line(line: &[u8]) -> (u16, bool) {
    let text = trim_eol(line);
    let code = match text.get(..3) {
        Some(digits) if digits.iter().all(u8::is_ascii_digit) => digits
            .iter()
            .fold(0u16, |acc, digit| acc * 10 + u16::from(digit - b'0')),
        _ => return (0, true),
    };
    (code, text.get(3) != Some(&b'-'))
}

/// The text of a reply line after `ddd-` / `ddd `, without terminator.
fn reply_text(line: &[u8]) -> &[u8] {
    trim_eol(line).get(4..).unwrap_or_default()
}

/// `AUTH mechanisms` or the pre-RFC 4954 `AUTH=mechanisms` form.
fn is_auth_extension(text: &[u8]) -> bool {
    is_keyword(text, b"AUTH")
        || text
            .get(..5)
            .is_some_and(|start| start.eq_ignore_ascii_case(b"AUTH="))
}

/// Whether an EHLO extension line names `keyword` (case-insensitive).
fn is_keyword(text: &[u8], keyword: &[u8]) -> bool {
    split_word(text).0.eq_ignore_ascii_case(keyword)
}

/// Writes a 250 EHLO reply from `\r\n`-terminated line texts, adding STARTTLS
/// last when asked and leaving out AUTH extensions when asked, with `250-` on
/// every line but the last.
fn write_ehlo_reply(texts: &[u8], with_starttls: bool, hide_auth: bool, out: &mut Output) {
    let mut lines: Vec<&[u8]> = texts
        .split_inclusive(|&b| b == b'\n')
        .map(trim_eol)
        .enumerate()
        .filter(|(index, text)| !(hide_auth && *index > 0 && is_auth_extension(text)))
        .map(|(_, text)| text)
        .collect();
    if lines.is_empty() {
        lines.push(b"");
    }
    if with_starttls {
        lines.push(b"STARTTLS");
    }
    let count = lines.len();
    for (index, text) in lines.into_iter().enumerate() {
        out.to_client
            .extend_from_slice(if index + 1 == count { b"250 " } else { b"250-" });
        out.to_client.extend_from_slice(text);
        out.to_client.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::protocol::testing::{backend, client};

    fn greeted(mode: TlsMode) -> SmtpInspector {
        let mut machine = SmtpInspector::new(InspectorOptions::new(mode, RequireTls::None));
        let (to_client, _, _) = backend(&mut machine, b"220 mx.example ESMTP\r\n");
        assert_eq!(to_client, b"220 mx.example ESMTP\r\n");
        assert!(machine.wants_client_line());
        machine
    }

    #[test]
    fn multi_line_greeting_is_relayed_and_waits_for_its_last_line() {
        let mut machine =
            SmtpInspector::new(InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
        let (to_client, _, _) = backend(&mut machine, b"220-mx.example\r\n");
        assert_eq!(to_client, b"220-mx.example\r\n");
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(&mut machine, b"220 ESMTP ready\r\n");
        assert_eq!(to_client, b"220 ESMTP ready\r\n");
        assert!(machine.wants_client_line());
    }

    #[test]
    fn multi_line_ehlo_reply_gains_starttls_as_its_last_line() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, to_backend, next) = client(&mut machine, b"EHLO client.example\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], &b"EHLO client.example\r\n"[..], Next::Continue)
        );
        let (to_client, _, _) = backend(
            &mut machine,
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n",
        );
        assert_eq!(
            to_client,
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
        );
        assert!(machine.wants_client_line());
    }

    #[test]
    fn one_line_ehlo_reply_becomes_two_lines() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"EHLO c\r\n");
        let (to_client, _, _) = backend(&mut machine, b"250 mx.example\r\n");
        assert_eq!(to_client, b"250-mx.example\r\n250 STARTTLS\r\n");
    }

    #[test]
    fn backend_starttls_is_replaced_by_the_proxys_own() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"ehlo c\r\n");
        let (to_client, _, _) = backend(
            &mut machine,
            b"250-mx.example\r\n250-starttls\r\n250 SIZE 100\r\n",
        );
        assert_eq!(
            to_client,
            b"250-mx.example\r\n250-SIZE 100\r\n250 STARTTLS\r\n"
        );
    }

    #[test]
    fn implicit_tls_strips_backend_starttls_even_when_it_is_the_last_line() {
        let mut machine = greeted(TlsMode::Implicit);
        client(&mut machine, b"EHLO c\r\n");
        let (to_client, _, _) = backend(
            &mut machine,
            b"250-mx.example\r\n250-SIZE 100\r\n250 STARTTLS\r\n",
        );
        assert_eq!(to_client, b"250-mx.example\r\n250 SIZE 100\r\n");
    }

    #[test]
    fn starttls_is_answered_locally_and_never_forwarded() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, to_backend, next) = client(&mut machine, b"STARTTLS\r\n");
        assert_eq!(to_client, READY_TO_START_TLS);
        assert_eq!(to_backend, b"");
        assert_eq!(next, Next::StartTls);
        assert!(!machine.wants_client_line());
    }

    #[test]
    fn after_tls_the_new_ehlo_is_forwarded_and_its_reply_has_no_starttls() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"EHLO c\r\n");
        backend(&mut machine, b"250-mx.example\r\n250 PIPELINING\r\n");
        client(&mut machine, b"STARTTLS\r\n");
        machine.tls_established();
        let (_, to_backend, _) = client(&mut machine, b"EHLO c\r\n");
        assert_eq!(to_backend, b"EHLO c\r\n");
        let (to_client, _, _) = backend(&mut machine, b"250-mx.example\r\n250 PIPELINING\r\n");
        assert_eq!(to_client, b"250-mx.example\r\n250 PIPELINING\r\n");
    }

    #[test]
    fn a_backend_refusing_the_second_ehlo_still_gives_a_valid_reply_after_tls() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"EHLO c\r\n");
        backend(
            &mut machine,
            b"250-mx.example\r\n250-STARTTLS\r\n250 SIZE 5\r\n",
        );
        client(&mut machine, b"STARTTLS\r\n");
        machine.tls_established();
        client(&mut machine, b"EHLO c\r\n");
        let (to_client, to_backend, _) = backend(&mut machine, b"503 5.5.1 Duplicate EHLO\r\n");
        assert_eq!(to_client, b"250-mx.example\r\n250 SIZE 5\r\n");
        assert_eq!(to_backend, b"");
        assert!(machine.wants_client_line());
    }

    #[test]
    fn second_starttls_and_starttls_on_implicit_get_503() {
        let mut machine = greeted(TlsMode::Implicit);
        let (to_client, to_backend, next) = client(&mut machine, b"STARTTLS\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (TLS_ALREADY_ACTIVE, &b""[..], Next::Continue)
        );

        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"STARTTLS\r\n");
        machine.tls_established();
        let (to_client, _, next) = client(&mut machine, b"starttls\r\n");
        assert_eq!(
            (to_client.as_slice(), next),
            (TLS_ALREADY_ACTIVE, Next::Continue)
        );
    }

    #[test]
    fn starttls_with_parameters_is_a_syntax_error() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, to_backend, next) = client(&mut machine, b"STARTTLS now\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (STARTTLS_SYNTAX, &b""[..], Next::Continue)
        );
    }

    #[test]
    fn helo_only_backend_gets_helo_and_the_client_a_synthesized_ehlo_reply() {
        let mut machine =
            SmtpInspector::new(InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
        backend(&mut machine, b"220 old.example SMTP\r\n");
        let (_, to_backend, _) = client(&mut machine, b"EHLO client.example\r\n");
        assert_eq!(to_backend, b"EHLO client.example\r\n");
        let (to_client, to_backend, _) = backend(&mut machine, b"500 Command unrecognized\r\n");
        assert_eq!(to_client, b"");
        assert_eq!(to_backend, b"HELO client.example\r\n");
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(&mut machine, b"250 old.example\r\n");
        assert_eq!(to_client, b"250-old.example\r\n250 STARTTLS\r\n");
        assert!(machine.wants_client_line());

        client(&mut machine, b"STARTTLS\r\n");
        machine.tls_established();
        client(&mut machine, b"EHLO client.example\r\n");
        let (_, to_backend, _) = backend(&mut machine, b"502 Not implemented\r\n");
        assert_eq!(to_backend, b"HELO client.example\r\n");
        let (to_client, _, _) = backend(&mut machine, b"250 old.example\r\n");
        assert_eq!(to_client, b"250 old.example\r\n");
    }

    #[test]
    fn helo_fallback_failure_is_relayed() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"EHLO x\r\n");
        backend(&mut machine, b"500 unknown\r\n");
        let (to_client, _, _) = backend(&mut machine, b"501 bad domain\r\n");
        assert_eq!(to_client, b"501 bad domain\r\n");
        assert!(machine.wants_client_line());
    }

    #[test]
    fn other_ehlo_errors_are_relayed_verbatim() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"EHLO\r\n");
        let (to_client, to_backend, _) =
            backend(&mut machine, b"501 5.5.4 Syntax: EHLO hostname\r\n");
        assert_eq!(to_client, b"501 5.5.4 Syntax: EHLO hostname\r\n");
        assert_eq!(to_backend, b"");
    }

    #[test]
    fn inspected_commands_are_relayed_with_their_replies() {
        let mut machine = greeted(TlsMode::StartTls);
        for command in [&b"NOOP\r\n"[..], b"RSET\r\n", b"HELO c\r\n", b"HELP\r\n"] {
            let (_, to_backend, next) = client(&mut machine, command);
            assert_eq!((to_backend.as_slice(), next), (command, Next::Continue));
            assert!(!machine.wants_client_line());
            let (to_client, _, _) = backend(&mut machine, b"250-first\r\n250 2.0.0 Ok\r\n");
            assert_eq!(to_client, b"250-first\r\n250 2.0.0 Ok\r\n");
            assert!(machine.wants_client_line());
        }
    }

    #[test]
    fn the_first_other_command_ends_inspection() {
        for command in [
            &b"MAIL FROM:<a@b>\r\n"[..],
            b"AUTH PLAIN AGFAYg==\r\n",
            b"DATA\r\n",
            b"garbage\r\n",
            b"\r\n",
        ] {
            let mut machine = greeted(TlsMode::StartTls);
            let (to_client, to_backend, next) = client(&mut machine, command);
            assert_eq!(
                (to_client.as_slice(), to_backend.as_slice(), next),
                (&b""[..], command, Next::Passthrough)
            );
        }
    }

    #[test]
    fn backend_bytes_after_the_starttls_reply_are_dropped() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"STARTTLS\r\n");
        let (to_client, _, _) = backend(&mut machine, b"250 injected\r\n");
        assert_eq!(to_client, b"");
    }

    #[test]
    fn overlong_client_line_gets_421() {
        let mut machine = greeted(TlsMode::StartTls);
        let mut out = Output::default();
        machine.goodbye(Goodbye::LineTooLong, &mut out);
        assert_eq!(out.to_client, LINE_TOO_LONG);
    }

    #[test]
    fn backend_failure_mid_reply_gets_421_but_not_after_passthrough() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"EHLO c\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert_eq!(out.to_client, SERVICE_UNAVAILABLE);

        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"MAIL FROM:<>\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert_eq!(out.to_client, b"");
    }

    #[test]
    fn backend_closing_after_the_quit_reply_adds_nothing() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"QUIT\r\n");
        let (to_client, _, _) = backend(&mut machine, b"221 2.0.0 Bye\r\n");
        assert_eq!(to_client, b"221 2.0.0 Bye\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert_eq!(out.to_client, b"");
    }

    fn with_policy(require_tls: RequireTls) -> SmtpInspector {
        let mut machine = SmtpInspector::new(InspectorOptions::new(TlsMode::StartTls, require_tls));
        backend(&mut machine, b"220 mx.example ESMTP\r\n");
        machine
    }

    const EHLO_WITH_AUTH: &[u8] =
        b"250-mx.example\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250 SIZE 10\r\n";

    #[test]
    fn require_tls_auth_hides_and_refuses_auth_before_tls_only() {
        let mut machine = with_policy(RequireTls::Auth);
        client(&mut machine, b"EHLO c\r\n");
        let (to_client, _, _) = backend(&mut machine, EHLO_WITH_AUTH);
        assert_eq!(
            to_client,
            b"250-mx.example\r\n250-SIZE 10\r\n250 STARTTLS\r\n"
        );
        let mut out = Output::default();
        let next = machine.client_line(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", &mut out);
        assert_eq!(
            (out.to_client.as_slice(), out.to_backend.as_slice(), next),
            (MUST_STARTTLS, &b""[..], Next::Continue)
        );
        assert_eq!(out.refused, Some("AUTH"));
        // Mail without authentication still flows (port 25), but command by
        // command: an AUTH after a refused MAIL must not cross in clear.
        let (_, to_backend, next) = client(&mut machine, b"MAIL FROM:<a@b.example>\r\n");
        assert_eq!(
            (to_backend.as_slice(), next),
            (&b"MAIL FROM:<a@b.example>\r\n"[..], Next::Continue)
        );
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(&mut machine, b"530 5.7.0 Authentication required\r\n");
        assert_eq!(to_client, b"530 5.7.0 Authentication required\r\n");
        let mut out = Output::default();
        machine.client_line(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", &mut out);
        assert_eq!(
            (out.to_client.as_slice(), out.to_backend.as_slice()),
            (MUST_STARTTLS, &b""[..])
        );

        let mut machine = with_policy(RequireTls::Auth);
        client(&mut machine, b"STARTTLS\r\n");
        machine.tls_established();
        client(&mut machine, b"EHLO c\r\n");
        let (to_client, _, _) = backend(&mut machine, EHLO_WITH_AUTH);
        assert_eq!(to_client, EHLO_WITH_AUTH);
        let (_, to_backend, next) = client(&mut machine, b"AUTH PLAIN x\r\n");
        assert_eq!(
            (to_backend.as_slice(), next),
            (&b"AUTH PLAIN x\r\n"[..], Next::Passthrough)
        );
    }

    #[test]
    fn before_tls_a_plaintext_transaction_is_relayed_with_its_body_and_auth_stays_refused() {
        let mut machine = with_policy(RequireTls::Auth);
        for (command, reply) in [
            (
                &b"MAIL FROM:<a@b.example>\r\n"[..],
                &b"250 2.1.0 Ok\r\n"[..],
            ),
            (b"RCPT TO:<c@d.example>\r\n", b"250 2.1.5 Ok\r\n"),
            (b"DATA\r\n", b"354 End data\r\n"),
        ] {
            let (_, to_backend, next) = client(&mut machine, command);
            assert_eq!((to_backend.as_slice(), next), (command, Next::Continue));
            let (to_client, _, _) = backend(&mut machine, reply);
            assert_eq!(to_client, reply);
        }
        assert!(machine.wants_client_bytes());
        // A body line reading AUTH is data, relayed verbatim.
        let mut out = Output::default();
        let body = b"AUTH PLAIN looks-like-a-command\r\n.\r\nAUTH PLAIN x\r\n";
        let taken = machine.client_bytes(body, &mut out);
        assert_eq!(&body[..taken], b"AUTH PLAIN looks-like-a-command\r\n.\r\n");
        assert_eq!(out.to_backend, &body[..taken]);
        let (to_client, _, _) = backend(&mut machine, b"250 2.0.0 Ok: queued\r\n");
        assert_eq!(to_client, b"250 2.0.0 Ok: queued\r\n");
        let mut out = Output::default();
        machine.client_line(b"AUTH PLAIN x\r\n", &mut out);
        assert_eq!(
            (out.to_client.as_slice(), out.to_backend.as_slice()),
            (MUST_STARTTLS, &b""[..])
        );
    }

    #[test]
    fn auth_in_disguise_behind_any_blank_and_bare_cr_lines_are_refused_before_tls() {
        for line in [
            &b"AUTH\tPLAIN AGFsaWNlAHNlY3JldA==\r\n"[..],
            b" AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
            b"auth plain x\n",
            b"\x0cAUTH PLAIN x\r\n",
            b"\x0bAUTH PLAIN x\r\n",
            b"AUTH\x0cPLAIN x\r\n",
        ] {
            let mut machine = with_policy(RequireTls::Auth);
            let mut out = Output::default();
            machine.client_line(line, &mut out);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice()),
                (MUST_STARTTLS, &b""[..]),
                "{line:?}"
            );
        }
        let mut machine = with_policy(RequireTls::Auth);
        let mut out = Output::default();
        machine.client_line(b"NOOP\rAUTH PLAIN x\r\n", &mut out);
        assert_eq!(
            (out.to_client.as_slice(), out.to_backend.as_slice()),
            (BARE_CR, &b""[..])
        );
        // STARTTLS with a NUL behind it is STARTTLS with an argument.
        let mut out = Output::default();
        machine.client_line(b"STARTTLS\0\r\n", &mut out);
        assert_eq!(out.to_client, STARTTLS_SYNTAX);
    }

    #[test]
    fn a_bdat_whose_size_cannot_be_read_ends_the_session() {
        let mut machine = with_policy(RequireTls::All);
        let mut out = Output::default();
        let next = machine.client_line(b"BDAT 10 LAS\r\n", &mut out);
        assert_eq!(
            (out.to_client.as_slice(), next),
            (MUST_STARTTLS, Next::Close)
        );

        let mut machine = with_policy(RequireTls::Auth);
        client(&mut machine, b"MAIL FROM:<a@b>\r\n");
        backend(&mut machine, b"250 ok\r\n");
        let (to_client, to_backend, next) = client(&mut machine, b"BDAT ten LAST\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (BDAT_SYNTAX, &b""[..], Next::Close)
        );
    }

    #[test]
    fn a_refused_bdat_chunk_is_skipped_unread() {
        let mut machine = with_policy(RequireTls::All);
        let mut out = Output::default();
        machine.client_line(b"BDAT 10 LAST\r\n", &mut out);
        assert_eq!(
            (out.to_client.as_slice(), out.skip_client_bytes),
            (MUST_STARTTLS, 10)
        );
        assert_eq!(out.refused, Some("BDAT"));
    }

    #[test]
    fn require_tls_all_serves_only_the_road_to_tls() {
        let mut machine = with_policy(RequireTls::All);
        for command in [
            &b"MAIL FROM:<a@b>\r\n"[..],
            b"HELP\r\n",
            b"VRFY root\r\n",
            b"AUTH LOGIN\r\n",
            b"DATA\r\n",
        ] {
            let mut out = Output::default();
            let next = machine.client_line(command, &mut out);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (MUST_STARTTLS, &b""[..], Next::Continue)
            );
        }
        for command in [&b"EHLO c\r\n"[..], b"NOOP\r\n", b"RSET\r\n", b"HELO c\r\n"] {
            let (_, to_backend, _) = client(&mut machine, command);
            assert_eq!(to_backend, command);
            backend(&mut machine, b"250 ok\r\n");
        }
        let (to_client, _, next) = client(&mut machine, b"STARTTLS\r\n");
        assert_eq!(
            (to_client.as_slice(), next),
            (READY_TO_START_TLS, Next::StartTls)
        );
        machine.tls_established();
        let (_, to_backend, next) = client(&mut machine, b"MAIL FROM:<a@b>\r\n");
        assert_eq!(
            (to_backend.as_slice(), next),
            (&b"MAIL FROM:<a@b>\r\n"[..], Next::Passthrough)
        );
    }

    #[test]
    fn implicit_listeners_ignore_the_starttls_policy() {
        let mut machine =
            SmtpInspector::new(InspectorOptions::new(TlsMode::Implicit, RequireTls::All));
        backend(&mut machine, b"220 mx\r\n");
        client(&mut machine, b"EHLO c\r\n");
        let (to_client, _, _) = backend(&mut machine, EHLO_WITH_AUTH);
        assert_eq!(to_client, EHLO_WITH_AUTH);
    }

    #[test]
    fn goodbyes_name_their_reason_and_nothing_is_said_during_a_handshake() {
        for (reason, text) in [
            (Goodbye::TooManyCommands, TOO_MANY_COMMANDS),
            (Goodbye::IdleTimeout, IDLE_TIMEOUT),
            (Goodbye::ShuttingDown, SHUTTING_DOWN),
        ] {
            let mut machine = greeted(TlsMode::StartTls);
            let mut out = Output::default();
            machine.goodbye(reason, &mut out);
            assert_eq!(out.to_client, text);
        }
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"STARTTLS\r\n");
        let mut out = Output::default();
        machine.goodbye(Goodbye::ShuttingDown, &mut out);
        assert_eq!(out.to_client, b"");
    }

    #[test]
    fn malformed_reply_lines_end_the_reply() {
        assert_eq!(parse_reply_line(b"250-x\r\n"), (250, false));
        assert_eq!(parse_reply_line(b"250\r\n"), (250, true));
        assert_eq!(parse_reply_line(b"25\r\n"), (0, true));
        assert_eq!(parse_reply_line(b"abc-def\r\n"), (0, true));
    }

    // -- client identity by XCLIENT ------------------------------------------

    const POSTFIX_EHLO: &[u8] = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n";

    fn xclient_options(client: &str) -> InspectorOptions {
        InspectorOptions {
            client_identity: ClientIdentity::Xclient,
            client: Some(client.parse().expect("client address")),
            server: Some("127.0.0.1:2525".parse().expect("server address")),
            hostname: Arc::from("proxy.example"),
            ..InspectorOptions::new(TlsMode::StartTls, RequireTls::None)
        }
    }

    /// Feeds backend bytes and returns everything the call produced.
    fn backend_out(machine: &mut SmtpInspector, bytes: &[u8]) -> Output {
        let mut out = Output::default();
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            machine.backend_line(line, &mut out);
        }
        out
    }

    /// A machine that has identified the client and greeted it.
    fn identified() -> SmtpInspector {
        let mut machine = SmtpInspector::new(xclient_options("127.0.0.2:40000"));
        backend(&mut machine, b"220 mx.example ESMTP\r\n");
        backend(&mut machine, POSTFIX_EHLO);
        let (to_client, _, _) = backend(&mut machine, b"220 mx.example ESMTP\r\n");
        assert_eq!(to_client, b"220 mx.example ESMTP\r\n");
        assert!(machine.wants_client_line());
        machine
    }

    #[test]
    fn xclient_is_sent_after_the_greeting_and_its_220_becomes_the_greeting() {
        let mut machine = SmtpInspector::new(xclient_options("127.0.0.2:40000"));
        let (to_client, to_backend, _) = backend(
            &mut machine,
            b"220-mx.example ESMTP\r\n220 first greeting\r\n",
        );
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice()),
            (&b""[..], &b"EHLO proxy.example\r\n"[..])
        );
        assert!(!machine.wants_client_line());
        let (to_client, to_backend, _) = backend(&mut machine, POSTFIX_EHLO);
        assert_eq!(to_client, b"");
        assert_eq!(
            to_backend,
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=127.0.0.2 PORT=40000 DESTADDR=127.0.0.1 DESTPORT=2525\r\n"
        );
        let out = backend_out(&mut machine, b"220 mx.example ESMTP new greeting\r\n");
        assert_eq!(out.to_client, b"220 mx.example ESMTP new greeting\r\n");
        assert_eq!(out.notice, Some(Notice::XclientAccepted));
        assert!(machine.wants_client_line());
        assert!(!machine.relaying());
    }

    #[test]
    fn only_offered_attributes_are_sent_and_addresses_follow_the_readme() {
        for (client, offered, expected) in [
            (
                "127.0.0.2:1",
                &b"250-mx\r\n250 XCLIENT ADDR\r\n"[..],
                &b"XCLIENT ADDR=127.0.0.2\r\n"[..],
            ),
            (
                "[2001:db8::7]:2525",
                b"250-mx\r\n250 XCLIENT NAME ADDR PORT\r\n",
                b"XCLIENT NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::7 PORT=2525\r\n",
            ),
            (
                "[::ffff:192.0.2.7]:9",
                b"250-mx\r\n250 xclient addr port\r\n",
                b"XCLIENT ADDR=192.0.2.7 PORT=9\r\n",
            ),
        ] {
            let mut machine = SmtpInspector::new(xclient_options(client));
            backend(&mut machine, b"220 mx\r\n");
            let (_, to_backend, _) = backend(&mut machine, offered);
            assert_eq!(text_of(&to_backend), text_of(expected));
        }
    }

    fn text_of(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn without_xclient_on_offer_the_client_gets_the_first_greeting_and_a_notice() {
        for ehlo_reply in [
            &b"250-mx.example\r\n250-XFORWARD NAME ADDR\r\n250 8BITMIME\r\n"[..],
            b"250-mx.example\r\n250 XCLIENT NAME HELO\r\n",
            b"502 5.5.2 Error: command not recognized\r\n",
        ] {
            let mut machine = SmtpInspector::new(xclient_options("127.0.0.2:40000"));
            backend(&mut machine, b"220 mx.example ESMTP\r\n");
            let out = backend_out(&mut machine, ehlo_reply);
            assert_eq!(out.to_client, b"220 mx.example ESMTP\r\n");
            assert_eq!(out.to_backend, b"");
            assert_eq!(out.notice, Some(Notice::XclientNotOffered));
            assert!(machine.wants_client_line());
        }
    }

    #[test]
    fn a_refused_xclient_leaves_the_first_greeting_and_a_notice() {
        let mut machine = SmtpInspector::new(xclient_options("127.0.0.2:40000"));
        backend(&mut machine, b"220 mx.example ESMTP\r\n");
        backend(&mut machine, POSTFIX_EHLO);
        let out = backend_out(
            &mut machine,
            b"550 5.7.0 Error: insufficient authorization\r\n",
        );
        assert_eq!(out.to_client, b"220 mx.example ESMTP\r\n");
        assert_eq!(out.notice, Some(Notice::XclientRefused(550)));
        assert!(machine.wants_client_line());
    }

    #[test]
    fn a_greeting_that_refuses_the_connection_is_relayed_without_xclient() {
        let mut machine = SmtpInspector::new(xclient_options("127.0.0.2:40000"));
        let (to_client, to_backend, _) = backend(&mut machine, b"554 5.7.1 go away\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice()),
            (&b"554 5.7.1 go away\r\n"[..], &b""[..])
        );
    }

    #[test]
    fn the_backend_failing_during_identification_gets_the_client_a_421() {
        let mut machine = SmtpInspector::new(xclient_options("127.0.0.2:40000"));
        backend(&mut machine, b"220 mx.example ESMTP\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert_eq!(out.to_client, SERVICE_UNAVAILABLE);
    }

    #[test]
    fn client_xclient_and_xforward_are_refused_in_every_mode_and_never_forwarded() {
        let mut none = greeted(TlsMode::StartTls);
        let mut xclient = identified();
        for machine in [&mut none, &mut xclient] {
            for command in [
                &b"XCLIENT ADDR=192.0.2.1\r\n"[..],
                b"xclient NAME=spoofed.example\r\n",
                b"XFORWARD ADDR=192.0.2.1\r\n",
            ] {
                let mut out = Output::default();
                let next = machine.client_line(command, &mut out);
                assert_eq!(
                    (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                    (IDENTITY_COMMAND_REFUSED, &b""[..], Next::Continue)
                );
                assert!(matches!(out.refused, Some("XCLIENT" | "XFORWARD")));
                assert!(machine.wants_client_line());
            }
        }
    }

    #[test]
    fn ehlo_replies_never_offer_xclient_or_xforward_to_clients() {
        let mut machine = identified();
        client(&mut machine, b"EHLO c\r\n");
        let (to_client, _, _) = backend(&mut machine, POSTFIX_EHLO);
        assert_eq!(
            text_of(&to_client),
            "250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 STARTTLS\r\n"
        );
    }

    #[test]
    fn xclient_mode_relays_the_whole_session_and_refuses_xclient_after_a_transaction() {
        let mut machine = identified();
        for (command, reply) in [
            (
                &b"EHLO c\r\n"[..],
                &b"250-mx.example\r\n250 PIPELINING\r\n"[..],
            ),
            (b"MAIL FROM:<a@b.example>\r\n", b"250 2.1.0 Ok\r\n"),
            (b"RCPT TO:<c@d.example>\r\n", b"250 2.1.5 Ok\r\n"),
        ] {
            let (_, to_backend, next) = client(&mut machine, command);
            assert_eq!((to_backend.as_slice(), next), (command, Next::Continue));
            assert!(!machine.wants_client_line());
            backend(&mut machine, reply);
            assert!(machine.wants_client_line());
        }
        assert!(machine.relaying());
        let (_, to_backend, next) = client(&mut machine, b"DATA\r\n");
        assert_eq!(
            (to_backend.as_slice(), next),
            (&b"DATA\r\n"[..], Next::Continue)
        );
        let (to_client, _, _) = backend(&mut machine, b"354 End data with <CR><LF>.<CR><LF>\r\n");
        assert_eq!(to_client, b"354 End data with <CR><LF>.<CR><LF>\r\n");
        assert!(machine.wants_client_bytes() && !machine.wants_client_line());

        // A body line far over the command cap, a pipelined XCLIENT after the
        // terminator that must stay unread.
        let mut body = b"Subject: x\r\n\r\n".to_vec();
        body.extend(std::iter::repeat_n(b'y', 100_000));
        body.extend_from_slice(b"\r\n..dot-stuffed\r\n.\r\n");
        let mut input = body.clone();
        input.extend_from_slice(b"XCLIENT ADDR=192.0.2.1\r\n");
        let mut out = Output::default();
        let taken = machine.client_bytes(&input, &mut out);
        assert_eq!(taken, body.len());
        assert_eq!(out.to_backend, body);
        assert!(!machine.wants_client_bytes() && !machine.wants_client_line());
        backend(&mut machine, b"250 2.0.0 Ok: queued as 1234\r\n");
        assert!(machine.wants_client_line());
        let mut out = Output::default();
        machine.client_line(&input[taken..], &mut out);
        assert_eq!(
            (out.to_client.as_slice(), out.to_backend.as_slice()),
            (IDENTITY_COMMAND_REFUSED, &b""[..])
        );
    }

    #[test]
    fn a_refused_data_command_sends_no_body() {
        let mut machine = identified();
        client(&mut machine, b"DATA\r\n");
        backend(&mut machine, b"554 5.5.1 Error: no valid recipients\r\n");
        assert!(machine.wants_client_line() && !machine.wants_client_bytes());
    }

    fn in_body(machine: &mut SmtpInspector) {
        client(machine, b"DATA\r\n");
        backend(machine, b"354 go ahead\r\n");
        assert!(machine.wants_client_bytes());
    }

    /// Relays `input` as a body in pieces of `size`; returns (relayed bytes,
    /// bytes taken, whether the body ended).
    fn relay_in_pieces(input: &[u8], size: usize) -> (Vec<u8>, usize, bool) {
        let mut machine = identified();
        in_body(&mut machine);
        let mut out = Output::default();
        let mut taken = 0;
        for piece in input.chunks(size) {
            let mut offset = 0;
            while offset < piece.len() && machine.wants_client_bytes() {
                offset += machine.client_bytes(&piece[offset..], &mut out);
            }
            taken += offset;
            if !machine.wants_client_bytes() {
                break;
            }
        }
        (out.to_backend, taken, !machine.wants_client_bytes())
    }

    #[test]
    fn the_body_ends_only_at_crlf_dot_crlf_however_it_is_split() {
        let body = b"a\r\n.\r\r\n.x\r\n\r\n.\r\nQUIT\r\n";
        let end = body.len() - b"QUIT\r\n".len();
        for size in 1..=body.len() {
            let (relayed, taken, ended) = relay_in_pieces(body, size);
            assert_eq!(
                (relayed.as_slice(), taken, ended),
                (&body[..end], end, true),
                "pieces of {size}"
            );
        }
        // An empty body: DATA's own CRLF comes before the dot.
        assert_eq!(
            relay_in_pieces(b".\r\nQUIT\r\n", 1),
            (b".\r\n".to_vec(), 3, true)
        );
    }

    #[test]
    fn dot_lines_next_to_bare_lf_are_stuffed_so_nothing_is_smuggled() {
        for (input, relayed) in [
            (
                &b"x\n.\nMAIL FROM:<s@x>\r\n.\r\n"[..],
                &b"x\n..\nMAIL FROM:<s@x>\r\n.\r\n"[..],
            ),
            (
                b"x\r\n.\nRCPT TO:<s@x>\r\n.\r\n",
                b"x\r\n..\nRCPT TO:<s@x>\r\n.\r\n",
            ),
            (
                b"x\n.\r\nXCLIENT ADDR=1.2.3.4\r\n.\r\n",
                b"x\n..\r\nXCLIENT ADDR=1.2.3.4\r\n.\r\n",
            ),
            (b".\n.\r\n", b"..\n..\r\n"),
        ] {
            for size in [1, 2, 3, input.len()] {
                let (out, taken, ended) = relay_in_pieces(input, size);
                if input == b".\n.\r\n" {
                    // Both dot lines touch a bare LF: the body goes on.
                    assert_eq!(
                        (out.as_slice(), taken, ended),
                        (relayed, input.len(), false)
                    );
                } else {
                    assert_eq!(
                        (text_of(&out), taken, ended),
                        (text_of(relayed), input.len(), true)
                    );
                }
            }
        }
    }

    #[test]
    fn bdat_chunks_are_relayed_by_their_size() {
        let mut machine = identified();
        let (_, to_backend, _) = client(&mut machine, b"BDAT 12\r\n");
        assert_eq!(to_backend, b"BDAT 12\r\n");
        assert!(machine.wants_client_bytes());
        let mut out = Output::default();
        // The chunk holds what looks like commands; they are data.
        assert_eq!(machine.client_bytes(b"XCLIENT A\r\n.", &mut out), 12);
        assert_eq!(out.to_backend, b"XCLIENT A\r\n.");
        assert!(!machine.wants_client_bytes() && !machine.wants_client_line());
        backend(&mut machine, b"250 2.0.0 Ok: 12 bytes\r\n");
        let (_, to_backend, _) = client(&mut machine, b"BDAT 0 LAST\r\n");
        assert_eq!(to_backend, b"BDAT 0 LAST\r\n");
        assert!(!machine.wants_client_bytes());
        backend(&mut machine, b"250 2.0.0 Ok: queued\r\n");
        // A chunk that cannot be framed ends the session: its data follows
        // at once and could only be misread as commands.
        for bad in [
            &b"BDAT\r\n"[..],
            b"BDAT x LAST\r\n",
            b"BDAT 5 NOW\r\n",
            b"BDAT 99999999999999999999\r\n",
        ] {
            let mut machine = identified();
            let (to_client, to_backend, next) = client(&mut machine, bad);
            assert_eq!(
                (to_client.as_slice(), to_backend.as_slice(), next),
                (BDAT_SYNTAX, &b""[..], Next::Close)
            );
        }
    }

    #[test]
    fn auth_continuation_lines_are_relayed_without_being_read_as_commands() {
        let mut machine = identified();
        client(&mut machine, b"AUTH LOGIN\r\n");
        backend(&mut machine, b"334 VXNlcm5hbWU6\r\n");
        assert!(machine.wants_client_line());
        let (to_client, to_backend, _) = client(&mut machine, b"BDAT 100\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice()),
            (&b""[..], &b"BDAT 100\r\n"[..])
        );
        assert!(!machine.wants_client_bytes());
        backend(&mut machine, b"334 UGFzc3dvcmQ6\r\n");
        client(&mut machine, b"c2VjcmV0\r\n");
        backend(&mut machine, b"235 2.7.0 Authentication successful\r\n");
        let (to_client, _, _) = client(&mut machine, b"XCLIENT ADDR=1.2.3.4\r\n");
        assert_eq!(to_client, IDENTITY_COMMAND_REFUSED);
    }

    #[test]
    fn without_xclient_mode_the_first_other_command_still_ends_inspection() {
        let mut machine = greeted(TlsMode::StartTls);
        let (_, _, next) = client(&mut machine, b"MAIL FROM:<a@b>\r\n");
        assert_eq!(next, Next::Passthrough);
        assert!(!machine.relaying());
    }

    proptest::proptest! {
        #[test]
        fn a_body_is_relayed_the_same_however_it_is_split(
            body in proptest::collection::vec(proptest::sample::select(vec![b'a', b'.', b'\r', b'\n']), 0..200),
            size in 1usize..16,
        ) {
            let whole = relay_in_pieces(&body, body.len().max(1));
            let pieces = relay_in_pieces(&body, size);
            proptest::prop_assert_eq!(&whole, &pieces);
            // Nothing is lost or reordered: only dots are ever added, and
            // at most a "." and a CR at the end are held back until the
            // next byte shows whether they end the body.
            let mut relayed = pieces.0.clone();
            let mut original = body[..pieces.1].to_vec();
            relayed.retain(|&b| b != b'.');
            original.retain(|&b| b != b'.');
            proptest::prop_assert!(original.starts_with(&relayed));
            proptest::prop_assert!(original.len() - relayed.len() <= 1);
            if pieces.2 {
                proptest::prop_assert_eq!(relayed, original);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn no_byte_input_panics_and_starttls_is_offered_only_before_tls(
            lines in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), 0..20),
            from_client in proptest::collection::vec(proptest::prelude::any::<bool>(), 20),
        ) {
            let mut machine = SmtpInspector::new(InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
            let mut out = Output::default();
            for (index, mut line) in lines.into_iter().enumerate() {
                line.extend_from_slice(b"\r\n");
                if from_client[index] {
                    machine.client_line(&line, &mut out);
                } else {
                    machine.backend_line(&line, &mut out);
                }
                if index == 10 {
                    machine.tls_established();
                    out.clear();
                }
            }
        }
    }
}
