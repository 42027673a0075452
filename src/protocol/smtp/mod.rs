//! SMTP inspection (RFC 5321, STARTTLS per RFC 3207).
//!
//! Life of a session:
//! 1. `ExpectGreeting`: the backend's 220 greeting (possibly multi-line) is
//!    relayed as it comes.
//! 2. `Idle`: the machine reads one client command. EHLO, HELO, NOOP, RSET,
//!    HELP and QUIT are forwarded and their reply awaited (`ExpectReply`);
//!    STARTTLS is answered by the proxy and the session upgrades; any other
//!    command is forwarded and ends inspection (`Passthrough`), except where
//!    the machine relays the whole session command by command (below: with
//!    XCLIENT, and before TLS under `require_tls = "auth" | "all"`).
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
//!
//! The machine's parts: `ehlo.rs` (the EHLO reply rewrite and the HELO
//! fallback), `xclient.rs` (the identification exchange), `body.rs` (DATA
//! and BDAT framing while the session is relayed command by command),
//! `replies.rs` (the proxy's words), `probe.rs` (the readiness check's).

mod body;
mod ehlo;
mod probe;
mod replies;
#[cfg(test)]
mod tests;
mod xclient;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::gate::StartTls;
use super::{
    command_label, lenient_command, split_word, trim_eol, BackendFailure, ClientIdentity, Goodbye,
    Inspector, InspectorOptions, Next, Notice, Output, Spec, TlsGate, UnsafeLine,
};

use body::{bdat_size, BodyScan};
use ehlo::is_keyword;
pub use replies::*;
use xclient::Step;
pub(crate) use xclient::{xclient_command, xclient_offer};

/// SMTP as the rest of the proxy sees it.
pub(crate) const SPEC: Spec = Spec {
    name: "smtp",
    // RFC 5321 section 4.5.3.2.7: 5 minutes for the server.
    default_idle_timeout: Duration::from_secs(5 * 60),
    replies: &REPLIES,
    is_error_reply,
    judge_greeting: probe::judge_greeting,
    expected_greeting: probe::EXPECTED_GREETING,
    polite_quit: probe::POLITE_QUIT,
    xclient: true,
    relays_mail: true,
    proxy_header_requirement: "Postfix: smtpd_upstream_proxy_protocol = haproxy on the smtpd \
        service the proxy connects to, reachable only by the proxy (a backend not expecting the \
        header fails every session with a temporary error)",
    new_inspector,
    #[cfg(test)]
    contract: &tests::FIXTURE,
};

fn new_inspector(options: &InspectorOptions) -> Box<dyn Inspector> {
    Box::new(SmtpInspector::new(options))
}

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
pub(crate) struct SmtpInspector {
    gate: TlsGate,
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
    pub(crate) fn new(options: &InspectorOptions) -> Self {
        // XCLIENT needs the client's address; without one there is nothing
        // to tell the backend.
        let identify =
            options.client_identity == ClientIdentity::Xclient && options.client.is_some();
        Self {
            gate: TlsGate::new(options),
            identity: options.client_identity,
            client: options.client,
            server: options.server,
            hostname: options.hostname.clone(),
            relaying: false,
            held_greeting: Vec::new(),
            data_line_crlf: true,
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
        self.identity == ClientIdentity::Xclient || self.gate.restricted()
    }

    /// Whether the listener's policy lets `verb` through right now.
    fn allowed(&self, verb: &[u8]) -> bool {
        if self.gate.road_to_tls_only() {
            matches!(
                verb,
                b"EHLO" | b"HELO" | b"NOOP" | b"RSET" | b"QUIT" | b"STARTTLS"
            )
        } else {
            !(self.gate.restricted() && verb == b"AUTH")
        }
    }

    /// Why a command line is refused for its bytes: the pre-TLS line policy
    /// ([`TlsGate::refuses_line`]), and in XCLIENT mode a bare CR for the
    /// whole session, since the proxy reads every command for a backend
    /// that trusts it (a NUL only cuts a line short: no second command).
    fn unsafe_line(&self, text: &[u8]) -> Option<UnsafeLine> {
        self.gate.refuses_line(text).or_else(|| {
            (self.identity == ClientIdentity::Xclient && text.contains(&b'\r'))
                .then_some(UnsafeLine::BareCr)
        })
    }

    fn command(&mut self, line: &[u8], out: &mut Output) -> Next {
        let text = trim_eol(line);
        let (verb, argument) = lenient_command(text);
        let verb = verb.to_ascii_uppercase();
        if let Some(found) = self.unsafe_line(text) {
            let reply = match found {
                UnsafeLine::Nul => NUL_IN_LINE,
                UnsafeLine::BareCr => BARE_CR,
            };
            return self.refuse(&verb, argument, reply, "other", out);
        }
        if !self.allowed(&verb) {
            return self.refuse(&verb, argument, MUST_STARTTLS, command_label(&verb), out);
        }
        match verb.as_slice() {
            b"XCLIENT" | b"XFORWARD" => {
                out.to_client.extend_from_slice(IDENTITY_COMMAND_REFUSED);
                out.refused = Some(command_label(&verb));
                Next::Continue
            }
            b"STARTTLS" => {
                let answer = self.gate.starttls(argument);
                out.to_client
                    .extend_from_slice(answer.reply(&REPLIES.starttls));
                if answer == StartTls::Begin {
                    self.state = State::AwaitTlsHandshake;
                }
                answer.next()
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

    /// Answers a command line with `reply` and forwards nothing. A refused
    /// BDAT's chunk follows the command without waiting for a reply (RFC
    /// 3030): it is data, to be thrown away unread; a chunk whose size
    /// cannot be read cannot be skipped, and the session closes.
    fn refuse(
        &mut self,
        verb: &[u8],
        argument: &[u8],
        reply: &'static [u8],
        label: &'static str,
        out: &mut Output,
    ) -> Next {
        out.to_client.extend_from_slice(reply);
        out.refused = Some(label);
        if verb == b"BDAT" {
            match bdat_size(argument) {
                Some(size) => out.skip_client_bytes = size,
                None => {
                    self.state = State::Done;
                    return Next::Close;
                }
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

    fn relay_collected(&self, out: &mut Output) {
        for line in self.collected_lines() {
            out.to_client.extend_from_slice(line);
        }
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
        self.gate.tls_established();
        self.state = State::Idle;
        // Before TLS the session may have been relayed command by command
        // (require_tls); after it, only XCLIENT mode keeps doing so.
        self.relaying = self.relaying && self.identity == ClientIdentity::Xclient;
    }

    fn goodbye(&mut self, reason: Goodbye, out: &mut Output) {
        REPLIES.write_goodbye(reason, self.state == State::AwaitTlsHandshake, out);
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
