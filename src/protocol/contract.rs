//! The [`Inspector`] contract, checked against every protocol's machine:
//! what the session core ([`crate::session::core`]) relies on whatever the
//! protocol. Each protocol's folder gives a [`Fixture`] (its greeting, its
//! STARTTLS spellings, a command whose reply is awaited, commands that end
//! inspection, ...) through its [`Spec`](super::Spec); these tests drive
//! every machine through the same checks, and a new protocol is checked as
//! soon as its `Spec` names its fixture.
//!
//! Byte-exact wording stays with each protocol's own tests; here the replies
//! are the ones its table ([`Replies`](super::Replies)) holds.

use proptest::prelude::*;

use super::gate::unsafe_line;
use super::testing::{backend, client};
use super::{
    split_word, trim_eol, BackendFailure, Goodbye, Greeting, Inspector, InspectorOptions, Next,
    Output, Protocol, Refusal, RequireTls, TlsMode,
};

/// What the contract drives one protocol's machine with.
pub(crate) struct Fixture {
    /// A backend greeting that starts the dialogue (one line).
    pub(crate) greeting: &'static [u8],
    /// STARTTLS (POP3's STLS) in spellings the protocol accepts.
    pub(crate) starttls: &'static [&'static [u8]],
    /// STARTTLS with an argument.
    pub(crate) starttls_with_argument: &'static [u8],
    /// Whether the proxy's replies to a command start with its tag (IMAP).
    pub(crate) tagged: bool,
    /// A command whose reply the machine awaits, and that whole reply.
    pub(crate) inspected: (&'static [u8], &'static [u8]),
    /// Commands (and garbage) that end inspection when nothing restricts
    /// the dialogue: forwarded verbatim, then pass-through.
    pub(crate) passthrough: &'static [&'static [u8]],
    /// A command that carries credentials.
    pub(crate) credentials: &'static [u8],
    /// A backend line nobody asked for, relayed as is while idle.
    pub(crate) unsolicited: &'static [u8],
    /// The replies table's words, byte for byte: the STARTTLS answers
    /// (begin, already active, syntax), the temporary failure, the goodbyes
    /// in [`GOODBYES`] order, and the refusals of too many connections, a
    /// client's PROXY header and an open relay.
    pub(crate) words: [&'static str; 11],
    /// Backend lines, and whether each is an error answer.
    pub(crate) error_replies: &'static [(&'static [u8], bool)],
    /// Pieces of client lines for random dialogues.
    pub(crate) client_lines: &'static [&'static [u8]],
    /// Pieces of backend lines for random dialogues.
    pub(crate) backend_lines: &'static [&'static [u8]],
}

const POLICIES: [RequireTls; 3] = [RequireTls::Auth, RequireTls::All, RequireTls::None];
const GOODBYES: [Goodbye; 4] = [
    Goodbye::LineTooLong,
    Goodbye::TooManyCommands,
    Goodbye::IdleTimeout,
    Goodbye::ShuttingDown,
];
const FAILURES: [BackendFailure; 3] = [
    BackendFailure::Unreachable,
    BackendFailure::Closed,
    BackendFailure::LineTooLong,
];

fn fixture(protocol: Protocol) -> &'static Fixture {
    protocol.spec().contract
}

/// A machine before the backend's greeting.
fn fresh(protocol: Protocol, mode: TlsMode, policy: RequireTls) -> Box<dyn Inspector> {
    protocol.new_inspector(&InspectorOptions::new(mode, policy))
}

/// A machine that relayed the fixture's greeting and waits for a command.
fn greeted(protocol: Protocol, mode: TlsMode, policy: RequireTls) -> Box<dyn Inspector> {
    let mut machine = fresh(protocol, mode, policy);
    let (to_client, to_backend, next) = backend(&mut *machine, fixture(protocol).greeting);
    assert_eq!(
        (to_client.as_slice(), to_backend.as_slice(), next),
        (fixture(protocol).greeting, &b""[..], Next::Continue),
        "{protocol}"
    );
    assert!(machine.wants_client_line(), "{protocol}");
    machine
}

/// What the proxy says to `line`: `reply`, after the line's tag in IMAP.
fn answer(protocol: Protocol, line: &[u8], reply: &[u8]) -> Vec<u8> {
    let mut expected = Vec::new();
    if fixture(protocol).tagged {
        expected.extend_from_slice(split_word(trim_eol(line)).0);
        expected.push(b' ');
    }
    expected.extend_from_slice(reply);
    expected
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_replies_are_worded_as_the_protocol_says() {
    for protocol in Protocol::ALL {
        let replies = protocol.spec().replies;
        let starttls = &replies.starttls;
        let mut words = vec![
            starttls.begin,
            starttls.already_active,
            starttls.syntax,
            replies.service_unavailable,
        ];
        words.extend(GOODBYES.map(|reason| replies.goodbye(reason)));
        words.extend(
            [
                Refusal::TooManyConnections,
                Refusal::ClientProxyHeader,
                Refusal::OpenRelay,
            ]
            .map(|refusal| replies.refusal(refusal)),
        );
        assert_eq!(
            words.iter().map(|bytes| text(bytes)).collect::<Vec<_>>(),
            fixture(protocol).words,
            "{protocol}"
        );
        assert_eq!(
            replies.refusal(Refusal::BackendUnavailable),
            replies.service_unavailable,
            "{protocol}"
        );
        for &(line, error) in fixture(protocol).error_replies {
            assert_eq!(
                protocol.is_error_reply(line),
                error,
                "{protocol} {:?}",
                text(line)
            );
        }
        // A backend's own good greeting is no error; the proxy's temporary
        // failure is one.
        assert!(!protocol.is_error_reply(fixture(protocol).greeting));
        assert_eq!(
            protocol.judge_greeting(fixture(protocol).greeting),
            Greeting::Good
        );
        assert!(protocol.is_error_reply(replies.service_unavailable));
    }
}

#[test]
fn starttls_is_answered_by_the_proxy_and_nothing_reaches_the_backend() {
    for protocol in Protocol::ALL {
        let replies = &protocol.spec().replies.starttls;
        for policy in POLICIES {
            for &line in fixture(protocol).starttls {
                let context = format!("{protocol} {policy:?} {:?}", text(line));
                let mut machine = greeted(protocol, TlsMode::StartTls, policy);
                let (to_client, to_backend, next) = client(&mut *machine, line);
                assert_eq!(
                    (text(&to_client), text(&to_backend), next),
                    (
                        text(&answer(protocol, line, replies.begin)),
                        String::new(),
                        Next::StartTls
                    ),
                    "{context}"
                );
                assert!(!machine.wants_client_line(), "{context}");
                assert!(!machine.wants_client_bytes(), "{context}");

                // Until the handshake is over nothing may be said: the
                // client would read it as TLS.
                for bytes in [
                    fixture(protocol).greeting,
                    fixture(protocol).unsolicited,
                    fixture(protocol).inspected.1,
                ] {
                    let (to_client, to_backend, next) = backend(&mut *machine, bytes);
                    assert_eq!(
                        (to_client.as_slice(), to_backend.as_slice(), next),
                        (&b""[..], &b""[..], Next::Continue),
                        "{context}"
                    );
                }
                let mut out = Output::default();
                machine.backend_failed(BackendFailure::Closed, &mut out);
                assert!(out.is_empty(), "{context}");

                // After it, a second STARTTLS is refused and the session
                // goes on, in every spelling.
                let mut machine = greeted(protocol, TlsMode::StartTls, policy);
                client(&mut *machine, line);
                machine.tls_established();
                assert!(machine.wants_client_line(), "{context}");
                for &again in fixture(protocol).starttls {
                    let (to_client, to_backend, next) = client(&mut *machine, again);
                    assert_eq!(
                        (text(&to_client), text(&to_backend), next),
                        (
                            text(&answer(protocol, again, replies.already_active)),
                            String::new(),
                            Next::Continue
                        ),
                        "{context}"
                    );
                    assert!(machine.wants_client_line(), "{context}");
                }
            }

            // With arguments: a syntax error, before TLS and after.
            let line = fixture(protocol).starttls_with_argument;
            for mode in [TlsMode::StartTls, TlsMode::Implicit] {
                let mut machine = greeted(protocol, mode, policy);
                let (to_client, to_backend, next) = client(&mut *machine, line);
                assert_eq!(
                    (text(&to_client), text(&to_backend), next),
                    (
                        text(&answer(protocol, line, replies.syntax)),
                        String::new(),
                        Next::Continue
                    ),
                    "{protocol} {policy:?} {mode}"
                );
                assert!(machine.wants_client_line(), "{protocol} {policy:?} {mode}");
            }

            // On an implicit listener TLS is already active.
            for &line in fixture(protocol).starttls {
                let mut machine = greeted(protocol, TlsMode::Implicit, policy);
                let (to_client, to_backend, next) = client(&mut *machine, line);
                assert_eq!(
                    (text(&to_client), text(&to_backend), next),
                    (
                        text(&answer(protocol, line, replies.already_active)),
                        String::new(),
                        Next::Continue
                    ),
                    "{protocol} {policy:?} implicit"
                );
            }
        }
    }
}

#[test]
fn goodbyes_are_the_protocols_own_and_silent_during_a_handshake() {
    for protocol in Protocol::ALL {
        let replies = protocol.spec().replies;
        for reason in GOODBYES {
            let context = format!("{protocol} {reason:?}");
            let mut machine = greeted(protocol, TlsMode::StartTls, RequireTls::Auth);
            let mut out = Output::default();
            machine.goodbye(reason, &mut out);
            assert_eq!(
                (text(&out.to_client), text(&out.to_backend)),
                (text(replies.goodbye(reason)), String::new()),
                "{context}"
            );
            assert!(!machine.wants_client_line(), "{context}");
            // The client has its answer: a backend closing now adds none.
            let mut out = Output::default();
            machine.backend_failed(BackendFailure::Closed, &mut out);
            assert!(out.is_empty(), "{context}");

            let mut machine = greeted(protocol, TlsMode::StartTls, RequireTls::Auth);
            client(&mut *machine, fixture(protocol).starttls[0]);
            let mut out = Output::default();
            machine.goodbye(reason, &mut out);
            assert!(out.is_empty(), "{context} during the handshake");
        }
    }
}

#[test]
fn a_backend_failure_is_told_only_to_a_client_that_waits_for_it() {
    for protocol in Protocol::ALL {
        let unavailable = protocol.spec().replies.service_unavailable;
        for failure in FAILURES {
            let context = format!("{protocol} {failure:?}");
            // Waiting for the greeting.
            let mut machine = fresh(protocol, TlsMode::StartTls, RequireTls::None);
            let mut out = Output::default();
            machine.backend_failed(failure, &mut out);
            assert_eq!(
                (text(&out.to_client), text(&out.to_backend)),
                (text(unavailable), String::new()),
                "{context}"
            );
            assert!(!machine.wants_client_line(), "{context}");
            // Told once.
            let mut out = Output::default();
            machine.backend_failed(failure, &mut out);
            assert!(out.is_empty(), "{context}");

            // Waiting for the reply to a command.
            let mut machine = greeted(protocol, TlsMode::StartTls, RequireTls::None);
            client(&mut *machine, fixture(protocol).inspected.0);
            let mut out = Output::default();
            machine.backend_failed(failure, &mut out);
            assert_eq!(text(&out.to_client), text(unavailable), "{context}");
            assert!(!machine.wants_client_line(), "{context}");

            // Inspection is over: the client talks to the backend, whose
            // close it sees itself.
            let mut machine = greeted(protocol, TlsMode::StartTls, RequireTls::None);
            client(&mut *machine, fixture(protocol).passthrough[0]);
            let mut out = Output::default();
            machine.backend_failed(failure, &mut out);
            assert!(out.is_empty(), "{context}");
        }
    }
}

#[test]
fn client_lines_are_read_only_when_the_machine_wants_one() {
    for protocol in Protocol::ALL {
        let (command, reply) = fixture(protocol).inspected;
        let mut machine = fresh(protocol, TlsMode::StartTls, RequireTls::None);
        assert!(
            !machine.wants_client_line(),
            "{protocol}: before the greeting"
        );
        // A line fed anyway is no command the machine may act on.
        let (to_client, to_backend, next) = client(&mut *machine, command);
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], &b""[..], Next::Continue),
            "{protocol}"
        );

        let mut machine = greeted(protocol, TlsMode::StartTls, RequireTls::None);
        let (to_client, to_backend, next) = client(&mut *machine, command);
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], command, Next::Continue),
            "{protocol}"
        );
        assert!(
            !machine.wants_client_line(),
            "{protocol}: a reply is awaited"
        );
        let (to_client, to_backend, next) = client(&mut *machine, fixture(protocol).starttls[0]);
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (&b""[..], &b""[..], Next::Continue),
            "{protocol}: a STARTTLS while a reply is awaited is ignored"
        );
        let (to_client, to_backend, _) = backend(&mut *machine, reply);
        assert!(!to_client.is_empty() && to_backend.is_empty(), "{protocol}");
        assert!(machine.wants_client_line(), "{protocol}: the reply is in");

        client(&mut *machine, fixture(protocol).starttls[0]);
        assert!(!machine.wants_client_line(), "{protocol}: in the handshake");
        machine.tls_established();
        assert!(
            machine.wants_client_line(),
            "{protocol}: after the handshake"
        );
        assert!(!machine.wants_client_bytes(), "{protocol}");
    }
}

#[test]
fn commands_that_end_inspection_are_forwarded_verbatim_and_nothing_follows() {
    for protocol in Protocol::ALL {
        for &command in fixture(protocol).passthrough {
            let context = format!("{protocol} {:?}", text(command));
            let mut machine = greeted(protocol, TlsMode::StartTls, RequireTls::None);
            let (to_client, to_backend, next) = client(&mut *machine, command);
            assert_eq!(
                (to_client.as_slice(), to_backend.as_slice(), next),
                (&b""[..], command, Next::Passthrough),
                "{context}"
            );
            assert!(!machine.wants_client_line(), "{context}");
            // The backend's answer is pass-through's to copy.
            let (to_client, _, _) = backend(&mut *machine, fixture(protocol).inspected.1);
            assert_eq!(to_client, b"", "{context}");
        }
    }
}

#[test]
fn unsolicited_backend_lines_while_idle_reach_the_client_as_they_are() {
    for protocol in Protocol::ALL {
        let line = fixture(protocol).unsolicited;
        let mut machine = greeted(protocol, TlsMode::StartTls, RequireTls::None);
        let (to_client, to_backend, next) = backend(&mut *machine, line);
        assert_eq!(
            (to_client.as_slice(), to_backend.as_slice(), next),
            (line, &b""[..], Next::Continue),
            "{protocol}"
        );
        assert!(machine.wants_client_line(), "{protocol}");
    }
}

#[test]
fn credentials_wait_for_tls_under_auth_and_all_and_cross_after_it() {
    for protocol in Protocol::ALL {
        let command = fixture(protocol).credentials;
        for policy in [RequireTls::Auth, RequireTls::All] {
            let context = format!("{protocol} {policy:?}");
            let mut machine = greeted(protocol, TlsMode::StartTls, policy);
            let mut out = Output::default();
            let next = machine.client_line(command, &mut out);
            assert_eq!(
                (out.to_backend.as_slice(), next),
                (&b""[..], Next::Continue),
                "{context}"
            );
            assert!(out.to_client.ends_with(b"\r\n"), "{context}");
            assert!(out.refused.is_some(), "{context}");
            assert!(machine.wants_client_line(), "{context}");
        }
        for policy in POLICIES {
            let mut machine = greeted(protocol, TlsMode::StartTls, policy);
            client(&mut *machine, fixture(protocol).starttls[0]);
            machine.tls_established();
            let (to_client, to_backend, next) = client(&mut *machine, command);
            assert_eq!(
                (to_client.as_slice(), to_backend.as_slice(), next),
                (&b""[..], command, Next::Passthrough),
                "{protocol} {policy:?} after TLS"
            );
        }
    }
}

/// One step of a random dialogue: the side (or, when `follow`, the side the
/// machine waits for), a line from the fixture's pieces or random bytes,
/// and its terminator.
fn step() -> impl Strategy<Value = (bool, bool, usize, Vec<u8>, u8)> {
    (
        prop::bool::weighted(0.7),
        any::<bool>(),
        any::<usize>(),
        proptest::collection::vec(any::<u8>(), 0..40),
        any::<u8>(),
    )
}

proptest! {
    /// Whatever the bytes and the order of calls, no machine panics and
    /// each keeps the promises the session core builds on.
    #[test]
    fn no_input_breaks_the_contract(
        protocol in prop::sample::select(Protocol::ALL.to_vec()),
        implicit in any::<bool>(),
        policy in prop::sample::select(POLICIES.to_vec()),
        xclient in any::<bool>(),
        steps in proptest::collection::vec(step(), 0..40),
        upgrade_at in 0usize..40,
        reason in prop::sample::select(GOODBYES.to_vec()),
    ) {
        let mode = if implicit { TlsMode::Implicit } else { TlsMode::StartTls };
        let mut options = InspectorOptions::new(mode, policy);
        if xclient {
            options.client_identity = super::ClientIdentity::Xclient;
            options.client = Some("192.0.2.7:40000".parse().expect("address"));
        }
        let mut machine = protocol.new_inspector(&options);
        let fixture = fixture(protocol);
        let replies = protocol.spec().replies;
        let mut tls = implicit;
        let mut handshake = false;
        // After a 334 an SMTP client line is SASL data, not a command.
        let mut sasl_possible = false;
        let mut out = Output::default();
        for (index, (follow, from_client, pick, random, terminator)) in steps.into_iter().enumerate() {
            let from_client = if follow { machine.wants_client_line() } else { from_client };
            let pieces = if from_client { fixture.client_lines } else { fixture.backend_lines };
            let mut line = if pick % 4 == 3 { random } else { pieces[pick % pieces.len()].to_vec() };
            // The driver never hands out a line with an LF inside.
            line.retain(|&b| b != b'\n');
            line.extend_from_slice(match terminator % 3 {
                0 => &b"\r\n"[..],
                1 => b"\n",
                _ => b"",
            });
            let wanted = machine.wants_client_line();
            out.clear();
            let next = if from_client {
                let next = machine.client_line(&line, &mut out);
                // Forwarded verbatim, or answered with one line, never both.
                prop_assert!(out.to_backend.is_empty() || out.to_backend == line);
                prop_assert!(out.to_backend.is_empty() || out.to_client.is_empty());
                if !out.to_client.is_empty() {
                    prop_assert!(out.to_client.ends_with(b"\r\n"));
                    prop_assert_eq!(out.to_client.iter().filter(|&&b| b == b'\n').count(), 1);
                }
                if !wanted || handshake {
                    prop_assert!(out.is_empty() && next == Next::Continue);
                }
                if !tls && !sasl_possible && unsafe_line(trim_eol(&line)).is_some() {
                    prop_assert!(out.to_backend.is_empty(), "{:?} forwarded before TLS", text(&line));
                }
                if !tls && policy != RequireTls::None {
                    prop_assert!(next != Next::Passthrough);
                }
                if next == Next::StartTls {
                    prop_assert!(!tls && wanted && out.to_backend.is_empty());
                    prop_assert_eq!(&out.to_client, &answer(protocol, &line, replies.starttls.begin));
                }
                next
            } else {
                sasl_possible |= line.starts_with(b"334");
                let next = machine.backend_line(&line, &mut out);
                prop_assert!(next != Next::StartTls);
                if handshake {
                    prop_assert!(out.is_empty());
                }
                next
            };
            prop_assert!(!(machine.wants_client_line() && machine.wants_client_bytes()));
            if next == Next::StartTls {
                handshake = true;
                prop_assert!(!machine.wants_client_line());
            }
            if (handshake && index >= upgrade_at) || (!tls && index == upgrade_at && !implicit) {
                machine.tls_established();
                tls = true;
                handshake = false;
            }
            if matches!(next, Next::Passthrough | Next::Close) {
                break;
            }
        }
        out.clear();
        machine.goodbye(reason, &mut out);
        prop_assert!(out.to_backend.is_empty());
        prop_assert!(out.to_client.is_empty() || out.to_client == replies.goodbye(reason));
        prop_assert!(!machine.wants_client_line());
        out.clear();
        machine.backend_failed(BackendFailure::Closed, &mut out);
        prop_assert!(out.is_empty());
    }
}
