//! Timeouts: a silent or trickling client, a client that never finishes its
//! handshake, and an idle pass-through session are all cut off, each with the
//! protocol's goodbye where the client can still read one.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test(start_paused = true)]
async fn a_client_that_never_sends_a_client_hello_is_cut_at_the_handshake_timeout() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = TestProxy::start([
        listener("timeout-imaps", "imap", "implicit", backend.address).handshake_timeout(1),
    ])
    .await;
    let started = Instant::now();
    let mut silent = proxy.connect("timeout-imaps").await;
    assert_eq!(read_to_close(&mut silent).await, b"");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );
    assert_eq!(backend.connections(), 0);
    assert_eq!(
        proxy
            .scrape()
            .await
            .value("mail_tls_proxy_timeouts_total{listener=\"timeout-imaps\",phase=\"handshake\"}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_in_inspection_gets_the_idle_goodbye() {
    for (protocol, script, greeting, goodbye) in [
        (
            "smtp",
            Script::smtp(),
            &b"220 fake.example ESMTP\r\n"[..],
            &b"421 4.4.2 Idle timeout, closing connection\r\n"[..],
        ),
        (
            "imap",
            Script::imap(),
            b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS] fake ready\r\n",
            b"* BYE Autologout; idle for too long\r\n",
        ),
        (
            "pop3",
            Script::pop3(),
            b"+OK fake POP3 ready\r\n",
            b"-ERR Idle timeout\r\n",
        ),
    ] {
        let backend = FakeBackend::start(script).await;
        let proxy = TestProxy::start([listener("plain", protocol, "starttls", backend.address)
            .idle_timeout(1)
            .require_tls("auth")])
        .await;
        let mut client = proxy.connect("plain").await;
        let got = read_to_close(&mut client).await;
        let expected = [greeting, goodbye].concat();
        if protocol == "imap" {
            // The greeting's capability list depends on the policy; the
            // goodbye is what this test is about.
            assert!(got.ends_with(goodbye), "{protocol}: {}", text(&got));
        } else {
            assert_eq!(text(&got), text(&expected), "{protocol}");
        }
    }
}

/// Slowloris: one byte at a time never completes a line within the idle
/// timeout, so the session is cut like a silent one (one task, no thread).
#[tokio::test(start_paused = true)]
async fn a_client_trickling_bytes_is_cut_by_the_idle_timeout() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy =
        TestProxy::start([listener("mx", "smtp", "starttls", backend.address).idle_timeout(1)])
            .await;
    let mut client = proxy.connect("mx").await;
    read_until(&mut client, b"\r\n").await;
    let started = Instant::now();
    let trickle = async {
        for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP".iter().cycle() {
            if client.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_secs(8) {
                break;
            }
        }
    };
    trickle.await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "not cut off: {elapsed:?}");
    assert_eq!(backend.received(0), b"");
}

#[tokio::test(start_paused = true)]
async fn an_idle_pass_through_session_is_closed_after_the_idle_timeout() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start([listener("mx", "smtp", "starttls", backend.address)
        .idle_timeout(1)
        .require_tls("none")])
    .await;
    let mut client = proxy.connect("mx").await;
    read_until(&mut client, b"\r\n").await;
    let reply = exchange(&mut client, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    assert_eq!(reply, b"250 2.1.0 Ok\r\n");
    let started = Instant::now();
    assert_eq!(read_to_close(&mut client).await, b"");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_loop_of_noops_is_cut_by_the_command_cap() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start([
        listener("mx", "smtp", "starttls", backend.address).max_inspected_commands(3)
    ])
    .await;
    let mut client = proxy.connect("mx").await;
    read_until(&mut client, b"\r\n").await;
    for _ in 0..3 {
        assert_eq!(
            exchange(&mut client, b"NOOP\r\n", b"\r\n").await,
            b"250 2.0.0 Ok\r\n"
        );
    }
    client.write_all(b"NOOP\r\n").await.expect("write");
    assert_eq!(
        text(&read_to_close(&mut client).await),
        "421 4.7.0 Too many commands, closing connection\r\n"
    );
    backend
        .assert_received(0, b"NOOP\r\nNOOP\r\nNOOP\r\n")
        .await;
}
