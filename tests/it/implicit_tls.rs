//! Implicit-TLS listeners (SMTPS 465, IMAPS 993, POP3S 995) against scripted
//! backends: TLS first, the backend connected only after the handshake, the
//! backend's own STARTTLS/STLS removed from what the client sees.

use crate::support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn smtps_relays_with_backend_starttls_removed() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start([listener("smtps", "smtp", "implicit", backend.address)]).await;
    let mut tls = proxy.connect_tls("smtps").await;
    assert_eq!(
        read_until(&mut tls, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    let reply = exchange(&mut tls, b"EHLO c.example\r\n", b"250 8BITMIME\r\n").await;
    assert_eq!(
        text(&reply),
        "250-fake.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    );
    let reply = exchange(&mut tls, b"STARTTLS\r\n", b"\r\n").await;
    assert_eq!(reply, b"503 5.5.1 TLS already active\r\n");
    let reply = exchange(&mut tls, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    assert_eq!(reply, b"250 2.1.0 Ok\r\n");
    backend
        .assert_received(0, b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n")
        .await;
}

#[tokio::test]
async fn imaps_relays_with_backend_starttls_removed() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = TestProxy::start([listener("imaps", "imap", "implicit", backend.address)]).await;
    let mut tls = proxy.connect_tls("imaps").await;
    assert_eq!(
        text(&read_until(&mut tls, b"\r\n").await),
        "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake ready\r\n"
    );
    let reply = exchange(
        &mut tls,
        b"a CAPABILITY\r\n",
        b"a OK Capability completed.\r\n",
    )
    .await;
    assert_eq!(
        text(&reply),
        "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na OK Capability completed.\r\n"
    );
    let reply = exchange(&mut tls, b"s STARTTLS\r\n", b"\r\n").await;
    assert_eq!(reply, b"s BAD TLS is already active\r\n");
    let reply = exchange(&mut tls, b"l LOGIN alice secret\r\n", b"\r\n").await;
    assert_eq!(reply, b"l OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n");
    let reply = exchange(&mut tls, b"z LOGOUT\r\n", b"z OK Logout completed.\r\n").await;
    assert_eq!(reply, b"* BYE Logging out\r\nz OK Logout completed.\r\n");
    assert_eq!(read_to_close(&mut tls).await, b"");
    backend
        .assert_received(0, b"a CAPABILITY\r\nl LOGIN alice secret\r\nz LOGOUT\r\n")
        .await;
}

#[tokio::test]
async fn pop3s_relays_with_backend_stls_removed() {
    let backend = FakeBackend::start(Script::pop3()).await;
    let proxy = TestProxy::start([listener("pop3s", "pop3", "implicit", backend.address)]).await;
    let mut tls = proxy.connect_tls("pop3s").await;
    assert_eq!(
        read_until(&mut tls, b"\r\n").await,
        b"+OK fake POP3 ready\r\n"
    );
    let reply = exchange(&mut tls, b"CAPA\r\n", b"\r\n.\r\n").await;
    assert_eq!(text(&reply), "+OK\r\nTOP\r\nUSER\r\n.\r\n");
    let reply = exchange(&mut tls, b"STLS\r\n", b"\r\n").await;
    assert_eq!(reply, b"-ERR Command not permitted when TLS active\r\n");
    let reply = exchange(
        &mut tls,
        b"USER alice\r\nPASS secret\r\nSTAT\r\n",
        b"+OK 0 0\r\n",
    )
    .await;
    assert_eq!(reply, b"+OK\r\n+OK Logged in.\r\n+OK 0 0\r\n");
    backend
        .assert_received(0, b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\n")
        .await;
}

/// A port scanner or a client that fails the handshake costs the backend
/// nothing: no connection is made to it.
#[tokio::test]
async fn a_failed_handshake_never_connects_to_the_backend() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = TestProxy::start([listener("imaps", "imap", "implicit", backend.address)]).await;
    let mut scanner = proxy.connect("imaps").await;
    scanner
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let answer = read_to_close(&mut scanner).await;
    // At most a TLS alert record, never protocol text.
    assert!(answer.len() <= 7, "{:?}", text(&answer));
    let silent = proxy.connect("imaps").await;
    drop(silent);
    // The proxy keeps serving: a real client still gets through.
    let mut tls = proxy.connect_tls("imaps").await;
    read_until(&mut tls, b"\r\n").await;
    assert_eq!(backend.connections(), 1);
}
