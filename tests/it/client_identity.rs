//! Telling the backend who the client is: PROXY protocol v1/v2 headers and
//! XCLIENT, byte for byte against scripted backends. Clients connect from
//! 127.0.0.2 (Linux routes all of 127/8 to the loopback interface) so the
//! client's address differs from the proxy's own 127.0.0.1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Where the test clients connect from.
const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// (client address, listener address) as the proxy sees them.
fn ends(stream: &TcpStream) -> (SocketAddr, SocketAddr) {
    (
        stream.local_addr().expect("client address"),
        stream.peer_addr().expect("listener address"),
    )
}

fn port_bytes(address: SocketAddr) -> [u8; 2] {
    address.port().to_be_bytes()
}

/// What backend connection `index` received, once nothing more has arrived
/// for a while: the barrier for "the backend never got X" after the proxy
/// has already closed the client's side.
async fn received_after_settling(backend: &FakeBackend, index: usize) -> Vec<u8> {
    let mut last = Vec::new();
    let mut stable_since = tokio::time::Instant::now();
    let deadline = stable_since + STEP;
    loop {
        let now = backend.received(index);
        if now != last {
            last = now;
            stable_since = tokio::time::Instant::now();
        } else if stable_since.elapsed() >= std::time::Duration::from_millis(300) {
            return last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never settled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn proxy_v1_header_comes_first_on_a_starttls_listener() {
    let backend = FakeBackend::start(Script::smtp().with_proxy_header()).await;
    let proxy = TestProxy::start([
        listener("submission", "smtp", "starttls", backend.address).client_identity("proxy-v1")
    ])
    .await;
    let mut client = proxy.connect_from(CLIENT_IP, "submission").await;
    let (from, to) = ends(&client);
    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    exchange(&mut client, b"EHLO client.example\r\n", b"250 STARTTLS\r\n").await;
    exchange(&mut client, b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    let expected = format!(
        "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\nEHLO client.example\r\nQUIT\r\n",
        from.port(),
        to.port()
    );
    backend.assert_received(0, expected.as_bytes()).await;
}

#[tokio::test]
async fn proxy_v2_header_on_a_starttls_listener_carries_addresses_only() {
    let backend = FakeBackend::start(Script::pop3().with_proxy_header()).await;
    let proxy = TestProxy::start([
        listener("pop3", "pop3", "starttls", backend.address).client_identity("proxy-v2")
    ])
    .await;
    let mut client = proxy.connect_from(CLIENT_IP, "pop3").await;
    let (from, to) = ends(&client);
    read_until(&mut client, b"\r\n").await;
    exchange(&mut client, b"STLS\r\n", b"\r\n").await;
    let mut tls = proxy.upgrade(client).await;
    exchange(&mut tls, b"QUIT\r\n", b"+OK Logging out.\r\n").await;

    let mut expected = V2_SIGNATURE.to_vec();
    expected.extend_from_slice(&[0x21, 0x11, 0x00, 12, 127, 0, 0, 2, 127, 0, 0, 1]);
    expected.extend_from_slice(&port_bytes(from));
    expected.extend_from_slice(&port_bytes(to));
    expected.extend_from_slice(b"QUIT\r\n");
    backend.assert_received(0, &expected).await;
}

#[tokio::test]
async fn proxy_v2_header_on_an_implicit_listener_carries_the_tls_facts() {
    let backend = FakeBackend::start(Script::imap().with_proxy_header()).await;
    let proxy = TestProxy::start([
        listener("imaps", "imap", "implicit", backend.address).client_identity("proxy-v2")
    ])
    .await;
    let client = proxy.connect_from(CLIENT_IP, "imaps").await;
    let (from, to) = ends(&client);
    let mut tls = proxy.upgrade(client).await;
    read_until(&mut tls, b"\r\n").await;
    exchange(&mut tls, b"z LOGOUT\r\n", b"z OK Logout completed.\r\n").await;

    let session = tls.get_ref().1;
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    // OpenSSL's names, which for TLS 1.3 are the IANA ones.
    let cipher: &[u8] = match session.negotiated_cipher_suite().expect("suite").suite() {
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => b"TLS_AES_256_GCM_SHA384",
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => b"TLS_AES_128_GCM_SHA256",
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => b"TLS_CHACHA20_POLY1305_SHA256",
        other => panic!("unexpected suite {other:?}"),
    };
    let ssl_value_length = 1 + 4 + (3 + 7) + (3 + cipher.len());
    let tlv_length = (3 + 9) + (3 + ssl_value_length);
    let mut expected = V2_SIGNATURE.to_vec();
    expected.extend_from_slice(&[0x21, 0x11, 0x00, (12 + tlv_length) as u8]);
    expected.extend_from_slice(&[127, 0, 0, 2, 127, 0, 0, 1]);
    expected.extend_from_slice(&port_bytes(from));
    expected.extend_from_slice(&port_bytes(to));
    expected.extend_from_slice(&[0x02, 0x00, 9]); // PP2_TYPE_AUTHORITY: the SNI name
    expected.extend_from_slice(b"localhost");
    expected.extend_from_slice(&[0x20, 0x00, ssl_value_length as u8]); // PP2_TYPE_SSL
    expected.push(0x01); // PP2_CLIENT_SSL; no client certificate
    expected.extend_from_slice(&[0, 0, 0, 1]); // verify: non-zero, nothing verified
    expected.extend_from_slice(&[0x21, 0x00, 7]); // PP2_SUBTYPE_SSL_VERSION
    expected.extend_from_slice(b"TLSv1.3");
    expected.extend_from_slice(&[0x23, 0x00, cipher.len() as u8]); // PP2_SUBTYPE_SSL_CIPHER
    expected.extend_from_slice(cipher);
    expected.extend_from_slice(b"z LOGOUT\r\n");
    backend.assert_received(0, &expected).await;
}

#[tokio::test]
async fn a_client_sending_a_proxy_header_is_refused_and_the_backend_never_sees_it() {
    let smtp_backend = FakeBackend::start(Script::smtp().with_proxy_header()).await;
    let imap_backend = FakeBackend::start(Script::imap().with_proxy_header()).await;
    let proxy = TestProxy::start([
        listener("submission", "smtp", "starttls", smtp_backend.address)
            .client_identity("proxy-v1"),
        listener("imap", "imap", "starttls", imap_backend.address).client_identity("proxy-v1"),
    ])
    .await;

    let mut client = proxy.connect_from(CLIENT_IP, "submission").await;
    let (from, to) = ends(&client);
    read_until(&mut client, b"\r\n").await;
    client
        .write_all(b"PROXY TCP4 192.0.2.66 127.0.0.1 1234 25\r\nEHLO spoofed\r\n")
        .await
        .expect("write");
    assert_eq!(
        text(&read_to_close(&mut client).await),
        "554 5.7.0 PROXY protocol headers are not accepted from clients\r\n"
    );
    let ours = format!(
        "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\n",
        from.port(),
        to.port()
    );
    assert_eq!(
        text(&received_after_settling(&smtp_backend, 0).await),
        ours,
        "only the proxy's own header reached the backend"
    );

    // A version 2 header, sent before the greeting arrived.
    let mut client = proxy.connect_from(CLIENT_IP, "imap").await;
    let mut spoofed = V2_SIGNATURE.to_vec();
    spoofed.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 66, 127, 0, 0, 1, 0, 1, 0, 2]);
    spoofed.extend_from_slice(b"a LOGIN alice secret\r\n");
    client.write_all(&spoofed).await.expect("write");
    let reply = text(&read_to_close(&mut client).await);
    assert!(
        reply.ends_with("* BYE PROXY protocol headers are not accepted from clients\r\n"),
        "{reply:?}"
    );
    let received = received_after_settling(&imap_backend, 0).await;
    assert!(
        received.starts_with(b"PROXY TCP4 127.0.0.2 ") && received.ends_with(b"\r\n"),
        "{received:?}"
    );
    assert_eq!(received.iter().filter(|&&b| b == b'\n').count(), 1);
}

/// A Postfix-like backend that trusts XCLIENT from the proxy.
fn xclient_backend() -> Script {
    Script::smtp()
        .once(
            b"EHLO proxy.test",
            b"250-fake.example\r\n250-PIPELINING\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250 8BITMIME\r\n",
        )
        .on(b"XCLIENT ", b"220 fake.example ESMTP identified\r\n")
}

#[tokio::test]
async fn xclient_identifies_the_client_and_the_whole_session_is_relayed() {
    let backend = FakeBackend::start(xclient_backend()).await;
    let proxy = TestProxy::start_config(TestConfig::new().hostname("proxy.test").listeners([
        listener("submission", "smtp", "starttls", backend.address).client_identity("xclient"),
    ]))
    .await;
    let mut client = proxy.connect_from(CLIENT_IP, "submission").await;
    let (from, to) = ends(&client);
    // The client hears the greeting the backend gave after XCLIENT.
    assert_eq!(
        text(&read_until(&mut client, b"\r\n").await),
        "220 fake.example ESMTP identified\r\n"
    );
    let reply = exchange(&mut client, b"EHLO client.example\r\n", b"250 STARTTLS\r\n").await;
    assert_eq!(
        text(&reply),
        "250-fake.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
    );
    exchange(&mut client, b"STARTTLS\r\n", b"\r\n").await;
    let mut tls = proxy.upgrade(client).await;
    exchange(&mut tls, b"EHLO client.example\r\n", b"250 8BITMIME\r\n").await;
    for (command, reply) in [
        (
            &b"MAIL FROM:<a@example.org>\r\n"[..],
            &b"250 2.1.0 Ok\r\n"[..],
        ),
        (b"RCPT TO:<b@example.org>\r\n", b"250 2.1.5 Ok\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    ] {
        assert_eq!(exchange(&mut tls, command, b"\r\n").await, reply);
    }
    // A body line far over the 8 KiB command cap is relayed as it is.
    let mut body = b"Subject: long\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'x', 20_000));
    body.extend_from_slice(b"\r\n.\r\n");
    assert_eq!(
        exchange(&mut tls, &body, b"\r\n").await,
        b"250 2.0.0 Ok: queued\r\n"
    );
    // After a transaction, as before it: the client cannot name itself.
    for command in [
        &b"XCLIENT ADDR=192.0.2.66\r\n"[..],
        b"XFORWARD ADDR=192.0.2.66\r\n",
    ] {
        assert_eq!(
            text(&exchange(&mut tls, command, b"\r\n").await),
            "550 5.7.1 XCLIENT and XFORWARD are not accepted from clients\r\n"
        );
    }
    // The backend records QUIT before it answers it: everything is in.
    exchange(&mut tls, b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;

    let mut expected = format!(
        "EHLO proxy.test\r\nXCLIENT NAME=[UNAVAILABLE] ADDR=127.0.0.2 PORT={} DESTADDR=127.0.0.1 DESTPORT={}\r\n\
         EHLO client.example\r\nEHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
        from.port(),
        to.port()
    )
    .into_bytes();
    expected.extend_from_slice(&body);
    expected.extend_from_slice(b"QUIT\r\n");
    assert_eq!(text(&backend.received(0)), text(&expected));
}

#[tokio::test]
async fn a_client_xclient_before_any_transaction_never_reaches_the_backend() {
    let backend = FakeBackend::start(xclient_backend()).await;
    let proxy = TestProxy::start_config(TestConfig::new().hostname("proxy.test").listeners([
        listener("smtps", "smtp", "implicit", backend.address).client_identity("xclient"),
    ]))
    .await;
    let tcp = proxy.connect_from(CLIENT_IP, "smtps").await;
    let mut tls = proxy.upgrade(tcp).await;
    read_until(&mut tls, b"identified\r\n").await;
    assert_eq!(
        text(
            &exchange(
                &mut tls,
                b"XCLIENT ADDR=192.0.2.66 NAME=trusted.example\r\n",
                b"\r\n"
            )
            .await
        ),
        "550 5.7.1 XCLIENT and XFORWARD are not accepted from clients\r\n"
    );
    exchange(&mut tls, b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    let received = text(&backend.received(0));
    assert_eq!(received.matches("XCLIENT").count(), 1, "{received:?}");
    assert!(!received.contains("192.0.2.66"), "{received:?}");
}

#[tokio::test]
async fn without_xclient_on_offer_the_client_gets_the_first_greeting() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start_config(TestConfig::new().hostname("proxy.test").listeners([
        listener("submission", "smtp", "starttls", backend.address).client_identity("xclient"),
    ]))
    .await;
    let mut client = proxy.connect_from(CLIENT_IP, "submission").await;
    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    exchange(&mut client, b"QUIT\r\n", b"221 2.0.0 Bye\r\n").await;
    backend
        .assert_received(0, b"EHLO proxy.test\r\nQUIT\r\n")
        .await;
}

#[tokio::test]
async fn a_backend_not_expecting_the_header_gives_the_client_a_temporary_failure() {
    // Postfix without smtpd_upstream_proxy_protocol: it greets, answers the
    // header's bytes as bad commands and quits at the signature's "QUIT".
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = TestProxy::start([
        listener("submission", "smtp", "starttls", backend.address).client_identity("proxy-v2")
    ])
    .await;
    let mut client = proxy.connect_from(CLIENT_IP, "submission").await;
    assert_eq!(
        text(&read_to_close(&mut client).await),
        "220 fake.example ESMTP\r\n421 4.3.2 Service not available, closing transmission channel\r\n"
    );
}
