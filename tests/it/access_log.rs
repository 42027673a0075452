//! The access log, read from the real binary's JSON log lines
//! (`--log-format json`, at debug level): one `session` line per finished
//! session with its client, TLS, outcome, side and exact byte counts; a
//! backend reset in pass-through is the backend's and the client still gets
//! a clean TLS close; refusals are logged by command word, never with the
//! command's arguments; `access_log = false` silences the line.

use std::net::SocketAddr;
use std::process::Command;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// The binary with JSON log lines at debug level, collected; killed when
/// dropped.
struct JsonProxy {
    process: ProxyProcess,
    pki: TestPki,
    _dir: TempDir,
}

impl JsonProxy {
    fn spawn(listeners: Vec<ListenerSpec>) -> JsonProxy {
        let pki = TestPki::new();
        let dir = TempDir::new("access-log");
        let config = TestConfig::new()
            .certificate(&pki.pair)
            .listeners(listeners)
            .write_in(dir.path());
        let mut command = Command::new(BINARY);
        command
            .args(["run", "--config"])
            .arg(&config)
            .env("MAIL_TLS_PROXY_LOG_FORMAT", "json");
        let process = ProxyProcess::spawn_with_log_filter(command, "mail_tls_proxy=debug");
        JsonProxy {
            process,
            pki,
            _dir: dir,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.process.log_lines()
    }

    /// Waits for a line holding every one of `parts`; returns it.
    async fn wait_for(&self, parts: &[&str]) -> String {
        self.wait_for_in(None, parts).await
    }

    /// As [`JsonProxy::wait_for`], among the lines of connection `id` only
    /// (when given).
    async fn wait_for_in(&self, id: Option<&str>, parts: &[&str]) -> String {
        self.process
            .wait_for_log_line(parts, |line| {
                id.is_none_or(|id| try_field(line, "connection_id").as_deref() == Some(id))
            })
            .await
    }

    /// The access line of the session of the client at `client`.
    async fn access_line(&self, client: SocketAddr) -> String {
        self.wait_for(&[
            r#""message":"session""#,
            &format!(r#""client_port":{}"#, client.port()),
        ])
        .await
    }

    async fn address(&self, listener: &str) -> SocketAddr {
        let line = self
            .wait_for(&[
                r#""message":"listening""#,
                &format!(r#""listener":"{listener}""#),
            ])
            .await;
        field(&line, "address").parse().expect("an address")
    }

    async fn connect(&self, listener: &str) -> TcpStream {
        let stream = TcpStream::connect(self.address(listener).await)
            .await
            .expect("connect to proxy");
        stream.set_nodelay(true).expect("nodelay");
        stream
    }

    async fn upgrade(&self, stream: TcpStream) -> tokio_rustls::client::TlsStream<TcpStream> {
        tokio::time::timeout(
            STEP,
            self.pki
                .connector
                .connect(ServerName::try_from("localhost").expect("name"), stream),
        )
        .await
        .expect("handshake in time")
        .expect("handshake succeeds")
    }
}

/// The value of `key` in a JSON log line, as written: a string without its
/// quotes, a number or boolean as is.
fn field(line: &str, key: &str) -> String {
    try_field(line, key).unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn try_field(line: &str, key: &str) -> Option<String> {
    let marker = format!("\"{key}\":");
    let rest = &line[line.find(&marker)? + marker.len()..];
    Some(match rest.strip_prefix('"') {
        Some(string) => string[..string.find('"')?].to_string(),
        None => rest[..rest.find([',', '}'])?].to_string(),
    })
}

/// The fields of an access line that describe the session, without those
/// that vary (`seconds`, `timestamp`, ids and ports).
fn summary(line: &str, keys: &[&str]) -> Vec<String> {
    keys.iter()
        .map(|key| format!("{key}={}", field(line, key)))
        .collect()
}

/// OpenSSL's name of the suite a client negotiated (TLS 1.3: the IANA name).
fn openssl_name(suite: rustls::CipherSuite) -> String {
    let name = format!("{suite:?}");
    match name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => name,
    }
}

/// Waits until one of `backend`'s connections received exactly `expected`
/// (the binary's readiness checks connect to it too).
async fn assert_a_connection_received(backend: &FakeBackend, expected: &[u8]) {
    eventually(
        || (0..backend.connections()).any(|index| backend.received(index) == expected),
        || {
            let got: Vec<String> = (0..backend.connections())
                .map(|index| text(&backend.received(index)))
                .collect();
            format!("no connection received {:?}; got {got:?}", text(expected))
        },
    )
    .await;
}

/// Reads everything until the peer ends the stream; `Ok` only for a clean
/// end (over TLS: close_notify).
async fn read_to_end_cleanly<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut got))
        .await
        .expect("the stream ends in time")?;
    Ok(got)
}

#[tokio::test]
async fn an_implicit_tls_session_closed_by_the_client_is_logged_with_exact_bytes() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = JsonProxy::spawn(vec![listener(
        "access-imaps",
        "imap",
        "implicit",
        backend.address,
    )]);
    let tcp = proxy.connect("access-imaps").await;
    let client_address = tcp.local_addr().expect("address");
    let mut tls = proxy.upgrade(tcp).await;
    let mut received = read_until(&mut tls, b"\r\n").await;
    received.extend(exchange(&mut tls, b"l LOGIN u p\r\n", b"Logged in\r\n").await);
    received.extend(exchange(&mut tls, b"n NOOP\r\n", b"n OK NOOP completed.\r\n").await);
    let cipher = openssl_name(
        tls.get_ref()
            .1
            .negotiated_cipher_suite()
            .expect("suite")
            .suite(),
    );
    tls.shutdown().await.expect("close_notify");
    received.extend(read_to_end_cleanly(&mut tls).await.expect("a clean close"));
    let sent = b"l LOGIN u p\r\nn NOOP\r\n";
    assert_a_connection_received(&backend, sent).await;

    let line = proxy.access_line(client_address).await;
    assert_eq!(
        summary(
            &line,
            &[
                "level",
                "listener",
                "client_ip",
                "client_port",
                "sni",
                "tls_version",
                "cipher",
                "resumed",
                "starttls",
                "outcome",
                "ended_by",
                "reason",
                "bytes_to_backend",
                "bytes_to_client",
            ]
        ),
        [
            "level=INFO".to_string(),
            "listener=access-imaps".into(),
            "client_ip=127.0.0.1".into(),
            format!("client_port={}", client_address.port()),
            "sni=localhost".into(),
            "tls_version=TLSv1.3".into(),
            format!("cipher={cipher}"),
            "resumed=false".into(),
            "starttls=false".into(),
            "outcome=client_closed".into(),
            "ended_by=client".into(),
            "reason=".into(),
            format!("bytes_to_backend={}", sent.len()),
            format!("bytes_to_client={}", received.len()),
        ]
    );
    assert_eq!(field(&line, "peer"), client_address.to_string());
    let seconds: f64 = field(&line, "seconds").parse().expect("seconds");
    assert!((0.0..10.0).contains(&seconds), "{line}");
    // The hand-over is a DEBUG line of the same connection.
    let id = field(&line, "connection_id");
    proxy
        .wait_for_in(
            Some(&id),
            &[
                r#""level":"DEBUG""#,
                r#""message":"inspection over; pass-through starts""#,
            ],
        )
        .await;
}

#[tokio::test]
async fn a_starttls_session_says_so_and_logs_the_upgrade_at_debug() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = JsonProxy::spawn(vec![listener(
        "access-imap",
        "imap",
        "starttls",
        backend.address,
    )]);
    let mut client = proxy.connect("access-imap").await;
    let client_address = client.local_addr().expect("address");
    let mut received = read_until(&mut client, b"\r\n").await;
    received.extend(exchange(&mut client, b"s STARTTLS\r\n", b"\r\n").await);
    let mut tls = proxy.upgrade(client).await;
    received.extend(exchange(&mut tls, b"l LOGIN u p\r\n", b"Logged in\r\n").await);
    tls.shutdown().await.expect("close_notify");
    received.extend(read_to_end_cleanly(&mut tls).await.expect("a clean close"));
    assert_a_connection_received(&backend, b"l LOGIN u p\r\n").await;

    let line = proxy.access_line(client_address).await;
    assert_eq!(
        summary(
            &line,
            &[
                "sni",
                "tls_version",
                "starttls",
                "outcome",
                "ended_by",
                "bytes_to_backend",
                "bytes_to_client"
            ]
        ),
        [
            "sni=localhost".to_string(),
            "tls_version=TLSv1.3".into(),
            "starttls=true".into(),
            "outcome=client_closed".into(),
            "ended_by=client".into(),
            "bytes_to_backend=13".into(),
            format!("bytes_to_client={}", received.len()),
        ]
    );
    let id = field(&line, "connection_id");
    for message in [
        "STARTTLS answered; TLS handshake starts",
        "STARTTLS: TLS established",
        "inspection over; pass-through starts",
    ] {
        proxy
            .wait_for_in(
                Some(&id),
                &[r#""level":"DEBUG""#, &format!(r#""message":"{message}""#)],
            )
            .await;
    }
}

/// An IMAP backend that greets, accepts a login, answers `a LOGOUT` and
/// then resets the connection (closes with SO_LINGER 0), as Dovecot does
/// after a pipelined LOGOUT. Other connections (the binary's readiness
/// checks) get the greeting only.
async fn resetting_backend() -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = socket.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(greet_log_in_and_reset(stream));
        }
    });
    address
}

async fn greet_log_in_and_reset(mut stream: TcpStream) {
    {
        let _ = stream.write_all(b"* OK ready\r\n").await;
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        for (command, reply) in [
            (&b"l LOGIN u p\r\n"[..], &b"l OK Logged in\r\n"[..]),
            (
                b"a LOGOUT\r\n",
                b"* BYE Logging out\r\na OK Logout completed.\r\n",
            ),
        ] {
            while !got.ends_with(command) {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => got.extend_from_slice(&chunk[..read]),
                }
            }
            let _ = stream.write_all(reply).await;
        }
    }
    // Zero linger: close sends a reset, not a FIN. (Deprecated because a
    // non-zero linger blocks the thread on drop; zero never waits.)
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

#[tokio::test]
async fn a_backend_reset_in_pass_through_is_the_backends_and_the_client_gets_close_notify() {
    let backend = resetting_backend().await;
    let proxy = JsonProxy::spawn(vec![listener("access-reset", "imap", "implicit", backend)]);
    let tcp = proxy.connect("access-reset").await;
    let client_address = tcp.local_addr().expect("address");
    let mut tls = proxy.upgrade(tcp).await;
    let mut received = read_until(&mut tls, b"\r\n").await;
    received.extend(exchange(&mut tls, b"l LOGIN u p\r\n", b"Logged in\r\n").await);
    tls.write_all(b"a LOGOUT\r\n").await.expect("write");
    // rustls reports a connection closed without close_notify as an
    // UnexpectedEof error; a clean TLS close reads as the end of stream.
    received.extend(
        read_to_end_cleanly(&mut tls)
            .await
            .expect("the proxy ends the client's TLS session with close_notify"),
    );
    assert!(
        received.ends_with(b"* BYE Logging out\r\na OK Logout completed.\r\n"),
        "{}",
        text(&received)
    );

    let line = proxy.access_line(client_address).await;
    assert_eq!(
        summary(
            &line,
            &["outcome", "ended_by", "bytes_to_backend", "bytes_to_client"]
        ),
        [
            "outcome=error".to_string(),
            "ended_by=backend".into(),
            "bytes_to_backend=23".into(),
            format!("bytes_to_client={}", received.len()),
        ]
    );
    assert!(
        field(&line, "reason").contains("reading from the backend failed"),
        "{line}"
    );
    let id = field(&line, "connection_id");
    let failure = proxy
        .wait_for_in(Some(&id), &[r#""message":"session failed""#])
        .await;
    assert_eq!(
        summary(&failure, &["level", "side"]),
        ["level=INFO", "side=backend"]
    );
}

#[tokio::test]
async fn a_connection_over_the_limit_is_logged_as_refused() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = JsonProxy::spawn(vec![listener(
        "access-limit",
        "imap",
        "implicit",
        backend.address,
    )
    .max_connections_per_ip(1)]);
    let first = proxy.connect("access-limit").await;
    let mut first = proxy.upgrade(first).await;
    read_until(&mut first, b"\r\n").await;
    let second = proxy.connect("access-limit").await;
    let second_address = second.local_addr().expect("address");
    let mut second = proxy.upgrade(second).await;
    let refusal = read_to_end_cleanly(&mut second)
        .await
        .expect("a clean close");
    assert!(refusal.starts_with(b"* BYE"), "{}", text(&refusal));

    let line = proxy.access_line(second_address).await;
    assert_eq!(
        summary(
            &line,
            &[
                "tls_version",
                "outcome",
                "ended_by",
                "reason",
                "bytes_to_backend",
                "bytes_to_client"
            ]
        ),
        [
            "tls_version=TLSv1.3".to_string(),
            "outcome=refused".into(),
            "ended_by=proxy".into(),
            "reason=limit reached: max_connections_per_ip".into(),
            "bytes_to_backend=0".into(),
            format!("bytes_to_client={}", refusal.len()),
        ]
    );
    drop(first);
}

#[tokio::test]
async fn a_policy_refusal_is_logged_by_command_word_without_its_arguments() {
    let backend = FakeBackend::start(Script::smtp()).await;
    let proxy = JsonProxy::spawn(vec![listener(
        "access-submission",
        "smtp",
        "starttls",
        backend.address,
    )
    .require_tls("auth")]);
    let mut client = proxy.connect("access-submission").await;
    let client_address = client.local_addr().expect("address");
    let mut received = read_until(&mut client, b"\r\n").await;
    received.extend(exchange(&mut client, b"EHLO client.example\r\n", b"250 STARTTLS\r\n").await);
    let refusal = exchange(&mut client, b"AUTH PLAIN secret\r\n", b"\r\n").await;
    assert!(refusal.starts_with(b"530"), "{}", text(&refusal));
    received.extend(refusal);
    received.extend(exchange(&mut client, b"QUIT\r\n", b"\r\n").await);
    received.extend(read_to_end_cleanly(&mut client).await.expect("closed"));
    let forwarded = b"EHLO client.example\r\nQUIT\r\n";
    assert_a_connection_received(&backend, forwarded).await;

    let line = proxy.access_line(client_address).await;
    assert_eq!(
        summary(
            &line,
            &[
                "tls_version",
                "starttls",
                "outcome",
                "ended_by",
                "reason",
                "bytes_to_backend",
                "bytes_to_client"
            ]
        ),
        [
            "tls_version=".to_string(),
            "starttls=false".into(),
            "outcome=refused".into(),
            // The server closes the connection after its 221 to QUIT.
            "ended_by=backend".into(),
            "reason=require_tls: AUTH refused before TLS".into(),
            format!("bytes_to_backend={}", forwarded.len()),
            format!("bytes_to_client={}", received.len()),
        ]
    );
    let id = field(&line, "connection_id");
    let refused = proxy
        .wait_for_in(
            Some(&id),
            &[r#""message":"command refused by the listener's policy""#],
        )
        .await;
    assert_eq!(
        summary(&refused, &["level", "command"]),
        ["level=DEBUG", "command=AUTH"]
    );
    let log = proxy.lines().join("\n");
    assert!(
        !log.contains("secret"),
        "an argument reached the log:\n{log}"
    );
}

#[tokio::test]
async fn access_log_false_writes_no_session_line_for_that_listener() {
    let backend = FakeBackend::start(Script::imap()).await;
    let proxy = JsonProxy::spawn(vec![
        listener("access-quiet", "imap", "implicit", backend.address).access_log(false),
        listener("access-loud", "imap", "implicit", backend.address),
    ]);
    for name in ["access-quiet", "access-loud"] {
        let tcp = proxy.connect(name).await;
        let client_address = tcp.local_addr().expect("address");
        let mut tls = proxy.upgrade(tcp).await;
        read_until(&mut tls, b"\r\n").await;
        tls.shutdown().await.expect("close_notify");
        read_to_end_cleanly(&mut tls).await.expect("a clean close");
        // The session is over once its last DEBUG line is out; its access
        // line, if any, follows it at once from the same task.
        proxy
            .wait_for(&[
                r#""message":"session closed""#,
                &format!(r#""peer":"{client_address}""#),
            ])
            .await;
    }
    let loud = proxy
        .wait_for(&[r#""message":"session""#, r#""listener":"access-loud""#])
        .await;
    assert_eq!(field(&loud, "outcome"), "client_closed");
    let quiet: Vec<String> = proxy
        .lines()
        .into_iter()
        .filter(|line| {
            line.contains(r#""message":"session""#) && line.contains(r#""listener":"access-quiet""#)
        })
        .collect();
    assert!(quiet.is_empty(), "{quiet:?}");
}
