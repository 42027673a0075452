//! Session resumption across a fleet: proxies that share a `[tls]
//! ticket_keys` file resume each other's sessions, for TLS 1.3 (PSK with
//! (EC)DHE) and TLS 1.2 (stateless tickets).
//!
//! Each test starts in-process proxies serving one certificate for
//! `localhost` in front of a scripted IMAP backend, and a rustls client that
//! keeps the tickets it is given (its session cache) and tells from its own
//! side whether a handshake was resumed. Checked:
//! - a ticket from proxy A resumes on proxy B, counted in B's
//!   `tls_resumptions_total`; a proxy with keys of its own does not resume
//!   it;
//! - after `tickets rotate` the previous key still opens its tickets; once a
//!   rotation with `--keep 1` drops it, they get a full handshake;
//! - a broken key file is refused (counted as an error) and the keys in use
//!   stay; `run` refuses to start with it and `check` exits 78 naming the
//!   line;
//! - without `ticket_keys`, a configuration reload keeps the process's keys,
//!   so its tickets still resume, and its TLS 1.2 session-ID cache, so a
//!   client without tickets resumes too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mail_tls_proxy::config::Config;
use mail_tls_proxy::server::{Proxy, ReloadHandle, StartError};
use mail_tls_proxy::tls::{ReloadStats, TicketKeyReloads};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, HandshakeKind};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

use crate::support::*;

/// An in-process proxy that reloads its configuration file on request.
struct Replica {
    addresses: HashMap<String, SocketAddr>,
    metrics: SocketAddr,
    ticket_key_reloads: Arc<TicketKeyReloads>,
    certificate_reloads: Arc<ReloadStats>,
    reload: ReloadHandle,
    /// Dropping it stops the proxy.
    _stop: oneshot::Sender<()>,
}

impl Replica {
    /// Starts `config` (with the shared certificate and a metrics endpoint)
    /// from `dir/config.toml`, making `dir` if needed.
    async fn start(dir: &Path, pki: &TestPki, config: TestConfig) -> Replica {
        Replica::try_start(dir, pki, config)
            .await
            .unwrap_or_else(|error| panic!("proxy starts: {error}"))
    }

    async fn try_start(
        dir: &Path,
        pki: &TestPki,
        config: TestConfig,
    ) -> Result<Replica, StartError> {
        std::fs::create_dir_all(dir).expect("replica folder");
        let path = config.certificate(&pki.pair).metrics().write_in(dir);
        let loaded = Config::load(&path).expect("valid configuration");
        let proxy = Proxy::bind(&loaded).await?.reload_from(&path);
        let addresses = proxy.listener_addresses();
        let metrics = proxy.metrics_address().expect("metrics address");
        let ticket_key_reloads = proxy.ticket_key_reloads();
        let certificate_reloads = proxy.certificate_reloads();
        let reload = proxy.reload_handle();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(proxy.run(async move {
            let _ = stopped.await;
        }));
        http_get(metrics, "/readyz").await;
        start_up_checks_done(
            loaded
                .listeners
                .iter()
                .map(|listener| listener.backend.as_str()),
        );
        Ok(Replica {
            addresses,
            metrics,
            ticket_key_reloads,
            certificate_reloads,
            reload,
            _stop: stop,
        })
    }

    fn address(&self, listener: &str) -> SocketAddr {
        self.addresses[listener]
    }

    /// This replica's resumptions on `listener`.
    async fn resumptions(&self, listener: &str) -> f64 {
        metric(
            self.metrics,
            &format!("mail_tls_proxy_tls_resumptions_total{{listener=\"{listener}\"}}"),
        )
        .await
    }

    async fn wait_for_key_reloads(&self, ok: u64, errors: u64) {
        let reloads = &self.ticket_key_reloads;
        eventually(
            || reloads.ok() >= ok && reloads.errors() >= errors,
            || {
                format!(
                    "expected {ok} ok and {errors} failed ticket key reloads, saw {} and {}",
                    reloads.ok(),
                    reloads.errors()
                )
            },
        )
        .await;
    }
}

/// A configuration with one implicit-TLS IMAP listener `name` in front of
/// `backend`.
fn imaps(name: &str, backend: SocketAddr) -> TestConfig {
    TestConfig::new().listener(listener(name, "imap", "implicit", backend))
}

/// A client that keeps the tickets it gets, speaking only `versions`.
fn resuming_client(
    pki: &TestPki,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut config = client_config(roots(&pki.cert_der), versions);
    config.resumption = rustls::client::Resumption::in_memory_sessions(64);
    Arc::new(config)
}

/// One IMAP session through `address`: the handshake, the greeting (which
/// brings the TLS 1.3 tickets sent after the handshake along), a clean
/// close. Returns how the client's handshake went.
async fn session(address: SocketAddr, client: &Arc<ClientConfig>) -> HandshakeKind {
    session_and_tickets(address, client).await.0
}

/// [`session`], and how many TLS 1.3 tickets came with the greeting.
async fn session_and_tickets(
    address: SocketAddr,
    client: &Arc<ClientConfig>,
) -> (HandshakeKind, u32) {
    let tcp = TcpStream::connect(address).await.expect("connect");
    let mut tls = tokio::time::timeout(
        STEP,
        TlsConnector::from(client.clone())
            .connect(ServerName::try_from("localhost").expect("name"), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake succeeds");
    let kind = tls.get_ref().1.handshake_kind().expect("handshake over");
    let greeting = read_until(&mut tls, b"\r\n").await;
    assert!(greeting.starts_with(b"* OK"), "{}", text(&greeting));
    let tickets = tls.get_ref().1.tls13_tickets_received();
    let _ = tls.shutdown().await;
    (kind, tickets)
}

/// A key file with one key, made as an operator would: `tickets rotate`.
fn rotate(file: &Path, keep: Option<&str>) -> String {
    let mut args = vec!["tickets", "rotate", "--file", file.to_str().expect("path")];
    if let Some(keep) = keep {
        args.extend(["--keep", keep]);
    }
    let (ok, stdout, stderr) = run_binary(&args, None);
    assert!(ok, "tickets rotate: {stdout}{stderr}");
    stdout
}

fn key_lines(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .expect("read keys")
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .count()
}

/// A key folder of its own (the proxies watch it) with a first key.
fn key_file(dir: &TempDir) -> PathBuf {
    let keys = dir.join("tickets");
    std::fs::create_dir_all(&keys).expect("key folder");
    let file = keys.join("keys");
    let said = rotate(&file, None);
    assert!(said.contains("created;"), "{said}");
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_from_one_replica_resumes_on_another_with_tls_1_3_and_1_2() {
    let backend = FakeBackend::start(Script::imap()).await;
    let pki = TestPki::new();
    let dir = TempDir::new("tickets-fleet");
    let file = key_file(&dir);
    let a = Replica::start(
        &dir.join("a"),
        &pki,
        imaps("tickets-fleet-a", backend.address).ticket_keys(&file),
    )
    .await;
    let b = Replica::start(
        &dir.join("b"),
        &pki,
        imaps("tickets-fleet-b", backend.address).ticket_keys(&file),
    )
    .await;
    // A replica with keys of its own.
    let c = Replica::start(
        &dir.join("c"),
        &pki,
        imaps("tickets-fleet-c", backend.address),
    )
    .await;
    let (on_a, on_b, on_c) = (
        a.address("tickets-fleet-a"),
        b.address("tickets-fleet-b"),
        c.address("tickets-fleet-c"),
    );

    let tls13 = resuming_client(&pki, &[&rustls::version::TLS13]);
    // Two new tickets after a full handshake, one after a resumed one.
    assert_eq!(
        session_and_tickets(on_a, &tls13).await,
        (HandshakeKind::Full, 2)
    );
    assert_eq!(
        session_and_tickets(on_b, &tls13).await,
        (HandshakeKind::Resumed, 1)
    );
    assert_eq!(b.resumptions("tickets-fleet-b").await, 1.0);
    assert_eq!(a.resumptions("tickets-fleet-a").await, 0.0);

    let tls12 = resuming_client(&pki, &[&rustls::version::TLS12]);
    assert_eq!(session(on_a, &tls12).await, HandshakeKind::Full);
    assert_eq!(session(on_b, &tls12).await, HandshakeKind::Resumed);
    assert_eq!(b.resumptions("tickets-fleet-b").await, 2.0);

    // C cannot open tickets sealed with the fleet's keys, and the fleet
    // cannot open C's.
    let other = resuming_client(&pki, &[&rustls::version::TLS13]);
    assert_eq!(session(on_a, &other).await, HandshakeKind::Full);
    assert_eq!(session(on_c, &other).await, HandshakeKind::Full);
    assert_eq!(session(on_b, &other).await, HandshakeKind::Full);
    assert_eq!(c.resumptions("tickets-fleet-c").await, 0.0);
    // Resumptions are successful handshakes too.
    assert_eq!(
        metric(
            b.metrics,
            "mail_tls_proxy_tls_handshakes_total{listener=\"tickets-fleet-b\",result=\"ok\"}"
        )
        .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_old_tickets_resume_until_their_key_is_dropped() {
    let backend = FakeBackend::start(Script::imap()).await;
    let pki = TestPki::new();
    let dir = TempDir::new("tickets-rotation");
    let file = key_file(&dir);
    let a = Replica::start(
        &dir.join("a"),
        &pki,
        imaps("tickets-rotation-a", backend.address).ticket_keys(&file),
    )
    .await;
    let b = Replica::start(
        &dir.join("b"),
        &pki,
        imaps("tickets-rotation-b", backend.address).ticket_keys(&file),
    )
    .await;
    let (on_a, on_b) = (
        a.address("tickets-rotation-a"),
        b.address("tickets-rotation-b"),
    );
    // Two clients with tickets sealed by the first key.
    let early = resuming_client(&pki, &[&rustls::version::TLS13]);
    let late = resuming_client(&pki, &[&rustls::version::TLS13]);
    assert_eq!(session(on_a, &early).await, HandshakeKind::Full);
    assert_eq!(session(on_a, &late).await, HandshakeKind::Full);

    // A second key: it seals from now on, the first still opens.
    let said = rotate(&file, None);
    assert!(
        said.contains("2 keys in the file, 0 oldest dropped"),
        "{said}"
    );
    a.wait_for_key_reloads(1, 0).await;
    b.wait_for_key_reloads(1, 0).await;
    assert_eq!(session(on_b, &early).await, HandshakeKind::Resumed);
    assert_eq!(b.resumptions("tickets-rotation-b").await, 1.0);

    // Only a third key left: the first key's tickets get a full handshake,
    // on either replica.
    let said = rotate(&file, Some("1"));
    assert!(
        said.contains("1 keys in the file, 2 oldest dropped"),
        "{said}"
    );
    assert_eq!(key_lines(&file), 1);
    a.wait_for_key_reloads(2, 0).await;
    b.wait_for_key_reloads(2, 0).await;
    assert_eq!(session(on_b, &late).await, HandshakeKind::Full);
    // The full handshake brought tickets of the third key: they resume.
    assert_eq!(session(on_a, &late).await, HandshakeKind::Resumed);
    assert_eq!(a.resumptions("tickets-rotation-a").await, 1.0);
    assert_eq!(b.resumptions("tickets-rotation-b").await, 1.0);
    assert!(
        metric(
            a.metrics,
            "mail_tls_proxy_ticket_key_reloads_total{result=\"ok\"}"
        )
        .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_key_file_is_refused_and_the_keys_in_use_stay() {
    let backend = FakeBackend::start(Script::imap()).await;
    let pki = TestPki::new();
    let dir = TempDir::new("tickets-broken");
    let file = key_file(&dir);
    let replica = Replica::start(
        dir.path(),
        &pki,
        imaps("tickets-broken", backend.address).ticket_keys(&file),
    )
    .await;
    let on_replica = replica.address("tickets-broken");
    let errors_before = metric(
        replica.metrics,
        "mail_tls_proxy_ticket_key_reloads_total{result=\"error\"}",
    )
    .await;
    let client = resuming_client(&pki, &[&rustls::version::TLS13]);
    assert_eq!(session(on_replica, &client).await, HandshakeKind::Full);

    // A truncated second key, written by rename as a deployment tool would.
    let good = std::fs::read_to_string(&file).expect("read keys");
    let last_key = good.lines().last().expect("a key").to_string();
    let broken = format!("{good}{}\n", &last_key[..40]);
    let staged = dir.join("tickets/.keys.new");
    std::fs::write(&staged, &broken).expect("write");
    std::fs::rename(&staged, &file).expect("rename");
    replica.wait_for_key_reloads(0, 1).await;
    assert_eq!(replica.ticket_key_reloads.ok(), 0);
    assert!(
        metric(
            replica.metrics,
            "mail_tls_proxy_ticket_key_reloads_total{result=\"error\"}"
        )
        .await
            >= errors_before + 1.0
    );
    // The keys in use stay: the ticket resumes.
    assert_eq!(session(on_replica, &client).await, HandshakeKind::Resumed);

    // `check` names the line and exits 78; so does a start with it.
    let config = dir.join("config.toml");
    let checked = finish(binary_command().args(["check", "-c"]).arg(&config));
    assert_eq!(checked.code, Some(78), "{checked:?}");
    let expected = format!("{}: line 5: 30 bytes where a key has 80", file.display());
    assert!(checked.stderr.contains(&expected), "{checked:?}");
    let other = TempDir::new("tickets-broken-start");
    let refused = Replica::try_start(
        other.path(),
        &pki,
        imaps("tickets-broken-start", backend.address).ticket_keys(&file),
    )
    .await;
    match refused {
        Err(error @ StartError::TicketKeys(_)) => {
            assert!(error.to_string().contains(&expected), "{error}")
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("started with a broken key file"),
    }

    // Fixed: the file's keys are in use again, nothing to swap.
    std::fs::write(&staged, &good).expect("write");
    std::fs::rename(&staged, &file).expect("rename");
    let checked = finish(binary_command().args(["check", "-c"]).arg(&config));
    assert_eq!(checked.code, Some(0), "{checked:?}");
    assert!(
        checked.stdout.contains("session tickets: 1 keys from"),
        "{checked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ticket_keys_a_configuration_reload_keeps_the_tickets() {
    let backend = FakeBackend::start(Script::imap()).await;
    let pki = TestPki::new();
    let dir = TempDir::new("tickets-reload");
    let replica = Replica::start(
        dir.path(),
        &pki,
        imaps("tickets-reload", backend.address).ticket_lifetime(3600),
    )
    .await;
    let on_replica = replica.address("tickets-reload");
    let tls13 = resuming_client(&pki, &[&rustls::version::TLS13]);
    let tls12 = resuming_client(&pki, &[&rustls::version::TLS12]);
    // A TLS 1.2 client without ticket support resumes by session ID.
    let session_id_only = {
        let mut config = client_config(roots(&pki.cert_der), &[&rustls::version::TLS12]);
        config.resumption = rustls::client::Resumption::in_memory_sessions(64)
            .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
        Arc::new(config)
    };
    assert_eq!(session(on_replica, &tls13).await, HandshakeKind::Full);
    assert_eq!(session(on_replica, &tls12).await, HandshakeKind::Full);
    assert_eq!(
        session(on_replica, &session_id_only).await,
        HandshakeKind::Full
    );

    assert!(replica.reload.reload());
    // A configuration reload re-reads the certificates and counts it.
    eventually(
        || replica.certificate_reloads.ok() >= 1,
        || "the configuration reload did not happen".to_string(),
    )
    .await;
    assert_eq!(session(on_replica, &tls13).await, HandshakeKind::Resumed);
    assert_eq!(session(on_replica, &tls12).await, HandshakeKind::Resumed);
    assert_eq!(
        session(on_replica, &session_id_only).await,
        HandshakeKind::Resumed
    );
    assert_eq!(replica.resumptions("tickets-reload").await, 3.0);
    assert_eq!(replica.ticket_key_reloads.ok(), 0);
}
