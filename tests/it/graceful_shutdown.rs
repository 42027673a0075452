//! Graceful shutdown: readiness turns false at once, listeners stop
//! accepting, sessions still in inspection get the protocol's goodbye, and
//! pass-through sessions (an SMTP DATA in flight) get the grace period to
//! finish. Also the real binary: SIGTERM drains and exits 0, a second signal
//! exits at once.

use std::time::{Duration, Instant};

use crate::support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn inspection_sessions_get_a_goodbye_and_a_data_transfer_in_flight_completes() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let imap = FakeBackend::start(Script::imap()).await;
    let mut proxy = TestProxy::start(&[
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

#[tokio::test]
async fn pass_through_sessions_are_cut_when_the_grace_period_ends() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let mut proxy = TestProxy::start_configured(
        &[listener("mx", "smtp", "starttls", smtp.address)],
        "shutdown_grace = 1",
        // Opportunistic TLS, so MAIL hands the session to pass-through.
        "require_tls = \"none\"",
    )
    .await;
    let mut lingering = proxy.connect("mx").await;
    read_until(&mut lingering, b"\r\n").await;
    exchange(&mut lingering, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    let started = Instant::now();
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

fn write_binary_config(
    dir: &std::path::Path,
    backend: std::net::SocketAddr,
    port: u16,
    metrics_port: u16,
) -> std::path::PathBuf {
    let path = dir.join("binary.toml");
    std::fs::write(
        &path,
        format!(
            "shutdown_grace = 30\n[[certificate]]\ncert = \"fullchain.pem\"\nkey = \"privkey.pem\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[[listener]]\nname = \"mx\"\nprotocol = \"smtp\"\ntls = \"starttls\"\nlisten = \"127.0.0.1:{port}\"\nbackend = \"{backend}\"\nrequire_tls = \"none\"\nrelay_check = \"off\"\n"
        ),
    )
    .expect("write config");
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn wait_until_listening(port: u16) {
    let deadline = Instant::now() + STEP;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "binary never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(child: &std::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn wait_for_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the binary did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_binary_drains_on_sigterm_and_a_second_signal_exits_at_once() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let pki = test_pki();
    let (port, metrics_port) = (free_port(), free_port());
    let config = write_binary_config(&pki.dir, smtp.address, port, metrics_port);
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mail-tls-proxy"))
            .args(["run", "--config"])
            .arg(&config)
            .env("MAIL_TLS_PROXY_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the binary")
    };

    // Nothing open: SIGTERM exits 0 promptly.
    let mut child = spawn();
    wait_until_listening(port).await;
    signal(&child, "TERM");
    assert_eq!(wait_for_exit(&mut child).await.code(), Some(0));

    // A pass-through session holds the drain; a second signal ends it at once.
    let mut child = spawn();
    wait_until_listening(port).await;
    let mut session = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    read_until(&mut session, b"\r\n").await;
    exchange(&mut session, b"MAIL FROM:<a@example.org>\r\n", b"\r\n").await;
    signal(&child, "TERM");
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let deadline = Instant::now() + STEP;
    while http_get(metrics, "/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "exited before the session ended"
    );
    signal(&child, "INT");
    let status = wait_for_exit(&mut child).await;
    assert_eq!(status.code(), Some(1));
}
