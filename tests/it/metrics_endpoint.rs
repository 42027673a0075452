//! The operator's endpoint: Prometheus metrics with the base set of names
//! and per-listener labels, and the health answers.

use crate::support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn metrics_count_connections_handshakes_upgrades_and_bytes() {
    let backend = FakeBackend::start(Script::pop3()).await;
    let dead = dead_address();
    let dead_backend = dead.address;
    let proxy = TestProxy::start([
        listener("metrics-pop3", "pop3", "starttls", backend.address),
        listener("metrics-dead", "imap", "implicit", &dead),
    ])
    .await;
    let address = proxy.metrics.expect("metrics address");

    let mut client = proxy.connect("metrics-pop3").await;
    read_until(&mut client, b"\r\n").await;
    exchange(&mut client, b"STLS\r\n", b"\r\n").await;
    let mut tls = proxy.upgrade(client).await;
    exchange(&mut tls, b"USER alice\r\n", b"+OK\r\n").await;
    let mut failed = proxy.connect_tls("metrics-dead").await;
    read_to_close(&mut failed).await;
    let mut garbage = proxy.connect("metrics-dead").await;
    garbage.write_all(b"hello\r\n").await.expect("write");
    read_to_close(&mut garbage).await;

    let metrics = Scrape::fetch(address).await;
    let pop3 = "listener=\"metrics-pop3\"";
    let dead = "listener=\"metrics-dead\"";
    assert_eq!(
        metrics.value(&format!("mail_tls_proxy_connections_total{{{pop3}}}")),
        1.0
    );
    assert_eq!(
        metrics.value(&format!("mail_tls_proxy_starttls_total{{{pop3}}}")),
        1.0
    );
    assert_eq!(
        metrics.value(&format!(
            "mail_tls_proxy_tls_handshakes_total{{{pop3},result=\"ok\"}}"
        )),
        1.0
    );
    assert_eq!(
        metrics.value(&format!("mail_tls_proxy_active_connections{{{pop3}}}")),
        1.0
    );
    assert_eq!(
        metrics.value(&format!("mail_tls_proxy_connections_total{{{dead}}}")),
        2.0
    );
    assert_eq!(
        metrics.value(&format!(
            "mail_tls_proxy_backend_connect_errors_total{{{dead}}}"
        )),
        1.0
    );
    assert_eq!(
        metrics.value(&format!(
            "mail_tls_proxy_tls_handshakes_total{{{dead},result=\"error\"}}"
        )),
        1.0
    );
    // "USER alice\r\n" went to the backend after inspection ended.
    assert_eq!(
        metrics.value(&format!(
            "mail_tls_proxy_bytes_total{{{pop3},direction=\"client_to_backend\"}}"
        )),
        12.0
    );
    assert!(
        metrics.value(&format!(
            "mail_tls_proxy_bytes_total{{{pop3},direction=\"backend_to_client\"}}"
        )) > 0.0
    );
    assert!(
        metrics.contains(&format!(
            "mail_tls_proxy_tls_handshake_duration_seconds_bucket{{{pop3},le=\"0.01\"}}"
        )),
        "{}",
        metrics.0
    );
    drop(tls);

    assert_eq!(
        http_get(address, "/healthz").await,
        (200, "ok\n".to_string())
    );
    // One listener's backend is down on purpose: not ready, and it says which.
    let (status, body) = http_get(address, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with(&format!(
            "not ready: listener metrics-dead: backend {dead_backend} (imap): connect failed"
        )),
        "{body}"
    );
    assert_eq!(http_get(address, "/nothing").await.0, 404);
}
