//! The operator's endpoint: Prometheus metrics with the base set of names
//! and per-listener labels, and the health answers.

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{metrics}"))
}

#[tokio::test]
async fn metrics_count_connections_handshakes_upgrades_and_bytes() {
    let backend = FakeBackend::start(Script::pop3()).await;
    let dead = dead_address().await;
    let dead_backend = dead;
    let proxy = TestProxy::start(&[
        listener("metrics-pop3", "pop3", "starttls", backend.address),
        listener("metrics-dead", "imap", "implicit", dead),
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

    let (status, metrics) = http_get(address, "/metrics").await;
    assert_eq!(status, 200);
    let pop3 = "listener=\"metrics-pop3\"";
    let dead = "listener=\"metrics-dead\"";
    assert_eq!(
        value(
            &metrics,
            &format!("mail_tls_proxy_connections_total{{{pop3}}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            &format!("mail_tls_proxy_starttls_total{{{pop3}}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            &format!("mail_tls_proxy_tls_handshakes_total{{{pop3},result=\"ok\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            &format!("mail_tls_proxy_active_connections{{{pop3}}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            &format!("mail_tls_proxy_connections_total{{{dead}}}")
        ),
        2.0
    );
    assert_eq!(
        value(
            &metrics,
            &format!("mail_tls_proxy_backend_connect_errors_total{{{dead}}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            &format!("mail_tls_proxy_tls_handshakes_total{{{dead},result=\"error\"}}")
        ),
        1.0
    );
    // "USER alice\r\n" went to the backend after inspection ended.
    assert_eq!(
        value(
            &metrics,
            &format!("mail_tls_proxy_bytes_total{{{pop3},direction=\"client_to_backend\"}}")
        ),
        12.0
    );
    assert!(
        value(
            &metrics,
            &format!("mail_tls_proxy_bytes_total{{{pop3},direction=\"backend_to_client\"}}")
        ) > 0.0
    );
    assert!(
        metrics.contains(&format!(
            "mail_tls_proxy_tls_handshake_duration_seconds_bucket{{{pop3},le=\"0.01\"}}"
        )),
        "{metrics}"
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
