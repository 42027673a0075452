//! STARTTLS listeners against scripted backends: the proxy offers the upgrade
//! in every capability answer, answers it itself, terminates TLS, and the
//! backend sees only the plain, unmodified dialogue.

use crate::support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn smtp_starttls_offers_answers_and_upgrades() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy =
        TestProxy::start([listener("submission", "smtp", "starttls", backend.address)]).await;
    let mut client = proxy.connect("submission").await;

    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    let reply = exchange(&mut client, b"EHLO client.example\r\n", b"250 STARTTLS\r\n").await;
    assert_eq!(
        text(&reply),
        "250-fake.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
    );
    let reply = exchange(&mut client, b"STARTTLS\r\n", b"\r\n").await;
    assert_eq!(reply, b"220 2.0.0 Ready to start TLS\r\n");

    let mut tls = proxy.upgrade(client).await;
    let reply = exchange(&mut tls, b"EHLO client.example\r\n", b"250 8BITMIME\r\n").await;
    assert_eq!(
        text(&reply),
        "250-fake.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    );
    let reply = exchange(&mut tls, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    assert_eq!(reply, b"250 2.1.0 Ok\r\n");
    let reply = exchange(&mut tls, b"QUIT\r\n", b"\r\n").await;
    assert_eq!(reply, b"221 2.0.0 Bye\r\n");

    backend
        .assert_received(
            0,
            b"EHLO client.example\r\nEHLO client.example\r\nMAIL FROM:<a@example.org>\r\nQUIT\r\n",
        )
        .await;
}

#[tokio::test]
async fn imap_starttls_offers_answers_and_upgrades() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = TestProxy::start([listener("imap", "imap", "starttls", backend.address)]).await;
    let mut client = proxy.connect("imap").await;

    // The default policy (require_tls = "auth") hides AUTH= and says
    // LOGINDISABLED until TLS; the backend's own STARTTLS is replaced.
    assert_eq!(
        text(&read_until(&mut client, b"\r\n").await),
        "* OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS] fake ready\r\n"
    );
    let reply = exchange(
        &mut client,
        b"a CAPABILITY\r\n",
        b"a OK Capability completed.\r\n",
    )
    .await;
    assert_eq!(
        text(&reply),
        "* CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS\r\na OK Capability completed.\r\n"
    );
    let reply = exchange(&mut client, b"s STARTTLS\r\n", b"\r\n").await;
    assert_eq!(reply, b"s OK Begin TLS negotiation now\r\n");

    let mut tls = proxy.upgrade(client).await;
    let reply = exchange(
        &mut tls,
        b"b CAPABILITY\r\n",
        b"b OK Capability completed.\r\n",
    )
    .await;
    assert_eq!(
        text(&reply),
        "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nb OK Capability completed.\r\n"
    );
    let reply = exchange(&mut tls, b"l LOGIN alice secret\r\n", b"\r\n").await;
    assert_eq!(reply, b"l OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n");

    backend
        .assert_received(
            0,
            b"a CAPABILITY\r\nb CAPABILITY\r\nl LOGIN alice secret\r\n",
        )
        .await;
}

#[tokio::test]
async fn pop3_stls_offers_answers_and_upgrades() {
    let backend = FakeBackend::start(Script::pop3()).await;
    let proxy = TestProxy::start([listener("pop3", "pop3", "starttls", backend.address)]).await;
    let mut client = proxy.connect("pop3").await;

    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"+OK fake POP3 ready\r\n"
    );
    let reply = exchange(&mut client, b"CAPA\r\n", b"\r\n.\r\n").await;
    assert_eq!(text(&reply), "+OK\r\nTOP\r\nSTLS\r\n.\r\n");
    let reply = exchange(&mut client, b"STLS\r\n", b"\r\n").await;
    assert_eq!(reply, b"+OK Begin TLS negotiation\r\n");

    let mut tls = proxy.upgrade(client).await;
    let reply = exchange(&mut tls, b"CAPA\r\n", b"\r\n.\r\n").await;
    assert_eq!(text(&reply), "+OK\r\nTOP\r\nUSER\r\n.\r\n");
    let reply = exchange(&mut tls, b"USER alice\r\n", b"\r\n").await;
    assert_eq!(reply, b"+OK\r\n");

    backend
        .assert_received(0, b"CAPA\r\nCAPA\r\nUSER alice\r\n")
        .await;
}

/// A client that writes its ClientHello right behind STARTTLS (in the same
/// TCP segment) still gets a working session: the early bytes feed the
/// handshake.
#[tokio::test]
async fn a_client_hello_pipelined_behind_starttls_still_works() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy =
        TestProxy::start([listener("submission", "smtp", "starttls", backend.address)]).await;
    let mut client = proxy.connect("submission").await;
    read_until(&mut client, b"\r\n").await;

    // The ClientHello in the same write as STARTTLS; the ServerHello
    // follows the reply at once, so exactly the reply is read as plaintext.
    let mut tls = proxy
        .handshake_behind(client, b"STARTTLS\r\n", b"220 2.0.0 Ready to start TLS\r\n")
        .await
        .handshake
        .expect("handshake with pipelined ClientHello succeeds");
    let reply = exchange(&mut tls, b"EHLO c\r\n", b"250 8BITMIME\r\n").await;
    assert_eq!(
        text(&reply),
        "250-fake.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    );
    backend.assert_received(0, b"EHLO c\r\n").await;
}

/// CVE-2011-0411 class: plaintext commands sent behind STARTTLS are never
/// executed: not forwarded, not answered, and they only break the handshake.
#[tokio::test]
async fn plaintext_injected_behind_starttls_never_reaches_the_backend() {
    for (protocol, greeting_end, command) in [
        (
            "smtp",
            &b"\r\n"[..],
            &b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n"[..],
        ),
        ("imap", b"\r\n", b"s STARTTLS\r\nl LOGIN evil evil\r\n"),
        ("pop3", b"\r\n", b"STLS\r\nUSER evil\r\n"),
    ] {
        let script = match protocol {
            "smtp" => Script::smtp(),
            "imap" => Script::imap(),
            _ => Script::pop3(),
        };
        let backend = FakeBackend::start(script).await;
        let proxy =
            TestProxy::start([listener("plain", protocol, "starttls", backend.address)]).await;
        let mut client = proxy.connect("plain").await;
        read_until(&mut client, greeting_end).await;
        client.write_all(command).await.expect("write");
        let rest = read_to_close(&mut client).await;
        // Only the upgrade reply arrives, then the handshake fails on the
        // injected bytes and the proxy closes (a TLS alert may follow).
        let expected_reply: &[u8] = match protocol {
            "smtp" => b"220 2.0.0 Ready to start TLS\r\n",
            "imap" => b"s OK Begin TLS negotiation now\r\n",
            _ => b"+OK Begin TLS negotiation\r\n",
        };
        assert!(
            rest.starts_with(expected_reply),
            "{protocol}: {:?}",
            text(&rest)
        );
        // At most a TLS alert record (7 bytes) follows; no reply line.
        let tail = &rest[expected_reply.len()..];
        assert!(
            tail.len() <= 7 && !tail.contains(&b'\n'),
            "{protocol}: something answered the injected command: {:?}",
            text(&rest)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            backend.received(0),
            b"",
            "{protocol}: backend received injected bytes"
        );
    }
}

#[tokio::test]
async fn a_plaintext_session_that_never_upgrades_works_as_without_the_proxy() {
    // Opportunistic STARTTLS: after the first other command the session is
    // copied unparsed. (With the default require_tls = "auth" the proxy
    // keeps reading a plaintext session command by command instead.)
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy =
        TestProxy::start([listener("mx", "smtp", "starttls", backend.address).require_tls("none")])
            .await;
    let mut client = proxy.connect("mx").await;
    read_until(&mut client, b"\r\n").await;
    exchange(&mut client, b"EHLO relay.example\r\n", b"250 STARTTLS\r\n").await;
    let reply = exchange(
        &mut client,
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n",
        b"250 2.1.5 Ok\r\n",
    )
    .await;
    assert_eq!(reply, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    // After inspection everything is copied, even a later STARTTLS.
    let reply = exchange(&mut client, b"STARTTLS\r\n", b"\r\n").await;
    assert_eq!(reply, b"502 5.5.2 Error: command not recognized\r\n");
    backend
        .assert_received(0, b"EHLO relay.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nSTARTTLS\r\n")
        .await;
}

#[tokio::test]
async fn a_second_starttls_gets_the_protocols_error() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = TestProxy::start([listener("imap", "imap", "starttls", backend.address)]).await;
    let mut client = proxy.connect("imap").await;
    read_until(&mut client, b"\r\n").await;
    exchange(&mut client, b"s STARTTLS\r\n", b"\r\n").await;
    let mut tls = proxy.upgrade(client).await;
    let reply = exchange(&mut tls, b"t STARTTLS\r\n", b"\r\n").await;
    assert_eq!(reply, b"t BAD TLS is already active\r\n");
    assert_eq!(backend.received(0), b"");
}

/// After STARTTLS the server never speaks first, so a line the backend sends
/// after the handshake but before the client's first command is dropped,
/// never delivered inside TLS.
#[tokio::test]
async fn backend_lines_between_the_handshake_and_the_first_command_are_dropped() {
    let mut backend = InjectingBackend::start(
        b"220 fake.example ESMTP\r\n",
        smtp_answer,
        b"250-INJECTED\r\n250 AUTH PLAIN\r\n",
    )
    .await;
    let proxy = TestProxy::start([listener("mx", "smtp", "starttls", backend.address)]).await;
    let mut client = proxy.connect("mx").await;
    read_until(&mut client, b"\r\n").await;
    exchange(&mut client, b"EHLO c\r\n", b"250 STARTTLS\r\n").await;
    exchange(&mut client, b"STARTTLS\r\n", b"\r\n").await;
    let mut tls = proxy.upgrade(client).await;
    backend.inject().await;
    // Give the injected bytes time to reach the proxy before the client speaks.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let reply = exchange(&mut tls, b"EHLO c\r\n", b"250 8BITMIME\r\n").await;
    assert_eq!(text(&reply), "250-fake.example\r\n250 8BITMIME\r\n");
    backend.assert_received(b"EHLO c\r\nEHLO c\r\n").await;
}
