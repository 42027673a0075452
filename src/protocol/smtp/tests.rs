use super::*;
use crate::protocol::contract::Fixture;
use crate::protocol::testing::{backend, client};
use crate::protocol::{RequireTls, TlsMode};

/// What the machine contract test ([`crate::protocol::contract`]) drives
/// this machine with.
pub(crate) const FIXTURE: Fixture = Fixture {
    greeting: b"220 mx.example ESMTP\r\n",
    starttls: &[b"STARTTLS\r\n", b"starttls\r\n", b"StartTLS\n"],
    starttls_with_argument: b"STARTTLS now\r\n",
    tagged: false,
    inspected: (
        b"EHLO client.example\r\n",
        b"250-mx.example\r\n250 PIPELINING\r\n",
    ),
    passthrough: &[
        b"MAIL FROM:<a@b>\r\n",
        b"AUTH PLAIN AGFAYg==\r\n",
        b"DATA\r\n",
        b"garbage\r\n",
        b"\r\n",
    ],
    credentials: b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    unsolicited: b"421 4.4.2 mx.example Error: timeout exceeded\r\n",
    words: [
        "220 2.0.0 Ready to start TLS\r\n",
        "503 5.5.1 TLS already active\r\n",
        "501 5.5.4 Syntax error (no parameters allowed)\r\n",
        "421 4.3.2 Service not available, closing transmission channel\r\n",
        "421 4.7.0 Line too long, closing connection\r\n",
        "421 4.7.0 Too many commands, closing connection\r\n",
        "421 4.4.2 Idle timeout, closing connection\r\n",
        "421 4.3.2 Service shutting down, closing connection\r\n",
        "421 4.7.0 Too many connections, try again later\r\n",
        "554 5.7.0 PROXY protocol headers are not accepted from clients\r\n",
        "421 4.3.2 Service temporarily unavailable, try again later\r\n",
    ],
    error_replies: &[
        (b"421 4.3.2 bye\r\n", true),
        (b"554 no\r\n", true),
        (b"220 ready\r\n", false),
        (b"4xx\r\n", false),
    ],
    client_lines: &[
        b"EHLO c",
        b"HELO c",
        b"NOOP",
        b"RSET",
        b"QUIT",
        b"STARTTLS",
        b"starttls x",
        b"STARTTLS\0",
        b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
        b"AUTH\tLOGIN",
        b" auth plain",
        b"NOOP\rAUTH PLAIN x",
        b"MAIL FROM:<a@b>",
        b"RCPT TO:<c@d>",
        b"DATA",
        b"BDAT 5 LAST",
        b"BDAT x",
        b"XCLIENT ADDR=192.0.2.1",
        b".",
        b"",
    ],
    backend_lines: &[
        b"220 mx.example ESMTP",
        b"220-mx.example",
        b"250-mx.example",
        b"250-STARTTLS",
        b"250-AUTH PLAIN LOGIN",
        b"250-XCLIENT NAME ADDR PORT",
        b"250 PIPELINING",
        b"250 2.0.0 Ok",
        b"354 End data with <CR><LF>.<CR><LF>",
        b"334 VXNlcm5hbWU6",
        b"500 5.5.1 unknown",
        b"502 5.5.2 not implemented",
        b"503 5.5.1 bad sequence",
        b"421 4.3.2 bye",
        b"garbage",
    ],
};

fn greeted(mode: TlsMode) -> SmtpInspector {
    let mut machine = SmtpInspector::new(&InspectorOptions::new(mode, RequireTls::None));
    let (to_client, _, _) = backend(&mut machine, b"220 mx.example ESMTP\r\n");
    assert_eq!(to_client, b"220 mx.example ESMTP\r\n");
    assert!(machine.wants_client_line());
    machine
}

#[test]
fn multi_line_greeting_is_relayed_and_waits_for_its_last_line() {
    let mut machine =
        SmtpInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
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
fn helo_only_backend_gets_helo_and_the_client_a_synthesized_ehlo_reply() {
    let mut machine =
        SmtpInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
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
    let (to_client, to_backend, _) = backend(&mut machine, b"501 5.5.4 Syntax: EHLO hostname\r\n");
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
    let mut machine = SmtpInspector::new(&InspectorOptions::new(TlsMode::StartTls, require_tls));
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
    // STARTTLS with a NUL behind it is refused before TLS (the pre-TLS
    // line policy), never begun nor forwarded.
    let mut out = Output::default();
    let next = machine.client_line(b"STARTTLS\0\r\n", &mut out);
    assert_eq!(
        (out.to_client.as_slice(), out.to_backend.as_slice(), next),
        (NUL_IN_LINE, &b""[..], Next::Continue)
    );
    // After TLS it is STARTTLS with an argument.
    let mut machine = with_policy(RequireTls::Auth);
    client(&mut machine, b"STARTTLS\r\n");
    machine.tls_established();
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
        SmtpInspector::new(&InspectorOptions::new(TlsMode::Implicit, RequireTls::All));
    backend(&mut machine, b"220 mx\r\n");
    client(&mut machine, b"EHLO c\r\n");
    let (to_client, _, _) = backend(&mut machine, EHLO_WITH_AUTH);
    assert_eq!(to_client, EHLO_WITH_AUTH);
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
    let mut machine = SmtpInspector::new(&xclient_options("127.0.0.2:40000"));
    backend(&mut machine, b"220 mx.example ESMTP\r\n");
    backend(&mut machine, POSTFIX_EHLO);
    let (to_client, _, _) = backend(&mut machine, b"220 mx.example ESMTP\r\n");
    assert_eq!(to_client, b"220 mx.example ESMTP\r\n");
    assert!(machine.wants_client_line());
    machine
}

#[test]
fn xclient_is_sent_after_the_greeting_and_its_220_becomes_the_greeting() {
    let mut machine = SmtpInspector::new(&xclient_options("127.0.0.2:40000"));
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
        let mut machine = SmtpInspector::new(&xclient_options(client));
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
        let mut machine = SmtpInspector::new(&xclient_options("127.0.0.2:40000"));
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
    let mut machine = SmtpInspector::new(&xclient_options("127.0.0.2:40000"));
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
    let mut machine = SmtpInspector::new(&xclient_options("127.0.0.2:40000"));
    let (to_client, to_backend, _) = backend(&mut machine, b"554 5.7.1 go away\r\n");
    assert_eq!(
        (to_client.as_slice(), to_backend.as_slice()),
        (&b"554 5.7.1 go away\r\n"[..], &b""[..])
    );
}

#[test]
fn the_backend_failing_during_identification_gets_the_client_a_421() {
    let mut machine = SmtpInspector::new(&xclient_options("127.0.0.2:40000"));
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

#[test]
fn greetings_are_judged_for_the_readiness_check() {
    use crate::protocol::{Greeting::*, Protocol};
    for (line, expected) in [
        (&b"220 mx ESMTP\r\n"[..], Good),
        (b"220\r\n", Good),
        (b"220-first\r\n", More),
        (b"421 4.3.2 busy\r\n", Bad),
        (b"554 no\r\n", Bad),
    ] {
        assert_eq!(
            Protocol::Smtp.judge_greeting(line),
            expected,
            "{}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn nul_and_bare_cr_lines_are_refused_before_tls_under_every_policy() {
    const NUL: &[u8] = b"500 5.5.2 Syntax error: NUL in a command line\r\n";
    const CR: &[u8] = b"500 5.5.2 Syntax error: bare CR in a command line\r\n";
    for policy in [RequireTls::Auth, RequireTls::All, RequireTls::None] {
        for (line, reply, next) in [
            (&b"STARTTLS\0\r\n"[..], NUL, Next::Continue),
            (b"NOOP\0\r\n", NUL, Next::Continue),
            (b"AUTH\0PLAIN AGFsaWNlAHNlY3JldA==\r\n", NUL, Next::Continue),
            (b"MAIL FROM:<a@b.example>\0\n", NUL, Next::Continue),
            (b"NOOP\rSTARTTLS\r\n", CR, Next::Continue),
            (b"NOOP\rAUTH PLAIN x\r\n", CR, Next::Continue),
            // A chunk whose size cannot be read cannot be skipped.
            (b"BDAT 3\0\r\n", NUL, Next::Close),
        ] {
            let mut machine = with_policy(policy);
            let mut out = Output::default();
            let result = machine.client_line(line, &mut out);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), result),
                (reply, &b""[..], next),
                "{policy:?} {line:?}"
            );
            assert_eq!(out.refused, Some("other"));
            assert_eq!(machine.wants_client_line(), next == Next::Continue);
        }
    }
    // After TLS (and on implicit listeners) the backend judges such lines.
    let mut machine = with_policy(RequireTls::None);
    client(&mut machine, b"STARTTLS\r\n");
    machine.tls_established();
    let (to_client, to_backend, _) = client(&mut machine, b"NOOP\0\r\n");
    assert_eq!(
        (to_client.as_slice(), to_backend.as_slice()),
        (&b""[..], &b"NOOP\0\r\n"[..])
    );
    let mut machine = greeted(TlsMode::Implicit);
    let (to_client, to_backend, _) = client(&mut machine, b"NOOP\rQUIT\r\n");
    assert_eq!(
        (to_client.as_slice(), to_backend.as_slice()),
        (&b""[..], &b"NOOP\rQUIT\r\n"[..])
    );
}

#[test]
fn xclient_mode_refuses_a_bare_cr_after_tls_too() {
    let mut machine = identified();
    client(&mut machine, b"STARTTLS\r\n");
    machine.tls_established();
    let mut out = Output::default();
    machine.client_line(b"NOOP\rXCLIENT ADDR=192.0.2.1\r\n", &mut out);
    assert_eq!(
        (out.to_client.as_slice(), out.to_backend.as_slice()),
        (BARE_CR, &b""[..])
    );
    // A NUL only cuts a line short: no second command for the backend.
    let (_, to_backend, _) = client(&mut machine, b"NOOP\0\r\n");
    assert_eq!(to_backend, b"NOOP\0\r\n");
}
