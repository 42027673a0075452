//! systemd's notify protocol as the real binary speaks it to a real notify
//! socket (`NOTIFY_SOCKET`, a Unix datagram socket the test binds): the
//! exact datagrams for ready (only once the listeners accept), reloading
//! (with the monotonic time of its start) and reloaded, stopping, and the
//! watchdog keep-alive at half the interval, for the watched process only.

use std::os::unix::net::UnixDatagram as StdUnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustls::pki_types::ServerName;
use sd_notify::NotifyState;
use tokio::net::{TcpStream, UnixDatagram};

use crate::support::*;

/// The service manager's end: a datagram socket in a private folder.
struct NotifySocket {
    path: PathBuf,
    socket: UnixDatagram,
    _dir: TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = TempDir::new("notify");
        let path = dir.join("notify.sock");
        let socket = StdUnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_nonblocking(true).expect("non-blocking");
        NotifySocket {
            path,
            socket: UnixDatagram::from_std(socket).expect("tokio socket"),
            _dir: dir,
        }
    }

    /// The next datagram, as its lines (each sent line ends in `\n`).
    async fn next(&self) -> Vec<String> {
        self.within(STEP)
            .await
            .expect("a notification within the step")
    }

    /// The next datagram if one arrives within `wait`.
    async fn within(&self, wait: Duration) -> Option<Vec<String>> {
        let mut buffer = vec![0u8; 4096];
        let length = tokio::time::timeout(wait, self.socket.recv(&mut buffer))
            .await
            .ok()?
            .expect("receive a datagram");
        let text = String::from_utf8(buffer[..length].to_vec()).expect("UTF-8");
        assert!(text.ends_with('\n'), "{text:?}");
        Some(text.lines().map(str::to_string).collect())
    }
}

/// `run --config config` with systemd's variables pointing at `socket`.
fn under_systemd(socket: &NotifySocket, config: &Path) -> Command {
    let mut command = binary_command();
    command
        .args(["run", "--config"])
        .arg(config)
        .env("NOTIFY_SOCKET", &socket.path);
    command
}

/// CLOCK_MONOTONIC in microseconds, as the proxy reads it.
fn monotonic_usec() -> i128 {
    match NotifyState::monotonic_usec_now().expect("CLOCK_MONOTONIC") {
        NotifyState::MonotonicUsec(now) => now,
        other => panic!("{other:?}"),
    }
}

/// One IMAPS listener on a port known before start-up, in front of a
/// greeting backend.
async fn imaps_on_known_port(pki: &TestPki) -> (FakeBackend, std::net::SocketAddr, PathBuf) {
    let backend = FakeBackend::start(Script::imap()).await;
    let address = free_address();
    let config = TestConfig::new()
        .shutdown_grace(1)
        .certificate(&pki.pair)
        .listener(listener("imaps", "imap", "implicit", backend.address).listen_on(address))
        .write_in(pki.dir.path());
    (backend, address, config)
}

#[tokio::test]
async fn ready_comes_once_the_listeners_accept_and_stopping_when_the_drain_begins() {
    let pki = TestPki::new();
    let (_backend, address, config) = imaps_on_known_port(&pki).await;
    let socket = NotifySocket::bind();
    let mut proxy = ProxyProcess::spawn_command(under_systemd(&socket, &config));

    assert_eq!(
        socket.next().await,
        ["READY=1", "STATUS=serving 1 listeners: imaps"]
    );
    // At once, no retry: the listener accepts and the session works.
    let tcp = TcpStream::connect(address)
        .await
        .expect("the listener accepts as soon as READY=1 is sent");
    let mut tls = tokio::time::timeout(
        STEP,
        pki.connector
            .connect(ServerName::try_from("localhost").expect("name"), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    assert!(text(&read_until(&mut tls, b"\r\n").await).starts_with("* OK"));
    drop(tls);

    proxy.signal("TERM");
    let stopping = socket.next().await;
    assert_eq!(stopping[0], "STOPPING=1", "{stopping:?}");
    assert_eq!(stopping.len(), 2, "{stopping:?}");
    assert!(
        stopping[1].starts_with("STATUS=draining ") && stopping[1].ends_with("(up to 1 s)"),
        "{stopping:?}"
    );
    assert_eq!(proxy.wait_for_exit().await.code(), Some(0));
    assert_eq!(socket.within(Duration::from_millis(100)).await, None);
}

#[tokio::test]
async fn a_reload_is_announced_with_its_monotonic_start_and_ends_ready_again() {
    let pki = TestPki::new();
    let (_backend, _address, config) = imaps_on_known_port(&pki).await;
    let socket = NotifySocket::bind();
    let proxy = ProxyProcess::spawn_command(under_systemd(&socket, &config));
    assert_eq!(socket.next().await[0], "READY=1");

    let before = monotonic_usec();
    proxy.signal("HUP");
    let reloading = socket.next().await;
    let after = monotonic_usec();
    assert_eq!(reloading.len(), 3, "{reloading:?}");
    assert_eq!(reloading[0], "RELOADING=1");
    let started: i128 = reloading[1]
        .strip_prefix("MONOTONIC_USEC=")
        .and_then(|usec| usec.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC= number: {reloading:?}"));
    assert!(
        before <= started && started <= after,
        "{before} <= {started} <= {after}"
    );
    assert_eq!(reloading[2], "STATUS=reloading the configuration");

    let reloaded = socket.next().await;
    assert_eq!(reloaded.len(), 2, "{reloaded:?}");
    assert_eq!(reloaded[0], "READY=1");
    assert!(reloaded[1].starts_with("STATUS="), "{reloaded:?}");
}

#[tokio::test]
async fn the_watchdog_is_fed_at_half_its_interval_for_the_watched_process_only() {
    let pki = TestPki::new();
    let (_backend, _address, config) = imaps_on_known_port(&pki).await;

    // WATCHDOG_PID names the process systemd started: the shell's pid is
    // the proxy's once it execs.
    let socket = NotifySocket::bind();
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            r#"WATCHDOG_PID=$$ exec "$0" run --config "$1""#,
            BINARY,
        ])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket.path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .env_remove("MAIL_TLS_PROXY_CONFIG");
    let proxy = ProxyProcess::spawn_command(command);
    let first = socket.next().await;
    let started = tokio::time::Instant::now();
    let mut keep_alives = usize::from(first == ["WATCHDOG=1"]);
    while started.elapsed() < Duration::from_secs(1) {
        let wait = Duration::from_secs(1).saturating_sub(started.elapsed());
        let Some(datagram) = socket.within(wait).await else {
            break;
        };
        match datagram[0].as_str() {
            "WATCHDOG=1" => {
                assert_eq!(datagram, ["WATCHDOG=1"]);
                keep_alives += 1;
            }
            "READY=1" => {}
            _ => panic!("unexpected {datagram:?}"),
        }
    }
    // Every 100 ms: about 10 in a second; a loaded machine may delay some.
    assert!(keep_alives >= 5, "{keep_alives} WATCHDOG=1 in a second");
    drop(proxy);

    // A watchdog meant for another process is not this one's to feed.
    let socket = NotifySocket::bind();
    let mut command = under_systemd(&socket, &config);
    command
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", "1");
    let _other = ProxyProcess::spawn_command(command);
    assert_eq!(socket.next().await[0], "READY=1");
    assert_eq!(socket.within(Duration::from_millis(500)).await, None);
}
