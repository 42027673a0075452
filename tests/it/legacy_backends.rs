//! Truly old backends still get STARTTLS/STLS offered: an RFC 821 SMTP server
//! that rejects EHLO, and an RFC 1939 POP3 server that rejects CAPA.

use crate::support::*;

#[tokio::test]
async fn a_helo_only_smtp_backend_still_gets_starttls_offered() {
    let script = Script::new(b"220 old.example Sendmail 5.x ready\r\n")
        .on(b"EHLO", b"500 Command unrecognized\r\n")
        .on(b"HELO", b"250 old.example Hello\r\n")
        .on(b"MAIL FROM", b"250 OK\r\n")
        .otherwise(b"500 Command unrecognized\r\n");
    let backend = FakeBackend::start(script).await;
    let proxy = TestProxy::start([listener("mx", "smtp", "starttls", backend.address)]).await;
    let mut client = proxy.connect("mx").await;
    read_until(&mut client, b"\r\n").await;
    let reply = exchange(&mut client, b"EHLO client.example\r\n", b"250 STARTTLS\r\n").await;
    assert_eq!(text(&reply), "250-old.example Hello\r\n250 STARTTLS\r\n");
    exchange(&mut client, b"STARTTLS\r\n", b"\r\n").await;
    let mut tls = proxy.upgrade(client).await;
    let reply = exchange(&mut tls, b"EHLO client.example\r\n", b"\r\n").await;
    assert_eq!(text(&reply), "250 old.example Hello\r\n");
    let reply = exchange(&mut tls, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    assert_eq!(reply, b"250 OK\r\n");
    // The backend saw a valid RFC 821 dialogue: HELO after each refused EHLO.
    backend
        .assert_received(
            0,
            b"EHLO client.example\r\nHELO client.example\r\nEHLO client.example\r\nHELO client.example\r\nMAIL FROM:<a@example.org>\r\n",
        )
        .await;
}

#[tokio::test]
async fn an_smtp_backend_refusing_the_second_ehlo_still_answers_after_tls() {
    let script = Script::new(b"220 picky.example ESMTP\r\n")
        .once(
            b"EHLO",
            b"250-picky.example\r\n250-STARTTLS\r\n250 SIZE 1000\r\n",
        )
        .on(b"EHLO", b"503 5.5.1 Error: duplicate HELO/EHLO\r\n")
        .otherwise(b"250 OK\r\n");
    let backend = FakeBackend::start(script).await;
    let proxy = TestProxy::start([listener("mx", "smtp", "starttls", backend.address)]).await;
    let mut client = proxy.connect("mx").await;
    read_until(&mut client, b"\r\n").await;
    exchange(&mut client, b"EHLO c\r\n", b"250 STARTTLS\r\n").await;
    exchange(&mut client, b"STARTTLS\r\n", b"\r\n").await;
    let mut tls = proxy.upgrade(client).await;
    // The backend refuses the second EHLO; the client gets the capabilities
    // announced before TLS, without STARTTLS, and the session goes on.
    let reply = exchange(&mut tls, b"EHLO c\r\n", b"250 SIZE 1000\r\n").await;
    assert_eq!(text(&reply), "250-picky.example\r\n250 SIZE 1000\r\n");
    let reply = exchange(&mut tls, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    assert_eq!(reply, b"250 OK\r\n");
    backend
        .assert_received(0, b"EHLO c\r\nEHLO c\r\nMAIL FROM:<a@example.org>\r\n")
        .await;
}

#[tokio::test]
async fn a_capa_less_pop3_backend_still_gets_stls_offered() {
    let script = Script::new(b"+OK POP3 server ready\r\n")
        .on(b"USER", b"+OK\r\n")
        .otherwise(b"-ERR unknown command\r\n");
    let backend = FakeBackend::start(script).await;
    let proxy = TestProxy::start([listener("pop3", "pop3", "starttls", backend.address)]).await;
    let mut client = proxy.connect("pop3").await;
    read_until(&mut client, b"\r\n").await;
    let reply = exchange(&mut client, b"CAPA\r\n", b"\r\n.\r\n").await;
    assert_eq!(text(&reply), "+OK Capability list follows\r\nSTLS\r\n.\r\n");
    exchange(&mut client, b"STLS\r\n", b"\r\n").await;
    let mut tls = proxy.upgrade(client).await;
    let reply = exchange(&mut tls, b"CAPA\r\n", b"\r\n").await;
    assert_eq!(reply, b"-ERR unknown command\r\n");
    let reply = exchange(&mut tls, b"USER alice\r\n", b"\r\n").await;
    assert_eq!(reply, b"+OK\r\n");
    backend
        .assert_received(0, b"CAPA\r\nCAPA\r\nUSER alice\r\n")
        .await;
}
