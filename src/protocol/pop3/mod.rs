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
//! The listener's [`RequireTls`] policy changes steps 2 and 3 before TLS on a
//! STARTTLS listener (and only there):
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

use super::{
    command_label, lenient_verb, split_word, trim_eol, BackendFailure, Goodbye, Inspector, Next,
    Output, RequireTls, TlsMode,
};

/// Reply to a client whose backend cannot be reached (RFC 3206 response code).
pub const SERVICE_UNAVAILABLE: &[u8] = b"-ERR [SYS/TEMP] Backend server not available\r\n";
/// Reply to a client line over the cap, before the connection is closed.
pub const LINE_TOO_LONG: &[u8] = b"-ERR Line too long\r\n";
/// Goodbyes for sessions the proxy ends during inspection.
pub const TOO_MANY_COMMANDS: &[u8] = b"-ERR Too many commands\r\n";
pub const IDLE_TIMEOUT: &[u8] = b"-ERR Idle timeout\r\n";
pub const SHUTTING_DOWN: &[u8] = b"-ERR [SYS/TEMP] Server shutting down\r\n";
/// Reply to STLS; the handshake starts right after it.
pub const BEGIN_TLS: &[u8] = b"+OK Begin TLS negotiation\r\n";
/// Reply to STLS once TLS is already active (RFC 2595 section 4 wording).
pub const TLS_ALREADY_ACTIVE: &[u8] = b"-ERR Command not permitted when TLS active\r\n";
/// Reply to STLS with arguments.
pub const STLS_SYNTAX: &[u8] = b"-ERR STLS takes no arguments\r\n";
/// The capability line the proxy adds to CAPA replies before TLS.
pub const STLS_CAPABILITY: &[u8] = b"STLS\r\n";
/// The CAPA reply served before TLS when the backend does not know CAPA.
pub const SYNTHESIZED_CAPA: &[u8] = b"+OK Capability list follows\r\nSTLS\r\n.\r\n";
/// Reply to USER, PASS, APOP and AUTH refused by the listener's policy
/// before TLS (RFC 3206 response code).
pub const AUTH_BEFORE_TLS: &[u8] = b"-ERR [AUTH] Must issue STLS command first\r\n";
/// Reply to other commands refused by the policy before TLS.
pub const COMMAND_BEFORE_TLS: &[u8] = b"-ERR Must issue STLS command first\r\n";

/// The commands that carry credentials.
const CREDENTIAL_COMMANDS: &[&[u8]] = &[b"USER", b"PASS", b"APOP", b"AUTH"];
/// The capability lines hidden before TLS under a restricting policy.
const CREDENTIAL_CAPABILITIES: &[&[u8]] = &[b"USER", b"SASL"];

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
pub struct Pop3Inspector {
    mode: TlsMode,
    /// The listener's policy for commands before TLS.
    require_tls: RequireTls,
    tls_active: bool,
    state: State,
}

impl Pop3Inspector {
    pub fn new(mode: TlsMode, require_tls: RequireTls) -> Self {
        Self {
            mode,
            require_tls,
            tls_active: mode == TlsMode::Implicit,
            state: State::ExpectGreeting,
        }
    }

    /// Whether CAPA replies must offer the proxy's STLS right now.
    fn offers_starttls(&self) -> bool {
        self.mode == TlsMode::StartTls && !self.tls_active
    }

    /// Whether the listener's policy restricts the dialogue right now.
    fn restricted(&self) -> bool {
        self.offers_starttls() && self.require_tls != RequireTls::None
    }

    fn command(&mut self, line: &[u8], out: &mut Output) -> Next {
        let text = trim_eol(line);
        let (keyword, argument) = split_word(text);
        // A bare CR inside the line could end a command for a lenient
        // backend and start another one (a USER) it would read in clear.
        if self.restricted() && text.contains(&b'\r') {
            return self.refuse(text, out);
        }
        if keyword.eq_ignore_ascii_case(b"STLS") {
            if !argument.is_empty() {
                out.to_client.extend_from_slice(STLS_SYNTAX);
                Next::Continue
            } else if self.tls_active {
                out.to_client.extend_from_slice(TLS_ALREADY_ACTIVE);
                Next::Continue
            } else {
                out.to_client.extend_from_slice(BEGIN_TLS);
                self.state = State::AwaitTlsHandshake;
                Next::StartTls
            }
        } else if keyword.eq_ignore_ascii_case(b"CAPA") {
            out.to_backend.extend_from_slice(line);
            self.state = State::ExpectCapaStatus;
            Next::Continue
        } else if keyword.eq_ignore_ascii_case(b"QUIT") {
            out.to_backend.extend_from_slice(line);
            self.state = State::ExpectStatus;
            Next::Continue
        } else if self.restricted() {
            if self.require_tls == RequireTls::All
                || is_one_of(lenient_verb(text), CREDENTIAL_COMMANDS)
            {
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

    fn capa_status(&mut self, line: &[u8], out: &mut Output) {
        if is_ok(line) {
            out.to_client.extend_from_slice(line);
            self.state = State::CapaBody;
            return;
        }
        // `-ERR` (or anything that is not `+OK`): a backend without CAPA.
        if self.offers_starttls() {
            out.to_client.extend_from_slice(SYNTHESIZED_CAPA);
        } else {
            out.to_client.extend_from_slice(line);
        }
        self.state = State::Idle;
    }

    fn capa_body(&mut self, line: &[u8], out: &mut Output) {
        let text = trim_eol(line);
        if text == b"." {
            if self.offers_starttls() {
                out.to_client.extend_from_slice(STLS_CAPABILITY);
            }
            out.to_client.extend_from_slice(line);
            self.state = State::Idle;
        } else if split_word(text).0.eq_ignore_ascii_case(b"STLS")
            || (self.restricted() && is_one_of(lenient_verb(text), CREDENTIAL_CAPABILITIES))
        {
            // Dropped: the backend's STLS, and the ways to log in that the
            // policy does not allow before TLS.
        } else {
            // Dot-stuffed lines (`..`) are data and relayed as they are.
            out.to_client.extend_from_slice(line);
        }
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

#[cfg(test)]
mod tests {
    #[test]
    fn user_behind_a_vertical_tab_or_form_feed_is_refused_before_tls() {
        for line in [&b"\x0bUSER joe\r\n"[..], b"\x0cUSER joe\r\n"] {
            let mut machine = Pop3Inspector::new(TlsMode::StartTls, RequireTls::Auth);
            backend(&mut machine, b"+OK ready\r\n");
            let (to_client, to_backend, _) = client(&mut machine, line);
            assert_eq!(to_backend, b"", "{line:?}");
            assert!(to_client.starts_with(b"-ERR"), "{line:?}");
        }
    }

    use super::*;

    use crate::protocol::testing::{backend, client};

    fn greeted(mode: TlsMode) -> Pop3Inspector {
        let mut machine = Pop3Inspector::new(mode, RequireTls::None);
        assert!(!machine.wants_client_line());
        let (to_client, _, next) = backend(
            &mut machine,
            b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n",
        );
        assert_eq!(
            (to_client.as_slice(), next),
            (
                &b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"[..],
                Next::Continue
            )
        );
        assert!(machine.wants_client_line());
        machine
    }

    /// A greeted STARTTLS-mode machine after STLS and the handshake.
    fn upgraded() -> Pop3Inspector {
        let mut machine = greeted(TlsMode::StartTls);
        let (_, _, next) = client(&mut machine, b"STLS\r\n");
        assert_eq!(next, Next::StartTls);
        machine.tls_established();
        machine
    }

    /// Sends CAPA and the backend's reply; returns what the client got.
    fn capa(machine: &mut Pop3Inspector, reply: &[u8]) -> Vec<u8> {
        let (to_client, to_backend, next) = client(machine, b"CAPA\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], &b"CAPA\r\n"[..], Next::Continue)
        );
        assert!(!machine.wants_client_line());
        let (to_client, to_backend, next) = backend(machine, reply);
        assert_eq!((to_backend.as_slice(), next), (&b""[..], Next::Continue));
        assert!(machine.wants_client_line());
        to_client
    }

    #[test]
    fn capa_reply_gains_stls_before_its_terminator() {
        let mut machine = greeted(TlsMode::StartTls);
        let to_client = capa(
            &mut machine,
            b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN\r\nUIDL\r\n.\r\n",
        );
        assert_eq!(
            to_client,
            b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN\r\nUIDL\r\nSTLS\r\n.\r\n"
        );
    }

    #[test]
    fn backend_stls_is_replaced_by_the_proxys_own() {
        let mut machine = greeted(TlsMode::StartTls);
        let to_client = capa(&mut machine, b"+OK\r\nstls\r\nTOP\r\nSTLS extra\r\n.\r\n");
        assert_eq!(to_client, b"+OK\r\nTOP\r\nSTLS\r\n.\r\n");
    }

    #[test]
    fn implicit_tls_strips_backend_stls() {
        let mut machine = greeted(TlsMode::Implicit);
        let to_client = capa(&mut machine, b"+OK\nTOP\nSTLS\nUIDL\n.\n");
        assert_eq!(to_client, b"+OK\nTOP\nUIDL\n.\n");
    }

    #[test]
    fn dot_stuffed_lines_are_data_and_relayed() {
        let mut machine = greeted(TlsMode::StartTls);
        let (_, _, _) = client(&mut machine, b"capa\r\n");
        let (to_client, _, _) = backend(&mut machine, b"+OK\r\n..\r\n..STLS\r\n. \r\n");
        assert_eq!(to_client, b"+OK\r\n..\r\n..STLS\r\n. \r\n");
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(&mut machine, b".\r\n");
        assert_eq!(to_client, b"STLS\r\n.\r\n");
        assert!(machine.wants_client_line());
    }

    #[test]
    fn capa_error_before_tls_becomes_a_list_offering_stls() {
        let mut machine = greeted(TlsMode::StartTls);
        let to_client = capa(&mut machine, b"-ERR unknown command\r\n");
        assert_eq!(to_client, b"+OK Capability list follows\r\nSTLS\r\n.\r\n");
    }

    #[test]
    fn capa_error_after_tls_and_on_implicit_is_relayed() {
        let mut machine = upgraded();
        let to_client = capa(&mut machine, b"-ERR unknown command\r\n");
        assert_eq!(to_client, b"-ERR unknown command\r\n");

        let mut machine = greeted(TlsMode::Implicit);
        let to_client = capa(&mut machine, b"-ERR what?\n");
        assert_eq!(to_client, b"-ERR what?\n");
    }

    #[test]
    fn after_tls_capa_has_no_stls() {
        let mut machine = upgraded();
        assert!(machine.wants_client_line());
        let to_client = capa(&mut machine, b"+OK\r\nSTLS\r\nUSER\r\n.\r\n");
        assert_eq!(to_client, b"+OK\r\nUSER\r\n.\r\n");
    }

    #[test]
    fn stls_is_answered_locally_and_never_forwarded() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, to_backend, next) = client(&mut machine, b"stls\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (
                &b"+OK Begin TLS negotiation\r\n"[..],
                &b""[..],
                Next::StartTls
            )
        );
        assert!(!machine.wants_client_line());
    }

    #[test]
    fn backend_lines_after_the_stls_reply_are_dropped() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"STLS\r\n");
        let (to_client, _, _) = backend(&mut machine, b"+OK injected\r\n");
        assert_eq!(to_client, b"");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn second_stls_and_stls_on_implicit_are_refused() {
        let mut machine = upgraded();
        let (to_client, to_backend, next) = client(&mut machine, b"STLS\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (
                &b"-ERR Command not permitted when TLS active\r\n"[..],
                &b""[..],
                Next::Continue
            )
        );
        assert!(machine.wants_client_line());

        let mut machine = greeted(TlsMode::Implicit);
        let (to_client, _, next) = client(&mut machine, b"Stls\n");
        assert_eq!(
            (to_client.as_slice(), next),
            (TLS_ALREADY_ACTIVE, Next::Continue)
        );
    }

    #[test]
    fn stls_with_arguments_is_refused() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, to_backend, next) = client(&mut machine, b"STLS now\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (
                &b"-ERR STLS takes no arguments\r\n"[..],
                &b""[..],
                Next::Continue
            )
        );
        assert!(machine.wants_client_line());
    }

    #[test]
    fn other_commands_are_forwarded_verbatim_and_end_inspection() {
        for command in [
            &b"USER joe\r\n"[..],
            b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n",
            b"AUTH PLAIN\r\n",
            b"garbage \xff\r\n",
            b"\r\n",
        ] {
            let mut machine = greeted(TlsMode::StartTls);
            let (to_client, to_backend, next) = client(&mut machine, command);
            assert_eq!(
                (to_client.as_slice(), to_backend.as_slice(), next),
                (&b""[..], command, Next::Passthrough)
            );
            assert!(!machine.wants_client_line());
            let (to_client, _, _) = backend(&mut machine, b"+OK\r\n");
            assert_eq!(to_client, b"");
        }
    }

    #[test]
    fn quit_is_relayed_and_the_backend_closing_gets_no_error() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, to_backend, next) = client(&mut machine, b"QUIT\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], &b"QUIT\r\n"[..], Next::Continue)
        );
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(&mut machine, b"+OK dewey POP3 server signing off\r\n");
        assert_eq!(to_client, b"+OK dewey POP3 server signing off\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn unsolicited_lines_in_idle_are_relayed() {
        let mut machine = greeted(TlsMode::StartTls);
        let (to_client, _, _) = backend(&mut machine, b"-ERR autologout\r\n");
        assert_eq!(to_client, b"-ERR autologout\r\n");
        assert!(machine.wants_client_line());
    }

    #[test]
    fn negative_greeting_is_relayed_and_nothing_more() {
        let mut machine = Pop3Inspector::new(TlsMode::StartTls, RequireTls::None);
        let (to_client, _, next) = backend(&mut machine, b"-ERR too many connections\r\n");
        assert_eq!(
            (to_client.as_slice(), next),
            (&b"-ERR too many connections\r\n"[..], Next::Continue)
        );
        assert!(!machine.wants_client_line());
        let (to_client, _, _) = backend(&mut machine, b"+OK late\r\n");
        assert_eq!(to_client, b"");
    }

    #[test]
    fn overlong_client_line_gets_an_error() {
        let mut machine = greeted(TlsMode::StartTls);
        let mut out = Output::default();
        machine.goodbye(Goodbye::LineTooLong, &mut out);
        assert_eq!(out.to_client, b"-ERR Line too long\r\n");
        assert!(!machine.wants_client_line());
    }

    #[test]
    fn backend_failure_gets_sys_temp_unless_inspection_is_over() {
        let mut machine = Pop3Inspector::new(TlsMode::StartTls, RequireTls::None);
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Unreachable, &mut out);
        assert_eq!(
            out.to_client,
            b"-ERR [SYS/TEMP] Backend server not available\r\n"
        );

        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"CAPA\r\n");
        backend(&mut machine, b"+OK\r\nTOP\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert_eq!(out.to_client, SERVICE_UNAVAILABLE);
        assert!(!machine.wants_client_line());

        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"USER joe\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn client_lines_are_ignored_unless_idle() {
        let mut machine = greeted(TlsMode::StartTls);
        client(&mut machine, b"CAPA\r\n");
        let (to_client, to_backend, next) = client(&mut machine, b"STLS\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], &b""[..], Next::Continue)
        );
    }

    const POLICIES: [RequireTls; 3] = [RequireTls::Auth, RequireTls::All, RequireTls::None];

    /// A greeted STARTTLS-mode machine under `policy`.
    fn with_policy(policy: RequireTls) -> Pop3Inspector {
        let mut machine = Pop3Inspector::new(TlsMode::StartTls, policy);
        backend(&mut machine, b"+OK ready\r\n");
        assert!(machine.wants_client_line());
        machine
    }

    /// Feeds one client line and returns the whole [`Output`] and `Next`.
    fn client_out(machine: &mut Pop3Inspector, line: &[u8]) -> (Output, Next) {
        let mut out = Output::default();
        let next = machine.client_line(line, &mut out);
        (out, next)
    }

    const CAPA_WITH_LOGINS: &[u8] = b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\nuser\r\nsasl\tLOGIN\r\nUIDL\r\nAUTH-RESP-CODE\r\n.\r\n";
    const CAPA_WITHOUT_STLS: &[u8] = b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN\r\nuser\r\nsasl\tLOGIN\r\nUIDL\r\nAUTH-RESP-CODE\r\n.\r\n";

    #[test]
    fn capa_under_each_policy_and_after_tls() {
        for (policy, expected) in [
            (
                RequireTls::Auth,
                &b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nAUTH-RESP-CODE\r\nSTLS\r\n.\r\n"[..],
            ),
            (
                RequireTls::All,
                b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nAUTH-RESP-CODE\r\nSTLS\r\n.\r\n",
            ),
            (
                RequireTls::None,
                b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN\r\nuser\r\nsasl\tLOGIN\r\nUIDL\r\nAUTH-RESP-CODE\r\nSTLS\r\n.\r\n",
            ),
        ] {
            let mut machine = with_policy(policy);
            assert_eq!(capa(&mut machine, CAPA_WITH_LOGINS), expected, "{policy:?}");
            // A backend without CAPA: the synthesized list is the same.
            assert_eq!(capa(&mut machine, b"-ERR unknown\r\n"), SYNTHESIZED_CAPA);

            // The backend never receives STLS; after TLS the list is the
            // backend's minus STLS.
            let (to_client, to_backend, next) = client(&mut machine, b"STLS\r\n");
            assert_eq!(
                (to_client.as_slice(), to_backend.as_slice(), next),
                (BEGIN_TLS, &b""[..], Next::StartTls)
            );
            machine.tls_established();
            assert_eq!(capa(&mut machine, CAPA_WITH_LOGINS), CAPA_WITHOUT_STLS, "{policy:?}");
        }
    }

    #[test]
    fn implicit_listeners_ignore_the_policy() {
        for policy in POLICIES {
            let mut machine = Pop3Inspector::new(TlsMode::Implicit, policy);
            backend(&mut machine, b"+OK ready\r\n");
            assert_eq!(capa(&mut machine, CAPA_WITH_LOGINS), CAPA_WITHOUT_STLS);
            let (out, next) = client_out(&mut machine, b"USER joe\r\n");
            assert_eq!(
                (out.to_backend.as_slice(), next, out.refused),
                (&b"USER joe\r\n"[..], Next::Passthrough, None)
            );
        }
    }

    #[test]
    fn credential_commands_are_refused_before_tls_under_auth_and_all() {
        for policy in [RequireTls::Auth, RequireTls::All] {
            for (command, label) in [
                (&b"USER joe\r\n"[..], "USER"),
                (b"PASS secret\r\n", "PASS"),
                (b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n", "APOP"),
                (b"AUTH PLAIN AGpvZQBzZWNyZXQ=\r\n", "AUTH"),
                (b"auth\n", "AUTH"),
                // What a lenient backend might still read as USER.
                (b"USER\tjoe\r\n", "USER"),
                (b" user joe\r\n", "USER"),
            ] {
                let mut machine = with_policy(policy);
                let (out, next) = client_out(&mut machine, command);
                assert_eq!(
                    (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                    (
                        &b"-ERR [AUTH] Must issue STLS command first\r\n"[..],
                        &b""[..],
                        Next::Continue
                    ),
                    "{policy:?} {:?}",
                    String::from_utf8_lossy(command)
                );
                assert_eq!(out.refused, Some(label));
                assert!(machine.wants_client_line());
            }
        }
    }

    #[test]
    fn other_commands_are_forwarded_and_their_status_awaited_under_auth() {
        let mut machine = with_policy(RequireTls::Auth);
        for (command, reply) in [
            (
                &b"STAT\r\n"[..],
                &b"-ERR Unknown command in AUTHORIZATION state\r\n"[..],
            ),
            (b"NOOP\r\n", b"-ERR not now\r\n"),
            (b"garbage \xff\r\n", b"-ERR Unknown command\r\n"),
            (b"\r\n", b"-ERR Unknown command\r\n"),
        ] {
            let (out, next) = client_out(&mut machine, command);
            assert_eq!(
                (
                    out.to_client.as_slice(),
                    out.to_backend.as_slice(),
                    next,
                    out.refused
                ),
                (&b""[..], command, Next::Continue, None)
            );
            assert!(!machine.wants_client_line());
            let (to_client, _, next) = backend(&mut machine, reply);
            assert_eq!((to_client.as_slice(), next), (reply, Next::Continue));
            assert!(machine.wants_client_line());
        }
        // Inspection goes on: a USER after them is still refused.
        let (out, _) = client_out(&mut machine, b"USER joe\r\n");
        assert_eq!(
            (out.to_backend.as_slice(), out.refused),
            (&b""[..], Some("USER"))
        );

        // A backend failing while the status is awaited is reported.
        client(&mut machine, b"STAT\r\n");
        let mut out = Output::default();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        assert_eq!(out.to_client, SERVICE_UNAVAILABLE);
    }

    #[test]
    fn lines_with_a_bare_cr_are_refused_before_tls_under_a_policy() {
        for policy in [RequireTls::Auth, RequireTls::All] {
            for (command, reply) in [
                (&b"NOOP\rUSER joe\r\n"[..], COMMAND_BEFORE_TLS),
                (b"CAPA x\rUSER joe\r\n", COMMAND_BEFORE_TLS),
                (b"USER joe\rPASS secret\r\n", AUTH_BEFORE_TLS),
            ] {
                let mut machine = with_policy(policy);
                let (out, next) = client_out(&mut machine, command);
                assert_eq!(
                    (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                    (reply, &b""[..], Next::Continue)
                );
            }
        }
    }

    #[test]
    fn require_tls_all_serves_only_the_road_to_tls() {
        let mut machine = with_policy(RequireTls::All);
        for (command, reply, label) in [
            (
                &b"STAT\r\n"[..],
                &b"-ERR Must issue STLS command first\r\n"[..],
                "STAT",
            ),
            (
                b"RETR 1\r\n",
                b"-ERR Must issue STLS command first\r\n",
                "RETR",
            ),
            (
                b"garbage\r\n",
                b"-ERR Must issue STLS command first\r\n",
                "other",
            ),
            (
                b"USER joe\r\n",
                b"-ERR [AUTH] Must issue STLS command first\r\n",
                "USER",
            ),
            (
                b"PASS secret\r\n",
                b"-ERR [AUTH] Must issue STLS command first\r\n",
                "PASS",
            ),
        ] {
            let (out, next) = client_out(&mut machine, command);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (reply, &b""[..], Next::Continue)
            );
            assert_eq!(out.refused, Some(label));
            assert!(machine.wants_client_line());
        }
        capa(&mut machine, b"+OK\r\nTOP\r\n.\r\n");
        let (to_client, to_backend, next) = client(&mut machine, b"STLS\r\n");
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (BEGIN_TLS, &b""[..], Next::StartTls)
        );

        let mut machine = with_policy(RequireTls::All);
        let (_, to_backend, _) = client(&mut machine, b"QUIT\r\n");
        assert_eq!(to_backend, b"QUIT\r\n");
    }

    #[test]
    fn after_tls_user_is_forwarded_and_ends_inspection() {
        for policy in POLICIES {
            let mut machine = with_policy(policy);
            client(&mut machine, b"STLS\r\n");
            machine.tls_established();
            let (out, next) = client_out(&mut machine, b"USER joe\r\n");
            assert_eq!(
                (
                    out.to_client.as_slice(),
                    out.to_backend.as_slice(),
                    next,
                    out.refused
                ),
                (&b""[..], &b"USER joe\r\n"[..], Next::Passthrough, None)
            );
        }
    }

    /// Whether a line starts, as a lenient peer might read it (leading
    /// blanks skipped, case ignored, not followed by a letter), with one of
    /// `words`. Written apart from the machine's own helpers.
    fn starts_with_word(line: &[u8], words: &[&[u8]]) -> bool {
        let upper = line.to_ascii_uppercase();
        let start = upper
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .unwrap_or(upper.len());
        let rest = &upper[start..];
        words.iter().any(|word| {
            rest.starts_with(word) && !rest.get(word.len()).is_some_and(u8::is_ascii_alphabetic)
        })
    }

    /// Whether bytes sent to the backend hold a command carrying
    /// credentials in any segment between CRs and LFs.
    fn carries_credentials(to_backend: &[u8]) -> bool {
        to_backend
            .split(|&b| b == b'\r' || b == b'\n')
            .any(|segment| starts_with_word(segment, &[b"USER", b"PASS", b"APOP", b"AUTH"]))
    }

    #[test]
    fn carries_credentials_sees_what_a_lenient_backend_would() {
        assert!(carries_credentials(b"USER joe\r\n"));
        assert!(carries_credentials(b" pass\tx\r\n"));
        assert!(carries_credentials(b"NOOP\rAPOP x y\r\n"));
        assert!(!carries_credentials(b"USERS\r\n"));
        assert!(!carries_credentials(b"STAT USER\r\n"));
    }

    /// Collects what the client gets for each CAPA and checks the finished
    /// list: it offers STLS exactly once, last, when the machine offers it
    /// and the list is the backend's or the synthesized one; it never
    /// contains STLS otherwise; and while the policy restricts the dialogue
    /// it has no USER or SASL line.
    #[derive(Default)]
    struct CapaChecker {
        reply: Vec<u8>,
        /// The offer and restriction in force when the reply started;
        /// `None` when no reply is being collected or TLS came up in its
        /// middle.
        offer: Option<(bool, bool)>,
    }

    impl CapaChecker {
        fn observe(
            &mut self,
            before: State,
            after: State,
            (offer, restricted): (bool, bool),
            to_client: &[u8],
        ) -> Result<(), String> {
            if !matches!(before, State::ExpectCapaStatus | State::CapaBody) {
                return Ok(());
            }
            if before == State::ExpectCapaStatus {
                self.reply.clear();
                self.offer = Some((offer, restricted));
            }
            self.reply.extend_from_slice(to_client);
            if after != State::Idle {
                return Ok(());
            }
            let Some((offer, restricted)) = self.offer.take() else {
                return Ok(());
            };
            let lines: Vec<&[u8]> = self.reply.split_inclusive(|&b| b == b'\n').collect();
            let Some((status, body)) = lines.split_first() else {
                return Err(format!("offer={offer}: empty CAPA reply"));
            };
            let stls: Vec<usize> = body
                .iter()
                .enumerate()
                .filter(|(_, line)| split_word(trim_eol(line)).0.eq_ignore_ascii_case(b"STLS"))
                .map(|(index, _)| index)
                .collect();
            let ok = match (offer, is_ok(status)) {
                (true, true) => {
                    stls.len() == 1 && stls[0] + 2 == body.len() && body[stls[0]] == STLS_CAPABILITY
                }
                (true, false) => false,
                (false, _) => stls.is_empty(),
            };
            let logins = body
                .iter()
                .any(|line| starts_with_word(trim_eol(line), &[b"USER", b"SASL"]));
            if ok && !(restricted && logins) {
                Ok(())
            } else {
                Err(format!(
                    "offer={offer} restricted={restricted} reply={:?}",
                    String::from_utf8_lossy(&self.reply)
                ))
            }
        }
    }

    /// A line made of protocol pieces (mostly) or of random bytes.
    fn line_from(pieces: Vec<&'static [u8]>) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let words = pieces.clone();
        prop_oneof![
            4 => prop::sample::select(pieces).prop_map(<[u8]>::to_vec),
            1 => proptest::collection::vec(prop::sample::select(words), 0..4).prop_map(|words| words.join(&b' ')),
            1 => proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    /// One step of a random dialogue: whether it feeds what the machine
    /// waits for (else the side picked by `from_client`), a client line, a
    /// backend status line, a capability line, and the terminator.
    #[allow(clippy::type_complexity)]
    fn step(
    ) -> impl proptest::strategy::Strategy<Value = (bool, bool, Vec<u8>, Vec<u8>, Vec<u8>, bool)>
    {
        use proptest::prelude::*;
        let client = line_from(vec![
            b"CAPA",
            b"capa",
            b"CAPA x",
            b"STLS",
            b"stls",
            b"STLS x",
            b"QUIT",
            b"USER joe",
            b"PASS secret",
            b"APOP mrose abc",
            b"AUTH PLAIN",
            b"auth",
            b"USER\tjoe",
            b" user joe",
            b"NOOP\rUSER joe",
            b"CAPA\rPASS x",
            b"STAT",
            b"",
        ]);
        let status = line_from(vec![b"+OK", b"+OK ready", b"+ok", b"+OK", b"-ERR no"]);
        let capability = line_from(vec![
            b".",
            b".",
            b"STLS",
            b"stls",
            b"STLS x",
            b"..",
            b"..STLS",
            b". ",
            b"TOP",
            b"SASL PLAIN",
            b"sasl\tLOGIN",
            b"USER",
            b"user",
            b" USER",
            b"USERX",
            b"",
            b"\xff",
        ]);
        (
            prop::bool::weighted(0.8),
            any::<bool>(),
            client,
            status,
            capability,
            any::<bool>(),
        )
    }

    proptest::proptest! {
        #[test]
        fn no_byte_input_panics_and_the_policy_holds(
            implicit in proptest::prelude::any::<bool>(),
            policy in proptest::sample::select(POLICIES.to_vec()),
            steps in proptest::collection::vec(step(), 0..48),
        ) {
            let mode = if implicit { TlsMode::Implicit } else { TlsMode::StartTls };
            let mut machine = Pop3Inspector::new(mode, policy);
            let mut checker = CapaChecker::default();
            let mut out = Output::default();
            let mut upgraded = false;
            for (index, (follow, from_client, client_line, status_line, capability_line, crlf)) in
                steps.into_iter().enumerate()
            {
                let from_client = if follow { machine.wants_client_line() } else { from_client };
                let mut line = if from_client {
                    client_line
                } else if machine.state == State::CapaBody || (!follow && crlf) {
                    capability_line
                } else {
                    status_line
                };
                // The driver hands out LF-terminated lines with no LF inside.
                line.retain(|&b| b != b'\n');
                line.extend_from_slice(if crlf { &b"\r\n"[..] } else { b"\n" });
                // Tracked here, not asked of the machine.
                let offer = !implicit && !upgraded;
                let restricted = offer && policy != RequireTls::None;
                let before = machine.state;
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
                        proptest::prop_assert!(starts_with_word(&out.to_backend, &[b"CAPA", b"QUIT"]));
                    }
                    next
                } else {
                    let next = machine.backend_line(&line, &mut out);
                    proptest::prop_assert!(out.to_backend.is_empty());
                    if let Err(message) = checker.observe(before, machine.state, (offer, restricted), &out.to_client) {
                        proptest::prop_assert!(false, "{}", message);
                    }
                    next
                };
                // Upgrades when asked to, and once more at an arbitrary point.
                if next == Next::StartTls || index == 24 {
                    machine.tls_established();
                    upgraded = true;
                    checker.offer = None;
                }
            }
            out.clear();
            machine.goodbye(Goodbye::LineTooLong, &mut out);
            machine.backend_failed(BackendFailure::Closed, &mut out);
        }
    }
}
