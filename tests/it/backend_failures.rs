//! A dead or misbehaving backend: the client gets the protocol's own
//! temporary-failure reply and a clean close, never a silent reset.

use crate::support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const UNAVAILABLE: [(&str, &[u8]); 3] = [
    (
        "smtp",
        b"421 4.3.2 Service not available, closing transmission channel\r\n",
    ),
    (
        "imap",
        b"* BYE [UNAVAILABLE] Backend server not available\r\n",
    ),
    ("pop3", b"-ERR [SYS/TEMP] Backend server not available\r\n"),
];

#[tokio::test]
async fn unreachable_backend_gets_a_temporary_failure_on_starttls_listeners() {
    let dead = dead_address();
    for (protocol, reply) in UNAVAILABLE {
        let proxy = TestProxy::start([listener("plain", protocol, "starttls", &dead)]).await;
        let mut client = proxy.connect("plain").await;
        assert_eq!(
            text(&read_to_close(&mut client).await),
            text(reply),
            "{protocol}"
        );
    }
}

#[tokio::test]
async fn unreachable_backend_gets_a_temporary_failure_inside_tls_on_implicit_listeners() {
    let dead = dead_address();
    for (protocol, reply) in UNAVAILABLE {
        let proxy = TestProxy::start([listener("tls", protocol, "implicit", &dead)]).await;
        let mut client = proxy.connect_tls("tls").await;
        assert_eq!(
            text(&read_to_close(&mut client).await),
            text(reply),
            "{protocol}"
        );
    }
}

#[tokio::test]
async fn a_backend_that_closes_before_greeting_gets_a_temporary_failure() {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = socket.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            drop(stream);
        }
    });
    for (protocol, reply) in UNAVAILABLE {
        let proxy = TestProxy::start([listener("plain", protocol, "starttls", address)]).await;
        let mut client = proxy.connect("plain").await;
        assert_eq!(
            text(&read_to_close(&mut client).await),
            text(reply),
            "{protocol}"
        );
    }
}

#[tokio::test]
async fn an_overlong_client_line_gets_the_protocols_error_and_a_close() {
    for (protocol, script, reply) in [
        ("smtp", Script::smtp(), &b"220 fake.example ESMTP\r\n421 4.7.0 Line too long, closing connection\r\n"[..]),
        ("imap", Script::imap(), b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS] fake ready\r\n* BYE Line too long\r\n"),
        ("pop3", Script::pop3(), b"+OK fake POP3 ready\r\n-ERR Line too long\r\n"),
    ] {
        let backend = FakeBackend::start(script).await;
        let proxy = TestProxy::start([listener("plain", protocol, "starttls", backend.address)]).await;
        let mut client = proxy.connect("plain").await;
        // 16 KiB without a line end: over the 8 KiB cap before it ever ends.
        let _ = client.write_all(&vec![b'A'; 16 * 1024]).await;
        assert_eq!(text(&read_to_close(&mut client).await), text(reply), "{protocol}");
        assert_eq!(backend.received(0), b"", "{protocol}: nothing of the line reached the backend");
    }
}

#[tokio::test]
async fn an_overlong_backend_line_gets_a_temporary_failure() {
    let greeting = [b"220 ".as_slice(), &vec![b'x'; 70 * 1024], b"\r\n"].concat();
    let backend = FakeBackend::start(Script::new(&greeting)).await;
    let proxy = TestProxy::start([listener("plain", "smtp", "starttls", backend.address)]).await;
    let mut client = proxy.connect("plain").await;
    assert_eq!(
        text(&read_to_close(&mut client).await),
        "421 4.3.2 Service not available, closing transmission channel\r\n"
    );
}

#[tokio::test]
async fn one_broken_session_does_not_disturb_others() {
    let backend = FakeBackend::start(Script::pop3()).await;
    let proxy = TestProxy::start([listener("pop3", "pop3", "starttls", backend.address)]).await;
    let mut healthy = proxy.connect("pop3").await;
    read_until(&mut healthy, b"\r\n").await;
    let mut broken = proxy.connect("pop3").await;
    read_until(&mut broken, b"\r\n").await;
    let _ = broken.write_all(&[0u8; 20 * 1024]).await;
    read_to_close(&mut broken).await;
    let reply = exchange(&mut healthy, b"CAPA\r\n", b"\r\n.\r\n").await;
    // USER is not offered before STLS (require_tls = "auth", the default).
    assert_eq!(text(&reply), "+OK\r\nTOP\r\nSTLS\r\n.\r\n");
}
