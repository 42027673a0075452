//! The harness every test module shares: an in-process proxy on ephemeral
//! ports ([`TestProxy`]) started from one typed configuration builder
//! ([`TestConfig`]), scripted fake backends that record every byte they
//! receive ([`FakeBackend`], [`InjectingBackend`]), the real binary as a
//! child process ([`ProxyProcess`]), and small client helpers that read
//! exact replies and exact metric values. Certificate helpers (a test CA,
//! rotations, handshakes on every listener kind) are in [`certs`].

pub mod certs;

mod backend;
mod config;
mod handshake;
mod process;
mod proxy;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub use backend::*;
pub use config::*;
pub use handshake::*;
pub use process::*;
pub use proxy::*;

/// How long any single test step may wait before the test fails.
pub const STEP: Duration = Duration::from_secs(10);

/// The 12 bytes every PROXY protocol version 2 header starts with.
pub const V2_SIGNATURE: &[u8] = b"\r\n\r\n\x00\r\nQUIT\n";

/// A number no other call in this process got: keeps temporary folders
/// apart.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A private temporary folder, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "mail-tls-proxy-{label}-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `done` every 10 ms until it holds; fails the test with `failure()`
/// if it does not within [`STEP`].
pub async fn eventually(mut done: impl FnMut() -> bool, failure: impl FnOnce() -> String) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{}", failure());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads until the received bytes end with `ending` and returns them all;
/// `Err` says what went wrong (the peer closed, a read failed, or nothing
/// ended that way within [`STEP`]), with what had arrived.
pub async fn try_read_until<S: AsyncRead + Unpin>(
    stream: &mut S,
    ending: &[u8],
) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        while !got.ends_with(ending) {
            match stream.read(&mut chunk).await {
                Ok(0) => return Err("closed".to_string()),
                Ok(read) => got.extend_from_slice(&chunk[..read]),
                Err(error) => return Err(format!("read: {error}")),
            }
        }
        Ok(())
    };
    let result = match tokio::time::timeout(STEP, read).await {
        Ok(result) => result,
        Err(_) => Err("timed out".to_string()),
    };
    result.map(|()| got.clone()).map_err(|error| {
        format!(
            "waited for {:?}: {error}; got {:?}",
            text(ending),
            text(&got)
        )
    })
}

/// Sends `command` and returns the reply, read until it ends with `ending`
/// (as [`try_read_until`]).
pub async fn try_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    command: &[u8],
    ending: &[u8],
) -> Result<Vec<u8>, String> {
    stream
        .write_all(command)
        .await
        .map_err(|error| format!("write: {error}"))?;
    stream
        .flush()
        .await
        .map_err(|error| format!("flush: {error}"))?;
    try_read_until(stream, ending).await
}

/// Reads until the received bytes end with `ending`; returns them all.
pub async fn read_until<S: AsyncRead + Unpin>(stream: &mut S, ending: &[u8]) -> Vec<u8> {
    try_read_until(stream, ending)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

/// Sends `command` and returns the reply, read until it ends with `ending`.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    command: &[u8],
    ending: &[u8],
) -> Vec<u8> {
    try_exchange(stream, command, ending)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
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
        text(&got)
    );
    got
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An address of 127.0.0.1 nothing listens on: a socket is bound to it but
/// never listens, so connections are refused, and no other socket (another
/// test's, or an outgoing connection's ephemeral port) can take the port
/// while this lives. [`FakeBackend::revive`] makes it listen.
pub struct DeadAddress {
    pub(crate) socket: TcpSocket,
    pub address: SocketAddr,
}

pub fn dead_address() -> DeadAddress {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let address = socket.local_addr().expect("address");
    DeadAddress { socket, address }
}

impl std::fmt::Display for DeadAddress {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.address.fmt(formatter)
    }
}

/// A minimal HTTP/1.1 GET; returns (status, body).
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::time::timeout(STEP, TcpStream::connect(address))
        .await
        .expect("connect in time")
        .expect("connect");
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

/// Polls `/readyz` at `address` until `done` accepts its answer; returns
/// that answer.
pub async fn readyz_until(address: SocketAddr, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    poll_until(async || {
        let (status, body) = http_get(address, "/readyz").await;
        if done(status, &body) {
            Ok((status, body))
        } else {
            Err(format!("/readyz still answers {status}: {body}"))
        }
    })
    .await
}

/// Calls `attempt` every 20 ms until it returns `Ok`; fails the test with
/// its last `Err` if that takes longer than [`STEP`].
pub async fn poll_until<T>(mut attempt: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => assert!(tokio::time::Instant::now() < deadline, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One scrape of a `/metrics` endpoint.
pub struct Scrape(pub String);

impl Scrape {
    /// Fetches `/metrics` from `address`.
    pub async fn fetch(address: SocketAddr) -> Scrape {
        let (status, body) = http_get(address, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        Scrape(body)
    }

    /// The value of the series `series` (name and labels exactly as
    /// exported); fails the test if there is none.
    ///
    /// A series labelled with a listener is claimed for exact assertions:
    /// the metrics recorder is one per process, so that listener name must
    /// be used by no other in-process proxy of this test binary (see
    /// [`proxy::claim_listener_name`]).
    pub fn value(&self, series: &str) -> f64 {
        if let Some((_, rest)) = series.split_once("listener=\"") {
            claim_listener_name(rest.split('"').next().expect("a label value"));
        }
        self.0
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series} in:\n{}", self.0))
            .trim()
            .parse()
            .expect("a number")
    }

    /// The series of the metric `name` for `listener`, each without the
    /// metric name and the listener label: `result="closed"} 1`, sorted.
    /// Claims the listener name as [`Scrape::value`] does.
    pub fn series_of(&self, name: &str, listener: &str) -> Vec<String> {
        claim_listener_name(listener);
        let prefix = format!("{name}{{listener=\"{listener}\",");
        let mut found: Vec<String> = self
            .0
            .lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .map(str::to_string)
            .collect();
        found.sort();
        found
    }

    pub fn contains(&self, part: &str) -> bool {
        self.0.contains(part)
    }
}

/// The value of `series` at the `/metrics` endpoint `address`.
pub async fn metric(address: SocketAddr, series: &str) -> f64 {
    Scrape::fetch(address).await.value(series)
}

/// Waits until `series` at `address` has the value `value`.
pub async fn wait_for_metric(address: SocketAddr, series: &str, value: f64) {
    poll_until(async || {
        let got = metric(address, series).await;
        if got == value {
            Ok(())
        } else {
            Err(format!("{series} is {got}, expected {value}"))
        }
    })
    .await
}
