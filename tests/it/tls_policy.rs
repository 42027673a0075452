//! TLS policy at the handshake: versions (1.2/1.3 only, or 1.3 only), ALPN
//! restricted to the listener's protocol (ALPACA), and broken handshakes that
//! end one connection cleanly while the proxy keeps serving others.

use std::sync::Arc;

use crate::support::*;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;

/// A client that trusts `proxy`'s test certificate, speaks `versions` and
/// offers `alpn`.
fn client(
    proxy: &TestProxy,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    let mut config = client_config(proxy.roots(), versions);
    config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

#[tokio::test]
async fn alpn_accepts_the_listeners_protocol_or_none_and_refuses_others() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy =
        TestProxy::start([listener("alpn-imaps", "imap", "implicit", backend.address)]).await;
    let name = || ServerName::try_from("localhost").expect("name");

    let imap = client(&proxy, &[b"imap"], BOTH);
    let tls = imap
        .connect(name(), proxy.connect("alpn-imaps").await)
        .await
        .expect("imap ALPN accepted");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"imap"[..]));

    let none = client(&proxy, &[], BOTH);
    none.connect(name(), proxy.connect("alpn-imaps").await)
        .await
        .expect("no ALPN accepted");

    let http = client(&proxy, &[b"http/1.1"], BOTH);
    let error = http
        .connect(name(), proxy.connect("alpn-imaps").await)
        .await
        .expect_err("http/1.1 must be refused");
    assert!(
        error.to_string().contains("NoApplicationProtocol"),
        "{error}"
    );

    let smtp_on_imap = client(&proxy, &[b"smtp"], BOTH);
    smtp_on_imap
        .connect(name(), proxy.connect("alpn-imaps").await)
        .await
        .expect_err("another mail protocol's id must be refused");

    // Only the two accepted handshakes reached the backend.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(backend.connections(), 2);
    assert_eq!(
        proxy.scrape().await.value("mail_tls_proxy_tls_handshake_errors_total{listener=\"alpn-imaps\",reason=\"no_application_protocol\"}"),
        2.0
    );
}

#[tokio::test]
async fn min_tls_version_1_3_refuses_tls_1_2_clients() {
    let backend = FakeBackend::start(Script::pop3()).await;
    let proxy = TestProxy::start([
        listener("pop3s", "pop3", "implicit", backend.address).min_tls_version("1.3")
    ])
    .await;
    let name = || ServerName::try_from("localhost").expect("name");
    let tls12 = client(&proxy, &[], &[&rustls::version::TLS12]);
    tls12
        .connect(name(), proxy.connect("pop3s").await)
        .await
        .expect_err("TLS 1.2 refused");
    let tls13 = client(&proxy, &[], &[&rustls::version::TLS13]);
    let mut tls = tls13
        .connect(name(), proxy.connect("pop3s").await)
        .await
        .expect("TLS 1.3 accepted");
    assert_eq!(
        read_until(&mut tls, b"\r\n").await,
        b"+OK fake POP3 ready\r\n"
    );
}

/// A hand-made TLS 1.1 ClientHello (no supported_versions extension).
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, AES128-SHA
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![
        0x16,
        0x03,
        0x01,
        (handshake.len() >> 8) as u8,
        handshake.len() as u8,
    ];
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn tls_1_1_clients_are_refused_with_an_alert_and_the_proxy_keeps_serving() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy =
        TestProxy::start([listener("tls11-smtps", "smtp", "implicit", backend.address)]).await;
    let mut old = proxy.connect("tls11-smtps").await;
    old.write_all(&tls11_client_hello()).await.expect("write");
    let answer = read_to_close(&mut old).await;
    // A fatal alert record (content type 21), never a ServerHello.
    assert_eq!(answer.first(), Some(&0x15), "{answer:?}");
    assert!(answer.len() <= 7, "{answer:?}");
    assert_eq!(
        proxy.scrape().await.value("mail_tls_proxy_tls_handshake_errors_total{listener=\"tls11-smtps\",reason=\"protocol_version\"}"),
        1.0
    );
    let mut modern = proxy.connect_tls("tls11-smtps").await;
    assert_eq!(
        read_until(&mut modern, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    assert_eq!(backend.connections(), 1);
}

#[tokio::test]
async fn broken_handshakes_end_cleanly_and_others_are_still_served() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = TestProxy::start([
        listener("imaps", "imap", "implicit", backend.address),
        listener("imap", "imap", "starttls", backend.address),
    ])
    .await;

    // Garbage instead of a ClientHello.
    let mut garbage = proxy.connect("imaps").await;
    garbage
        .write_all(b"\x00\x01\x02 this is not TLS\r\n")
        .await
        .expect("write");
    let answer = read_to_close(&mut garbage).await;
    assert!(answer.len() <= 7, "{answer:?}");

    // A truncated handshake: half a ClientHello, then the client goes away.
    let hello = tls11_client_hello();
    let mut truncated = proxy.connect("imaps").await;
    truncated
        .write_all(&hello[..hello.len() / 2])
        .await
        .expect("write");
    truncated.shutdown().await.expect("shutdown");
    read_to_close(&mut truncated).await;

    // A client that disconnects mid-handshake on a STARTTLS listener.
    let mut upgrading = proxy.connect("imap").await;
    read_until(&mut upgrading, b"\r\n").await;
    upgrading.write_all(b"s STARTTLS\r\n").await.expect("write");
    read_until(&mut upgrading, b"\r\n").await;
    upgrading.write_all(&hello[..10]).await.expect("write");
    drop(upgrading);

    // The proxy keeps serving.
    let mut tls = proxy.connect_tls("imaps").await;
    read_until(&mut tls, b"\r\n").await;
    let reply = exchange(&mut tls, b"n NOOP\r\n", b"\r\n").await;
    assert_eq!(reply, b"n OK NOOP completed.\r\n");
}
