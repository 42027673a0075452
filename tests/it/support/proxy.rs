//! A proxy running inside the test process, and the test PKI the usual one
//! serves.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use mail_tls_proxy::config::Config;
use mail_tls_proxy::server::{Proxy, StartError};
use mail_tls_proxy::tls::{generate_pair, ReloadStats};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{PairPaths, Scrape, TempDir, TestConfig, STEP};

/// A certificate for `localhost`, written to a private folder, and a client
/// that trusts it.
pub struct TestPki {
    pub dir: TempDir,
    pub pair: PairPaths,
    pub cert_der: CertificateDer<'static>,
    pub connector: TlsConnector,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = TempDir::new("test-pki");
        let generated = generate_pair(&["localhost".to_string()]).expect("generate certificate");
        let pair = PairPaths {
            cert: dir.join("fullchain.pem"),
            key: dir.join("privkey.pem"),
        };
        std::fs::write(&pair.cert, &generated.cert_pem).expect("write cert");
        std::fs::write(&pair.key, &generated.key_pem).expect("write key");
        let connector = TlsConnector::from(Arc::new(client_config(
            roots(&generated.cert_der),
            rustls::DEFAULT_VERSIONS,
        )));
        TestPki {
            dir,
            pair,
            cert_der: generated.cert_der,
            connector,
        }
    }
}

/// A root store holding `certificate` only.
pub fn roots(certificate: &CertificateDer<'static>) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate.clone()).expect("trust certificate");
    roots
}

/// A TLS client configuration for tests: trusts `roots`, speaks `versions`,
/// no client certificate.
pub fn client_config(
    roots: rustls::RootCertStore,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// How many in-process proxies of this test binary used each listener name,
/// and whether a test asserts exact metric values for it.
static LISTENER_NAMES: Mutex<BTreeMap<String, NameUse>> = Mutex::new(BTreeMap::new());

/// [`LISTENER_NAMES`], also after a test failed while holding it (one
/// collision must not fail every later test).
fn listener_names() -> std::sync::MutexGuard<'static, BTreeMap<String, NameUse>> {
    LISTENER_NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct NameUse {
    proxies: usize,
    claimed: bool,
}

fn collision(name: &str, proxies: usize) -> String {
    format!(
        "listener name {name:?} is used by {proxies} in-process proxies of this test binary, \
         and a test asserts exact metric values for it; the metrics recorder is one per \
         process, so give that test's listeners names no other test uses"
    )
}

fn register_listener_names(config: &TestConfig) {
    let mut names = listener_names();
    for listener in &config.listeners {
        let entry = names.entry(listener.name.clone()).or_default();
        entry.proxies += 1;
        assert!(
            !entry.claimed || entry.proxies == 1,
            "{}",
            collision(&listener.name, entry.proxies)
        );
    }
}

/// Marks `name` as one whose metric values a test asserts exactly: no
/// other in-process proxy of this binary may use it, before or after.
pub fn claim_listener_name(name: &str) {
    let mut names = listener_names();
    let entry = names.entry(name.to_string()).or_default();
    entry.claimed = true;
    assert!(entry.proxies <= 1, "{}", collision(name, entry.proxies));
}

/// A proxy running inside the test process.
pub struct TestProxy {
    addresses: HashMap<String, SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub reloads: Arc<ReloadStats>,
    stop: Option<oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<()>>,
    /// The test PKI whose certificate this proxy serves, when the harness
    /// made one ([`TestProxy::start`]); dropped (its folder removed) with
    /// the proxy.
    pki: Option<TestPki>,
}

impl TestProxy {
    /// The usual test proxy: `listeners`, the test PKI's certificate for
    /// `localhost` and `/metrics` on an ephemeral port.
    pub async fn start(listeners: impl IntoIterator<Item = super::ListenerSpec>) -> TestProxy {
        Self::start_config(TestConfig::new().listeners(listeners)).await
    }

    /// As [`TestProxy::start`] with the rest of `config` (top-level settings
    /// and listeners); it must name no certificate and no metrics endpoint of
    /// its own.
    pub async fn start_config(config: TestConfig) -> TestProxy {
        match Self::try_start_config(config).await {
            Ok(proxy) => proxy,
            Err(error) => panic!("proxy binds: {error}"),
        }
    }

    /// As [`TestProxy::start_config`], returning why it cannot start.
    pub async fn try_start_config(config: TestConfig) -> Result<TestProxy, StartError> {
        assert!(
            !config.has_certificate() && !config.has_metrics(),
            "the harness adds the test PKI's certificate and the metrics endpoint"
        );
        let pki = TestPki::new();
        let config = config.certificate(&pki.pair).metrics();
        let mut proxy = Self::bind(pki.dir.path(), &config).await?;
        proxy.pki = Some(pki);
        Ok(proxy)
    }

    /// A proxy started from `config` exactly as given, written to `dir`
    /// (for tests that bring their own certificates).
    pub async fn start_in(dir: &Path, config: &TestConfig) -> TestProxy {
        Self::bind(dir, config).await.expect("proxy starts")
    }

    async fn bind(dir: &Path, config: &TestConfig) -> Result<TestProxy, StartError> {
        register_listener_names(config);
        let path = config.write_in(dir);
        let loaded = Config::load(&path).expect("valid test config");
        let proxy = Proxy::bind(&loaded).await?;
        let addresses = proxy.listener_addresses();
        let metrics = proxy.metrics_address();
        let reloads = proxy.certificate_reloads();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(proxy.run(async move {
            let _ = stopped.await;
        }));
        // The proxy checks every backend from start-up; /readyz answers once
        // that first round is done (or after 3 s), so the checks' connections
        // come before any the test makes.
        if let Some(metrics) = metrics {
            super::http_get(metrics, "/readyz").await;
        }
        super::backend::start_up_checks_done(
            loaded
                .listeners
                .iter()
                .map(|listener| listener.backend.as_str()),
        );
        Ok(TestProxy {
            addresses,
            metrics,
            reloads,
            stop: Some(stop),
            running: Some(running),
            pki: None,
        })
    }

    /// The client that trusts the test PKI this proxy serves.
    pub fn connector(&self) -> &TlsConnector {
        &self
            .pki
            .as_ref()
            .expect("a proxy serving the test PKI (TestProxy::start); others serve the test's own certificates")
            .connector
    }

    /// The test PKI's certificate, as the one root a client trusts.
    pub fn roots(&self) -> rustls::RootCertStore {
        roots(
            &self
                .pki
                .as_ref()
                .expect("a proxy serving the test PKI")
                .cert_der,
        )
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

    /// A connection to listener `name` from `source` (any address of
    /// 127/8: Linux routes all of it to the loopback interface), with
    /// Nagle off.
    pub async fn connect_from(&self, source: IpAddr, name: &str) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind the source address");
        let stream = tokio::time::timeout(STEP, socket.connect(self.address(name)))
            .await
            .expect("connect in time")
            .expect("connect to proxy");
        stream.set_nodelay(true).expect("nodelay");
        stream
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
            self.connector()
                .connect(ServerName::try_from("localhost").expect("name"), stream),
        )
        .await
        .expect("handshake in time")
        .expect("handshake succeeds")
    }

    /// One scrape of this proxy's `/metrics`.
    pub async fn scrape(&self) -> Scrape {
        Scrape::fetch(self.metrics.expect("metrics address")).await
    }

    /// Waits (polling, up to [`STEP`]) until this proxy counted at least
    /// `count` failed reloads.
    pub async fn wait_for_reload_errors(&self, count: u64) {
        super::eventually(
            || self.reloads.errors() >= count,
            || {
                format!(
                    "expected {count} failed reloads, saw {}",
                    self.reloads.errors()
                )
            },
        )
        .await;
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
