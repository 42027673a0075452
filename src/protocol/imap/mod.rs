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
//! The listener's [`RequireTls`](super::RequireTls) policy changes step 2
//! and 3 before TLS on a STARTTLS listener (and only there):
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

mod capability;
mod probe;
mod replies;
#[cfg(test)]
mod tests;

use std::time::Duration;

use super::gate::StartTls;
use super::{
    command_label, lenient_verb, split_word, trim_eol, BackendFailure, Goodbye, Inspector,
    InspectorOptions, Next, Output, Spec, TlsGate, DOVECOT_PROXY_HEADER,
};

#[cfg(test)]
use capability::{capability_list, LOGINDISABLED};
use capability::{write_rewritten, Rewrite, STARTTLS};
pub use replies::*;

/// IMAP as the rest of the proxy sees it.
pub(crate) const SPEC: Spec = Spec {
    name: "imap",
    // RFC 9051 section 5.4: at least 30 minutes.
    default_idle_timeout: Duration::from_secs(30 * 60),
    replies: &REPLIES,
    is_error_reply,
    judge_greeting: probe::judge_greeting,
    expected_greeting: probe::EXPECTED_GREETING,
    polite_quit: probe::POLITE_QUIT,
    xclient: false,
    relays_mail: false,
    proxy_header_requirement: DOVECOT_PROXY_HEADER,
    new_inspector,
    #[cfg(test)]
    contract: &tests::FIXTURE,
};

fn new_inspector(options: &InspectorOptions) -> Box<dyn Inspector> {
    Box::new(ImapInspector::new(options))
}

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
pub(crate) struct ImapInspector {
    gate: TlsGate,
    state: State,
    /// The tag of the command whose completion is awaited (reused buffer).
    tag: Vec<u8>,
    /// The backend has announced it is closing (`* BYE`); the client already
    /// knows, so a backend failure afterwards gets no second BYE.
    bye_relayed: bool,
}

impl ImapInspector {
    pub(crate) fn new(options: &InspectorOptions) -> Self {
        Self {
            gate: TlsGate::new(options),
            state: State::ExpectGreeting,
            tag: Vec::with_capacity(16),
            bye_relayed: false,
        }
    }

    /// How capability lists are rewritten right now.
    fn rewrite(&self) -> Rewrite {
        let restricted = self.gate.restricted();
        Rewrite {
            hide_auth: restricted,
            login_disabled: restricted,
            starttls: self.gate.offers_starttls(),
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
        } else if is_untagged(text, b"PREAUTH") && self.gate.road_to_tls_only() {
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
                hide_auth: self.gate.restricted(),
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
        if self.gate.restricted() || self.gate.refuses_line(text).is_some() {
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
        if let Some(answer) = self
            .gate
            .upgrade_request(STARTTLS, command, arguments, rest)
        {
            write_tagged(tag, answer.reply(&REPLIES.starttls), out);
            if answer == StartTls::Begin {
                self.state = State::AwaitTlsHandshake;
            }
            answer.next()
        } else if is_one_of(command, INSPECTED) || self.gate.restricted() {
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

    /// Answers locally, before TLS, a line the listener's policy or the
    /// pre-TLS line policy does not let through; `None` lets it be served.
    fn refuse_before_tls(
        &mut self,
        text: &[u8],
        tag: &[u8],
        command: &[u8],
        verb: &[u8],
        literal: Option<Literal>,
        out: &mut Output,
    ) -> Option<Next> {
        // A NUL or a bare CR inside the line could end a command for a
        // lenient backend and start another one (a LOGIN, a STARTTLS) it
        // would read in clear ([`TlsGate::refuses_line`]).
        if !is_tag(tag) || command.is_empty() || self.gate.refuses_line(text).is_some() {
            out.to_client.extend_from_slice(GARBAGE_BEFORE_TLS);
        } else if is_one_of(verb, CREDENTIAL_COMMANDS) {
            write_tagged(tag, LOGIN_BEFORE_TLS, out);
        } else if self.gate.road_to_tls_only() && !is_one_of(command, ROAD_TO_TLS) {
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
        self.gate.tls_established();
        self.state = State::Idle;
    }

    fn goodbye(&mut self, reason: Goodbye, out: &mut Output) {
        REPLIES.write_goodbye(reason, self.state == State::AwaitTlsHandshake, out);
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
