//! Adversarial STARTTLS integrity suite: one test per attack, for every
//! protocol it applies to, asserting the exact bytes the client got and the
//! exact bytes the backend received.
//!
//! The attacks are the classic ones against STARTTLS implementations:
//! plaintext pipelined behind the upgrade command (CVE-2011-0411 and its
//! relatives), backend bytes buffered across the upgrade, odd spellings and
//! framings of the upgrade command, oversized and unterminated lines, the
//! word STARTTLS carried as data, backends advertising their own STARTTLS,
//! and credentials sent before TLS.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Smtp,
    Imap,
    Pop3,
}

use Proto::{Imap, Pop3, Smtp};

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Smtp => "smtp",
            Imap => "imap",
            Pop3 => "pop3",
        }
    }

    fn script(self) -> Script {
        match self {
            Smtp => Script::smtp(),
            Imap => Script::imap(),
            Pop3 => Script::pop3(),
        }
    }

    /// The upgrade command a well-behaved client sends.
    fn upgrade(self) -> &'static [u8] {
        match self {
            Smtp => b"STARTTLS\r\n",
            Imap => b"s STARTTLS\r\n",
            Pop3 => b"STLS\r\n",
        }
    }

    /// The proxy's answer to [`Proto::upgrade`].
    fn upgrade_reply(self) -> &'static [u8] {
        match self {
            Smtp => b"220 2.0.0 Ready to start TLS\r\n",
            Imap => b"s OK Begin TLS negotiation now\r\n",
            Pop3 => b"+OK Begin TLS negotiation\r\n",
        }
    }

    /// A command a vulnerable server would run if it read it behind the
    /// upgrade command.
    fn evil(self) -> &'static [u8] {
        match self {
            Smtp => b"MAIL FROM:<evil@example.org>\r\n",
            Imap => b"l LOGIN evil evil\r\n",
            Pop3 => b"USER evil\r\n",
        }
    }

    /// A capability request inside TLS and its exact answer (the standard
    /// script's, without STARTTLS/STLS).
    fn probe_after_tls(self) -> (&'static [u8], &'static [u8]) {
        match self {
            Smtp => (
                b"EHLO c\r\n",
                b"250-fake.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            ),
            Imap => (
                b"b CAPABILITY\r\n",
                b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nb OK Capability completed.\r\n",
            ),
            Pop3 => (b"CAPA\r\n", b"+OK\r\nTOP\r\nUSER\r\n.\r\n"),
        }
    }

    /// The goodbye for a client line over the 8 KiB cap.
    fn line_too_long(self) -> &'static [u8] {
        match self {
            Smtp => b"421 4.7.0 Line too long, closing connection\r\n",
            Imap => b"* BYE Line too long\r\n",
            Pop3 => b"-ERR Line too long\r\n",
        }
    }

    fn idle_goodbye(self) -> &'static [u8] {
        match self {
            Smtp => b"421 4.4.2 Idle timeout, closing connection\r\n",
            Imap => b"* BYE Autologout; idle for too long\r\n",
            Pop3 => b"-ERR Idle timeout\r\n",
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The STARTTLS listener named "plain" in front of `backend`.
fn plain(proto: Proto, backend: SocketAddr) -> ListenerSpec {
    listener("plain", proto.name(), "starttls", backend)
}

/// A proxy with one STARTTLS listener named "plain" in front of `backend`.
async fn starttls_proxy(proto: Proto, backend: SocketAddr) -> TestProxy {
    TestProxy::start([plain(proto, backend)]).await
}

/// A connection to listener "plain" with the greeting already read.
async fn greeted(proxy: &TestProxy) -> TcpStream {
    let mut client = proxy.connect("plain").await;
    let greeting = read_until(&mut client, b"\r\n").await;
    assert_eq!(
        greeting.iter().filter(|&&b| b == b'\n').count(),
        1,
        "greeting: {:?}",
        text(&greeting)
    );
    client
}

/// Reads until at least `expected.len()` bytes arrived (or the peer closed,
/// or [`REPLY_WAIT`] passed), then asserts they are exactly `expected`.
async fn expect_bytes<S: AsyncRead + Unpin>(stream: &mut S, expected: &[u8]) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(REPLY_WAIT, async {
        while got.len() < expected.len() {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => got.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await;
    assert_eq!(text(&got), text(expected));
}

/// Sends `command` and asserts the reply is exactly `expected`.
async fn expect_exchange<S>(stream: &mut S, command: &[u8], expected: &[u8])
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(command).await.expect("write");
    stream.flush().await.expect("flush");
    expect_bytes(stream, expected).await;
}

/// Reads one line (whatever arrives up to a CRLF) and asserts it is the only
/// line that arrived.
async fn one_line<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let line = read_until(stream, b"\r\n").await;
    assert_eq!(
        line.iter().filter(|&&b| b == b'\n').count(),
        1,
        "expected one line, got {:?}",
        text(&line)
    );
    line
}

/// What the proxy sent after a failed upgrade: nothing, or exactly one TLS
/// alert record (never a protocol line).
fn assert_at_most_an_alert(what: &str, tail: &[u8]) {
    let is_alert =
        tail.len() == 7 && tail[0] == 0x15 && tail[1] == 0x03 && tail[3] == 0 && tail[4] == 2;
    assert!(
        tail.is_empty() || is_alert,
        "{what}: after the upgrade reply the proxy sent {:?} ({:02x?}), not at most one TLS alert",
        text(tail),
        tail
    );
}

// ---------------------------------------------------------------------------
// Plaintext injected behind the upgrade command
// ---------------------------------------------------------------------------

/// Same write: `STARTTLS\r\n<evil>` (and `STARTTLS\r\nSTARTTLS\r\n`), then a
/// real client tries its handshake. The injected bytes are handshake bytes:
/// the handshake fails, nothing reaches the backend, nothing is answered.
async fn injected_in_the_same_write(proto: Proto) {
    let backend = FakeBackend::start(proto.script()).await;
    let proxy = starttls_proxy(proto, backend.address).await;
    for (index, injected) in [proto.evil(), proto.upgrade()].into_iter().enumerate() {
        let what = format!("{proto:?} + {:?}", text(injected));
        let mut client = greeted(&proxy).await;
        client
            .write_all(&[proto.upgrade(), injected].concat())
            .await
            .expect("write");
        let relayed = proxy
            .handshake_behind(client, b"", proto.upgrade_reply())
            .await;
        assert!(
            relayed.handshake.is_err(),
            "{what}: the handshake succeeded over injected plaintext"
        );
        assert_at_most_an_alert(&what, &relayed.until_closed().await);
        assert_eq!(
            text(&backend.received_when_closed(index).await),
            "",
            "{what}: the backend received injected bytes"
        );
    }
}

#[tokio::test]
async fn smtp_commands_pipelined_behind_starttls_are_never_executed() {
    injected_in_the_same_write(Smtp).await;
}

#[tokio::test]
async fn imap_commands_pipelined_behind_starttls_are_never_executed() {
    injected_in_the_same_write(Imap).await;
}

#[tokio::test]
async fn pop3_commands_pipelined_behind_stls_are_never_executed() {
    injected_in_the_same_write(Pop3).await;
}

/// Separate writes: the upgrade reply has been read, the proxy waits for the
/// ClientHello, and plaintext arrives first (in its own segment).
async fn injected_in_a_separate_write(proto: Proto) {
    let backend = FakeBackend::start(proto.script()).await;
    let proxy = starttls_proxy(proto, backend.address).await;
    for (index, injected) in [proto.evil(), proto.upgrade()].into_iter().enumerate() {
        let what = format!("{proto:?} then {:?}", text(injected));
        let mut client = greeted(&proxy).await;
        client.set_nodelay(true).expect("nodelay");
        expect_exchange(&mut client, proto.upgrade(), proto.upgrade_reply()).await;
        client.write_all(injected).await.expect("write");
        let relayed = proxy.handshake_behind(client, b"", b"").await;
        assert!(
            relayed.handshake.is_err(),
            "{what}: the handshake succeeded over injected plaintext"
        );
        assert_at_most_an_alert(&what, &relayed.until_closed().await);
        assert_eq!(
            text(&backend.received_when_closed(index).await),
            "",
            "{what}: the backend received injected bytes"
        );
    }
}

#[tokio::test]
async fn smtp_commands_sent_before_the_client_hello_are_never_executed() {
    injected_in_a_separate_write(Smtp).await;
}

#[tokio::test]
async fn imap_commands_sent_before_the_client_hello_are_never_executed() {
    injected_in_a_separate_write(Imap).await;
}

#[tokio::test]
async fn pop3_commands_sent_before_the_client_hello_are_never_executed() {
    injected_in_a_separate_write(Pop3).await;
}

/// The legitimate form of pipelining: the ClientHello in the same write as
/// the upgrade command gives a working session.
async fn client_hello_in_the_same_write(proto: Proto) {
    let backend = FakeBackend::start(proto.script()).await;
    let proxy = starttls_proxy(proto, backend.address).await;
    let client = greeted(&proxy).await;
    let relayed = proxy
        .handshake_behind(client, proto.upgrade(), proto.upgrade_reply())
        .await;
    let mut tls = relayed
        .handshake
        .expect("the handshake with a pipelined ClientHello succeeds");
    let (probe, answer) = proto.probe_after_tls();
    expect_exchange(&mut tls, probe, answer).await;
    backend.assert_received(0, probe).await;
}

#[tokio::test]
async fn smtp_client_hello_in_the_same_write_as_starttls_gives_a_working_session() {
    client_hello_in_the_same_write(Smtp).await;
}

#[tokio::test]
async fn imap_client_hello_in_the_same_write_as_starttls_gives_a_working_session() {
    client_hello_in_the_same_write(Imap).await;
}

#[tokio::test]
async fn pop3_client_hello_in_the_same_write_as_stls_gives_a_working_session() {
    client_hello_in_the_same_write(Pop3).await;
}

// ---------------------------------------------------------------------------
// Backend bytes around the upgrade
// ---------------------------------------------------------------------------

/// The backend answers the client's capability request, and after the
/// proxy's upgrade reply (while the TLS handshake is pending) sends an
/// unsolicited line. The client then starts TLS and asks again: it must get
/// exactly the clean answer, nothing injected.
#[tokio::test]
async fn smtp_backend_bytes_sent_around_starttls_never_reach_the_client_inside_tls() {
    let mut backend = InjectingBackend::start(
        b"220 fake.example ESMTP\r\n",
        smtp_answer,
        b"250-INJECTED\r\n250 AUTH PLAIN\r\n",
    )
    .await;
    let proxy = starttls_proxy(Smtp, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(
        &mut client,
        b"EHLO c\r\n",
        b"250-fake.example\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
    )
    .await;
    expect_exchange(&mut client, Smtp.upgrade(), Smtp.upgrade_reply()).await;
    backend.inject().await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(
        &mut tls,
        b"EHLO c\r\n",
        b"250-fake.example\r\n250 8BITMIME\r\n",
    )
    .await;
    expect_exchange(&mut tls, b"NOOP\r\n", b"250 2.0.0 Ok\r\n").await;
    backend
        .assert_received(b"EHLO c\r\nEHLO c\r\nNOOP\r\n")
        .await;
}

#[tokio::test]
async fn imap_backend_bytes_sent_around_starttls_never_reach_the_client_inside_tls() {
    let mut backend = InjectingBackend::start(
        b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake ready\r\n",
        imap_answer,
        b"* CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=INJECTED\r\n",
    )
    .await;
    let proxy = starttls_proxy(Imap, backend.address).await;
    let mut client = greeted(&proxy).await;
    // Before TLS the list depends on the policy; only its end matters here.
    client.write_all(b"a CAPABILITY\r\n").await.expect("write");
    read_until(&mut client, b"a OK Capability completed.\r\n").await;
    expect_exchange(&mut client, Imap.upgrade(), Imap.upgrade_reply()).await;
    backend.inject().await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(
        &mut tls,
        b"b CAPABILITY\r\n",
        b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nb OK Capability completed.\r\n",
    )
    .await;
    expect_exchange(&mut tls, b"n NOOP\r\n", b"n OK NOOP completed.\r\n").await;
    backend
        .assert_received(b"a CAPABILITY\r\nb CAPABILITY\r\nn NOOP\r\n")
        .await;
}

#[tokio::test]
async fn pop3_backend_bytes_sent_around_stls_never_reach_the_client_inside_tls() {
    let mut backend =
        InjectingBackend::start(b"+OK fake POP3 ready\r\n", pop3_answer, b"+OK injected\r\n").await;
    let proxy = starttls_proxy(Pop3, backend.address).await;
    let mut client = greeted(&proxy).await;
    client.write_all(b"CAPA\r\n").await.expect("write");
    read_until(&mut client, b"\r\n.\r\n").await;
    expect_exchange(&mut client, Pop3.upgrade(), Pop3.upgrade_reply()).await;
    backend.inject().await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(&mut tls, b"CAPA\r\n", b"+OK\r\nTOP\r\nUSER\r\n.\r\n").await;
    expect_exchange(&mut tls, b"NOOP\r\n", b"+OK\r\n").await;
    backend.assert_received(b"CAPA\r\nCAPA\r\nNOOP\r\n").await;
}

// ---------------------------------------------------------------------------
// The upgrade command twice, after TLS, on implicit listeners, with
// arguments, in other cases, with bare LF
// ---------------------------------------------------------------------------

/// After TLS the upgrade command gets the protocol's error, never reaches the
/// backend, and the session goes on.
async fn upgrade_after_tls(proto: Proto, again: &[u8], refusal: &[u8]) {
    let backend = FakeBackend::start(proto.script()).await;
    let proxy = starttls_proxy(proto, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(&mut client, proto.upgrade(), proto.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(&mut tls, again, refusal).await;
    let (probe, answer) = proto.probe_after_tls();
    expect_exchange(&mut tls, probe, answer).await;
    backend.assert_received(0, probe).await;
}

#[tokio::test]
async fn smtp_starttls_after_tls_gets_503_and_the_session_goes_on() {
    upgrade_after_tls(
        Smtp,
        b"STARTTLS\r\nSTARTTLS\r\n",
        b"503 5.5.1 TLS already active\r\n503 5.5.1 TLS already active\r\n",
    )
    .await;
}

#[tokio::test]
async fn imap_starttls_after_tls_gets_bad_and_the_session_goes_on() {
    upgrade_after_tls(
        Imap,
        b"t STARTTLS\r\nu STARTTLS\r\n",
        b"t BAD TLS is already active\r\nu BAD TLS is already active\r\n",
    )
    .await;
}

#[tokio::test]
async fn pop3_stls_after_tls_gets_err_and_the_session_goes_on() {
    upgrade_after_tls(
        Pop3,
        b"STLS\r\nSTLS\r\n",
        b"-ERR Command not permitted when TLS active\r\n-ERR Command not permitted when TLS active\r\n",
    )
    .await;
}

/// On an implicit listener every spelling of the upgrade command (pipelined,
/// lowercase, with arguments) is answered by the proxy and never forwarded.
async fn upgrade_on_an_implicit_listener(
    proto: Proto,
    greeting: &[u8],
    commands: &[u8],
    replies: &[u8],
) {
    let backend = FakeBackend::start(proto.script()).await;
    let proxy =
        TestProxy::start([listener("tls", proto.name(), "implicit", backend.address)]).await;
    let mut tls = proxy.connect_tls("tls").await;
    expect_bytes(&mut tls, greeting).await;
    expect_exchange(&mut tls, commands, replies).await;
    let (probe, answer) = proto.probe_after_tls();
    expect_exchange(&mut tls, probe, answer).await;
    backend.assert_received(0, probe).await;
}

#[tokio::test]
async fn smtp_starttls_on_an_implicit_listener_is_refused_in_every_spelling() {
    upgrade_on_an_implicit_listener(
        Smtp,
        b"220 fake.example ESMTP\r\n",
        b"starttls\r\nSTARTTLS now\r\nStartTLS\n",
        b"503 5.5.1 TLS already active\r\n501 5.5.4 Syntax error (no parameters allowed)\r\n503 5.5.1 TLS already active\r\n",
    )
    .await;
}

#[tokio::test]
async fn imap_starttls_on_an_implicit_listener_is_refused_in_every_spelling() {
    upgrade_on_an_implicit_listener(
        Imap,
        b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake ready\r\n",
        b"a starttls\r\nb STARTTLS now\r\nC StartTls\n",
        b"a BAD TLS is already active\r\nb BAD STARTTLS takes no arguments\r\nC BAD TLS is already active\r\n",
    )
    .await;
}

#[tokio::test]
async fn pop3_stls_on_an_implicit_listener_is_refused_in_every_spelling() {
    upgrade_on_an_implicit_listener(
        Pop3,
        b"+OK fake POP3 ready\r\n",
        b"stls\r\nSTLS now\r\nStls\n",
        b"-ERR Command not permitted when TLS active\r\n-ERR STLS takes no arguments\r\n-ERR Command not permitted when TLS active\r\n",
    )
    .await;
}

/// The upgrade command with arguments is refused and never forwarded; the
/// plain command still works afterwards.
async fn upgrade_with_arguments(proto: Proto, with_arguments: &[u8], refusal: &[u8]) {
    let backend = FakeBackend::start(proto.script()).await;
    let proxy = starttls_proxy(proto, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(&mut client, with_arguments, refusal).await;
    expect_exchange(&mut client, proto.upgrade(), proto.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    let (probe, answer) = proto.probe_after_tls();
    expect_exchange(&mut tls, probe, answer).await;
    backend.assert_received(0, probe).await;
}

#[tokio::test]
async fn smtp_starttls_with_arguments_is_refused_and_never_forwarded() {
    upgrade_with_arguments(
        Smtp,
        b"STARTTLS now\r\nSTARTTLS MAIL FROM:<evil@example.org>\r\n",
        b"501 5.5.4 Syntax error (no parameters allowed)\r\n501 5.5.4 Syntax error (no parameters allowed)\r\n",
    )
    .await;
}

#[tokio::test]
async fn imap_starttls_with_arguments_is_refused_and_never_forwarded() {
    upgrade_with_arguments(
        Imap,
        b"a STARTTLS now\r\nb STARTTLS LOGIN evil evil\r\n",
        b"a BAD STARTTLS takes no arguments\r\nb BAD STARTTLS takes no arguments\r\n",
    )
    .await;
}

#[tokio::test]
async fn pop3_stls_with_arguments_is_refused_and_never_forwarded() {
    upgrade_with_arguments(
        Pop3,
        b"STLS now\r\nSTLS USER evil\r\n",
        b"-ERR STLS takes no arguments\r\n-ERR STLS takes no arguments\r\n",
    )
    .await;
}

/// Lowercase and mixed-case spellings upgrade like the canonical one.
async fn upgrade_in_other_cases(proto: Proto, spellings: &[(&[u8], &[u8])]) {
    let backend = FakeBackend::start(proto.script()).await;
    let proxy = starttls_proxy(proto, backend.address).await;
    let (probe, answer) = proto.probe_after_tls();
    for (index, (command, reply)) in spellings.iter().enumerate() {
        let mut client = greeted(&proxy).await;
        expect_exchange(&mut client, command, reply).await;
        let mut tls = proxy.upgrade(client).await;
        expect_exchange(&mut tls, probe, answer).await;
        backend.assert_received(index, probe).await;
    }
}

#[tokio::test]
async fn smtp_lowercase_and_mixed_case_starttls_upgrade() {
    upgrade_in_other_cases(
        Smtp,
        &[
            (b"starttls\r\n", b"220 2.0.0 Ready to start TLS\r\n"),
            (b"StartTLS\r\n", b"220 2.0.0 Ready to start TLS\r\n"),
        ],
    )
    .await;
}

#[tokio::test]
async fn imap_lowercase_and_mixed_case_starttls_upgrade() {
    upgrade_in_other_cases(
        Imap,
        &[
            (b"a starttls\r\n", b"a OK Begin TLS negotiation now\r\n"),
            (b"A1 StartTLS\r\n", b"A1 OK Begin TLS negotiation now\r\n"),
        ],
    )
    .await;
}

#[tokio::test]
async fn pop3_lowercase_and_mixed_case_stls_upgrade() {
    upgrade_in_other_cases(
        Pop3,
        &[
            (b"stls\r\n", b"+OK Begin TLS negotiation\r\n"),
            (b"StLs\r\n", b"+OK Begin TLS negotiation\r\n"),
        ],
    )
    .await;
}

/// Bare LF line endings: commands are forwarded byte for byte, the upgrade
/// command is recognised, and after TLS the dialogue goes on the same way.
#[tokio::test]
async fn smtp_bare_lf_lines_are_forwarded_verbatim_and_starttls_works() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = starttls_proxy(Smtp, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(
        &mut client,
        b"EHLO x\n",
        b"250-fake.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
    )
    .await;
    expect_exchange(
        &mut client,
        b"STARTTLS\n",
        b"220 2.0.0 Ready to start TLS\r\n",
    )
    .await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(
        &mut tls,
        b"EHLO x\n",
        b"250-fake.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
    )
    .await;
    backend.assert_received(0, b"EHLO x\nEHLO x\n").await;
}

#[tokio::test]
async fn imap_bare_lf_lines_are_forwarded_verbatim_and_starttls_works() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = starttls_proxy(Imap, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(&mut client, b"n NOOP\n", b"n OK NOOP completed.\r\n").await;
    expect_exchange(
        &mut client,
        b"s STARTTLS\n",
        b"s OK Begin TLS negotiation now\r\n",
    )
    .await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(
        &mut tls,
        b"b CAPABILITY\n",
        b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nb OK Capability completed.\r\n",
    )
    .await;
    backend.assert_received(0, b"n NOOP\nb CAPABILITY\n").await;
}

#[tokio::test]
async fn pop3_bare_lf_lines_are_forwarded_verbatim_and_stls_works() {
    let backend = FakeBackend::start(Script::pop3()).await;
    let proxy = starttls_proxy(Pop3, backend.address).await;
    let mut client = greeted(&proxy).await;
    client.write_all(b"CAPA\n").await.expect("write");
    let capa = read_until(&mut client, b"\r\n.\r\n").await;
    assert!(
        capa.starts_with(b"+OK\r\n") && capa.ends_with(b"\r\nSTLS\r\n.\r\n"),
        "{}",
        text(&capa)
    );
    expect_exchange(&mut client, b"STLS\n", b"+OK Begin TLS negotiation\r\n").await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(&mut tls, b"CAPA\n", b"+OK\r\nTOP\r\nUSER\r\n.\r\n").await;
    backend.assert_received(0, b"CAPA\nCAPA\n").await;
}

// ---------------------------------------------------------------------------
// NUL bytes
// ---------------------------------------------------------------------------

/// After odd sessions, the proxy still serves a normal one end to end.
async fn still_serves(proxy: &TestProxy, proto: Proto, backend: &FakeBackend) {
    let index = backend.connections();
    let mut client = greeted(proxy).await;
    expect_exchange(&mut client, proto.upgrade(), proto.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    let (probe, answer) = proto.probe_after_tls();
    expect_exchange(&mut tls, probe, answer).await;
    backend.assert_received(index, probe).await;
}

/// Before TLS, whatever `require_tls` says, a command line holding a NUL is
/// refused with the protocol's own error and never reaches the backend: one
/// that ends strings at NUL would read `STARTTLS\0` as STARTTLS, which only
/// the proxy may answer. The session goes on and upgrades as usual; after
/// TLS such lines are the backend's to judge.
#[tokio::test]
async fn smtp_nul_bytes_in_commands_are_refused_before_tls_and_never_upgrade() {
    const REFUSED: &[u8] = b"500 5.5.2 Syntax error: NUL in a command line\r\n";
    let backend = FakeBackend::start(Script::smtp()).await;
    for require_tls in ["auth", "none"] {
        let proxy = TestProxy::start([plain(Smtp, backend.address).require_tls(require_tls)]).await;
        let connection = backend.connections();
        let mut client = greeted(&proxy).await;
        for line in [&b"EHLO a\0b\r\n"[..], b"STARTTLS\0\r\n", b"\0\r\n"] {
            expect_exchange(&mut client, line, REFUSED).await;
        }
        expect_exchange(
            &mut client,
            b"EHLO a\r\n",
            b"250-fake.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
        )
        .await;
        expect_exchange(&mut client, Smtp.upgrade(), Smtp.upgrade_reply()).await;
        let mut tls = proxy.upgrade(client).await;
        expect_exchange(&mut tls, b"NOOP\0\r\n", b"250 2.0.0 Ok\r\n").await;
        backend
            .assert_received(connection, b"EHLO a\r\nNOOP\0\r\n")
            .await;
        drop(tls);
        still_serves(&proxy, Smtp, &backend).await;
    }
}

#[tokio::test]
async fn imap_nul_bytes_in_commands_are_refused_before_tls_and_never_upgrade() {
    const REFUSED: &[u8] = b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n";
    let script = Script::imap().on(b"n NO\0OP", b"n BAD Unknown command\r\n");
    let backend = FakeBackend::start(script).await;
    for require_tls in ["auth", "none"] {
        let proxy = TestProxy::start([plain(Imap, backend.address).require_tls(require_tls)]).await;
        let connection = backend.connections();
        let mut client = greeted(&proxy).await;
        // In the tag, in the command word, glued to STARTTLS: refused, and
        // no tag is echoed.
        for line in [
            &b"s\0 STARTTLS\r\n"[..],
            b"n NO\0OP\r\n",
            b"s STARTTLS\0\r\n",
        ] {
            expect_exchange(&mut client, line, REFUSED).await;
        }
        // Inspection goes on: NOOP and STARTTLS still work.
        expect_exchange(&mut client, b"n NOOP\r\n", b"n OK NOOP completed.\r\n").await;
        expect_exchange(&mut client, Imap.upgrade(), Imap.upgrade_reply()).await;
        let mut tls = proxy.upgrade(client).await;
        let (probe, answer) = Imap.probe_after_tls();
        expect_exchange(&mut tls, probe, answer).await;
        expect_exchange(&mut tls, b"n NO\0OP\r\n", b"n BAD Unknown command\r\n").await;
        backend
            .assert_received(connection, b"n NOOP\r\nb CAPABILITY\r\nn NO\0OP\r\n")
            .await;
        drop(tls);
        still_serves(&proxy, Imap, &backend).await;
    }
}

#[tokio::test]
async fn pop3_nul_bytes_in_commands_are_refused_before_tls_and_never_upgrade() {
    const REFUSED: &[u8] = b"-ERR Must issue STLS command first\r\n";
    let backend = FakeBackend::start(Script::pop3()).await;
    for require_tls in ["auth", "none"] {
        let proxy = TestProxy::start([plain(Pop3, backend.address).require_tls(require_tls)]).await;
        let connection = backend.connections();
        let mut client = greeted(&proxy).await;
        // STLS with a NUL glued on is refused by the proxy, not judged by
        // the backend, and inspection goes on before TLS.
        expect_exchange(&mut client, b"STLS\0\r\n", REFUSED).await;
        expect_exchange(&mut client, b"ST\0AT\r\n", REFUSED).await;
        expect_exchange(&mut client, Pop3.upgrade(), Pop3.upgrade_reply()).await;
        let mut tls = proxy.upgrade(client).await;
        let (probe, answer) = Pop3.probe_after_tls();
        expect_exchange(&mut tls, probe, answer).await;
        backend.assert_received(connection, b"CAPA\r\n").await;
        drop(tls);
        still_serves(&proxy, Pop3, &backend).await;
    }
}

// ---------------------------------------------------------------------------
// Oversized and unterminated lines
// ---------------------------------------------------------------------------

/// A 1 MiB line: the client gets the line-too-long goodbye and a close, the
/// backend nothing, and the proxy keeps serving.
async fn one_mebibyte_line(proto: Proto) {
    let backend = FakeBackend::start(proto.script()).await;
    let proxy = starttls_proxy(proto, backend.address).await;
    let client = greeted(&proxy).await;
    let (mut read_half, mut write_half) = client.into_split();
    let mut line = vec![b'A'; 1024 * 1024];
    line.extend_from_slice(b"\r\n");
    // The proxy stops reading after 8 KiB; the write may fail, which is fine.
    let writer = tokio::spawn(async move {
        let _ = write_half.write_all(&line).await;
        write_half
    });
    assert_eq!(
        text(&read_to_close(&mut read_half).await),
        text(proto.line_too_long())
    );
    assert_eq!(text(&backend.received_when_closed(0).await), "");
    writer.abort();
    still_serves(&proxy, proto, &backend).await;
}

#[tokio::test]
async fn smtp_a_one_mebibyte_line_gets_the_goodbye_and_never_reaches_the_backend() {
    one_mebibyte_line(Smtp).await;
}

#[tokio::test]
async fn imap_a_one_mebibyte_line_gets_the_goodbye_and_never_reaches_the_backend() {
    one_mebibyte_line(Imap).await;
}

#[tokio::test]
async fn pop3_a_one_mebibyte_line_gets_the_goodbye_and_never_reaches_the_backend() {
    one_mebibyte_line(Pop3).await;
}

/// The cap is exact: a line of 8 KiB (terminator included) is served, one
/// byte more without a line end is cut.
#[tokio::test]
async fn smtp_the_8_kib_line_cap_is_exact() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = starttls_proxy(Smtp, backend.address).await;

    let mut client = greeted(&proxy).await;
    let mut longest = b"NOOP ".to_vec();
    longest.resize(8 * 1024 - 2, b'x');
    longest.extend_from_slice(b"\r\n");
    assert_eq!(longest.len(), 8192);
    expect_exchange(&mut client, &longest, b"250 2.0.0 Ok\r\n").await;
    backend.assert_received(0, &longest).await;
    drop(client);

    // A line that never ends: 8193 bytes and no line end.
    let mut client = greeted(&proxy).await;
    let mut endless = b"NOOP ".to_vec();
    endless.resize(8 * 1024 + 1, b'x');
    client.write_all(&endless).await.expect("write");
    assert_eq!(
        text(&read_to_close(&mut client).await),
        text(Smtp.line_too_long())
    );
    assert_eq!(text(&backend.received_when_closed(1).await), "");
}

/// A line that never ends but stays under the cap is cut by the idle
/// timeout (1 s here), with the protocol's goodbye; nothing reaches the
/// backend.
async fn unterminated_line_under_the_cap(proto: Proto, partial: &[u8]) {
    let backend = FakeBackend::start(proto.script()).await;
    let proxy = TestProxy::start([plain(proto, backend.address).idle_timeout(1)]).await;
    let mut client = greeted(&proxy).await;
    let started = tokio::time::Instant::now();
    client.write_all(partial).await.expect("write");
    assert_eq!(
        text(&read_to_close(&mut client).await),
        text(proto.idle_goodbye())
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1900),
        "cut after {took:?}"
    );
    assert_eq!(text(&backend.received_when_closed(0).await), "");
}

#[tokio::test(start_paused = true)]
async fn smtp_an_unterminated_line_under_the_cap_is_cut_by_the_idle_timeout() {
    unterminated_line_under_the_cap(Smtp, b"STARTTLS").await;
}

#[tokio::test(start_paused = true)]
async fn imap_an_unterminated_line_under_the_cap_is_cut_by_the_idle_timeout() {
    unterminated_line_under_the_cap(Imap, b"s STARTTLS").await;
}

#[tokio::test(start_paused = true)]
async fn pop3_an_unterminated_line_under_the_cap_is_cut_by_the_idle_timeout() {
    unterminated_line_under_the_cap(Pop3, b"STLS").await;
}

// ---------------------------------------------------------------------------
// STARTTLS as data
// ---------------------------------------------------------------------------

/// A backend that takes `a LOGIN` with two literals, one of them holding a
/// STARTTLS line.
fn literal_login_script(greeting: &[u8]) -> Script {
    Script::new(greeting)
        .on(b"a LOGIN {12}", b"+ Ready for literal data\r\n")
        .on(b"b STARTTLS", b"")
        .on(b" {6}", b"+ Ready for literal data\r\n")
        .on(b"secret", b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        .on(b"a LOGIN {12+}", b"")
        .on(b" {6+}", b"")
        .otherwise(b"* BAD unknown\r\n")
}

/// `a LOGIN {12}\r\n` + `b STARTTLS\r\n` (the user name) + ` {6}\r\n` +
/// `secret\r\n`, synchronizing and then non-synchronizing: the backend gets
/// it verbatim, the client never gets `b OK Begin TLS negotiation now`.
async fn starttls_inside_imap_literals<S>(stream: &mut S)
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    expect_exchange(stream, b"a LOGIN {12}\r\n", b"+ Ready for literal data\r\n").await;
    expect_exchange(
        stream,
        b"b STARTTLS\r\n {6}\r\n",
        b"+ Ready for literal data\r\n",
    )
    .await;
    expect_exchange(
        stream,
        b"secret\r\n",
        b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
    )
    .await;
    // After login, the non-synchronizing form (RFC 7888) in one write.
    expect_exchange(
        stream,
        b"a LOGIN {12+}\r\nb STARTTLS\r\n {6+}\r\nsecret\r\n",
        b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
    )
    .await;
}

const LITERAL_LOGINS: &[u8] = b"a LOGIN {12}\r\nb STARTTLS\r\n {6}\r\nsecret\r\n\
a LOGIN {12+}\r\nb STARTTLS\r\n {6+}\r\nsecret\r\n";

#[tokio::test]
async fn imap_starttls_inside_a_literal_is_data_on_an_implicit_listener() {
    let greeting = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] fake ready\r\n";
    let backend = FakeBackend::start(literal_login_script(greeting)).await;
    let proxy = TestProxy::start([listener("imaps", "imap", "implicit", backend.address)]).await;
    let mut tls = proxy.connect_tls("imaps").await;
    expect_bytes(&mut tls, greeting).await;
    starttls_inside_imap_literals(&mut tls).await;
    backend.assert_received(0, LITERAL_LOGINS).await;
}

#[tokio::test]
async fn imap_starttls_inside_a_literal_is_data_before_tls_with_require_tls_none() {
    let greeting = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] fake ready\r\n";
    let backend = FakeBackend::start(literal_login_script(greeting)).await;
    let proxy = TestProxy::start([plain(Imap, backend.address).require_tls("none")]).await;
    let mut client = proxy.connect("plain").await;
    expect_bytes(
        &mut client,
        b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN STARTTLS] fake ready\r\n",
    )
    .await;
    starttls_inside_imap_literals(&mut client).await;
    backend.assert_received(0, LITERAL_LOGINS).await;
}

#[tokio::test]
async fn smtp_starttls_inside_a_data_body_is_data() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = starttls_proxy(Smtp, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(
        &mut client,
        b"EHLO c\r\n",
        b"250-fake.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
    )
    .await;
    expect_exchange(
        &mut client,
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
    )
    .await;
    let body = b"Subject: hi\r\n\r\nSTARTTLS\r\nstarttls\r\nQUIT\r\n.\r\n";
    expect_exchange(&mut client, body, b"250 2.0.0 Ok: queued\r\n").await;
    expect_exchange(&mut client, b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    backend
        .assert_received(
            0,
            &[
                &b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"[..],
                body,
                b"QUIT\r\n",
            ]
            .concat(),
        )
        .await;
}

/// A script that takes BDAT chunks: its reply to the chunk's bytes (read as
/// lines) is nothing, so only the proxy could answer them.
fn bdat_script() -> Script {
    Script::new(b"220 fake.example ESMTP\r\n")
        .on(
            b"EHLO",
            b"250-fake.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
        )
        .on(b"MAIL FROM", b"250 2.1.0 Ok\r\n")
        .on(b"RCPT TO", b"250 2.1.5 Ok\r\n")
        .on(b"BDAT", b"250 2.0.0 Ok: 20 octets queued\r\n")
        .on(b"NOOP", b"250 2.0.0 Ok\r\n")
        .otherwise(b"")
}

#[tokio::test]
async fn smtp_starttls_inside_a_bdat_chunk_is_data() {
    let backend = FakeBackend::start(bdat_script()).await;
    let proxy = starttls_proxy(Smtp, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(
        &mut client,
        b"EHLO c\r\n",
        b"250-fake.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 STARTTLS\r\n",
    )
    .await;
    // RFC 3030: the 20 octets after the BDAT line are data, whatever they say.
    let commands = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 20 LAST\r\nSTARTTLS\r\nSTARTTLS\r\n";
    expect_exchange(
        &mut client,
        commands,
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: 20 octets queued\r\n",
    )
    .await;
    expect_exchange(&mut client, b"NOOP\r\n", b"250 2.0.0 Ok\r\n").await;
    backend
        .assert_received(0, &[&b"EHLO c\r\n"[..], commands, b"NOOP\r\n"].concat())
        .await;
}

/// With require_tls = "all" the proxy refuses BDAT before TLS itself. The
/// chunk still follows the command line (RFC 3030: the client does not wait
/// for a reply before sending it), so it must be discarded, never read as
/// commands: `STARTTLS` inside it must not start a TLS handshake.
#[tokio::test]
async fn smtp_a_bdat_chunk_refused_by_require_tls_all_is_never_read_as_commands() {
    let backend = FakeBackend::start(bdat_script()).await;
    let proxy = TestProxy::start([plain(Smtp, backend.address).require_tls("all")]).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(
        &mut client,
        b"BDAT 10 LAST\r\nSTARTTLS\r\nNOOP\r\n",
        b"530 5.7.0 Must issue a STARTTLS command first\r\n250 2.0.0 Ok\r\n",
    )
    .await;
    backend.assert_received(0, b"NOOP\r\n").await;
}

// ---------------------------------------------------------------------------
// Backends that advertise STARTTLS / STLS / LOGINDISABLED themselves
// ---------------------------------------------------------------------------

#[tokio::test]
async fn smtp_backend_starttls_advertisements_are_replaced_by_the_proxys() {
    let script = Script::new(b"220 fake.example ESMTP\r\n")
        .on(
            b"EHLO",
            b"250-fake.example\r\n250-starttls\r\n250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
        )
        .otherwise(b"502 5.5.2 Error: command not recognized\r\n");
    let backend = FakeBackend::start(script).await;
    let proxy = starttls_proxy(Smtp, backend.address).await;
    let mut client = greeted(&proxy).await;
    // Before TLS: exactly one STARTTLS, the proxy's, last; AUTH hidden.
    expect_exchange(
        &mut client,
        b"EHLO c\r\n",
        b"250-fake.example\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
    )
    .await;
    expect_exchange(&mut client, Smtp.upgrade(), Smtp.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    // After TLS: no STARTTLS at all, and the last line still `250 `.
    expect_exchange(
        &mut tls,
        b"EHLO c\r\n",
        b"250-fake.example\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n",
    )
    .await;
    backend.assert_received(0, b"EHLO c\r\nEHLO c\r\n").await;
}

/// How many times `atom` appears in a line's capability data.
fn count_atom(line: &[u8], atom: &str) -> usize {
    text(line)
        .split([' ', '[', ']', '\r', '\n'])
        .filter(|word| word.eq_ignore_ascii_case(atom))
        .count()
}

#[tokio::test]
async fn imap_backend_starttls_and_logindisabled_are_replaced_by_the_proxys_policy() {
    let script = Script::new(
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN starttls] fake ready\r\n",
    )
    .on(
        b"a CAPABILITY",
        b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN\r\na OK [CAPABILITY IMAP4rev1 StartTLS LOGINDISABLED] done\r\n",
    )
    .on(
        b"b CAPABILITY",
        b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN\r\nb OK [CAPABILITY IMAP4rev1 StartTLS LOGINDISABLED] done\r\n",
    )
    .otherwise(b"* BAD unknown\r\n");
    let backend = FakeBackend::start(script).await;
    let proxy = starttls_proxy(Imap, backend.address).await;
    let mut client = proxy.connect("plain").await;
    // Before TLS (require_tls = auth): one STARTTLS, the proxy's, last; the
    // proxy's LOGINDISABLED once, before it; no AUTH= mechanisms in clear.
    let greeting = one_line(&mut client).await;
    assert_eq!(
        text(&greeting),
        "* OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS] fake ready\r\n"
    );
    expect_exchange(
        &mut client,
        b"a CAPABILITY\r\n",
        b"* CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS\r\na OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS] done\r\n",
    )
    .await;
    expect_exchange(&mut client, Imap.upgrade(), Imap.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    // After TLS: neither STARTTLS nor LOGINDISABLED.
    let mut after = Vec::new();
    tls.write_all(b"b CAPABILITY\r\n").await.expect("write");
    after.extend(read_until(&mut tls, b" done\r\n").await);
    assert_eq!(
        (
            count_atom(&after, "STARTTLS"),
            count_atom(&after, "LOGINDISABLED")
        ),
        (0, 0),
        "{}",
        text(&after)
    );
    assert_eq!(
        text(&after),
        "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nb OK [CAPABILITY IMAP4rev1] done\r\n"
    );
    backend
        .assert_received(0, b"a CAPABILITY\r\nb CAPABILITY\r\n")
        .await;
}

#[tokio::test]
async fn pop3_backend_stls_advertisements_are_replaced_by_the_proxys() {
    let script = Script::new(b"+OK fake POP3 ready\r\n")
        .on(
            b"CAPA",
            b"+OK Capability list follows\r\nSTLS\r\nTOP\r\nstls\r\nUSER\r\nSASL PLAIN\r\nUIDL\r\n.\r\n",
        )
        .otherwise(b"-ERR Unknown command\r\n");
    let backend = FakeBackend::start(script).await;
    let proxy = starttls_proxy(Pop3, backend.address).await;
    let mut client = greeted(&proxy).await;
    // Before TLS (require_tls = auth): one STLS, the proxy's, last; USER and
    // SASL hidden.
    expect_exchange(
        &mut client,
        b"CAPA\r\n",
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\n.\r\n",
    )
    .await;
    expect_exchange(&mut client, Pop3.upgrade(), Pop3.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(
        &mut tls,
        b"CAPA\r\n",
        b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN\r\nUIDL\r\n.\r\n",
    )
    .await;
    backend.assert_received(0, b"CAPA\r\nCAPA\r\n").await;
}

// ---------------------------------------------------------------------------
// Credentials and commands before TLS (require_tls)
// ---------------------------------------------------------------------------

fn smtp_auth_script() -> Script {
    Script::smtp().on(b"AUTH", b"235 2.7.0 Authentication successful\r\n")
}

#[tokio::test]
async fn smtp_auth_before_tls_is_refused_and_never_reaches_the_backend() {
    let backend = FakeBackend::start(smtp_auth_script()).await;
    let proxy = starttls_proxy(Smtp, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(
        &mut client,
        b"EHLO c\r\n",
        b"250-fake.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
    )
    .await;
    expect_exchange(
        &mut client,
        b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nauth login\r\n",
        b"530 5.7.0 Must issue a STARTTLS command first\r\n530 5.7.0 Must issue a STARTTLS command first\r\n",
    )
    .await;
    expect_exchange(&mut client, Smtp.upgrade(), Smtp.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    let (probe, answer) = Smtp.probe_after_tls();
    expect_exchange(&mut tls, probe, answer).await;
    expect_exchange(
        &mut tls,
        b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"235 2.7.0 Authentication successful\r\n",
    )
    .await;
    backend
        .assert_received(
            0,
            b"EHLO c\r\nEHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        )
        .await;
}

/// The policy must hold for the whole plaintext part of the session, not
/// just until the first command the proxy does not inspect: a client whose
/// MAIL FROM was refused by the backend (530 authentication required) and
/// which then authenticates must not send its password in clear. (IMAP and
/// POP3 keep inspecting before TLS for exactly this reason.)
#[tokio::test]
async fn smtp_auth_after_a_forwarded_command_is_still_refused_before_tls() {
    let script = Script::new(b"220 fake.example ESMTP\r\n")
        .on(b"EHLO", b"250-fake.example\r\n250 AUTH PLAIN\r\n")
        .on(b"MAIL FROM", b"530 5.7.0 Authentication required\r\n")
        .on(b"VRFY", b"252 2.0.0 Cannot VRFY user\r\n")
        .on(b"AUTH", b"235 2.7.0 Authentication successful\r\n")
        .otherwise(b"502 5.5.2 Error: command not recognized\r\n");
    let backend = FakeBackend::start(script).await;
    let proxy = starttls_proxy(Smtp, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(
        &mut client,
        b"EHLO c\r\n",
        b"250-fake.example\r\n250 STARTTLS\r\n",
    )
    .await;
    expect_exchange(
        &mut client,
        b"MAIL FROM:<alice@example.org>\r\n",
        b"530 5.7.0 Authentication required\r\n",
    )
    .await;
    expect_exchange(
        &mut client,
        b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"530 5.7.0 Must issue a STARTTLS command first\r\n",
    )
    .await;
    backend
        .assert_received(0, b"EHLO c\r\nMAIL FROM:<alice@example.org>\r\n")
        .await;
}

/// AUTH spelled the way lenient servers still read it (a tab as separator,
/// leading blanks, a bare CR splitting the line) is refused before TLS like
/// AUTH itself; IMAP and POP3 already read verbs this way.
#[tokio::test]
async fn smtp_auth_disguised_by_odd_separators_is_still_refused_before_tls() {
    let backend = FakeBackend::start(smtp_auth_script()).await;
    let proxy = starttls_proxy(Smtp, backend.address).await;
    let mut leaks = Vec::new();
    for (index, command) in [
        &b"AUTH\tPLAIN AGFsaWNlAHNlY3JldA==\r\n"[..],
        b" AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"NOOP\rAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let mut client = greeted(&proxy).await;
        expect_exchange(
            &mut client,
            b"EHLO c\r\n",
            b"250-fake.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
        )
        .await;
        client.write_all(command).await.expect("write");
        let reply = text(&one_line(&mut client).await);
        drop(client);
        let received = text(&backend.received_when_closed(index).await);
        // Refused by the proxy (5xx), and nothing but the EHLO forwarded.
        if !reply.starts_with('5') || received != "EHLO c\r\n" {
            leaks.push(format!(
                "{:?}: client got {reply:?}, backend received {received:?}",
                text(command)
            ));
        }
    }
    assert!(
        leaks.is_empty(),
        "credentials crossed in clear:\n{}",
        leaks.join("\n")
    );
}

#[tokio::test]
async fn smtp_mail_before_tls_is_refused_with_require_tls_all() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start([plain(Smtp, backend.address).require_tls("all")]).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(
        &mut client,
        b"EHLO c\r\n",
        b"250-fake.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
    )
    .await;
    expect_exchange(
        &mut client,
        b"MAIL FROM:<a@example.org>\r\nmail from:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n",
        b"530 5.7.0 Must issue a STARTTLS command first\r\n530 5.7.0 Must issue a STARTTLS command first\r\n530 5.7.0 Must issue a STARTTLS command first\r\n",
    )
    .await;
    expect_exchange(&mut client, Smtp.upgrade(), Smtp.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(
        &mut tls,
        b"MAIL FROM:<a@example.org>\r\n",
        b"250 2.1.0 Ok\r\n",
    )
    .await;
    backend
        .assert_received(0, b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")
        .await;
}

const IMAP_LOGIN_REFUSED: &str = "NO [PRIVACYREQUIRED] ";

#[tokio::test]
async fn imap_login_before_tls_is_refused_with_privacyrequired() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = starttls_proxy(Imap, backend.address).await;
    let mut client = greeted(&proxy).await;
    for (tag, command) in [
        ("l", &b"l LOGIN alice secret\r\n"[..]),
        ("m", b"m login alice secret\r\n"),
        ("p", b"p AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
    ] {
        client.write_all(command).await.expect("write");
        let reply = text(&one_line(&mut client).await);
        assert!(
            reply.starts_with(&format!("{tag} {IMAP_LOGIN_REFUSED}")),
            "{}: {reply:?}",
            text(command)
        );
    }
    // The session goes on: NOOP is forwarded and answered.
    expect_exchange(&mut client, b"n NOOP\r\n", b"n OK NOOP completed.\r\n").await;
    expect_exchange(&mut client, Imap.upgrade(), Imap.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(
        &mut tls,
        b"l LOGIN alice secret\r\n",
        b"l OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
    )
    .await;
    backend
        .assert_received(0, b"n NOOP\r\nl LOGIN alice secret\r\n")
        .await;
}

/// LOGIN with literals: the non-synchronizing form arrives whole in one
/// write (the refused command's literal bodies must be skipped, never read
/// as commands or forwarded); the synchronizing form gets its NO at once,
/// no `+` continuation.
#[tokio::test]
async fn imap_login_with_literals_before_tls_is_refused_and_nothing_reaches_the_backend() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = starttls_proxy(Imap, backend.address).await;
    let mut client = greeted(&proxy).await;

    client
        .write_all(b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n")
        .await
        .expect("write");
    let reply = text(&one_line(&mut client).await);
    assert!(
        reply.starts_with(&format!("a {IMAP_LOGIN_REFUSED}")),
        "{reply:?}"
    );
    // Nothing else was answered; CAPABILITY still is.
    client.write_all(b"a CAPABILITY\r\n").await.expect("write");
    let capability = read_until(&mut client, b"a OK Capability completed.\r\n").await;
    assert!(
        text(&capability).starts_with("* CAPABILITY IMAP4rev1 ")
            && capability.iter().filter(|&&b| b == b'\n').count() == 2,
        "{:?}",
        text(&capability)
    );

    client.write_all(b"b LOGIN {5}\r\n").await.expect("write");
    let reply = text(&one_line(&mut client).await);
    assert!(
        reply.starts_with(&format!("b {IMAP_LOGIN_REFUSED}")),
        "{reply:?}"
    );
    expect_exchange(&mut client, b"n NOOP\r\n", b"n OK NOOP completed.\r\n").await;
    backend
        .assert_received(0, b"a CAPABILITY\r\nn NOOP\r\n")
        .await;
}

/// IMAP keeps inspecting before TLS under require_tls = auth: a LOGIN after
/// another forwarded command is still refused.
#[tokio::test]
async fn imap_login_after_a_forwarded_command_is_still_refused_before_tls() {
    let backend =
        FakeBackend::start(Script::imap().on(b"x SELECT", b"x NO not logged in\r\n")).await;
    let proxy = starttls_proxy(Imap, backend.address).await;
    let mut client = greeted(&proxy).await;
    expect_exchange(
        &mut client,
        b"x SELECT INBOX\r\n",
        b"x NO not logged in\r\n",
    )
    .await;
    client
        .write_all(b"l LOGIN alice secret\r\n")
        .await
        .expect("write");
    let reply = text(&one_line(&mut client).await);
    assert!(
        reply.starts_with(&format!("l {IMAP_LOGIN_REFUSED}")),
        "{reply:?}"
    );
    expect_exchange(&mut client, b"n NOOP\r\n", b"n OK NOOP completed.\r\n").await;
    backend
        .assert_received(0, b"x SELECT INBOX\r\nn NOOP\r\n")
        .await;
}

const POP3_AUTH_REFUSED: &str = "-ERR [AUTH] ";

#[tokio::test]
async fn pop3_credentials_before_tls_are_refused_with_the_auth_code() {
    let backend = FakeBackend::start(Script::pop3()).await;
    let proxy = starttls_proxy(Pop3, backend.address).await;
    let mut client = greeted(&proxy).await;
    for command in [
        &b"USER alice\r\n"[..],
        b"user alice\r\n",
        b"PASS secret\r\n",
        b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
        b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    ] {
        client.write_all(command).await.expect("write");
        let reply = text(&one_line(&mut client).await);
        assert!(
            reply.starts_with(POP3_AUTH_REFUSED),
            "{}: {reply:?}",
            text(command)
        );
    }
    // A forwarded command does not end inspection: USER is still refused.
    expect_exchange(&mut client, b"STAT\r\n", b"+OK 0 0\r\n").await;
    client.write_all(b"USER alice\r\n").await.expect("write");
    let reply = text(&one_line(&mut client).await);
    assert!(reply.starts_with(POP3_AUTH_REFUSED), "{reply:?}");

    expect_exchange(&mut client, Pop3.upgrade(), Pop3.upgrade_reply()).await;
    let mut tls = proxy.upgrade(client).await;
    expect_exchange(&mut tls, b"USER alice\r\n", b"+OK\r\n").await;
    backend.assert_received(0, b"STAT\r\nUSER alice\r\n").await;
}
