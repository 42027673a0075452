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

use super::{
    command_label, split_word, trim_eol, BackendFailure, Goodbye, Inspector, Next, Output,
    RequireTls, TlsMode,
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
    /// Inspection is over or the session is closing; no more lines expected.
    Done,
}

/// The command whose reply is awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// EHLO: the reply is collected whole and rewritten.
    Ehlo,
    /// The HELO the proxy sent because the backend rejected EHLO; its reply
    /// becomes a synthesized EHLO reply.
    HeloFallback,
    /// HELO, NOOP, RSET, HELP, QUIT: the reply is relayed line by line.
    Relay,
}

/// The SMTP inspection state machine.
#[derive(Debug)]
pub struct SmtpInspector {
    mode: TlsMode,
    require_tls: RequireTls,
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
    pub fn new(mode: TlsMode, require_tls: RequireTls) -> Self {
        Self {
            mode,
            require_tls,
            tls_active: mode == TlsMode::Implicit,
            state: State::ExpectGreeting,
            reply: Vec::new(),
            reply_line_ends: Vec::new(),
            ehlo_domain: Vec::new(),
            capabilities_before_tls: None,
        }
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
        let (verb, argument) = split_word(trim_eol(line));
        let verb = verb.to_ascii_uppercase();
        if !self.allowed_before_tls(&verb) {
            out.to_client.extend_from_slice(MUST_STARTTLS);
            out.refused = Some(command_label(&verb));
            return Next::Continue;
        }
        match verb.as_slice() {
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
            _ => {
                // MAIL, AUTH, DATA, BDAT, unknown words, garbage: the backend
                // judges them, and nothing after them is parsed.
                out.to_backend.extend_from_slice(line);
                self.state = State::Done;
                Next::Passthrough
            }
        }
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
            for line in self.collected_lines() {
                let text = reply_text(line);
                if !is_keyword(text, b"STARTTLS") {
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
}

impl Inspector for SmtpInspector {
    fn wants_client_line(&self) -> bool {
        self.state == State::Idle
    }

    fn client_line(&mut self, line: &[u8], out: &mut Output) -> Next {
        match self.state {
            State::Idle => self.command(line, out),
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
            State::ExpectReply(Pending::Relay) => {
                out.to_client.extend_from_slice(line);
                if last {
                    self.state = State::Idle;
                }
                Next::Continue
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
            State::Idle => {
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
        if matches!(self.state, State::ExpectGreeting | State::ExpectReply(_)) {
            out.to_client.extend_from_slice(SERVICE_UNAVAILABLE);
        }
        self.state = State::Done;
    }
}

/// The reply code and whether this is the reply's last line. A line that is
/// not `ddd`, `ddd text` or `ddd-text` ends the reply (code 0), so a broken
/// backend cannot keep the machine collecting forever.
fn parse_reply_line(line: &[u8]) -> (u16, bool) {
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

    /// Feeds one side's bytes line by line and returns what came out and the
    /// last `Next`.
    fn backend(machine: &mut SmtpInspector, bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Next) {
        feed(machine, bytes, false)
    }

    fn client(machine: &mut SmtpInspector, bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Next) {
        feed(machine, bytes, true)
    }

    fn feed(
        machine: &mut SmtpInspector,
        bytes: &[u8],
        from_client: bool,
    ) -> (Vec<u8>, Vec<u8>, Next) {
        let mut out = Output::default();
        let mut next = Next::Continue;
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            next = if from_client {
                machine.client_line(line, &mut out)
            } else {
                machine.backend_line(line, &mut out)
            };
        }
        (out.to_client, out.to_backend, next)
    }

    fn greeted(mode: TlsMode) -> SmtpInspector {
        let mut machine = SmtpInspector::new(mode, RequireTls::None);
        let (to_client, _, _) = backend(&mut machine, b"220 mx.example ESMTP\r\n");
        assert_eq!(to_client, b"220 mx.example ESMTP\r\n");
        assert!(machine.wants_client_line());
        machine
    }

    #[test]
    fn multi_line_greeting_is_relayed_and_waits_for_its_last_line() {
        let mut machine = SmtpInspector::new(TlsMode::StartTls, RequireTls::None);
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
        let mut machine = SmtpInspector::new(TlsMode::StartTls, RequireTls::None);
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
        let mut machine = SmtpInspector::new(TlsMode::StartTls, require_tls);
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
        assert_eq!(to_client, b"250-mx.example\r\n250-SIZE 10\r\n250 STARTTLS\r\n");
        let mut out = Output::default();
        let next = machine.client_line(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", &mut out);
        assert_eq!((out.to_client.as_slice(), out.to_backend.as_slice(), next), (MUST_STARTTLS, &b""[..], Next::Continue));
        assert_eq!(out.refused, Some("AUTH"));
        // Mail without authentication still flows (port 25).
        let (_, to_backend, next) = client(&mut machine, b"MAIL FROM:<a@b.example>\r\n");
        assert_eq!((to_backend.as_slice(), next), (&b"MAIL FROM:<a@b.example>\r\n"[..], Next::Passthrough));

        let mut machine = with_policy(RequireTls::Auth);
        client(&mut machine, b"STARTTLS\r\n");
        machine.tls_established();
        client(&mut machine, b"EHLO c\r\n");
        let (to_client, _, _) = backend(&mut machine, EHLO_WITH_AUTH);
        assert_eq!(to_client, EHLO_WITH_AUTH);
        let (_, to_backend, next) = client(&mut machine, b"AUTH PLAIN x\r\n");
        assert_eq!((to_backend.as_slice(), next), (&b"AUTH PLAIN x\r\n"[..], Next::Passthrough));
    }

    #[test]
    fn require_tls_all_serves_only_the_road_to_tls() {
        let mut machine = with_policy(RequireTls::All);
        for command in [&b"MAIL FROM:<a@b>\r\n"[..], b"HELP\r\n", b"VRFY root\r\n", b"AUTH LOGIN\r\n", b"DATA\r\n"] {
            let mut out = Output::default();
            let next = machine.client_line(command, &mut out);
            assert_eq!((out.to_client.as_slice(), out.to_backend.as_slice(), next), (MUST_STARTTLS, &b""[..], Next::Continue));
        }
        for command in [&b"EHLO c\r\n"[..], b"NOOP\r\n", b"RSET\r\n", b"HELO c\r\n"] {
            let (_, to_backend, _) = client(&mut machine, command);
            assert_eq!(to_backend, command);
            backend(&mut machine, b"250 ok\r\n");
        }
        let (to_client, _, next) = client(&mut machine, b"STARTTLS\r\n");
        assert_eq!((to_client.as_slice(), next), (READY_TO_START_TLS, Next::StartTls));
        machine.tls_established();
        let (_, to_backend, next) = client(&mut machine, b"MAIL FROM:<a@b>\r\n");
        assert_eq!((to_backend.as_slice(), next), (&b"MAIL FROM:<a@b>\r\n"[..], Next::Passthrough));
    }

    #[test]
    fn implicit_listeners_ignore_the_starttls_policy() {
        let mut machine = SmtpInspector::new(TlsMode::Implicit, RequireTls::All);
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

    proptest::proptest! {
        #[test]
        fn no_byte_input_panics_and_starttls_is_offered_only_before_tls(
            lines in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), 0..20),
            from_client in proptest::collection::vec(proptest::prelude::any::<bool>(), 20),
        ) {
            let mut machine = SmtpInspector::new(TlsMode::StartTls, RequireTls::None);
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
