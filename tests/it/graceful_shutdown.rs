//! Graceful shutdown: readiness turns false at once, listeners stop
//! accepting, sessions still in inspection get the protocol's goodbye, and
//! pass-through sessions (an SMTP DATA in flight) get the grace period to
//! finish. Also the real binary: SIGTERM drains and exits 0, a second signal
//! exits at once.

use std::time::Duration;

use crate::support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn inspection_sessions_get_a_goodbye_and_a_data_transfer_in_flight_completes() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let imap = FakeBackend::start(Script::imap()).await;
    let mut proxy = TestProxy::start([
        listener("mx", "smtp", "starttls", smtp.address),
        listener("imap", "imap", "starttls", imap.address),
        listener("pop3s", "pop3", "implicit", imap.address),
    ])
    .await;
    let metrics_address = proxy.metrics.expect("metrics");

    let mut idle_smtp = proxy.connect("mx").await;
    read_until(&mut idle_smtp, b"\r\n").await;
    let mut idle_imap = proxy.connect("imap").await;
    read_until(&mut idle_imap, b"\r\n").await;

    let mut sender = proxy.connect("mx").await;
    read_until(&mut sender, b"\r\n").await;
    exchange(&mut sender, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    exchange(&mut sender, b"RCPT TO:<b@example.org>\r\n", b"\r\n").await;
    exchange(&mut sender, b"DATA\r\n", b"\r\n").await;
    sender
        .write_all(b"Subject: in flight\r\n\r\nfirst half\r\n")
        .await
        .expect("write");

    let listen_address = proxy.address("mx");
    let drained = proxy.begin_shutdown();

    assert_eq!(
        text(&read_to_close(&mut idle_smtp).await),
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
    assert_eq!(
        text(&read_to_close(&mut idle_imap).await),
        "* BYE [UNAVAILABLE] Server shutting down\r\n"
    );
    assert_eq!(
        http_get(metrics_address, "/readyz").await,
        (
            503,
            "not ready: draining: the proxy is shutting down\n".to_string()
        )
    );
    assert!(
        tokio::net::TcpStream::connect(listen_address)
            .await
            .is_err(),
        "the listener still accepts"
    );

    // The message in flight completes and the backend accepts it; then the
    // proxy, which reads this plaintext session command by command
    // (require_tls = "auth"), says goodbye at the next command boundary.
    sender
        .write_all(b"second half\r\n.\r\n")
        .await
        .expect("write");
    assert_eq!(
        text(&read_to_close(&mut sender).await),
        "250 2.0.0 Ok: queued\r\n421 4.3.2 Service shutting down, closing connection\r\n"
    );
    drop(sender);
    tokio::time::timeout(STEP, drained)
        .await
        .expect("drained once sessions ended")
        .expect("task");
    smtp.assert_received(
        1,
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: in flight\r\n\r\nfirst half\r\nsecond half\r\n.\r\n",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn pass_through_sessions_are_cut_when_the_grace_period_ends() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let mut proxy = TestProxy::start_config(
        TestConfig::new().shutdown_grace(1).listeners([listener(
            "mx",
            "smtp",
            "starttls",
            smtp.address,
        )
        .require_tls("none")]),
    )
    .await;
    let mut lingering = proxy.connect("mx").await;
    read_until(&mut lingering, b"\r\n").await;
    exchange(&mut lingering, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    let started = tokio::time::Instant::now();
    let drained = proxy.begin_shutdown();
    tokio::time::timeout(STEP, drained)
        .await
        .expect("drained")
        .expect("task");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn the_binary_drains_on_sigterm_and_a_second_signal_exits_at_once() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let pki = TestPki::new();
    let config = TestConfig::new()
        .shutdown_grace(30)
        .certificate(&pki.pair)
        .metrics()
        .listener(listener("mx", "smtp", "starttls", smtp.address).require_tls("none"))
        .write_in(pki.dir.path());

    // Nothing open: SIGTERM exits 0 promptly.
    let mut proxy = ProxyProcess::spawn(&config);
    proxy.wait_for_log(&["listening", "listener=mx"]).await;
    proxy.signal("TERM");
    assert_eq!(proxy.wait_for_exit().await.code(), Some(0));

    // A pass-through session holds the drain; a second signal ends it at once.
    let mut proxy = ProxyProcess::spawn(&config);
    let listener = proxy.address(&["listening", "listener=mx"]).await;
    let metrics = proxy.address(&["serving /metrics"]).await;
    let mut session = tokio::net::TcpStream::connect(listener)
        .await
        .expect("connect");
    read_until(&mut session, b"\r\n").await;
    exchange(&mut session, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    proxy.signal("TERM");
    readyz_until(metrics, |status, _| status == 503).await;
    assert!(proxy.is_running(), "exited before the session ended");
    proxy.signal("INT");
    assert_eq!(proxy.wait_for_exit().await.code(), Some(1));
}
