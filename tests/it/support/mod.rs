//! Shared test harness: an in-process proxy on ephemeral ports, scripted fake
//! backends that record every byte they receive, a test PKI generated at run
//! time, and small client helpers that read exact replies.
#![allow(dead_code)]

pub mod certs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mail_tls_proxy::config::Config;
use mail_tls_proxy::server::{Proxy, StartError};
use mail_tls_proxy::tls::generate_pair;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long any single test step may wait before the test fails.
pub const STEP: Duration = Duration::from_secs(10);

/// A certificate for `localhost`, written to a private folder, and a client
/// configuration that trusts it.
pub struct TestPki {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub connector: TlsConnector,
}

pub fn test_pki() -> TestPki {
    let dir = std::env::temp_dir().join(format!(
        "mail-tls-proxy-test-{}-{}",
        std::process::id(),
        unique()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let pair = generate_pair(&["localhost".to_string()]).expect("generate certificate");
    let cert = dir.join("fullchain.pem");
    let key = dir.join("privkey.pem");
    std::fs::write(&cert, &pair.cert_pem).expect("write cert");
    std::fs::write(&key, &pair.key_pem).expect("write key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pair.cert_der.clone()).expect("trust test cert");
    TestPki {
        dir,
        cert,
        key,
        connector: connector_with(roots, None),
    }
}

pub fn connector_with(roots: rustls::RootCertStore, alpn: Option<Vec<Vec<u8>>>) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if let Some(alpn) = alpn {
        config.alpn_protocols = alpn;
    }
    TlsConnector::from(Arc::new(config))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One `[[listener]]` of a test proxy.
pub struct ListenerSpec {
    pub name: &'static str,
    pub protocol: &'static str,
    pub tls: &'static str,
    pub backend: String,
}

pub fn listener(
    name: &'static str,
    protocol: &'static str,
    tls: &'static str,
    backend: SocketAddr,
) -> ListenerSpec {
    ListenerSpec {
        name,
        protocol,
        tls,
        backend: backend.to_string(),
    }
}

/// A proxy running inside the test process.
pub struct TestProxy {
    pub pki: TestPki,
    addresses: std::collections::HashMap<String, SocketAddr>,
    pub metrics: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    pub async fn start(listeners: &[ListenerSpec]) -> TestProxy {
        Self::start_with(listeners, "").await
    }

    /// Starts a proxy; `extra` is appended to each listener's table.
    pub async fn start_with(listeners: &[ListenerSpec], extra: &str) -> TestProxy {
        Self::start_configured(listeners, "", extra).await
    }

    /// Starts a proxy with `top_level` settings (e.g. `max_connections = 1`)
    /// and `per_listener` settings appended to each listener's table.
    pub async fn start_configured(
        listeners: &[ListenerSpec],
        top_level: &str,
        per_listener: &str,
    ) -> TestProxy {
        match Self::try_start_configured(listeners, top_level, per_listener).await {
            Ok(proxy) => proxy,
            Err(error) => panic!("proxy binds: {error}"),
        }
    }

    /// As [`TestProxy::start_configured`], returning why it cannot start.
    pub async fn try_start_configured(
        listeners: &[ListenerSpec],
        top_level: &str,
        per_listener: &str,
    ) -> Result<TestProxy, StartError> {
        let extra = per_listener;
        let pki = test_pki();
        let mut text = format!("{top_level}\n");
        text.push_str(
            "[[certificate]]\ncert = \"fullchain.pem\"\nkey = \"privkey.pem\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        );
        for spec in listeners {
            // Scripted backends answer only the dialogue a test plans for;
            // the relay guard's own probe is tested on its own
            // (tests/relay_guard.rs), so it stays off here unless a test
            // sets it.
            let relay_check = if spec.protocol == "smtp" && !extra.contains("relay_check") {
                "relay_check = \"off\"\n"
            } else {
                ""
            };
            text.push_str(&format!(
                "\n[[listener]]\nname = \"{}\"\nprotocol = \"{}\"\ntls = \"{}\"\nlisten = \"127.0.0.1:0\"\nbackend = \"{}\"\n{relay_check}{}\n",
                spec.name, spec.protocol, spec.tls, spec.backend, extra
            ));
        }
        let path = pki.dir.join("config.toml");
        std::fs::write(&path, &text).expect("write config");
        let config = Config::load(&path).expect("valid test config");
        let proxy = Proxy::bind(&config).await?;
        let addresses = proxy.listener_addresses();
        let metrics = proxy.metrics_address();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(proxy.run(async move {
            let _ = stopped.await;
        }));
        Ok(TestProxy {
            pki,
            addresses,
            metrics,
            stop: Some(stop),
            running: Some(running),
        })
    }

    /// Starts the graceful shutdown (as SIGTERM does) and returns the task
    /// that completes when the proxy has drained.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.running.take().expect("proxy is running")
    }

    pub fn address(&self, name: &str) -> SocketAddr {
        self.addresses[name]
    }

    pub async fn connect(&self, name: &str) -> TcpStream {
        tokio::time::timeout(STEP, TcpStream::connect(self.address(name)))
            .await
            .expect("connect in time")
            .expect("connect to proxy")
    }

    pub async fn connect_tls(&self, name: &str) -> TlsStream<TcpStream> {
        let tcp = self.connect(name).await;
        self.upgrade(tcp).await
    }

    pub async fn upgrade<S>(&self, stream: S) -> TlsStream<S>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
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

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What a fake backend answers: the first rule whose prefix matches the
/// start of a received line (ASCII case-insensitive) sends its reply.
#[derive(Clone)]
pub struct Script {
    pub greeting: Vec<u8>,
    pub rules: Vec<(Vec<u8>, Vec<u8>)>,
    /// Rules that answer only the first matching line (checked before `rules`).
    pub once: Vec<(Vec<u8>, Vec<u8>)>,
    /// Reply to lines no rule matches.
    pub fallback: Vec<u8>,
    /// Read a PROXY protocol header (v1 or v2) before greeting, as a
    /// backend configured for it does; it is recorded with the rest.
    pub proxy_header: bool,
}

impl Script {
    pub fn new(greeting: &[u8]) -> Self {
        Self {
            greeting: greeting.to_vec(),
            rules: Vec::new(),
            once: Vec::new(),
            fallback: Vec::new(),
            proxy_header: false,
        }
    }

    /// Expects a PROXY protocol header before the greeting.
    pub fn with_proxy_header(mut self) -> Self {
        self.proxy_header = true;
        self
    }

    pub fn on(mut self, prefix: &[u8], reply: &[u8]) -> Self {
        self.rules.push((prefix.to_vec(), reply.to_vec()));
        self
    }

    pub fn once(mut self, prefix: &[u8], reply: &[u8]) -> Self {
        self.once.push((prefix.to_vec(), reply.to_vec()));
        self
    }

    pub fn otherwise(mut self, reply: &[u8]) -> Self {
        self.fallback = reply.to_vec();
        self
    }

    pub fn smtp() -> Self {
        Script::new(b"220 fake.example ESMTP\r\n")
            .on(
                b"EHLO",
                b"250-fake.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n",
            )
            .on(b"HELO", b"250 fake.example\r\n")
            .on(b"NOOP", b"250 2.0.0 Ok\r\n")
            .on(b"MAIL FROM", b"250 2.1.0 Ok\r\n")
            .on(b"RCPT TO", b"250 2.1.5 Ok\r\n")
            .on(b"DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n")
            .on(b"QUIT", b"221 2.0.0 Bye\r\n")
            .otherwise(b"502 5.5.2 Error: command not recognized\r\n")
    }

    pub fn imap() -> Self {
        Script::new(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] fake ready\r\n")
            .on(
                b"a CAPABILITY",
                b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\na OK Capability completed.\r\n",
            )
            .on(
                b"b CAPABILITY",
                b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\nb OK Capability completed.\r\n",
            )
            .on(b"n NOOP", b"n OK NOOP completed.\r\n")
            .on(
                b"l LOGIN",
                b"l OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
            )
            .on(
                b"z LOGOUT",
                b"* BYE Logging out\r\nz OK Logout completed.\r\n",
            )
            .otherwise(b"* BAD unknown\r\n")
    }

    pub fn pop3() -> Self {
        Script::new(b"+OK fake POP3 ready\r\n")
            .on(b"CAPA", b"+OK\r\nTOP\r\nSTLS\r\nUSER\r\n.\r\n")
            .on(b"USER", b"+OK\r\n")
            .on(b"PASS", b"+OK Logged in.\r\n")
            .on(b"STAT", b"+OK 0 0\r\n")
            .on(b"QUIT", b"+OK Logging out.\r\n")
            .otherwise(b"-ERR Unknown command\r\n")
    }
}

/// What each connection to a fake backend received, in accept order.
type Recordings = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// A plaintext backend on 127.0.0.1 that follows a [`Script`] and records
/// everything each connection sent it.
pub struct FakeBackend {
    pub address: SocketAddr,
    /// What new connections get (see [`FakeBackend::set_script`]).
    script: Arc<Mutex<Script>>,
    received: Recordings,
    /// Per connection, in accept order: set once its script has ended (the
    /// proxy closed the connection, or the script itself ended it).
    ended: Arc<Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
}

impl FakeBackend {
    pub async fn start(script: Script) -> FakeBackend {
        let socket = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let address = socket.local_addr().expect("backend address");
        let received: Recordings = Arc::default();
        let ended: Arc<Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>> = Arc::default();
        let connections = received.clone();
        let endings = ended.clone();
        let script = Arc::new(Mutex::new(script));
        let current = script.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                let record = Arc::new(Mutex::new(Vec::new()));
                let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
                endings.lock().expect("lock").push(done.clone());
                connections.lock().expect("lock").push(record.clone());
                let script = current.lock().expect("lock").clone();
                tokio::spawn(async move {
                    serve_script(stream, script, record).await;
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        FakeBackend {
            address,
            script,
            received,
            ended,
        }
    }

    /// Connections from now on follow `script` (a backend reconfigured
    /// while the proxy runs); open ones keep theirs.
    pub fn set_script(&self, script: Script) {
        *self.script.lock().expect("lock") = script;
    }

    /// Waits until connection `index` has ended (for a proxy session: the
    /// proxy closed its backend side) and returns everything it received.
    /// A barrier for "the backend never got X": nothing can arrive later.
    pub async fn received_when_closed(&self, index: usize) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let done = self
                .ended
                .lock()
                .expect("lock")
                .get(index)
                .is_some_and(|done| done.load(std::sync::atomic::Ordering::SeqCst));
            if done {
                return self.received(index);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "backend connection {index} was not closed; received so far {:?}",
                if self.connections() > index {
                    String::from_utf8_lossy(&self.received(index)).into_owned()
                } else {
                    "(not connected)".to_string()
                }
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many connections reached the backend.
    pub fn connections(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    /// Everything connection `index` sent to the backend so far.
    pub fn received(&self, index: usize) -> Vec<u8> {
        let connections = self.received.lock().expect("lock");
        let bytes = connections[index].lock().expect("lock").clone();
        bytes
    }

    /// Waits until connection `index` has received exactly `expected`.
    pub async fn assert_received(&self, index: usize, expected: &[u8]) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if self.connections() > index && self.received(index) == expected {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let got = if self.connections() > index {
                    self.received(index)
                } else {
                    Vec::new()
                };
                panic!(
                    "backend connection {index} received {:?}, expected {:?}",
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(expected)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn serve_script(mut stream: TcpStream, mut script: Script, record: Arc<Mutex<Vec<u8>>>) {
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    if script.proxy_header {
        // Version 2: 16 fixed bytes, then the length they announce;
        // version 1: one CRLF-terminated line.
        let header_length = |bytes: &[u8]| {
            if bytes.len() >= 16 && bytes.starts_with(b"\r\n\r\n\0\r\nQUIT\n") {
                Some(16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]])))
            } else if bytes.starts_with(b"PROXY ") {
                find_subslice(bytes, b"\r\n").map(|end| end + 2)
            } else {
                None
            }
        };
        loop {
            if let Some(length) = header_length(&pending) {
                if pending.len() >= length {
                    pending.drain(..length);
                    break;
                }
            }
            let read = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            record
                .lock()
                .expect("lock")
                .extend_from_slice(&chunk[..read]);
            pending.extend_from_slice(&chunk[..read]);
        }
    }
    if stream.write_all(&script.greeting).await.is_err() {
        return;
    }
    loop {
        let read = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        record
            .lock()
            .expect("lock")
            .extend_from_slice(&chunk[..read]);
        pending.extend_from_slice(&chunk[..read]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let matches = |(prefix, _): &(Vec<u8>, Vec<u8>)| {
                line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
            };
            let reply = match script.once.iter().position(matches) {
                Some(index) => script.once.remove(index).1,
                None => script
                    .rules
                    .iter()
                    .find(|rule| matches(rule))
                    .map(|(_, reply)| reply.clone())
                    .unwrap_or_else(|| script.fallback.clone()),
            };
            if stream.write_all(&reply).await.is_err() {
                return;
            }
            if reply.starts_with(b"354") {
                // SMTP DATA: the body runs to a line holding a single dot.
                loop {
                    let body_end = if pending.starts_with(b".\r\n") {
                        Some(3)
                    } else {
                        find_subslice(&pending, b"\r\n.\r\n").map(|at| at + 5)
                    };
                    if let Some(consumed) = body_end {
                        pending.drain(..consumed);
                        break;
                    }
                    let read = match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => read,
                    };
                    record
                        .lock()
                        .expect("lock")
                        .extend_from_slice(&chunk[..read]);
                    pending.extend_from_slice(&chunk[..read]);
                }
                if stream.write_all(b"250 2.0.0 Ok: queued\r\n").await.is_err() {
                    return;
                }
            }
            if line.to_ascii_uppercase().starts_with(b"QUIT")
                || line.to_ascii_uppercase().starts_with(b"Z LOGOUT")
            {
                return;
            }
        }
    }
}

fn find_subslice(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Reads until the received bytes end with `ending`; returns them all.
pub async fn read_until<S: AsyncRead + Unpin>(stream: &mut S, ending: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let result = tokio::time::timeout(STEP, async {
        while !got.ends_with(ending) {
            let read = stream.read(&mut chunk).await.expect("read");
            if read == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..read]);
        }
    })
    .await;
    assert!(
        result.is_ok() && got.ends_with(ending),
        "waited for {:?}, got {:?}",
        String::from_utf8_lossy(ending),
        String::from_utf8_lossy(&got)
    );
    got
}

/// Sends `command` and returns the reply, read until it ends with `ending`.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    command: &[u8],
    ending: &[u8],
) -> Vec<u8> {
    stream.write_all(command).await.expect("write");
    stream.flush().await.expect("flush");
    read_until(stream, ending).await
}

/// Reads to end of stream (the peer closed), within the step limit.
pub async fn read_to_close<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let result = tokio::time::timeout(STEP, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => got.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "connection was not closed; got {:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An address nothing listens on.
pub async fn dead_address() -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = socket.local_addr().expect("address");
    drop(socket);
    address
}

/// Fetches `/metrics` from a test proxy.
pub async fn http_get_metrics(proxy: &TestProxy) -> String {
    http_get(proxy.metrics.expect("metrics address"), "/metrics")
        .await
        .1
}

/// A minimal HTTP/1.1 GET; returns (status, body).
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut response = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut response))
        .await
        .expect("response in time")
        .expect("read");
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
