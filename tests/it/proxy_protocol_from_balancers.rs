//! Behind a load balancer: connections from `accept_proxy_from` sources
//! start with a PROXY protocol header, and the client it names is the client
//! everywhere (what the backend is told, the per-address limit). The test
//! plays the balancer from 127.0.0.1; scripted backends record every byte.

use std::net::SocketAddr;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The balancer: every test plays it from 127.0.0.1.
const TRUST_LOOPBACK: &[&str] = &["127.0.0.1/32"];

fn address(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

/// A version 2 PROXY header for TCP over IPv4, as HAProxy's
/// `send-proxy-v2` writes it.
fn v2_tcp4(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) = (source, destination) else {
        panic!("IPv4 addresses expected");
    };
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    header.extend_from_slice(&source.ip().octets());
    header.extend_from_slice(&destination.ip().octets());
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

/// Connects as the balancer and sends `header` first.
async fn balancer_connection(proxy: &TestProxy, name: &str, header: &[u8]) -> TcpStream {
    let mut stream = proxy.connect(name).await;
    stream.write_all(header).await.expect("write header");
    stream
}

#[tokio::test]
async fn a_v1_header_names_the_client_the_backend_is_told_about() {
    let backend = FakeBackend::start(Script::smtp().with_proxy_header()).await;
    let proxy = TestProxy::start([
        listener("lb-submission", "smtp", "starttls", backend.address)
            .accept_proxy_from(TRUST_LOOPBACK)
            .client_identity("proxy-v2"),
    ])
    .await;
    let mut client = balancer_connection(
        &proxy,
        "lb-submission",
        b"PROXY TCP4 203.0.113.9 198.51.100.25 40000 587\r\n",
    )
    .await;
    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    exchange(&mut client, b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    let mut expected = v2_tcp4(address("203.0.113.9:40000"), address("198.51.100.25:587"));
    expected.extend_from_slice(b"QUIT\r\n");
    backend.assert_received(0, &expected).await;
}

#[tokio::test]
async fn a_v2_header_comes_before_the_tls_handshake_on_an_implicit_listener() {
    let backend = FakeBackend::start(Script::imap().with_proxy_header()).await;
    let proxy = TestProxy::start([listener("lb-imaps", "imap", "implicit", backend.address)
        .accept_proxy_from(TRUST_LOOPBACK)
        .client_identity("proxy-v1")])
    .await;
    let header = v2_tcp4(address("203.0.113.7:50000"), address("198.51.100.1:993"));
    let client = balancer_connection(&proxy, "lb-imaps", &header).await;
    let mut tls = proxy.upgrade(client).await;
    read_until(&mut tls, b"\r\n").await;
    exchange(&mut tls, b"z LOGOUT\r\n", b"z OK Logout completed.\r\n").await;
    backend
        .assert_received(
            0,
            b"PROXY TCP4 203.0.113.7 198.51.100.1 50000 993\r\nz LOGOUT\r\n",
        )
        .await;
}

#[tokio::test]
async fn a_v2_local_connection_is_the_balancer_itself() {
    let backend = FakeBackend::start(Script::pop3().with_proxy_header()).await;
    let proxy = TestProxy::start([listener("lb-pop3", "pop3", "starttls", backend.address)
        .accept_proxy_from(TRUST_LOOPBACK)
        .client_identity("proxy-v1")])
    .await;
    let mut client = balancer_connection(
        &proxy,
        "lb-pop3",
        &[V2_SIGNATURE, b"\x20\x00\x00\x00"].concat(),
    )
    .await;
    let balancer = client.local_addr().expect("address");
    let listener_address = client.peer_addr().expect("address");
    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"+OK fake POP3 ready\r\n"
    );
    exchange(&mut client, b"QUIT\r\n", b"+OK Logging out.\r\n").await;
    let expected = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\nQUIT\r\n",
        balancer.port(),
        listener_address.port()
    );
    backend.assert_received(0, expected.as_bytes()).await;
}

#[tokio::test]
async fn a_trusted_source_without_a_header_is_closed_silently_and_counted_unless_it_sent_nothing() {
    let smtp_backend = FakeBackend::start(Script::smtp()).await;
    let imap_backend = FakeBackend::start(Script::imap()).await;
    let proxy = TestProxy::start([
        listener("lb-noheader-smtp", "smtp", "starttls", smtp_backend.address)
            .accept_proxy_from(TRUST_LOOPBACK),
        listener(
            "lb-noheader-imaps",
            "imap",
            "implicit",
            imap_backend.address,
        )
        .accept_proxy_from(TRUST_LOOPBACK),
    ])
    .await;
    // A plain TCP health check: connects and leaves without a byte. Not a
    // rejection, so not counted below.
    drop(proxy.connect("lb-noheader-smtp").await);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // A plaintext command where the header belongs.
    let mut client = balancer_connection(&proxy, "lb-noheader-smtp", b"EHLO x\r\n").await;
    assert_eq!(read_to_close(&mut client).await, b"");
    // A TLS ClientHello where the header belongs.
    let client = proxy.connect("lb-noheader-imaps").await;
    let handshake = tokio::time::timeout(
        STEP,
        proxy.connector().connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            client,
        ),
    )
    .await
    .expect("handshake ends in time");
    assert!(handshake.is_err(), "the handshake must not complete");
    // A version 2 header of another transport (UDP).
    let mut udp = V2_SIGNATURE.to_vec();
    udp.extend_from_slice(&[0x21, 0x12, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
    let mut client = balancer_connection(&proxy, "lb-noheader-smtp", &udp).await;
    assert_eq!(read_to_close(&mut client).await, b"");

    assert_eq!(smtp_backend.connections(), 0);
    assert_eq!(imap_backend.connections(), 0);
    let metrics = proxy.scrape().await;
    for (listener, count) in [("lb-noheader-smtp", 2.0), ("lb-noheader-imaps", 1.0)] {
        let series = format!(
            "mail_tls_proxy_rejected_connections_total{{listener=\"{listener}\",reason=\"proxy_header\"}}"
        );
        assert_eq!(metrics.value(&series), count, "{series}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_header_that_does_not_arrive_in_time_is_a_timeout() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start([listener("lb-slow", "smtp", "starttls", backend.address)
        .accept_proxy_from(TRUST_LOOPBACK)
        .proxy_header_timeout(1)])
    .await;
    // Half a header, then silence.
    let mut client = balancer_connection(&proxy, "lb-slow", b"PROXY TCP4 203.0.113.9").await;
    let started = tokio::time::Instant::now();
    assert_eq!(read_to_close(&mut client).await, b"");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    assert_eq!(backend.connections(), 0);
    assert_eq!(
        proxy
            .scrape()
            .await
            .value("mail_tls_proxy_timeouts_total{listener=\"lb-slow\",phase=\"proxy_header\"}"),
        1.0
    );
}

#[tokio::test]
async fn an_untrusted_source_sending_a_header_is_refused_as_any_client() {
    // The backend trusts PROXY headers from the proxy, so a client's own
    // header must never reach it.
    let backend = FakeBackend::start(Script::smtp().with_proxy_header()).await;
    let proxy = TestProxy::start([
        listener("lb-untrusted", "smtp", "starttls", backend.address)
            .accept_proxy_from(&["192.0.2.0/24"])
            .client_identity("proxy-v2"),
    ])
    .await;
    let mut client = proxy.connect("lb-untrusted").await;
    let from = client.local_addr().expect("address");
    let to = client.peer_addr().expect("address");
    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    client
        .write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 1234 25\r\n")
        .await
        .expect("write");
    assert_eq!(
        text(&read_to_close(&mut client).await),
        "554 5.7.0 PROXY protocol headers are not accepted from clients\r\n"
    );
    // Only the proxy's own header, naming the real peer.
    assert_eq!(backend.received_when_closed(0).await, v2_tcp4(from, to));
}

#[tokio::test]
async fn the_per_address_limit_counts_the_real_clients() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start([listener("lb-limit", "smtp", "starttls", backend.address)
        .accept_proxy_from(TRUST_LOOPBACK)
        .max_connections_per_ip(1)])
    .await;
    let header = |client: &str| format!("PROXY TCP4 {client} 198.51.100.25 40000 25\r\n");
    let mut first = balancer_connection(&proxy, "lb-limit", header("203.0.113.9").as_bytes()).await;
    assert_eq!(
        read_until(&mut first, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    // The same client again, through the same balancer: over its limit.
    let mut second =
        balancer_connection(&proxy, "lb-limit", header("203.0.113.9").as_bytes()).await;
    assert_eq!(
        text(&read_to_close(&mut second).await),
        "421 4.7.0 Too many connections, try again later\r\n"
    );
    // Another client through the same balancer: served.
    let mut third =
        balancer_connection(&proxy, "lb-limit", header("203.0.113.10").as_bytes()).await;
    assert_eq!(
        read_until(&mut third, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    exchange(&mut third, b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    exchange(&mut first, b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    assert_eq!(backend.connections(), 2);
}

#[tokio::test]
async fn bytes_behind_the_header_stay_with_the_client() {
    // A client command behind the header in the same segment (the TLS
    // ClientHello case is the implicit-listener test above): not a byte
    // of it is lost.
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start([
        listener("lb-pipelined", "smtp", "starttls", backend.address)
            .accept_proxy_from(TRUST_LOOPBACK),
    ])
    .await;
    let mut client = balancer_connection(
        &proxy,
        "lb-pipelined",
        b"PROXY TCP4 203.0.113.9 198.51.100.25 40000 25\r\nNOOP\r\n",
    )
    .await;
    let mut reply = vec![0u8; 256];
    let mut got = Vec::new();
    while !got.ends_with(b"250 2.0.0 Ok\r\n") {
        let read = tokio::time::timeout(STEP, client.read(&mut reply))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(read > 0, "closed early: {:?}", text(&got));
        got.extend_from_slice(&reply[..read]);
    }
    assert_eq!(text(&got), "220 fake.example ESMTP\r\n250 2.0.0 Ok\r\n");
    exchange(&mut client, b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    backend.assert_received(0, b"NOOP\r\nQUIT\r\n").await;
}
