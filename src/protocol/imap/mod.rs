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
//!    `[CAPABILITY ...]` response code, the backend's own STARTTLS and
//!    LOGINDISABLED atoms are removed and, before TLS on a STARTTLS listener,
//!    the proxy's STARTTLS is appended at the end of the list. The rest of the
//!    line, terminator included, is relayed byte for byte.
//!
//! The listener's [`RequireTls`] policy changes step 2 and 3 before TLS on a
//! STARTTLS listener (and only there):
//! - `auth`: capability lists lose their `AUTH=` atoms and gain
//!   `LOGINDISABLED` (before the proxy's STARTTLS); LOGIN and AUTHENTICATE
//!   are answered `NO [PRIVACYREQUIRED]` by the proxy and never forwarded.
//!   Nothing ends inspection before TLS: other commands are forwarded and
//!   their completion awaited, so a later LOGIN is still seen; commands
//!   carrying a literal and lines that are not `tag SP command` are refused
//!   locally.
//! - `all`: only CAPABILITY, NOOP, LOGOUT and STARTTLS are served; LOGIN and
//!   AUTHENTICATE get the `NO` above, anything else a local `BAD`.
//!
//! A refused command that announces a non-synchronizing literal (`{n+}`,
//! RFC 7888) is still being sent by the client: the driver is told to discard
//! the literal's body unread (`Output::skip_client_bytes`), and the rest of
//! the command, which arrives as the next line (`DiscardCommandRest`), is
//! dropped the same way. A synchronizing literal (`{n}`) is answered at once
//! and no `+` continuation is ever sent, so its body never comes.
//!
//! After STARTTLS, IMAP sends no new greeting: the client asks CAPABILITY
//! again, and the answer no longer offers STARTTLS.

use super::{
    command_label, eol_of, lenient_verb, split_word, trim_eol, BackendFailure, Goodbye, Inspector,
    Next, Output, RequireTls, TlsMode,
};

/// Reply to a client whose backend cannot be reached (RFC 5530 response code).
/// Reply when a backend pre-authenticates a session before TLS on a
/// listener with `require_tls = "all"`.
pub const PREAUTH_WITHOUT_TLS: &[u8] =
    b"* BYE [PRIVACYREQUIRED] Pre-authenticated session refused without TLS\r\n";
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
/// Tagged reply (after `tag SP`) to LOGIN and AUTHENTICATE refused by the
/// listener's policy before TLS (RFC 5530 response code).
pub const LOGIN_BEFORE_TLS: &[u8] = b"NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n";
/// Tagged reply (after `tag SP`) to other commands refused by the policy
/// before TLS.
pub const COMMAND_BEFORE_TLS: &[u8] = b"BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n";
/// Tagged reply (after `tag SP`) to a command carrying a literal before TLS
/// under a restricting policy.
pub const LITERAL_BEFORE_TLS: &[u8] =
    b"BAD [PRIVACYREQUIRED] Literals are not accepted before STARTTLS\r\n";
/// Reply to a line that is not `tag SP command` before TLS under a
/// restricting policy.
pub const GARBAGE_BEFORE_TLS: &[u8] = b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n";

/// The capability atom the proxy adds and removes.
const STARTTLS: &[u8] = b"STARTTLS";
/// The capability atom the proxy adds before TLS under a restricting policy
/// and otherwise removes.
const LOGINDISABLED: &[u8] = b"LOGINDISABLED";
/// The prefix of the SASL mechanism atoms hidden before TLS.
const AUTH_PREFIX: &[u8] = b"AUTH=";
/// The capability keyword, as an untagged response and as a response code.
const CAPABILITY: &[u8] = b"CAPABILITY";
/// The commands that carry credentials.
const CREDENTIAL_COMMANDS: &[&[u8]] = &[b"LOGIN", b"AUTHENTICATE"];
/// The commands the `all` policy serves before TLS.
const ROAD_TO_TLS: &[&[u8]] = &[b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS"];
/// The commands whose completion is awaited without further conditions.
const INSPECTED: &[&[u8]] = &[b"CAPABILITY", b"NOOP", b"ID", b"LOGOUT"];

/// What the machine waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The backend's greeting.
    ExpectGreeting,
    /// A client command.
    Idle,
    /// The rest of a refused command after the body of its
    /// non-synchronizing literal (the driver discards the body); nothing of
    /// it is forwarded or answered.
    DiscardCommandRest,
    /// The tagged completion of a forwarded command (the tag is kept in
    /// [`ImapInspector::tag`]); untagged data is relayed meanwhile.
    ExpectTagged,
    /// The OK to STARTTLS is out; the handshake runs in the driver.
    AwaitTlsHandshake,
    /// Inspection is over or the session is closing; no more lines expected.
    Done,
}

/// How the capability lists relayed right now are rewritten. The backend's
/// STARTTLS and LOGINDISABLED atoms are always removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rewrite {
    /// Remove the `AUTH=` atoms.
    hide_auth: bool,
    /// Append ` LOGINDISABLED`.
    login_disabled: bool,
    /// Append ` STARTTLS` (after LOGINDISABLED).
    starttls: bool,
}

/// A literal announced at the end of a command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Literal {
    /// Its size in bytes (saturating: a size beyond `u64` is "forever").
    size: u64,
    /// `{n+}`: the body follows without waiting for a `+` continuation.
    non_synchronizing: bool,
}

/// The IMAP inspection state machine.
#[derive(Debug)]
pub struct ImapInspector {
    mode: TlsMode,
    /// The listener's policy for commands before TLS.
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

    /// Whether the listener's policy restricts the dialogue right now.
    fn restricted(&self) -> bool {
        self.offers_starttls() && self.require_tls != RequireTls::None
    }

    /// How capability lists are rewritten right now.
    fn rewrite(&self) -> Rewrite {
        let restricted = self.restricted();
        Rewrite {
            hide_auth: restricted,
            login_disabled: restricted,
            starttls: self.offers_starttls(),
        }
    }

    /// Relays a backend line to the client with its capability data rewritten.
    fn relay(&mut self, line: &[u8], out: &mut Output) {
        if is_untagged(trim_eol(line), b"BYE") {
            self.bye_relayed = true;
        }
        write_rewritten(line, self.rewrite(), &mut out.to_client);
    }

    fn greeting(&mut self, line: &[u8], out: &mut Output) -> Next {
        let text = trim_eol(line);
        if is_untagged(text, b"OK") {
            self.relay(line, out);
            self.state = State::Idle;
            Next::Continue
        } else if is_untagged(text, b"PREAUTH")
            && self.offers_starttls()
            && self.require_tls == RequireTls::All
        {
            // The backend authenticated the session in clear, where STARTTLS
            // is no longer possible; `all` forbids such a session.
            out.to_client.extend_from_slice(PREAUTH_WITHOUT_TLS);
            self.state = State::Done;
            Next::Close
        } else if is_untagged(text, b"PREAUTH") {
            // Already authenticated: STARTTLS is not allowed any more
            // (RFC 9051 section 6.2.1) and the proxy will not be there to
            // answer it, so the greeting never offers it. Nothing is added;
            // under a restricting policy the (now meaningless) SASL
            // mechanisms are still not shown in clear.
            let rewrite = Rewrite {
                hide_auth: self.restricted(),
                login_disabled: false,
                starttls: false,
            };
            write_rewritten(line, rewrite, &mut out.to_client);
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
        let literal = trailing_literal(text);
        let well_formed = is_tag(tag) && !command.is_empty();
        if self.restricted() {
            // The verb as a lenient backend reads it: blanks of any kind may
            // stand between tag and command.
            let verb = lenient_verb(rest);
            if let Some(next) = self.refuse_before_tls(text, tag, command, verb, literal, out) {
                return next;
            }
        } else if literal.is_some() || !well_formed {
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
        } else if is_one_of(command, INSPECTED) || self.restricted() {
            // Before TLS under a restricting policy nothing ends inspection:
            // a LOGIN sent later must still be seen.
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

    /// Answers locally, before TLS under a restricting policy, a line the
    /// policy does not let through; `None` lets it be served.
    fn refuse_before_tls(
        &mut self,
        text: &[u8],
        tag: &[u8],
        command: &[u8],
        verb: &[u8],
        literal: Option<Literal>,
        out: &mut Output,
    ) -> Option<Next> {
        // A bare CR inside the line could end a command for a lenient
        // backend and start another one (a LOGIN) it would read in clear.
        if !is_tag(tag) || command.is_empty() || text.contains(&b'\r') {
            out.to_client.extend_from_slice(GARBAGE_BEFORE_TLS);
        } else if is_one_of(verb, CREDENTIAL_COMMANDS) {
            write_tagged(tag, LOGIN_BEFORE_TLS, out);
        } else if self.require_tls == RequireTls::All && !is_one_of(command, ROAD_TO_TLS) {
            write_tagged(tag, COMMAND_BEFORE_TLS, out);
        } else if literal.is_some() {
            write_tagged(tag, LITERAL_BEFORE_TLS, out);
        } else {
            return None;
        }
        out.refused = Some(command_label(verb));
        self.discard_literal(literal, out);
        Some(Next::Continue)
    }

    /// After a refused line: has the driver discard the body of its
    /// non-synchronizing literal and the machine the rest of the command;
    /// otherwise the command is over.
    fn discard_literal(&mut self, literal: Option<Literal>, out: &mut Output) {
        match literal {
            Some(Literal {
                size,
                non_synchronizing: true,
            }) => {
                out.skip_client_bytes = size;
                self.state = State::DiscardCommandRest;
            }
            _ => self.state = State::Idle,
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
        matches!(self.state, State::Idle | State::DiscardCommandRest)
    }

    fn client_line(&mut self, line: &[u8], out: &mut Output) -> Next {
        match self.state {
            State::Idle => self.command(line, out),
            State::DiscardCommandRest => {
                self.discard_literal(trailing_literal(trim_eol(line)), out);
                Next::Continue
            }
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
            State::Idle | State::DiscardCommandRest => {
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

/// Whether `word` is one of `known` (case-insensitive).
fn is_one_of(word: &[u8], known: &[&[u8]]) -> bool {
    known.iter().any(|known| word.eq_ignore_ascii_case(known))
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

/// The literal a command line (terminator removed) announces at its end:
/// `{n}`, or the non-synchronizing `{n+}` (RFC 7888); the `literal8` forms
/// `~{n}` and `~{n+}` (RFC 3516) end the same way.
fn trailing_literal(text: &[u8]) -> Option<Literal> {
    let inner = text.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let count = inner.get(open + 1..)?;
    let (count, non_synchronizing) = match count.strip_suffix(b"+") {
        Some(count) => (count, true),
        None => (count, false),
    };
    if count.is_empty() || !count.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = count.iter().fold(0u64, |size, digit| {
        size.saturating_mul(10)
            .saturating_add(u64::from(digit - b'0'))
    });
    Some(Literal {
        size,
        non_synchronizing,
    })
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
    // A response code may also open a continuation request (`+ [CAPABILITY
    // ...] text`, RFC 9051 section 7.5).
    let code = if first == b"+" {
        rest.strip_prefix(b"[")?
    } else if is_status {
        after.strip_prefix(b"[")?
    } else {
        return None;
    };
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

/// Writes a backend line with its capability list (if any) rewritten as
/// `rewrite` says. Everything else, terminator included, is copied unchanged.
fn write_rewritten(line: &[u8], rewrite: Rewrite, out: &mut Vec<u8>) {
    let text = trim_eol(line);
    let parts = capability_list(text).and_then(|(start, end)| {
        Some((text.get(..start)?, text.get(start..end)?, text.get(end..)?))
    });
    let Some((head, list, tail)) = parts else {
        out.extend_from_slice(line);
        return;
    };
    out.extend_from_slice(head);
    write_filtered_list(list, rewrite, out);
    out.extend_from_slice(tail);
    out.extend_from_slice(eol_of(line));
}

/// Whether the atom is a SASL mechanism (`AUTH=PLAIN`).
fn is_auth_atom(atom: &[u8]) -> bool {
    atom.get(..AUTH_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(AUTH_PREFIX))
}

/// Copies a space-separated atom list without its STARTTLS and LOGINDISABLED
/// atoms (and its `AUTH=` atoms when asked), each removed with the spaces
/// before it, appending ` LOGINDISABLED` and ` STARTTLS` after the last atom
/// when asked. Other spacing is kept as it was.
fn write_filtered_list(list: &[u8], rewrite: Rewrite, out: &mut Vec<u8>) {
    let mut rest = list;
    loop {
        let spaces = rest.iter().take_while(|&&b| b == b' ').count();
        let (gap, after) = rest.split_at(spaces);
        let atom_len = after.iter().position(|&b| b == b' ').unwrap_or(after.len());
        if atom_len == 0 {
            if rewrite.login_disabled {
                out.push(b' ');
                out.extend_from_slice(LOGINDISABLED);
            }
            if rewrite.starttls {
                out.push(b' ');
                out.extend_from_slice(STARTTLS);
            }
            out.extend_from_slice(gap);
            return;
        }
        let (atom, tail) = after.split_at(atom_len);
        let removed = atom.eq_ignore_ascii_case(STARTTLS)
            || atom.eq_ignore_ascii_case(LOGINDISABLED)
            || (rewrite.hide_auth && is_auth_atom(atom));
        if !removed {
            out.extend_from_slice(gap);
            out.extend_from_slice(atom);
        }
        rest = tail;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_preauth_greeting_before_tls_is_refused_under_require_tls_all() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::All);
        let (to_client, to_backend, next) = backend(
            &mut machine,
            b"* PREAUTH [CAPABILITY IMAP4rev1] Logged in as joe\r\n",
        );
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (PREAUTH_WITHOUT_TLS, &b""[..], Next::Close)
        );
    }

    #[test]
    fn capability_codes_in_continuations_are_rewritten_too() {
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::None);
        backend(&mut machine, b"* OK ready\r\n");
        client(&mut machine, b"s STARTTLS\r\n");
        machine.tls_established();
        client(&mut machine, b"b NOOP\r\n");
        let (to_client, _, _) =
            backend(&mut machine, b"+ [CAPABILITY IMAP4rev1 STARTTLS] go on\r\n");
        assert_eq!(to_client, b"+ [CAPABILITY IMAP4rev1] go on\r\n");
    }

    #[test]
    fn login_behind_any_blanks_after_the_tag_is_refused_before_tls() {
        for line in [
            &b"a \t LOGIN joe secret\r\n"[..],
            b"a \x0bLOGIN joe secret\r\n",
        ] {
            let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::Auth);
            backend(&mut machine, b"* OK ready\r\n");
            let (_, to_backend, _) = client(&mut machine, line);
            assert_eq!(to_backend, b"", "{line:?}");
        }
    }

    use super::*;

    use crate::protocol::testing::{backend, client};

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
        let rewrite = Rewrite {
            hide_auth: false,
            login_disabled: false,
            starttls: offer,
        };
        let mut out = Vec::new();
        write_rewritten(line, rewrite, &mut out);
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
    fn implicit_tls_strips_starttls_and_logindisabled_from_the_greeting() {
        let mut machine = ImapInspector::new(TlsMode::Implicit, RequireTls::None);
        let (to_client, _, _) = backend(
            &mut machine,
            b"* ok [capability IMAP4rev1 starttls LOGINDISABLED] ready\n",
        );
        assert_eq!(to_client, b"* ok [capability IMAP4rev1] ready\n");
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
        assert_eq!(trailing_literal(b"a LOGIN {}"), None);
        assert_eq!(trailing_literal(b"a LOGIN {+}"), None);
        assert_eq!(trailing_literal(b"a LOGIN {5x}"), None);
        assert_eq!(trailing_literal(b"a LOGIN }"), None);
        assert_eq!(
            trailing_literal(b"a APPEND box ~{12}"),
            Some(Literal {
                size: 12,
                non_synchronizing: false
            })
        );
        assert_eq!(
            trailing_literal(b"a LOGIN ~{7+}"),
            Some(Literal {
                size: 7,
                non_synchronizing: true
            })
        );
        assert_eq!(
            trailing_literal(b"a LOGIN {99999999999999999999999+}"),
            Some(Literal {
                size: u64::MAX,
                non_synchronizing: true
            })
        );
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

    /// A greeted STARTTLS-mode machine under `policy`.
    fn with_policy(policy: RequireTls) -> ImapInspector {
        let mut machine = ImapInspector::new(TlsMode::StartTls, policy);
        backend(&mut machine, b"* OK ready\r\n");
        assert!(machine.wants_client_line());
        machine
    }

    /// Feeds one client line and returns the whole [`Output`] and `Next`.
    fn client_out(machine: &mut ImapInspector, line: &[u8]) -> (Output, Next) {
        let mut out = Output::default();
        let next = machine.client_line(line, &mut out);
        (out, next)
    }

    const POLICIES: [RequireTls; 3] = [RequireTls::Auth, RequireTls::All, RequireTls::None];

    #[test]
    fn dovecot_greeting_before_tls_under_each_policy() {
        let greeting = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n";
        for (policy, expected) in [
            (RequireTls::Auth, &b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ LOGINDISABLED STARTTLS] Dovecot ready.\r\n"[..]),
            (RequireTls::All, b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ LOGINDISABLED STARTTLS] Dovecot ready.\r\n"),
            (RequireTls::None, b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN STARTTLS] Dovecot ready.\r\n"),
        ] {
            let mut machine = ImapInspector::new(TlsMode::StartTls, policy);
            let (to_client, to_backend, next) = backend(&mut machine, greeting);
            assert_eq!(to_client, expected, "{policy:?}");
            assert_eq!((to_backend.as_slice(), next), (&b""[..], Next::Continue));
        }
    }

    #[test]
    fn backend_starttls_logindisabled_and_sasl_under_each_policy_and_after_tls() {
        let reply: &[u8] = b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN\r\na OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN] done\r\n";
        for (policy, expected) in [
            (RequireTls::Auth, &b"* CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS\r\na OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS] done\r\n"[..]),
            (RequireTls::All, b"* CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS\r\na OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS] done\r\n"),
            (RequireTls::None, b"* CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS\r\na OK [CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS] done\r\n"),
        ] {
            let mut machine = with_policy(policy);
            let (_, to_backend, _) = client(&mut machine, b"a CAPABILITY\r\n");
            assert_eq!(to_backend, b"a CAPABILITY\r\n");
            let (to_client, _, _) = backend(&mut machine, reply);
            assert_eq!(to_client, expected, "{policy:?}");
            assert!(machine.wants_client_line());

            // The backend never receives STARTTLS; after TLS the lists are
            // the backend's, minus STARTTLS and LOGINDISABLED.
            let (_, to_backend, next) = client(&mut machine, b"b STARTTLS\r\n");
            assert_eq!((to_backend.as_slice(), next), (&b""[..], Next::StartTls));
            machine.tls_established();
            client(&mut machine, b"a CAPABILITY\r\n");
            let (to_client, _, _) = backend(&mut machine, reply);
            assert_eq!(
                to_client,
                b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] done\r\n",
                "{policy:?}"
            );
        }
    }

    #[test]
    fn implicit_listeners_ignore_the_policy() {
        for policy in POLICIES {
            let mut machine = ImapInspector::new(TlsMode::Implicit, policy);
            let (to_client, _, _) = backend(
                &mut machine,
                b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN] hi\r\n",
            );
            assert_eq!(to_client, b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n");
            let (out, next) = client_out(&mut machine, b"a LOGIN alice secret\r\n");
            assert_eq!(
                (out.to_backend.as_slice(), next, out.refused),
                (&b"a LOGIN alice secret\r\n"[..], Next::Passthrough, None)
            );
        }
    }

    #[test]
    fn login_and_authenticate_are_refused_before_tls_under_auth_and_all() {
        for policy in [RequireTls::Auth, RequireTls::All] {
            for (command, expected, label) in [
                (
                    &b"a LOGIN alice secret\r\n"[..],
                    &b"a NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n"[..],
                    "LOGIN",
                ),
                (
                    b"b login alice secret\n",
                    b"b NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                    "LOGIN",
                ),
                (
                    b"c AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
                    b"c NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                    "AUTHENTICATE",
                ),
                (
                    b"d AUTHENTICATE PLAIN\r\n",
                    b"d NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                    "AUTHENTICATE",
                ),
                // What a lenient backend might still read as LOGIN.
                (
                    b"e LOGIN\talice secret\r\n",
                    b"e NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                    "LOGIN",
                ),
                (
                    b"f  \tLOGIN alice secret\r\n",
                    b"f NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                    "LOGIN",
                ),
            ] {
                let mut machine = with_policy(policy);
                let (out, next) = client_out(&mut machine, command);
                assert_eq!(
                    (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                    (expected, &b""[..], Next::Continue),
                    "{policy:?}"
                );
                assert_eq!((out.refused, out.skip_client_bytes), (Some(label), 0));
                assert!(machine.wants_client_line());
            }
        }
    }

    #[test]
    fn login_with_a_synchronizing_literal_gets_no_and_no_continuation() {
        for policy in [RequireTls::Auth, RequireTls::All] {
            let mut machine = with_policy(policy);
            let (out, next) = client_out(&mut machine, b"a LOGIN {5}\r\n");
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (
                    &b"a NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n"[..],
                    &b""[..],
                    Next::Continue
                )
            );
            assert_eq!((out.refused, out.skip_client_bytes), (Some("LOGIN"), 0));
            // No literal body is expected: the next line is a command.
            assert_eq!(machine.state, State::Idle);
            let (_, to_backend, _) = client(&mut machine, b"b NOOP\r\n");
            assert_eq!(to_backend, b"b NOOP\r\n");
        }
    }

    #[test]
    fn login_with_non_synchronizing_literals_is_discarded_unread() {
        for (policy, first) in [
            (RequireTls::Auth, &b"a LOGIN {5+}\r\n"[..]),
            (RequireTls::All, b"a LOGIN {5+}\r\n"),
            (RequireTls::Auth, b"a LOGIN ~{5+}\r\n"),
        ] {
            let mut machine = with_policy(policy);
            let (out, next) = client_out(&mut machine, first);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (
                    &b"a NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n"[..],
                    &b""[..],
                    Next::Continue
                )
            );
            assert_eq!((out.refused, out.skip_client_bytes), (Some("LOGIN"), 5));
            assert!(machine.wants_client_line());

            // The driver skipped `alice`; the rest of the command follows.
            let (out, next) = client_out(&mut machine, b" {6+}\r\n");
            assert!(out.is_empty());
            assert_eq!(
                (next, out.refused, out.skip_client_bytes),
                (Next::Continue, None, 6)
            );
            assert!(machine.wants_client_line());

            // `secret` skipped; the command ends here.
            let (out, next) = client_out(&mut machine, b"\r\n");
            assert!(out.is_empty());
            assert_eq!((next, out.skip_client_bytes), (Next::Continue, 0));
            assert_eq!(machine.state, State::Idle);

            let (_, to_backend, _) = client(&mut machine, b"b NOOP\r\n");
            assert_eq!(to_backend, b"b NOOP\r\n");
        }
    }

    #[test]
    fn other_commands_are_forwarded_and_awaited_before_tls_under_auth() {
        let mut machine = with_policy(RequireTls::Auth);
        let (out, next) = client_out(&mut machine, b"a SELECT INBOX\r\n");
        assert_eq!(
            (
                out.to_client.as_slice(),
                out.to_backend.as_slice(),
                next,
                out.refused
            ),
            (&b""[..], &b"a SELECT INBOX\r\n"[..], Next::Continue, None)
        );
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(&mut machine, b"* OK [ALERT] hello\r\n");
        assert_eq!(to_client, b"* OK [ALERT] hello\r\n");
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(&mut machine, b"a BAD Not authenticated\r\n");
        assert_eq!(to_client, b"a BAD Not authenticated\r\n");
        assert!(machine.wants_client_line());

        // Inspection goes on: a LOGIN after it is still refused.
        for command in [
            &b"b ID NIL\r\n"[..],
            b"c ENABLE UTF8=ACCEPT\r\n",
            b"d XYZZY\r\n",
        ] {
            let (_, to_backend, next) = client(&mut machine, command);
            assert_eq!((to_backend.as_slice(), next), (command, Next::Continue));
            backend(&mut machine, &[&command[..2], b"OK done\r\n"].concat());
            assert!(machine.wants_client_line());
        }
        let (out, _) = client_out(&mut machine, b"e LOGIN alice secret\r\n");
        assert_eq!(out.to_backend, b"");
        assert_eq!(out.refused, Some("LOGIN"));
    }

    #[test]
    fn literals_and_garbage_are_refused_before_tls_under_auth() {
        for (command, expected, skip) in [
            (
                &b"a SELECT {5}\r\n"[..],
                &b"a BAD [PRIVACYREQUIRED] Literals are not accepted before STARTTLS\r\n"[..],
                0,
            ),
            (
                b"a APPEND INBOX {12+}\r\n",
                b"a BAD [PRIVACYREQUIRED] Literals are not accepted before STARTTLS\r\n",
                12,
            ),
            (
                b"a CAPABILITY {0}\n",
                b"a BAD [PRIVACYREQUIRED] Literals are not accepted before STARTTLS\r\n",
                0,
            ),
            (
                b"a STARTTLS {5}\r\n",
                b"a BAD [PRIVACYREQUIRED] Literals are not accepted before STARTTLS\r\n",
                0,
            ),
            (
                b"garbage\r\n",
                b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                0,
            ),
            (
                b"\r\n",
                b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                0,
            ),
            (
                b"* LOGIN a b\r\n",
                b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                0,
            ),
            (
                b"\xff {3+}\r\n",
                b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                3,
            ),
            // A bare CR could start a second command for a lenient backend.
            (
                b"a NOOP\rb LOGIN alice secret\r\n",
                b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                0,
            ),
        ] {
            let mut machine = with_policy(RequireTls::Auth);
            let (out, next) = client_out(&mut machine, command);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (expected, &b""[..], Next::Continue),
                "{:?}",
                String::from_utf8_lossy(command)
            );
            assert!(out.refused.is_some());
            assert_eq!(out.skip_client_bytes, skip);
            assert!(machine.wants_client_line());
        }
    }

    #[test]
    fn require_tls_all_serves_only_the_road_to_tls() {
        let mut machine = with_policy(RequireTls::All);
        for (command, expected, label, skip) in [
            (
                &b"a SELECT INBOX\r\n"[..],
                &b"a BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n"[..],
                "SELECT",
                0,
            ),
            (
                b"b ID NIL\r\n",
                b"b BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                "ID",
                0,
            ),
            (
                b"c ENABLE {3+}\r\n",
                b"c BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                "other",
                3,
            ),
            (
                b"d LOGIN alice secret\r\n",
                b"d NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                "LOGIN",
                0,
            ),
            (
                b"junk\r\n",
                b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n",
                "other",
                0,
            ),
        ] {
            let (out, next) = client_out(&mut machine, command);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (expected, &b""[..], Next::Continue)
            );
            assert_eq!((out.refused, out.skip_client_bytes), (Some(label), skip));
            if skip > 0 {
                client_out(&mut machine, b"\r\n");
            }
            assert_eq!(machine.state, State::Idle);
        }
        for command in [&b"e CAPABILITY\r\n"[..], b"f NOOP\r\n", b"g LOGOUT\r\n"] {
            let (_, to_backend, next) = client(&mut machine, command);
            assert_eq!((to_backend.as_slice(), next), (command, Next::Continue));
            backend(&mut machine, &[&command[..2], b"OK done\r\n"].concat());
            assert!(machine.wants_client_line());
        }
        let (to_client, to_backend, next) = client(&mut machine, b"h STARTTLS\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (
                &b"h OK Begin TLS negotiation now\r\n"[..],
                &b""[..],
                Next::StartTls
            )
        );
    }

    #[test]
    fn after_tls_login_is_forwarded_and_ends_inspection() {
        for policy in POLICIES {
            let mut machine = with_policy(policy);
            client(&mut machine, b"a STARTTLS\r\n");
            machine.tls_established();
            let (out, next) = client_out(&mut machine, b"b LOGIN {5+}\r\n");
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (&b""[..], &b"b LOGIN {5+}\r\n"[..], Next::Passthrough)
            );
            assert_eq!((out.refused, out.skip_client_bytes), (None, 0));
        }
    }

    #[test]
    fn preauth_greeting_under_a_policy_offers_nothing_and_shows_no_sasl() {
        // (Under `all` a PREAUTH before TLS is refused outright; see
        // a_preauth_greeting_before_tls_is_refused_under_require_tls_all.)
        let mut machine = ImapInspector::new(TlsMode::StartTls, RequireTls::Auth);
        let (to_client, _, next) = backend(
            &mut machine,
            b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN] Logged in\r\n",
        );
        assert_eq!(to_client, b"* PREAUTH [CAPABILITY IMAP4rev1] Logged in\r\n");
        assert_eq!(next, Next::Passthrough);
    }

    #[test]
    fn unsolicited_lines_while_discarding_are_relayed_and_rewritten() {
        let mut machine = with_policy(RequireTls::Auth);
        client_out(&mut machine, b"a LOGIN {5+}\r\n");
        let (to_client, _, _) = backend(
            &mut machine,
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] late greeting\r\n",
        );
        assert_eq!(
            to_client,
            b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS] late greeting\r\n"
        );
        assert_eq!(machine.state, State::DiscardCommandRest);
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert_eq!(out.to_client, SERVICE_UNAVAILABLE);
    }

    /// Whether an atom names a SASL mechanism (checked independently of the
    /// machine's own helper).
    fn names_sasl(atom: &[u8]) -> bool {
        atom.len() >= 5 && atom[..5].eq_ignore_ascii_case(b"AUTH=")
    }

    /// Checks every capability list in what was sent to the client. The
    /// backend's STARTTLS and LOGINDISABLED never appear; the proxy's come
    /// last, exactly once each, in the order `LOGINDISABLED STARTTLS`:
    /// STARTTLS when `offer`, LOGINDISABLED when `restricted`, and neither in
    /// a PREAUTH greeting. When `restricted`, no list names a SASL mechanism.
    fn check_capabilities(
        to_client: &[u8],
        offer: bool,
        restricted: bool,
        greeting: bool,
    ) -> Result<(), String> {
        for line in to_client.split_inclusive(|&b| b == b'\n') {
            let text = trim_eol(line);
            let Some((start, end)) = capability_list(text) else {
                continue;
            };
            let atoms: Vec<&[u8]> = text[start..end]
                .split(|&b| b == b' ')
                .filter(|atom| !atom.is_empty())
                .collect();
            let count = |name: &[u8]| {
                atoms
                    .iter()
                    .filter(|atom| atom.eq_ignore_ascii_case(name))
                    .count()
            };
            let preauth = greeting && is_untagged(text, b"PREAUTH");
            let mut tail: Vec<&[u8]> = Vec::new();
            if restricted && !preauth {
                tail.push(LOGINDISABLED);
            }
            if offer && !preauth {
                tail.push(STARTTLS);
            }
            let ok = count(STARTTLS) == usize::from(offer && !preauth)
                && count(LOGINDISABLED) == usize::from(restricted && !preauth)
                && atoms.ends_with(&tail)
                && !(restricted && atoms.iter().any(|atom| names_sasl(atom)));
            if !ok {
                return Err(format!(
                    "offer={offer} restricted={restricted} line={:?}",
                    String::from_utf8_lossy(line)
                ));
            }
        }
        Ok(())
    }

    /// Whether bytes sent to the backend hold a command that carries
    /// credentials, as even a lenient backend might read them: any segment
    /// between CRs and LFs, after its first word and blanks, starting with
    /// LOGIN or AUTHENTICATE not followed by a letter.
    fn carries_credentials(to_backend: &[u8]) -> bool {
        to_backend
            .split(|&b| b == b'\r' || b == b'\n')
            .any(|segment| {
                let upper = segment.to_ascii_uppercase();
                let rest = split_word(&upper).1;
                let start = rest
                    .iter()
                    .position(|&b| b != b' ' && b != b'\t')
                    .unwrap_or(rest.len());
                let rest = &rest[start..];
                [&b"LOGIN"[..], b"AUTHENTICATE"].iter().any(|verb| {
                    rest.starts_with(verb)
                        && !rest.get(verb.len()).is_some_and(u8::is_ascii_alphabetic)
                })
            })
    }

    #[test]
    fn carries_credentials_sees_what_a_lenient_backend_would() {
        assert!(carries_credentials(b"a LOGIN x y\r\n"));
        assert!(carries_credentials(b"a login\tx y\r\n"));
        assert!(carries_credentials(b"a NOOP\rb AUTHENTICATE PLAIN\r\n"));
        assert!(!carries_credentials(b"a LOGINX\r\n"));
        assert!(!carries_credentials(b"a SELECT LOGIN\r\n"));
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
            b"a1 login alice secret",
            b"a1 AUTHENTICATE PLAIN",
            b"a1 LOGIN\talice secret",
            b"a1 NOOP\ra2 LOGIN alice secret",
            b" {6+}",
            b"a1 APPEND INBOX ~{3+}",
            b"a1 SELECT INBOX",
            b"* STARTTLS",
            b"",
        ]);
        let backend = line_from(vec![
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready",
            b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED auth=login] ready",
            b"* OK Waiting for authentication",
            b"* CAPABILITY IMAP4rev1 starttls",
            b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN",
            b"* capability",
            b"a1 OK [CAPABILITY STARTTLS] done",
            b"a1 OK [CAPABILITY AUTH=PLAIN logindisabled] done",
            b"a1 OK done",
            b"A1 NO [CAPABILITY]",
            b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] hi",
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
        fn no_byte_input_panics_and_the_policy_holds(
            implicit in proptest::prelude::any::<bool>(),
            policy in proptest::sample::select(POLICIES.to_vec()),
            steps in proptest::collection::vec(step(), 0..32),
        ) {
            let mode = if implicit { TlsMode::Implicit } else { TlsMode::StartTls };
            let mut machine = ImapInspector::new(mode, policy);
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
                let restricted = offer && policy != RequireTls::None;
                let greeting = machine.state == State::ExpectGreeting;
                out.clear();
                let next = if from_client {
                    let next = machine.client_line(&line, &mut out);
                    if restricted {
                        proptest::prop_assert!(
                            !carries_credentials(&out.to_backend),
                            "{:?} forwarded {:?}", policy, String::from_utf8_lossy(&out.to_backend)
                        );
                        proptest::prop_assert!(next != Next::Passthrough);
                    }
                    if policy == RequireTls::All && restricted && !out.to_backend.is_empty() {
                        let command = split_word(split_word(&out.to_backend).1).0;
                        proptest::prop_assert!(is_one_of(trim_eol(command), ROAD_TO_TLS));
                    }
                    next
                } else {
                    let next = machine.backend_line(&line, &mut out);
                    proptest::prop_assert!(out.to_backend.is_empty());
                    next
                };
                if let Err(message) = check_capabilities(&out.to_client, offer, restricted, greeting) {
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
