use super::*;
use crate::protocol::contract::Fixture;
use crate::protocol::testing::{backend, client};
use crate::protocol::{RequireTls, TlsMode};

/// What the machine contract test ([`crate::protocol::contract`]) drives
/// this machine with.
pub(crate) const FIXTURE: Fixture = Fixture {
    greeting: b"* OK IMAP4rev1 server ready\r\n",
    starttls: &[b"a STARTTLS\r\n", b"a001 starttls\r\n", b"a StartTLS\n"],
    starttls_with_argument: b"a STARTTLS now\r\n",
    tagged: true,
    inspected: (b"a1 NOOP\r\n", b"a1 OK NOOP completed\r\n"),
    passthrough: &[
        b"a LOGIN user pass\r\n",
        b"a AUTHENTICATE PLAIN AGFAYg==\r\n",
        b"a SELECT INBOX\r\n",
        b"garbage\r\n",
        b"\r\n",
        b"* STARTTLS\r\n",
        b"a+ STARTTLS\r\n",
        b"\xff STARTTLS\r\n",
    ],
    credentials: b"a LOGIN alice secret\r\n",
    unsolicited: b"* BYE Autologout; idle for too long\r\n",
    words: [
        "OK Begin TLS negotiation now\r\n",
        "BAD TLS is already active\r\n",
        "BAD STARTTLS takes no arguments\r\n",
        "* BYE [UNAVAILABLE] Backend server not available\r\n",
        "* BYE Line too long\r\n",
        "* BYE Too many commands\r\n",
        "* BYE Autologout; idle for too long\r\n",
        "* BYE [UNAVAILABLE] Server shutting down\r\n",
        "* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
        "* BYE PROXY protocol headers are not accepted from clients\r\n",
        "* BYE [UNAVAILABLE] Service temporarily unavailable, try again later\r\n",
    ],
    error_replies: &[
        (b"* BYE bye\r\n", true),
        (b"a1 NO no\r\n", true),
        (b"a1 bad syntax\r\n", true),
        (b"* OK ready\r\n", false),
        (b"a1 OK done\r\n", false),
    ],
    client_lines: &[
        b"a1 CAPABILITY",
        b"a1 NOOP",
        b"a1 ID NIL",
        b"a1 LOGOUT",
        b"a1 STARTTLS",
        b"a1 starttls x",
        b"a1 STARTTLS\0",
        b"a1 LOGIN alice secret",
        b"a1 LOGIN\talice secret",
        b"a1 LOGIN {5+}",
        b"a1 LOGIN {5}",
        b"a1 NOOP\ra2 LOGIN alice secret",
        b"a1 SELECT INBOX",
        b" {6+}",
        b"* STARTTLS",
        b"",
    ],
    backend_lines: &[
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready",
        b"* OK Waiting for authentication",
        b"* PREAUTH [CAPABILITY IMAP4rev1] hi",
        b"* BYE go away",
        b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN",
        b"a1 OK [CAPABILITY IMAP4rev1 STARTTLS] done",
        b"a1 OK done",
        b"a1 NO no",
        b"+ go on",
        b"garbage",
    ],
};

#[test]
fn a_preauth_greeting_before_tls_is_refused_under_require_tls_all() {
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::All));
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
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
    backend(&mut machine, b"* OK ready\r\n");
    client(&mut machine, b"s STARTTLS\r\n");
    machine.tls_established();
    client(&mut machine, b"b NOOP\r\n");
    let (to_client, _, _) = backend(&mut machine, b"+ [CAPABILITY IMAP4rev1 STARTTLS] go on\r\n");
    assert_eq!(to_client, b"+ [CAPABILITY IMAP4rev1] go on\r\n");
}

#[test]
fn login_behind_any_blanks_after_the_tag_is_refused_before_tls() {
    for line in [
        &b"a \t LOGIN joe secret\r\n"[..],
        b"a \x0bLOGIN joe secret\r\n",
    ] {
        let mut machine =
            ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::Auth));
        backend(&mut machine, b"* OK ready\r\n");
        let (_, to_backend, _) = client(&mut machine, line);
        assert_eq!(to_backend, b"", "{line:?}");
    }
}

fn greeted(mode: TlsMode) -> ImapInspector {
    let mut machine = ImapInspector::new(&InspectorOptions::new(mode, RequireTls::None));
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
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
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
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
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
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::Implicit, RequireTls::None));
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
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
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
fn preauth_greeting_ends_inspection_without_offering_starttls() {
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
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
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
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
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::None));
    let (to_client, _, _) = backend(&mut machine, b"hello?\r\n");
    assert_eq!(to_client, b"hello?\r\n");
    assert!(!machine.wants_client_line());
    backend(&mut machine, b"* OK ready\r\n");
    assert!(machine.wants_client_line());
}

/// A greeted STARTTLS-mode machine under `policy`.
fn with_policy(policy: RequireTls) -> ImapInspector {
    let mut machine = ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, policy));
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
        let mut machine = ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, policy));
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
        let mut machine = ImapInspector::new(&InspectorOptions::new(TlsMode::Implicit, policy));
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
    let mut machine =
        ImapInspector::new(&InspectorOptions::new(TlsMode::StartTls, RequireTls::Auth));
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
                rest.starts_with(verb) && !rest.get(verb.len()).is_some_and(u8::is_ascii_alphabetic)
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
        let mut machine = ImapInspector::new(&InspectorOptions::new(mode, policy));
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

#[test]
fn greetings_are_judged_for_the_readiness_check() {
    use crate::protocol::{Greeting::*, Protocol};
    for (line, expected) in [
        (&b"* OK [CAPABILITY IMAP4rev1] ready\r\n"[..], Good),
        (b"* ok ready\r\n", Good),
        (b"* PREAUTH hi\r\n", Good),
        (b"* BYE go away\r\n", Bad),
    ] {
        assert_eq!(
            Protocol::Imap.judge_greeting(line),
            expected,
            "{}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn nul_and_bare_cr_lines_are_refused_before_tls_under_every_policy() {
    const REFUSED: &[u8] = b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n";
    for policy in POLICIES {
        for (line, skip) in [
            (&b"a STARTTLS\0\r\n"[..], 0),
            (b"a NOOP\0\r\n", 0),
            (b"a LOGIN\0alice secret\r\n", 0),
            (b"a\0 CAPABILITY\n", 0),
            (b"a NOOP\rb STARTTLS\r\n", 0),
            (b"a NOOP\rb LOGIN alice secret\r\n", 0),
            // The body of a non-synchronizing literal is still discarded.
            (b"a APPEND INBOX\0 {5+}\r\n", 5),
        ] {
            let mut machine = with_policy(policy);
            let (out, next) = client_out(&mut machine, line);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (REFUSED, &b""[..], Next::Continue),
                "{policy:?} {line:?}"
            );
            assert_eq!(out.skip_client_bytes, skip);
            assert!(out.refused.is_some());
            assert!(machine.wants_client_line());
        }
    }
    // After TLS (and on implicit listeners) the backend judges such lines.
    let mut machine = upgraded();
    let (to_client, to_backend, _) = client(&mut machine, b"a NOOP\0\r\n");
    assert_eq!(
        (to_client.as_slice(), to_backend.as_slice()),
        (&b""[..], &b"a NOOP\0\r\n"[..])
    );
    // A STARTTLS in any spelling is always the proxy's to answer.
    let mut machine = greeted(TlsMode::Implicit);
    let (to_client, to_backend, _) = client(&mut machine, b"a STARTTLS\0\r\n");
    assert_eq!(
        (to_client.as_slice(), to_backend.as_slice()),
        (&b"a BAD STARTTLS takes no arguments\r\n"[..], &b""[..])
    );
}

#[test]
fn starttls_spelled_for_a_lenient_server_is_answered_never_forwarded() {
    for policy in [RequireTls::Auth, RequireTls::All, RequireTls::None] {
        // Under "all" the policy answers first; either way the backend
        // never sees the line.
        let reply: &[u8] = if policy == RequireTls::All {
            b"a BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n"
        } else {
            b"a BAD STARTTLS takes no arguments\r\n"
        };
        for line in [
            &b"a \tSTARTTLS\r\n"[..],
            b"a STARTTLS\tx\r\n",
            b"a \x0cstarttls\r\n",
        ] {
            let mut machine = with_policy(policy);
            let (out, next) = client_out(&mut machine, line);
            assert_eq!(
                (out.to_client.as_slice(), out.to_backend.as_slice(), next),
                (reply, &b""[..], Next::Continue),
                "{policy:?} {line:?}"
            );
        }
    }
}
