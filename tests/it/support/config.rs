//! The one way tests write a proxy configuration: [`TestConfig`] with its
//! [`ListenerSpec`]s and [`PairPaths`], serialized by the `toml` crate (so
//! strings and paths are always escaped correctly). Options left unset are
//! not written, and the proxy's default applies.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// A whole configuration file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TestConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shutdown_grace: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate_poll_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    readiness_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_check_interval: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reload_on_change: Option<bool>,
    #[serde(rename = "certificate", skip_serializing_if = "Vec::is_empty")]
    certificates: Vec<PairPaths>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Tls>,
    #[serde(rename = "listener", skip_serializing_if = "Vec::is_empty")]
    pub(super) listeners: Vec<ListenerSpec>,
}

#[derive(Clone, Debug, Serialize)]
struct Metrics {
    listen: String,
}

/// The `[tls]` table.
#[derive(Clone, Debug, Default, Serialize)]
struct Tls {
    #[serde(skip_serializing_if = "Option::is_none")]
    ticket_keys: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ticket_lifetime: Option<u64>,
}

/// Where a certificate and its key live on disk: a `[[certificate]]` table.
#[derive(Clone, Debug, Serialize)]
pub struct PairPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestConfig {
    pub fn new() -> TestConfig {
        TestConfig::default()
    }

    pub fn hostname(mut self, name: &str) -> Self {
        self.hostname = Some(name.to_string());
        self
    }

    pub fn max_connections(mut self, count: usize) -> Self {
        self.max_connections = Some(count);
        self
    }

    pub fn shutdown_grace(mut self, seconds: u64) -> Self {
        self.shutdown_grace = Some(seconds);
        self
    }

    pub fn certificate_poll_interval(mut self, seconds: u64) -> Self {
        self.certificate_poll_interval = Some(seconds);
        self
    }

    pub fn readiness_interval(mut self, seconds: u64) -> Self {
        self.readiness_interval = Some(seconds);
        self
    }

    pub fn reload_on_change(mut self, on: bool) -> Self {
        self.reload_on_change = Some(on);
        self
    }

    pub fn relay_check_interval(mut self, seconds: u64) -> Self {
        self.relay_check_interval = Some(seconds);
        self
    }

    /// Adds a `[[certificate]]` (the first one added is the default).
    pub fn certificate(mut self, pair: &PairPaths) -> Self {
        self.certificates.push(pair.clone());
        self
    }

    /// `[[certificate]]` tables for `pairs`, in order.
    pub fn certificates<'a>(self, pairs: impl IntoIterator<Item = &'a PairPaths>) -> Self {
        pairs.into_iter().fold(self, TestConfig::certificate)
    }

    pub(super) fn has_certificate(&self) -> bool {
        !self.certificates.is_empty()
    }

    /// `/metrics` and the health endpoints on an ephemeral port.
    pub fn metrics(self) -> Self {
        self.metrics_on("127.0.0.1:0")
    }

    pub fn metrics_on(mut self, listen: &str) -> Self {
        self.metrics = Some(Metrics {
            listen: listen.to_string(),
        });
        self
    }

    pub(super) fn has_metrics(&self) -> bool {
        self.metrics.is_some()
    }

    /// `[tls] ticket_keys`: session ticket keys shared with other proxies.
    pub fn ticket_keys(mut self, path: &Path) -> Self {
        self.tls.get_or_insert_with(Tls::default).ticket_keys = Some(path.to_path_buf());
        self
    }

    /// `[tls] ticket_lifetime`, in seconds.
    pub fn ticket_lifetime(mut self, seconds: u64) -> Self {
        self.tls.get_or_insert_with(Tls::default).ticket_lifetime = Some(seconds);
        self
    }

    pub fn listener(mut self, listener: ListenerSpec) -> Self {
        self.listeners.push(listener);
        self
    }

    pub fn listeners(self, listeners: impl IntoIterator<Item = ListenerSpec>) -> Self {
        listeners.into_iter().fold(self, TestConfig::listener)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a configuration serializes")
    }

    /// Writes the configuration as `config.toml` in `dir`; returns its path.
    pub fn write_in(&self, dir: &Path) -> PathBuf {
        let path = dir.join("config.toml");
        std::fs::write(&path, self.to_toml()).expect("write config");
        path
    }
}

/// One `[[listener]]` table.
#[derive(Clone, Debug, Serialize)]
pub struct ListenerSpec {
    pub name: String,
    pub protocol: &'static str,
    pub tls: &'static str,
    listen: String,
    backend: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    handshake_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    require_tls: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_tls_version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections_per_ip: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_inspected_commands: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sni_strict: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_identity: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_check: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accept_proxy_from: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_header_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    access_log: Option<bool>,
}

/// A listener on an ephemeral port of 127.0.0.1 in front of `backend`.
///
/// SMTP listeners get `relay_check = "off"`: scripted backends answer only
/// the dialogue a test plans for (the SMTP script accepts every recipient),
/// and the relay guard's own probe is tested on its own
/// (`relay_guard.rs`). A test about the guard sets
/// [`ListenerSpec::relay_check`] or [`ListenerSpec::default_relay_check`].
pub fn listener(
    name: &str,
    protocol: &'static str,
    tls: &'static str,
    backend: impl ToString,
) -> ListenerSpec {
    ListenerSpec {
        name: name.to_string(),
        protocol,
        tls,
        listen: "127.0.0.1:0".to_string(),
        backend: backend.to_string(),
        handshake_timeout: None,
        idle_timeout: None,
        require_tls: None,
        min_tls_version: None,
        max_connections_per_ip: None,
        max_inspected_commands: None,
        sni_strict: None,
        client_identity: None,
        relay_check: (protocol == "smtp").then_some("off"),
        accept_proxy_from: None,
        proxy_header_timeout: None,
        access_log: None,
    }
}

impl ListenerSpec {
    pub fn handshake_timeout(mut self, seconds: u64) -> Self {
        self.handshake_timeout = Some(seconds);
        self
    }

    /// Listens on `address` instead of an ephemeral port.
    pub fn listen_on(mut self, address: std::net::SocketAddr) -> Self {
        self.listen = address.to_string();
        self
    }

    pub fn idle_timeout(mut self, seconds: u64) -> Self {
        self.idle_timeout = Some(seconds);
        self
    }

    pub fn require_tls(mut self, policy: &'static str) -> Self {
        self.require_tls = Some(policy);
        self
    }

    pub fn min_tls_version(mut self, version: &'static str) -> Self {
        self.min_tls_version = Some(version);
        self
    }

    pub fn max_connections_per_ip(mut self, count: usize) -> Self {
        self.max_connections_per_ip = Some(count);
        self
    }

    pub fn max_inspected_commands(mut self, count: usize) -> Self {
        self.max_inspected_commands = Some(count);
        self
    }

    pub fn sni_strict(mut self, strict: bool) -> Self {
        self.sni_strict = Some(strict);
        self
    }

    pub fn client_identity(mut self, identity: &'static str) -> Self {
        self.client_identity = Some(identity);
        self
    }

    pub fn relay_check(mut self, mode: &'static str) -> Self {
        self.relay_check = Some(mode);
        self
    }

    /// No `relay_check` key: the proxy's default (refuse) applies.
    pub fn default_relay_check(mut self) -> Self {
        self.relay_check = None;
        self
    }

    pub fn accept_proxy_from(mut self, sources: &[&str]) -> Self {
        self.accept_proxy_from = Some(sources.iter().map(ToString::to_string).collect());
        self
    }

    pub fn proxy_header_timeout(mut self, seconds: u64) -> Self {
        self.proxy_header_timeout = Some(seconds);
        self
    }

    pub fn access_log(mut self, on: bool) -> Self {
        self.access_log = Some(on);
        self
    }
}

#[test]
fn the_builder_writes_exact_toml_that_the_proxy_loads() {
    let dir = super::TempDir::new("config-builder");
    let pair = PairPaths {
        cert: dir.join("a \"quoted\" \\ name.crt"),
        key: dir.join("key.pem"),
    };
    let config = TestConfig::new()
        .hostname("proxy.test")
        .max_connections(7)
        .relay_check_interval(60)
        .certificate(&pair)
        .metrics()
        .listener(listener("mx", "smtp", "starttls", "127.0.0.1:25"))
        .listener(
            listener("imaps", "imap", "implicit", "127.0.0.1:143")
                .sni_strict(true)
                .client_identity("proxy-v2")
                .accept_proxy_from(&["127.0.0.1", "10.0.0.0/8"]),
        )
        .listener(listener("guarded", "smtp", "implicit", "127.0.0.1:25").default_relay_check());
    // A path with quotes and a backslash becomes a literal string.
    assert_eq!(
        config.to_toml(),
        format!(
            "hostname = \"proxy.test\"\nmax_connections = 7\nrelay_check_interval = 60\n\n\
             [[certificate]]\ncert = '{}'\nkey = \"{}\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [[listener]]\nname = \"mx\"\nprotocol = \"smtp\"\ntls = \"starttls\"\nlisten = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:25\"\nrelay_check = \"off\"\n\n\
             [[listener]]\nname = \"imaps\"\nprotocol = \"imap\"\ntls = \"implicit\"\nlisten = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:143\"\nsni_strict = true\nclient_identity = \"proxy-v2\"\naccept_proxy_from = [\"127.0.0.1\", \"10.0.0.0/8\"]\n\n\
             [[listener]]\nname = \"guarded\"\nprotocol = \"smtp\"\ntls = \"implicit\"\nlisten = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:25\"\n",
            pair.cert.display(),
            pair.key.display()
        )
    );
    let parsed: toml::Table = toml::from_str(&config.to_toml()).expect("TOML");
    assert_eq!(
        parsed["certificate"][0]["cert"].as_str(),
        pair.cert.to_str()
    );
    let loaded = mail_tls_proxy::config::Config::load(&config.write_in(dir.path()))
        .expect("the proxy loads it");
    let names: Vec<&str> = loaded.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["mx", "imaps", "guarded"]);
    assert!(loaded.listeners[1].sni_strict);
}
