//! POP3 inspection (RFC 1939, CAPA per RFC 2449, STLS per RFC 2595).
//!
//! Life of a session:
//! 1. `ExpectGreeting`: the backend's one-line greeting is relayed; `+OK`
//!    starts the dialogue, anything else is relayed and the machine waits for
//!    the backend to close.
//! 2. `Idle`: the machine reads one client command. CAPA is forwarded and its
//!    multi-line reply rewritten (`ExpectCapaStatus`, then `CapaBody`); QUIT
//!    is forwarded and its reply relayed (`ExpectStatus`); STLS is answered by
//!    the proxy and the session upgrades; any other command (USER, APOP,
//!    AUTH, garbage) is forwarded and ends inspection (`Passthrough`).
//! 3. The CAPA reply loses the backend's own STLS line, and before TLS on a
//!    STARTTLS listener gains the proxy's `STLS` right before the terminating
//!    `.`. A backend that predates CAPA (RFC 1939 only) answers `-ERR`; before
//!    TLS the client gets a capability list holding just STLS instead, so it
//!    can still find the upgrade.
//!
//! The listener's [`RequireTls`](super::RequireTls) policy changes steps 2
//! and 3 before TLS on a STARTTLS listener (and only there):
//! - `auth`: the CAPA reply also loses its `USER` and `SASL` lines; USER,
//!   PASS, APOP and AUTH are answered `-ERR [AUTH]` by the proxy (RFC 3206)
//!   and never forwarded. Nothing ends inspection before TLS: any other
//!   command is forwarded and its one-line status relayed
//!   (`ExpectCommandStatus`), so a later USER is still seen.
//! - `all`: only CAPA, QUIT and STLS are served; everything else is answered
//!   `-ERR` by the proxy.
//!
//! After STLS there is no new greeting; the client may send CAPA again, and
//! the answer no longer offers STLS.

mod capa;
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

pub use replies::*;

/// POP3 as the rest of the proxy sees it.
pub(crate) const SPEC: Spec = Spec {
    name: "pop3",
    // RFC 1939 section 3: at least 10 minutes.
    default_idle_timeout: Duration::from_secs(10 * 60),
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
    Box::new(Pop3Inspector::new(options))
}

/// The commands that carry credentials.
const CREDENTIAL_COMMANDS: &[&[u8]] = &[b"USER", b"PASS", b"APOP", b"AUTH"];

/// What the machine waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The backend's greeting.
    ExpectGreeting,
    /// A client command.
    Idle,
    /// The single-line reply to QUIT.
    ExpectStatus,
    /// The single-line reply to a command forwarded before TLS under a
    /// restricting policy; inspection goes on after it.
    ExpectCommandStatus,
    /// The status line of the reply to CAPA.
    ExpectCapaStatus,
    /// The capability lines after `+OK`, up to the terminating `.`.
    CapaBody,
    /// The `+OK` to STLS is out; the handshake runs in the driver.
    AwaitTlsHandshake,
    /// Inspection is over or the session is closing; no more lines expected.
    Done,
}

/// The POP3 inspection state machine.
#[derive(Debug)]
pub(crate) struct Pop3Inspector {
    gate: TlsGate,
    state: State,
}

impl Pop3Inspector {
    pub(crate) fn new(options: &InspectorOptions) -> Self {
        Self {
            gate: TlsGate::new(options),
            state: State::ExpectGreeting,
        }
    }

    fn command(&mut self, line: &[u8], out: &mut Output) -> Next {
        let text = trim_eol(line);
        let (keyword, argument) = split_word(text);
        // A NUL or a bare CR inside the line could end a command for a
        // lenient backend and start another one (a USER, an STLS) it would
        // read in clear ([`TlsGate::refuses_line`]).
        if self.gate.refuses_line(text).is_some() {
            return self.refuse(text, out);
        }
        if let Some(answer) = self.gate.upgrade_request(b"STLS", keyword, argument, text) {
            out.to_client
                .extend_from_slice(answer.reply(&REPLIES.starttls));
            if answer == StartTls::Begin {
                self.state = State::AwaitTlsHandshake;
            }
            answer.next()
        } else if keyword.eq_ignore_ascii_case(b"CAPA") {
            out.to_backend.extend_from_slice(line);
            self.state = State::ExpectCapaStatus;
            Next::Continue
        } else if keyword.eq_ignore_ascii_case(b"QUIT") {
            out.to_backend.extend_from_slice(line);
            self.state = State::ExpectStatus;
            Next::Continue
        } else if self.gate.restricted() {
            if self.gate.road_to_tls_only() || is_one_of(lenient_verb(text), CREDENTIAL_COMMANDS) {
                return self.refuse(text, out);
            }
            // Before TLS nothing ends inspection: a USER sent later must
            // still be seen.
            out.to_backend.extend_from_slice(line);
            self.state = State::ExpectCommandStatus;
            Next::Continue
        } else {
            // USER, APOP, AUTH, unknown words, garbage: the backend judges
            // them, and nothing after them is parsed.
            out.to_backend.extend_from_slice(line);
            self.state = State::Done;
            Next::Passthrough
        }
    }

    /// Answers a command the policy does not let through before TLS.
    fn refuse(&mut self, text: &[u8], out: &mut Output) -> Next {
        let verb = lenient_verb(text);
        out.to_client
            .extend_from_slice(if is_one_of(verb, CREDENTIAL_COMMANDS) {
                AUTH_BEFORE_TLS
            } else {
                COMMAND_BEFORE_TLS
            });
        out.refused = Some(command_label(verb));
        Next::Continue
    }
}

impl Inspector for Pop3Inspector {
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
            State::ExpectGreeting => {
                out.to_client.extend_from_slice(line);
                self.state = if is_ok(line) {
                    State::Idle
                } else {
                    State::Done
                };
            }
            State::ExpectStatus => {
                // Only QUIT gets here: the backend closes after its reply,
                // and the client expects nothing more.
                out.to_client.extend_from_slice(line);
                self.state = State::Done;
            }
            State::ExpectCommandStatus => {
                out.to_client.extend_from_slice(line);
                self.state = State::Idle;
            }
            State::ExpectCapaStatus => self.capa_status(line, out),
            State::CapaBody => self.capa_body(line, out),
            // Unsolicited (a backend timing out, say): relay.
            State::Idle => out.to_client.extend_from_slice(line),
            // After the `+OK` to STLS nothing from the backend may reach the
            // client: it would be read as a reply inside TLS.
            State::AwaitTlsHandshake | State::Done => {}
        }
        Next::Continue
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
        out.to_client.extend_from_slice(SERVICE_UNAVAILABLE);
        self.state = State::Done;
    }
}

/// Whether a status line is positive: it starts with `+OK`
/// (case-insensitive, as lenient clients read it).
fn is_ok(line: &[u8]) -> bool {
    line.get(..3)
        .is_some_and(|status| status.eq_ignore_ascii_case(b"+OK"))
}

/// Whether `word` is one of `known` (case-insensitive).
fn is_one_of(word: &[u8], known: &[&[u8]]) -> bool {
    known.iter().any(|known| word.eq_ignore_ascii_case(known))
}
