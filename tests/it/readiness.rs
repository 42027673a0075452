//! `/readyz` means "send traffic here": every listener bound, a certificate
//! loaded, not draining, and every listener's backend greeted in the last
//! check (SMTP 220, IMAP * OK, POP3 +OK), on a fresh connection closed with
//! QUIT / LOGOUT. Otherwise 503 with a reason naming listener and backend.
//! The checks run in the background from start-up, asked or not.

use crate::support::*;

#[tokio::test]
async fn ready_when_every_backend_greets_and_each_gets_a_polite_goodbye() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let imap = FakeBackend::start(Script::imap().on(b"r1 LOGOUT", b"* BYE\r\nr1 OK\r\n")).await;
    let pop3 = FakeBackend::start(Script::pop3()).await;
    let proxy = TestProxy::start([
        listener("ready-submission", "smtp", "starttls", smtp.address),
        listener("ready-imaps", "imap", "implicit", imap.address),
        listener("ready-imap", "imap", "starttls", imap.address),
        listener("ready-pop3s", "pop3", "implicit", pop3.address),
    ])
    .await;
    let metrics = proxy.metrics.expect("metrics");
    // Checked from start-up; listeners that share a backend share its
    // check, and each check ends with a polite goodbye.
    assert_eq!(smtp.health_checks(), [b"QUIT\r\n".to_vec()]);
    assert_eq!(imap.health_checks(), [b"r1 LOGOUT\r\n".to_vec()]);
    assert_eq!(pop3.health_checks(), [b"QUIT\r\n".to_vec()]);
    assert_eq!(
        http_get(metrics, "/readyz").await,
        (200, "ready\n".to_string())
    );

    let scrape = proxy.scrape().await;
    for name in [
        "ready-submission",
        "ready-imaps",
        "ready-imap",
        "ready-pop3s",
    ] {
        assert_eq!(
            scrape.value(&format!("mail_tls_proxy_backend_up{{listener=\"{name}\"}}")),
            1.0,
            "{name}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_or_unwilling_backend_is_named_in_the_503() {
    let imap = FakeBackend::start(Script::imap()).await;
    let dead = dead_address();
    let busy = FakeBackend::start(Script::new(b"421 4.3.2 too busy\r\n")).await;
    let proxy = TestProxy::start([
        listener("unready-imaps", "imap", "implicit", imap.address),
        listener("unready-pop3s", "pop3", "implicit", &dead),
        listener("unready-smtps", "smtp", "implicit", busy.address),
    ])
    .await;
    let metrics = proxy.metrics.expect("metrics");
    let (status, body) = http_get(metrics, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 2, "{body}");
    assert!(
        lines[0].starts_with(&format!(
            "not ready: listener unready-pop3s: backend {dead} (pop3): connect failed: "
        )),
        "{body}"
    );
    assert_eq!(
        lines[1],
        format!(
            "not ready: listener unready-smtps: backend {} (smtp): greeting \"421 4.3.2 too busy\" is not 220",
            busy.address
        )
    );
    // Liveness is not readiness: the process is fine.
    assert_eq!(http_get(metrics, "/healthz").await, (200, "ok\n".into()));
    let scrape = proxy.scrape().await;
    assert_eq!(
        scrape.value("mail_tls_proxy_backend_up{listener=\"unready-pop3s\"}"),
        0.0
    );
    assert_eq!(
        scrape.value("mail_tls_proxy_backend_up{listener=\"unready-imaps\"}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_comes_back_makes_the_proxy_ready_at_the_next_check() {
    let dead = dead_address();
    let proxy =
        TestProxy::start_config(TestConfig::new().readiness_interval(1).listeners([listener(
            "comeback-pop3",
            "pop3",
            "starttls",
            &dead,
        )]))
        .await;
    let metrics = proxy.metrics.expect("metrics");
    assert_eq!(http_get(metrics, "/readyz").await.0, 503);

    // The backend starts on the address the proxy was configured with.
    let _backend =
        FakeBackend::revive(dead, Script::new(b"+OK back\r\n").otherwise(b"+OK bye\r\n"));
    let (_, body) = readyz_until(metrics, |status, _| status == 200).await;
    assert_eq!(body, "ready\n");
}

#[tokio::test]
async fn a_backend_expecting_a_proxy_header_gets_the_health_check_form_first() {
    for (identity, header) in [
        ("proxy-v1", b"PROXY UNKNOWN\r\n".to_vec()),
        ("proxy-v2", [V2_SIGNATURE, b"\x20\x00\x00\x00"].concat()),
    ] {
        let pop3 = FakeBackend::start(Script::pop3().with_proxy_header()).await;
        let proxy =
            TestProxy::start([listener("header-pop3s", "pop3", "implicit", pop3.address)
                .client_identity(identity)])
            .await;
        assert_eq!(
            http_get(proxy.metrics.expect("metrics"), "/readyz").await,
            (200, "ready\n".to_string()),
            "{identity}"
        );
        let mut expected = header;
        expected.extend_from_slice(b"QUIT\r\n");
        assert_eq!(pop3.health_checks(), [expected], "{identity}");
    }
}
