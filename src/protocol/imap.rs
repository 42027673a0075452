//! IMAP inspection (RFC 9051 and RFC 3501, STARTTLS per RFC 2595).
//!
//! Life of a session:
//! 1. `ExpectGreeting`: the backend's first line. `* OK` is relayed and the
//!    machine waits for commands; `* PREAUTH` (the session is already
//!    authenticated, so STARTTLS is no longer allowed) is relayed and ends
//!    inspection; `* BYE` is relayed and the machine waits for the backend to
//!    close. The first line need not carry the capabilities: Dovecot may send
//!    `* OK Waiting for authentication process to respond..` first and its
//!    real greeting later, which then arrives as an ordinary untagged line.
//! 2. `Idle`: the machine reads one client command. CAPABILITY, NOOP, ID and
//!    LOGOUT are forwarded and the backend's replies relayed until the tagged
//!    completion (`ExpectTagged`); STARTTLS is answered by the proxy and the
//!    session upgrades; any other command, a command carrying a literal, or a
//!    line that is not `tag SP command` is forwarded and ends inspection.
//! 3. Every backend line relayed during inspection has its capability data
//!    rewritten: in an untagged `* CAPABILITY` response and in a
//!    `[CAPABILITY ...]` response code, the backend's own STARTTLS atoms are
//!    removed and, before TLS on a STARTTLS listener, the proxy's STARTTLS is
//!    appended at the end of the list. The rest of the line, terminator
//!    included, is relayed byte for byte.
//!
//! After STARTTLS, IMAP sends no new greeting: the client asks CAPABILITY
//! again, and the answer no longer offers STARTTLS.

use super::{eol_of, split_word, trim_eol, BackendFailure, Inspector, Next, Output, TlsMode, Goodbye, RequireTls};

/// Reply to a client whose backend cannot be reached (RFC 5530 response code).
pub const SERVICE_UNAVAILABLE: &[u8] = b"* BYE [UNAVAILABLE] Backend server not available\r\n";
/// Reply to a client line over the cap, before the connection is closed.
pub const LINE_TOO_LONG: &[u8] = b"* BYE Line too long\r\n";
/// Goodbyes for sessions the proxy ends during inspection.
pub const TOO_MANY_COMMANDS: &[u8] = b"* BYE Too many commands\r\n";
pub const IDLE_TIMEOUT: &[u8] = b"* BYE Autologout; idle for too long\r\n";
pub const SHUTTING_DOWN: &[u8] = b"* BYE [UNAVAILABLE] Server shutting down\r\n";
/// Tagged reply to STARTTLS (after `tag SP`); the handshake starts right after it.
pub const BEGIN_TLS: &[u8] = b"OK Begin TLS negotiation now\r\n";
/// Tagged reply to STARTTLS (after `tag SP`) once TLS is already active
/// (implicit TLS or a second STARTTLS).
pub const TLS_ALREADY_ACTIVE: &[u8] = b"BAD TLS is already active\r\n";
/// Tagged reply to STARTTLS (after `tag SP`) with arguments.
pub const STARTTLS_SYNTAX: &[u8] = b"BAD STARTTLS takes no arguments\r\n";

/// The capability atom the proxy adds and removes.
const STARTTLS: &[u8] = b"STARTTLS";
/// The capability keyword, as an untagged response and as a response code.
const CAPABILITY: &[u8] = b"CAPABILITY";

/// What the machine waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The backend's greeting.
    ExpectGreeting,
    /// A client command.
    Idle,
    /// The tagged completion of a forwarded command (the tag is kept in
    /// [`ImapInspector::tag`]); untagged data is relayed meanwhile.
    ExpectTagged,
    /// The OK to STARTTLS is out; the handshake runs in the driver.
    AwaitTlsHandshake,
    /// Inspection is over or the session is closing; no more lines expected.
    Done,
}

/// The IMAP inspection state machine.
#[derive(Debug)]
pub struct ImapInspector {
    mode: TlsMode,
    /// The listener's policy for commands before TLS.
    #[allow(dead_code)]
    require_tls: RequireTls,
    tls_active: bool,
    state: State,
    /// The tag of the command whose completion is awaited (reused buffer).
    tag: Vec<u8>,
    /// The backend has announced it is closing (`* BYE`); the client already
    /// knows, so a backend failure afterwards gets no second BYE.
    bye_relayed: bool,
}

impl ImapInspector {
    pub fn new(mode: TlsMode, require_tls: RequireTls) -> Self {
        Self {
            mode,
            require_tls,
            tls_active: mode == TlsMode::Implicit,
            state: State::ExpectGreeting,
            tag: Vec::with_capacity(16),
            bye_relayed: false,
        }
    }

    /// Whether capability lists must offer the proxy's STARTTLS right now.
    fn offers_starttls(&self) -> bool {
        self.mode == TlsMode::StartTls && !self.tls_active
    }

    /// Relays a backend line to the client with its capability data rewritten.
    fn relay(&mut self, line: &[u8], out: &mut Output) {
        if is_untagged(trim_eol(line), b"BYE") {
            self.bye_relayed = true;
        }
        write_rewritten(line, self.offers_starttls(), &mut out.to_client);
    }

    fn greeting(&mut self, line: &[u8], out: &mut Output) -> Next {
        let text = trim_eol(line);
        if is_untagged(text, b"OK") {
            self.relay(line, out);
            self.state = State::Idle;
            Next::Continue
        } else if is_untagged(text, b"PREAUTH") {
            // Already authenticated: STARTTLS is not allowed any more
            // (RFC 9051 section 6.2.1) and the proxy will not be there to
            // answer it, so the greeting never offers it.
            write_rewritten(line, false, &mut out.to_client);
            self.state = State::Done;
            Next::Passthrough
        } else if is_untagged(text, b"BYE") {
            self.relay(line, out);
            self.state = State::Done;
            Next::Continue
        } else {
            // Not a greeting; relay it and keep waiting for one.
            self.relay(line, out);
            Next::Continue
        }
    }

    fn command(&mut self, line: &[u8], out: &mut Output) -> Next {
        let text = trim_eol(line);
        let (tag, rest) = split_word(text);
        let (command, arguments) = split_word(rest);
        if ends_with_literal(text) || !is_tag(tag) || command.is_empty() {
            // The literal's bytes follow without being lines; garbage is the
            // backend's to judge. Either way nothing after it is parsed.
            return self.pass_through(line, out);
        }
        if command.eq_ignore_ascii_case(STARTTLS) {
            if !arguments.is_empty() {
                write_tagged(tag, STARTTLS_SYNTAX, out);
                Next::Continue
            } else if self.tls_active {
                write_tagged(tag, TLS_ALREADY_ACTIVE, out);
                Next::Continue
            } else {
                write_tagged(tag, BEGIN_TLS, out);
                self.state = State::AwaitTlsHandshake;
                Next::StartTls
            }
        } else if [&b"CAPABILITY"[..], b"NOOP", b"ID", b"LOGOUT"]
            .iter()
            .any(|known| command.eq_ignore_ascii_case(known))
        {
            out.to_backend.extend_from_slice(line);
            self.tag.clear();
            self.tag.extend_from_slice(tag);
            self.state = State::ExpectTagged;
            Next::Continue
        } else {
            // LOGIN, AUTHENTICATE, SELECT, unknown commands: the backend
            // judges them, and nothing after them is parsed.
            self.pass_through(line, out)
        }
    }

    fn pass_through(&mut self, line: &[u8], out: &mut Output) -> Next {
        out.to_backend.extend_from_slice(line);
        self.state = State::Done;
        Next::Passthrough
    }
}

impl Inspector for ImapInspector {
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
        match self.state {
            State::ExpectGreeting => self.greeting(line, out),
            State::ExpectTagged => {
                let completes = split_word(trim_eol(line)).0 == self.tag.as_slice();
                self.relay(line, out);
                if completes {
                    self.state = State::Idle;
                }
                Next::Continue
            }
            // Unsolicited (e.g. `* BYE Autologout`, or Dovecot's real
            // greeting after its "Waiting for authentication" line): relay.
            State::Idle => {
                self.relay(line, out);
                Next::Continue
            }
            // After the OK to STARTTLS nothing from the backend may reach the
            // client: it would be read as a response inside TLS.
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
        if matches!(self.state, State::Done | State::AwaitTlsHandshake) {
            return;
        }
        if !self.bye_relayed {
            out.to_client.extend_from_slice(SERVICE_UNAVAILABLE);
        }
        self.state = State::Done;
    }
}

/// Writes `tag SP reply` to the client.
fn write_tagged(tag: &[u8], reply: &[u8], out: &mut Output) {
    out.to_client.extend_from_slice(tag);
    out.to_client.push(b' ');
    out.to_client.extend_from_slice(reply);
}

/// Whether `text` is an untagged response whose first word after `*` is
/// `keyword` (case-insensitive).
fn is_untagged(text: &[u8], keyword: &[u8]) -> bool {
    let (star, rest) = split_word(text);
    star == b"*" && split_word(rest).0.eq_ignore_ascii_case(keyword)
}

/// Whether `word` is a valid IMAP tag: one or more ASTRING-CHARs other than
/// `+` (RFC 9051 formal syntax). The proxy echoes tags in its own replies, so
/// it only answers commands whose tag is well-formed.
fn is_tag(word: &[u8]) -> bool {
    !word.is_empty()
        && word
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && !b"(){%*\"\\+".contains(&b))
}

/// Whether a command line (terminator removed) ends with a literal
/// announcement, `{n}` or the non-synchronizing `{n+}` (RFC 7888).
fn ends_with_literal(text: &[u8]) -> bool {
    let Some(inner) = text.strip_suffix(b"}") else {
        return false;
    };
    let Some(open) = inner.iter().rposition(|&b| b == b'{') else {
        return false;
    };
    let count = inner.get(open + 1..).unwrap_or_default();
    let count = count.strip_suffix(b"+").unwrap_or(count);
    !count.is_empty() && count.iter().all(u8::is_ascii_digit)
}

/// Where a line's capability list sits, as a byte range of the line without
/// its terminator: from right after the `CAPABILITY` keyword to the end of
/// the line (untagged `* CAPABILITY` response) or to the `]` closing the
/// response code (`* OK [CAPABILITY ...]`, `tag OK [CAPABILITY ...]`, and the
/// other status responses). A code whose `]` is missing runs to the end.
fn capability_list(text: &[u8]) -> Option<(usize, usize)> {
    let (first, rest) = split_word(text);
    if first.is_empty() {
        return None;
    }
    let (second, after) = split_word(rest);
    // `rest` and `after` are suffixes of `text` whenever they are not empty.
    let second_at = text.len() - rest.len();
    if first == b"*" && second.eq_ignore_ascii_case(CAPABILITY) {
        return Some((second_at + second.len(), text.len()));
    }
    let is_status = [&b"OK"[..], b"NO", b"BAD", b"PREAUTH", b"BYE"]
        .iter()
        .any(|status| second.eq_ignore_ascii_case(status));
    let code = after.strip_prefix(b"[")?;
    if !is_status {
        return None;
    }
    let name_len = code
        .iter()
        .position(|&b| b == b' ' || b == b']')
        .unwrap_or(code.len());
    if !code.get(..name_len)?.eq_ignore_ascii_case(CAPABILITY) {
        return None;
    }
    let start = text.len() - code.len() + name_len;
    let end = text
        .get(start..)?
        .iter()
        .position(|&b| b == b']')
        .map_or(text.len(), |offset| start + offset);
    Some((start, end))
}

/// Writes a backend line with its capability list (if any) rewritten: every
/// STARTTLS atom removed, and ` STARTTLS` appended when `offer` is set.
/// Everything else, terminator included, is copied unchanged.
fn write_rewritten(line: &[u8], offer: bool, out: &mut Vec<u8>) {
    let text = trim_eol(line);
    let parts = capability_list(text).and_then(|(start, end)| {
        Some((text.get(..start)?, text.get(start..end)?, text.get(end..)?))
    });
    let Some((head, list, tail)) = parts else {
        out.extend_from_slice(line);
        return;
    };
    out.extend_from_slice(head);
    write_filtered_list(list, offer, out);
    out.extend_from_slice(tail);
    out.extend_from_slice(eol_of(line));
}

/// Copies a space-separated atom list without its STARTTLS atoms (each
/// removed with the spaces before it), appending ` STARTTLS` after the last
/// atom when `offer` is set. Other spacing is kept as it was.
fn write_filtered_list(list: &[u8], offer: bool, out: &mut Vec<u8>) {
    let mut rest = list;
    loop {
        let spaces = rest.iter().take_while(|&&b| b == b' ').count();
        let (gap, after) = rest.split_at(spaces);
        let atom_len = after.iter().position(|&b| b == b' ').unwrap_or(after.len());
        if atom_len == 0 {
            if offer {
                out.push(b' ');
                out.extend_from_slice(STARTTLS);
            }
            out.extend_from_slice(gap);
            return;
        }
        let (atom, tail) = after.split_at(atom_len);
        if !atom.eq_ignore_ascii_case(STARTTLS) {
            out.extend_from_slice(gap);
            out.extend_from_slice(atom);
        }
        rest = tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds one side's bytes line by line and returns what came out and the
    /// last `Next`.
    fn backend(machine: &mut ImapInspector, bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Next) {
        feed(machine, bytes, false)
    }

    fn client(machine: &mut ImapInspector, bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Next) {
        feed(machine, bytes, true)
    }

    fn feed(
        machine: &mut ImapInspector,
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

    fn greeted(mode: TlsMode) -> ImapInspector {
        let mut machine = ImapInspector::new(mode, RequireTls::None);
        let (to_client, _, next) = backend(&mut machine, b"* OK IMAP4rev1 server ready\r\n");
        assert_eq!(
            (to_client.as_slice(), next),
            (&b"* OK IMAP4rev1 server ready\r\n"[..], Next::Continue)
        );
        assert!(machine.wants_client_line());
        machine
    }

    /// A greeted STARTTLS-mode machine after STARTTLS and the handshake.
    fn upgraded() -> ImapInspector {
        let mut machine = greeted(TlsMode::StartTls);
        let (_, _, next) = client(&mut machine, b"a STARTTLS\r\n");
        assert_eq!(next, Next::StartTls);
        machine.tls_established();
        machine
    }

    fn rewritten(line: &[u8], offer: bool) -> Vec<u8> {
        let mut out = Vec::new();
        write_rewritten(line, offer, &mut out);
        out
    }

    #[test]
    fn greeting_capability_code_gains_starttls_before_tls() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::None);
        assert!(!machine.wants_client_line());
        let (to_client, to_backend, next) = backend(
            &mut machine,
            b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n",
        );
        assert_eq!(
            to_client,
            b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN STARTTLS] Dovecot ready.\r\n"
        );
        assert_eq!((to_backend.as_slice(), next), (&b""[..], Next::Continue));
        assert!(machine.wants_client_line());
    }

    #[test]
    fn backend_starttls_in_the_greeting_is_moved_to_the_end() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::None);
        let (to_client, _, _) = backend(
            &mut machine,
            b"* OK [CAPABILITY IMAP4rev1 LITERAL+ STARTTLS AUTH=PLAIN] Dovecot ready.\r\n",
        );
        assert_eq!(
            to_client,
            b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN STARTTLS] Dovecot ready.\r\n"
        );
    }

    #[test]
    fn implicit_tls_strips_starttls_from_the_greeting() {
        let mut machine = ImapInspector::new(TlsMode::Implicit, RequireTls::None);
        let (to_client, _, _) = backend(
            &mut machine,
            b"* ok [capability IMAP4rev1 starttls LOGINDISABLED] ready\n",
        );
        assert_eq!(
            to_client,
            b"* ok [capability IMAP4rev1 LOGINDISABLED] ready\n"
        );
        assert!(machine.wants_client_line());
    }

    #[test]
    fn lines_without_capability_data_are_relayed_byte_identical() {
        for line in [
            &b"* OK [UIDVALIDITY 3857529045] UIDs valid\r\n"[..],
            b"* OK STARTTLS CAPABILITY mentioned in text\r\n",
            b"* OK [CAPABILITYX STARTTLS] not the capability code\n",
            b"a1 OK done STARTTLS\r\n",
            b"* 3 EXISTS\r\n",
            b"\xff\xfe garbage \x00\r\n",
            b"",
        ] {
            assert_eq!(rewritten(line, true), line);
        }
    }

    #[test]
    fn rewriting_keeps_spacing_terminators_and_edge_lists_valid() {
        assert_eq!(
            rewritten(b"* CAPABILITY\r\n", true),
            b"* CAPABILITY STARTTLS\r\n"
        );
        assert_eq!(
            rewritten(b"* CAPABILITY STARTTLS\n", false),
            b"* CAPABILITY\n"
        );
        assert_eq!(
            rewritten(b"* CAPABILITY STARTTLS IMAP4rev1", true),
            b"* CAPABILITY IMAP4rev1 STARTTLS"
        );
        assert_eq!(
            rewritten(b"* OK [CAPABILITY] hi\r\n", true),
            b"* OK [CAPABILITY STARTTLS] hi\r\n"
        );
        assert_eq!(
            rewritten(b"* OK [CAPABILITY STARTTLS] hi\r\n", false),
            b"* OK [CAPABILITY] hi\r\n"
        );
        assert_eq!(
            rewritten(b"*  capability  A  B \r\n", true),
            b"*  capability  A  B STARTTLS \r\n"
        );
        assert_eq!(
            rewritten(b"* OK [CAPABILITY A STARTTLS\r\n", false),
            b"* OK [CAPABILITY A\r\n"
        );
        assert_eq!(
            rewritten(
                b"* OK [CAPABILITY StartTLS STARTTLS A] x [CAPABILITY STARTTLS]\r\n",
                false
            ),
            b"* OK [CAPABILITY A] x [CAPABILITY STARTTLS]\r\n"
        );
    }

    #[test]
    fn untagged_capability_reply_to_a_lowercase_command_gains_starttls() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, to_backend, next) = client(&mut machine, b"a1 capability\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], &b"a1 capability\r\n"[..], Next::Continue)
        );
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(
            &mut machine,
            b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\n",
        );
        assert_eq!(to_client, b"* CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS\r\n");
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(
            &mut machine,
            b"a1 OK Pre-login capabilities listed, post-login capabilities have more.\r\n",
        );
        assert_eq!(
            to_client,
            b"a1 OK Pre-login capabilities listed, post-login capabilities have more.\r\n"
        );
        assert!(machine.wants_client_line());
    }

    #[test]
    fn tagged_capability_code_is_rewritten_and_completes_the_command() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"x NOOP\r\n");
        let (to_client, _, _) = backend(
            &mut machine,
            b"x OK [CAPABILITY IMAP4rev1 ID] NOOP completed\r\n",
        );
        assert_eq!(
            to_client,
            b"x OK [CAPABILITY IMAP4rev1 ID STARTTLS] NOOP completed\r\n"
        );
        assert!(machine.wants_client_line());
    }

    #[test]
    fn only_the_matching_tag_completes_the_command() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"A2 ID NIL\r\n");
        for line in [
            &b"* ID NIL\r\n"[..],
            b"+ go on\r\n",
            b"a2 OK case differs\r\n",
            b"A1 OK other tag\r\n",
        ] {
            let (to_client, _, _) = backend(&mut machine, line);
            assert_eq!(to_client, line);
            assert!(!machine.wants_client_line());
        }
        let (to_client, _, _) = backend(&mut machine, b"A2 OK ID completed\r\n");
        assert_eq!(to_client, b"A2 OK ID completed\r\n");
        assert!(machine.wants_client_line());
    }

    #[test]
    fn dovecot_waiting_line_then_the_real_greeting_later() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::None);
        let (to_client, _, _) = backend(
            &mut machine,
            b"* OK Waiting for authentication process to respond..\r\n",
        );
        assert_eq!(
            to_client,
            b"* OK Waiting for authentication process to respond..\r\n"
        );
        assert!(machine.wants_client_line());
        let (to_client, _, _) = backend(
            &mut machine,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS AUTH=PLAIN] Dovecot ready.\r\n",
        );
        assert_eq!(
            to_client,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN STARTTLS] Dovecot ready.\r\n"
        );
        assert!(machine.wants_client_line());
    }

    #[test]
    fn starttls_is_answered_locally_and_never_forwarded() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, to_backend, next) = client(&mut machine, b"a001 starttls\r\n");
        assert_eq!(to_client, b"a001 OK Begin TLS negotiation now\r\n");
        assert_eq!(to_backend, b"");
        assert_eq!(next, Next::StartTls);
        assert!(!machine.wants_client_line());
    }

    #[test]
    fn backend_lines_after_the_starttls_reply_are_dropped() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"a STARTTLS\r\n");
        let (to_client, to_backend, next) = backend(
            &mut machine,
            b"* OK [CAPABILITY IMAP4rev1] injected\r\n* BYE\r\n",
        );
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], &b""[..], Next::Continue)
        );
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn after_tls_capability_is_asked_again_and_has_no_starttls() {
        let mut machine = upgraded();
        assert!(machine.wants_client_line());
        let (_, to_backend, next) = client(&mut machine, b"b CAPABILITY\r\n");
        assert_eq!(
            (to_backend.as_slice(), next),
            (&b"b CAPABILITY\r\n"[..], Next::Continue)
        );
        let (to_client, _, _) = backend(&mut machine, b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\nb OK [CAPABILITY IMAP4rev1 STARTTLS] done\r\n");
        assert_eq!(
            to_client,
            b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nb OK [CAPABILITY IMAP4rev1] done\r\n"
        );
        assert!(machine.wants_client_line());
    }

    #[test]
    fn second_starttls_and_starttls_on_implicit_get_bad() {
        let mut machine = upgraded();
        let (to_client, to_backend, next) = client(&mut machine, b"c STARTTLS\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (
                &b"c BAD TLS is already active\r\n"[..],
                &b""[..],
                Next::Continue
            )
        );
        assert!(machine.wants_client_line());

        let mut machine = greeted(TlsMode::Implicit);
        let (to_client, to_backend, next) = client(&mut machine, b"a StartTLS\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (
                &b"a BAD TLS is already active\r\n"[..],
                &b""[..],
                Next::Continue
            )
        );
    }

    #[test]
    fn starttls_with_arguments_is_bad() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, to_backend, next) = client(&mut machine, b"a STARTTLS now\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (
                &b"a BAD STARTTLS takes no arguments\r\n"[..],
                &b""[..],
                Next::Continue
            )
        );
        assert!(machine.wants_client_line());
    }

    #[test]
    fn commands_with_literals_end_inspection() {
        for command in [
            &b"a LOGIN {5}\r\n"[..],
            b"a LOGIN {5+}\r\n",
            b"a STARTTLS {5}\r\n",
            b"a CAPABILITY {0}\n",
        ] {
            let mut machine = greeted(TlsMode::StartTls);
            let (to_client, to_backend, next) = client(&mut machine, command);
            assert_eq!(
                (to_client.as_slice(), to_backend.as_slice(), next),
                (&b""[..], command, Next::Passthrough)
            );
            assert!(!machine.wants_client_line());
        }
        assert!(!ends_with_literal(b"a LOGIN {}"));
        assert!(!ends_with_literal(b"a LOGIN {+}"));
        assert!(!ends_with_literal(b"a LOGIN {5x}"));
        assert!(!ends_with_literal(b"a LOGIN }"));
        assert!(ends_with_literal(b"a APPEND box ~{12}"));
    }

    #[test]
    fn other_commands_and_garbage_are_forwarded_verbatim_and_end_inspection() {
        for command in [
            &b"a LOGIN user pass\r\n"[..],
            b"a AUTHENTICATE PLAIN AGFAYg==\r\n",
            b"a SELECT INBOX\r\n",
            b"garbage\r\n",
            b"\r\n",
            b"* STARTTLS\r\n",
            b"a+ STARTTLS\r\n",
            b"\xff STARTTLS\r\n",
        ] {
            let mut machine = greeted(TlsMode::StartTls);
            let (to_client, to_backend, next) = client(&mut machine, command);
            assert_eq!(
                (to_client.as_slice(), to_backend.as_slice(), next),
                (&b""[..], command, Next::Passthrough)
            );
            assert!(!machine.wants_client_line());
            let (to_client, _, _) = backend(&mut machine, b"a OK\r\n");
            assert_eq!(to_client, b"");
        }
    }

    #[test]
    fn logout_is_relayed_and_the_backend_closing_gets_no_second_bye() {
        let mut machine = greeted(TlsMode::StartTls);
        let (_, to_backend, _) = client(&mut machine, b"z LOGOUT\r\n");
        assert_eq!(to_backend, b"z LOGOUT\r\n");
        let (to_client, _, _) = backend(
            &mut machine,
            b"* BYE Logging out\r\nz OK Logout completed.\r\n",
        );
        assert_eq!(
            to_client,
            b"* BYE Logging out\r\nz OK Logout completed.\r\n"
        );
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert!(out.is_empty());
        assert!(!machine.wants_client_line());
    }

    #[test]
    fn unsolicited_lines_in_idle_are_relayed() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, _, _) = backend(&mut machine, b"* BYE Autologout; idle for too long\r\n");
        assert_eq!(to_client, b"* BYE Autologout; idle for too long\r\n");
        assert!(machine.wants_client_line());
    }

    #[test]
    fn preauth_greeting_ends_inspection_without_offering_starttls() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::None);
        let (to_client, to_backend, next) = backend(
            &mut machine,
            b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] Logged in as joe\r\n",
        );
        assert_eq!(
            to_client,
            b"* PREAUTH [CAPABILITY IMAP4rev1] Logged in as joe\r\n"
        );
        assert_eq!((to_backend.as_slice(), next), (&b""[..], Next::Passthrough));
        assert!(!machine.wants_client_line());
    }

    #[test]
    fn bye_greeting_is_relayed_and_nothing_more() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::None);
        let (to_client, _, next) = backend(&mut machine, b"* BYE Too many connections\r\n");
        assert_eq!(
            (to_client.as_slice(), next),
            (&b"* BYE Too many connections\r\n"[..], Next::Continue)
        );
        assert!(!machine.wants_client_line());
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_line_that_is_not_a_greeting_is_relayed_and_the_greeting_still_awaited() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::None);
        let (to_client, _, _) = backend(&mut machine, b"hello?\r\n");
        assert_eq!(to_client, b"hello?\r\n");
        assert!(!machine.wants_client_line());
        backend(&mut machine, b"* OK ready\r\n");
        assert!(machine.wants_client_line());
    }

    #[test]
    fn overlong_client_line_gets_bye() {
        let mut machine = greeted(TlsMode::StartTls);
        let mut out = Output::default();
        machine.goodbye(Goodbye::LineTooLong, &mut out);
        assert_eq!(out.to_client, b"* BYE Line too long\r\n");
        assert!(!machine.wants_client_line());
    }

    #[test]
    fn backend_failure_gets_bye_unavailable_unless_inspection_is_over() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::None);
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Unreachable, &mut out);
        assert_eq!(
            out.to_client,
            b"* BYE [UNAVAILABLE] Backend server not available\r\n"
        );

        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"a CAPABILITY\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::LineTooLong, &mut out);
        assert_eq!(out.to_client, SERVICE_UNAVAILABLE);
        assert!(!machine.wants_client_line());

        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"a LOGIN u p\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn wants_client_line_only_while_idle() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::None);
        assert!(!machine.wants_client_line());
        backend(&mut machine, b"* OK hi\r\n");
        assert!(machine.wants_client_line());
        client(&mut machine, b"a NOOP\r\n");
        assert!(!machine.wants_client_line());
        // A client line fed anyway is ignored.
        let (to_client, to_backend, next) = client(&mut machine, b"b STARTTLS\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], &b""[..], Next::Continue)
        );
        backend(&mut machine, b"a OK NOOP completed\r\n");
        assert!(machine.wants_client_line());
        client(&mut machine, b"a STARTTLS\r\n");
        assert!(!machine.wants_client_line());
        machine.tls_established();
        assert!(machine.wants_client_line());
    }

    /// Checks every capability list in what was sent to the client: with
    /// STARTTLS exactly once, as the last atom, when `offer`; without it
    /// otherwise. Proxy replies carry no list, and a PREAUTH greeting no offer.
    fn check_capabilities(to_client: &[u8], offer: bool, greeting: bool) -> Result<(), String> {
        for line in to_client.split_inclusive(|&b| b == b'\n') {
            let text = trim_eol(line);
            let Some((start, end)) = capability_list(text) else {
                continue;
            };
            let atoms: Vec<&[u8]> = text[start..end]
                .split(|&b| b == b' ')
                .filter(|atom| !atom.is_empty())
                .collect();
            let count = atoms
                .iter()
                .filter(|atom| atom.eq_ignore_ascii_case(STARTTLS))
                .count();
            let expect = offer && !(greeting && is_untagged(text, b"PREAUTH"));
            let ok = if expect {
                count == 1 && atoms.last() == Some(&STARTTLS)
            } else {
                count == 0
            };
            if !ok {
                return Err(format!(
                    "offer={offer} line={:?}",
                    String::from_utf8_lossy(line)
                ));
            }
        }
        Ok(())
    }

    /// A line made of protocol pieces (mostly) or of random bytes.
    fn line_from(pieces: Vec<&'static [u8]>) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let words: Vec<&'static [u8]> = pieces
            .iter()
            .flat_map(|piece| piece.split(|&b| b == b' '))
            .collect();
        prop_oneof![
            3 => prop::sample::select(pieces).prop_map(<[u8]>::to_vec),
            2 => proptest::collection::vec(prop::sample::select(words), 0..8).prop_map(|words| words.join(&b' ')),
            1 => proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    /// One step of a random dialogue: whether it feeds the side the machine
    /// waits for (else `from_client`), the line for each side, and the
    /// terminator (CRLF, LF or none).
    fn step() -> impl proptest::strategy::Strategy<Value = (bool, bool, Vec<u8>, Vec<u8>, u8)> {
        use proptest::prelude::*;
        let client = line_from(vec![
            b"a1 CAPABILITY",
            b"a1 capability",
            b"A1 NOOP",
            b"a1 ID NIL",
            b"a1 LOGOUT",
            b"a1 STARTTLS",
            b"a1 starttls x",
            b"a1 LOGIN {5}",
            b"a1 LOGIN {5+}",
            b"a1 SELECT INBOX",
            b"* STARTTLS",
            b"",
        ]);
        let backend = line_from(vec![
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready",
            b"* OK Waiting for authentication",
            b"* CAPABILITY IMAP4rev1 starttls",
            b"* capability",
            b"a1 OK [CAPABILITY STARTTLS] done",
            b"a1 OK done",
            b"A1 NO [CAPABILITY]",
            b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] hi",
            b"* BYE [CAPABILITY STARTTLS",
            b"+ [CAPABILITY STARTTLS]",
            b"* OK [ALERT] STARTTLS",
            b"]",
            b"[",
            b"\xff",
        ]);
        (
            prop::bool::weighted(0.8),
            any::<bool>(),
            client,
            backend,
            any::<u8>(),
        )
    }

    proptest::proptest! {
        #[test]
        fn no_byte_input_panics_and_starttls_is_offered_only_before_tls(
            implicit in proptest::prelude::any::<bool>(),
            steps in proptest::collection::vec(step(), 0..32),
        ) {
            let mode = if implicit { TlsMode::Implicit } else { TlsMode::StartTls };
            let mut machine = ImapInspector::new(mode, RequireTls::None);
            let mut out = Output::default();
            let mut upgraded = false;
            for (index, (follow, from_client, client_line, backend_line, terminator)) in steps.into_iter().enumerate() {
                let from_client = if follow { machine.wants_client_line() } else { from_client };
                let mut line = if from_client { client_line } else { backend_line };
                // The driver never hands out a line with an LF inside.
                line.retain(|&b| b != b'\n');
                line.extend_from_slice(match terminator % 3 {
                    0 => &b"\r\n"[..],
                    1 => b"\n",
                    _ => b"",
                });
                // Tracked here, not asked of the machine.
                let offer = !implicit && !upgraded;
                let greeting = machine.state == State::ExpectGreeting;
                out.clear();
                let next = if from_client {
                    machine.client_line(&line, &mut out)
                } else {
                    let next = machine.backend_line(&line, &mut out);
                    proptest::prop_assert!(out.to_backend.is_empty());
                    next
                };
                if let Err(message) = check_capabilities(&out.to_client, offer, greeting) {
                    proptest::prop_assert!(false, "{}", message);
                }
                // Upgrades when asked to, and once more at an arbitrary point.
                if next == Next::StartTls || index == 16 {
                    machine.tls_established();
                    upgraded = true;
                }
            }
            out.clear();
            machine.goodbye(Goodbye::LineTooLong, &mut out);
            machine.backend_failed(BackendFailure::Closed, &mut out);
        }
    }
}
