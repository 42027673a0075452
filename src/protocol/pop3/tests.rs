use super::*;
use crate::protocol::contract::Fixture;
use crate::protocol::testing::{backend, client};
use crate::protocol::{RequireTls, TlsMode};

/// What the machine contract test ([`crate::protocol::contract`]) drives
/// this machine with.
pub(crate) const FIXTURE: Fixture = Fixture {
    greeting: b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n",
    starttls: &[b"STLS\r\n", b"stls\r\n", b"Stls\n"],
    starttls_with_argument: b"STLS now\r\n",
    tagged: false,
    inspected: (b"CAPA\r\n", b"+OK\r\nTOP\r\n.\r\n"),
    passthrough: &[
        b"USER joe\r\n",
        b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n",
        b"AUTH PLAIN\r\n",
        b"garbage \xff\r\n",
        b"\r\n",
    ],
    credentials: b"USER joe\r\n",
    unsolicited: b"-ERR autologout\r\n",
    words: [
        "+OK Begin TLS negotiation\r\n",
        "-ERR Command not permitted when TLS active\r\n",
        "-ERR STLS takes no arguments\r\n",
        "-ERR [SYS/TEMP] Backend server not available\r\n",
        "-ERR Line too long\r\n",
        "-ERR Too many commands\r\n",
        "-ERR Idle timeout\r\n",
        "-ERR [SYS/TEMP] Server shutting down\r\n",
        "-ERR [SYS/TEMP] Too many connections, try again later\r\n",
        "-ERR PROXY protocol headers are not accepted from clients\r\n",
        "-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n",
    ],
    error_replies: &[(b"-ERR no\r\n", true), (b"+OK\r\n", false)],
    client_lines: &[
        b"CAPA",
        b"STLS",
        b"stls x",
        b"STLS\0",
        b"QUIT",
        b"USER joe",
        b"PASS secret",
        b"APOP mrose abc",
        b"AUTH PLAIN",
        b"USER\tjoe",
        b"NOOP\rUSER joe",
        b"STAT",
        b"",
    ],
    backend_lines: &[
        b"+OK ready",
        b"-ERR no",
        b"TOP",
        b"STLS",
        b"USER",
        b"SASL PLAIN",
        b"..",
        b".",
        b"garbage",
    ],
};

#[test]
fn user_behind_a_vertical_tab_or_form_feed_is_refused_before_tls() {
    for line in [&b"\x0bUSER joe\r\n"[..], b"\x0cUSER joe\r\n"] {
        let mut machine =
            Pop3Inspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::Auth));
        backend(&mut machine, b"+OK ready\r\n");
        let (to_client, to_backend, _) = client(&mut machine, line);
        assert_eq!(to_backend, b"", "{line:?}");
        assert!(to_client.starts_with(b"-ERR"), "{line:?}");
    }
}

fn greeted(mode: TlsMode) -> Pop3Inspector {
    let mut machine = Pop3Inspector::new(&InspectorOptions::new(mode, RequireTls::None));
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
fn negative_greeting_is_relayed_and_nothing_more() {
    let mut machine =
        Pop3Inspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
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
fn a_backend_failing_in_the_middle_of_a_capa_list_gets_sys_temp() {
    let mut machine = greeted(TlsMode::StartTls);
    client(&mut machine, b"CAPA\r\n");
    backend(&mut machine, b"+OK\r\nTOP\r\n");
    let mut out = Output::default();
    machine.backend_failed(BackendFailure::Closed, &mut out);
    assert_eq!(out.to_client, SERVICE_UNAVAILABLE);
    assert!(!machine.wants_client_line());
}

const POLICIES: [RequireTls; 3] = [RequireTls::Auth, RequireTls::All, RequireTls::None];

/// A greeted STARTTLS-mode machine under `policy`.
fn with_policy(policy: RequireTls) -> Pop3Inspector {
    let mut machine = Pop3Inspector::new(&InspectorOptions::new(TlsMode::StartTls, policy));
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
        let mut machine = Pop3Inspector::new(&InspectorOptions::new(TlsMode::Implicit, policy));
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
fn step() -> impl proptest::strategy::Strategy<Value = (bool, bool, Vec<u8>, Vec<u8>, Vec<u8>, bool)>
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
        let mut machine = Pop3Inspector::new(&InspectorOptions::new(mode, policy));
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

#[test]
fn greetings_are_judged_for_the_readiness_check() {
    use crate::protocol::{Greeting::*, Protocol};
    for (line, expected) in [
        (&b"+OK ready\r\n"[..], Good),
        (b"-ERR [SYS/TEMP] busy\r\n", Bad),
    ] {
        assert_eq!(
            Protocol::Pop3.judge_greeting(line),
            expected,
            "{}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn nul_and_bare_cr_lines_are_refused_before_tls_under_every_policy() {
    for policy in POLICIES {
        for (line, reply) in [
            (
                &b"STLS\0\r\n"[..],
                &b"-ERR Must issue STLS command first\r\n"[..],
            ),
            (b"CAPA\0\r\n", b"-ERR Must issue STLS command first\r\n"),
            (b"NOOP\rSTLS\r\n", b"-ERR Must issue STLS command first\r\n"),
            (
                b"USER\0joe\r\n",
                b"-ERR [AUTH] Must issue STLS command first\r\n",
            ),
            (
                b"USER joe\rPASS secret\n",
                b"-ERR [AUTH] Must issue STLS command first\r\n",
            ),
        ] {
            let mut machine = with_policy(policy);
            let (out, next) = client_out(&mut machine, line);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (reply, &b""[..], Next::Continue),
                "{policy:?} {line:?}"
            );
            assert!(out.refused.is_some());
            assert!(machine.wants_client_line());
        }
    }
    // After TLS (and on implicit listeners) the backend judges such lines,
    // but for an STLS in any spelling: that is always the proxy's to answer.
    let mut machine = upgraded();
    let (to_client, to_backend, _) = client(&mut machine, b"NOOP\0\r\n");
    assert_eq!(
        (to_client.as_slice(), to_backend.as_slice()),
        (&b""[..], &b"NOOP\0\r\n"[..])
    );
    let mut machine = upgraded();
    let (to_client, to_backend, _) = client(&mut machine, b"STLS\0\r\n");
    assert_eq!(
        (to_client.as_slice(), to_backend.as_slice()),
        (&b"-ERR STLS takes no arguments\r\n"[..], &b""[..])
    );
    let mut machine = greeted(TlsMode::Implicit);
    let (_, to_backend, _) = client(&mut machine, b"NOOP\rUSER joe\r\n");
    assert_eq!(to_backend, b"NOOP\rUSER joe\r\n");
}

#[test]
fn stls_spelled_for_a_lenient_server_is_answered_never_forwarded() {
    for policy in [RequireTls::Auth, RequireTls::All, RequireTls::None] {
        for line in [
            &b"STLS\tx\r\n"[..],
            b"\tSTLS\r\n",
            b"STLS\x0b\r\n",
            b"stls1\r\n",
        ] {
            let mut machine = with_policy(policy);
            let (out, next) = client_out(&mut machine, line);
            assert_eq!(out.to_backend, b"", "{policy:?} {line:?}");
            assert_eq!(
                out.to_client, b"-ERR STLS takes no arguments\r\n",
                "{line:?}"
            );
            assert_eq!(next, Next::Continue);
        }
    }
}
