//! Connection limits: past `max_connections_per_ip` or `max_connections`, the
//! client gets its protocol's temporary error and a close; the slot comes back
//! when a session ends.

use crate::support::*;

#[tokio::test]
async fn past_the_per_ip_limit_the_client_gets_421_and_a_close() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start([
        listener("mx", "smtp", "starttls", backend.address).max_connections_per_ip(2)
    ])
    .await;
    let mut first = proxy.connect("mx").await;
    read_until(&mut first, b"\r\n").await;
    let mut second = proxy.connect("mx").await;
    read_until(&mut second, b"\r\n").await;
    let mut third = proxy.connect("mx").await;
    assert_eq!(
        text(&read_to_close(&mut third).await),
        "421 4.7.0 Too many connections, try again later\r\n"
    );
    assert_eq!(
        backend.connections(),
        2,
        "a refused client costs the backend nothing"
    );

    drop(first);
    // The slot is given back once the proxy notices the close.
    poll_until(async || {
        let mut again = proxy.connect("mx").await;
        match try_read_until(&mut again, b"\n").await {
            Ok(got) if got == b"220 fake.example ESMTP\r\n" => Ok(()),
            got => Err(format!("slot never came back: {got:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn past_the_global_limit_every_listener_refuses_in_its_own_protocol() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let imap = FakeBackend::start(Script::imap()).await;
    let pop3 = FakeBackend::start(Script::pop3()).await;
    let proxy = TestProxy::start_config(TestConfig::new().max_connections(1).listeners([
        listener("limit-mx", "smtp", "starttls", smtp.address),
        listener("limit-imaps", "imap", "implicit", imap.address),
        listener("limit-pop3", "pop3", "starttls", pop3.address),
    ]))
    .await;
    let mut holder = proxy.connect("limit-mx").await;
    read_until(&mut holder, b"\r\n").await;

    let mut imaps = proxy.connect_tls("limit-imaps").await;
    assert_eq!(
        text(&read_to_close(&mut imaps).await),
        "* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
    );
    let mut pop3_client = proxy.connect("limit-pop3").await;
    assert_eq!(
        text(&read_to_close(&mut pop3_client).await),
        "-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    );
    assert_eq!((imap.connections(), pop3.connections()), (0, 0));

    assert_eq!(
        proxy.scrape().await.value("mail_tls_proxy_rejected_connections_total{listener=\"limit-imaps\",reason=\"max_connections\"}"),
        1.0
    );
}
