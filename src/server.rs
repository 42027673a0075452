//! Start-up, serving and reloading: loads certificates, binds every
//! listener, asks the relay guard about every SMTP backend before serving,
//! and, on SIGHUP, re-reads the whole configuration and applies it without
//! dropping a connection (see [`crate::listeners`] for how sockets are kept).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::limits::GlobalLimit;
use crate::listeners::{Changes, ListenerSet, Plan, PlanError, Shared};
use crate::metrics::{self, ConfigReloadResult, ReloadResult};
use crate::readiness::{self, BackendProbe, Readiness};
use crate::relay_guard::{self, Guard, OpenRelay, Target};
use crate::supervisor::{Supervisor, Unsupervised};
use crate::tls::tickets::reload::{put_in_use, TicketKeyReloader};
use crate::tls::{
    count_reload, CertificateError, CertificateStore, ReloadStats, Reloader, SessionTicketer,
    TicketKeyError, TicketKeyReloads, TicketKeys,
};

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    /// The `[tls] ticket_keys` file cannot be used.
    #[error(transparent)]
    TicketKeys(#[from] TicketKeyError),
    #[error("listener {name:?}: cannot listen on {address}: {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("metrics: {0}")]
    Metrics(String),
    /// The relay guard found an SMTP backend that would relay for anyone
    /// arriving through its listener (`relay_check = "refuse"`).
    #[error(transparent)]
    OpenRelay(#[from] OpenRelay),
}

impl From<PlanError> for StartError {
    fn from(error: PlanError) -> StartError {
        match error {
            PlanError::Bind {
                name,
                address,
                source,
            } => StartError::Bind {
                name,
                address,
                source,
            },
            PlanError::Tls { source, .. } => StartError::Tls(source),
        }
    }
}

/// Why a configuration reload was refused (the previous configuration
/// stays in use).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error(transparent)]
    TicketKeys(#[from] TicketKeyError),
    #[error(transparent)]
    Listener(#[from] PlanError),
    #[error(transparent)]
    OpenRelay(#[from] OpenRelay),
    #[error("reading the configuration failed: {0}")]
    Task(String),
}

/// Loads and checks every configured certificate, or generates the
/// self-signed default when none is configured (with a warning: clients will
/// not trust it). The error names the file and the reason.
pub fn load_certificates(config: &Config) -> Result<Reloader, CertificateError> {
    Reloader::load_sources(&crate::acme::certificate_sources(config), &config.hostname)
}

/// Reads and checks the `[tls] ticket_keys` file, if one is configured. The
/// error names the file and the line.
pub fn load_ticket_keys(config: &Config) -> Result<Option<TicketKeys>, TicketKeyError> {
    config
        .tls
        .ticket_keys
        .as_deref()
        .map(TicketKeys::load)
        .transpose()
}

/// Asks a running proxy to reload its configuration file (what SIGHUP
/// does), e.g. from a test.
#[derive(Clone, Debug)]
pub struct ReloadHandle(mpsc::UnboundedSender<()>);

impl ReloadHandle {
    /// Requests a reload; false if the proxy is no longer running.
    pub fn reload(&self) -> bool {
        self.0.send(()).is_ok()
    }
}

/// A proxy with every socket bound, ready to run.
pub struct Proxy {
    /// The configuration served now.
    config: Config,
    listeners: ListenerSet,
    /// The listeners of `config`, bound, served once `run` starts.
    initial: Option<Plan>,
    admin: Option<TcpListener>,
    metrics_handle: PrometheusHandle,
    /// The reloader of the configuration served now (until `run` starts
    /// it; a reload replaces it).
    reloader: Option<Reloader>,
    /// What every listener resolves certificates from, for the life of the
    /// process (a reload swaps its content).
    certificates: Arc<CertificateStore>,
    reload_stats: Arc<ReloadStats>,
    /// The metrics labels of the certificates served now.
    certificate_labels: Vec<String>,
    /// The session ticketer of every listener, for the life of the process
    /// (a reload or a new key file swaps its keys).
    ticketer: Arc<SessionTicketer>,
    /// The TLS 1.2 session-ID cache of every listener, for the life of
    /// the process.
    session_ids: Arc<dyn rustls::server::StoresServerSessions>,
    ticket_key_reloads: Arc<TicketKeyReloads>,
    /// What follows the `ticket_keys` file of the configuration served now
    /// (until `run` starts it; a reload replaces it).
    ticket_key_reloader: Option<TicketKeyReloader>,
    global_limit: Arc<GlobalLimit>,
    readiness: Arc<Readiness>,
    /// One periodic relay check per guarded SMTP listener (until `run`
    /// starts them).
    relay_guards: Vec<Guard>,
    /// Told when the proxy is ready, reloads and stops.
    supervisor: Arc<dyn Supervisor>,
    /// The configuration file reloads re-read (SIGHUP); none: SIGHUP
    /// re-reads certificates only.
    config_path: Option<PathBuf>,
    /// The content of that file when it was last read, to tell a change.
    config_bytes: Option<Vec<u8>>,
    /// SIGHUP, registered at bind so that from then on it never ends the
    /// process.
    hangup: Option<Signal>,
    reload_requests: mpsc::UnboundedReceiver<()>,
    reload_handle: ReloadHandle,
    /// ACME challenge responder and renewals (see [`crate::acme`]).
    acme: crate::acme::AcmeService,
    /// The ACME responder of `config`, bound, started once `run` starts.
    acme_responder: Option<crate::acme::PreparedResponder>,
}

/// The tasks that belong to one configuration; a reload replaces them.
struct Background {
    certificate_reloads: JoinSet<()>,
    ticket_key_reloads: JoinSet<()>,
    relay_guards: JoinSet<()>,
}

impl Proxy {
    /// Loads certificates, binds every socket and asks the relay guard about
    /// every SMTP backend (all at once); fails before serving anything,
    /// including when a backend would relay for anyone under
    /// `relay_check = "refuse"` ([`StartError::OpenRelay`]).
    pub async fn bind(config: &Config) -> Result<Proxy, StartError> {
        let metrics_handle = metrics::install().map_err(StartError::Metrics)?;
        let hangup = match signal(SignalKind::hangup()) {
            Ok(stream) => Some(stream),
            Err(error) => {
                warn!(%error, "cannot listen for SIGHUP; reload by restarting");
                None
            }
        };
        let reloader = load_certificates(config)?;
        reloader.export_metrics();
        let certificate_labels = reloader.labels();
        let certificates = reloader.store();
        let reload_stats = reloader.stats();
        let ticket_keys = load_ticket_keys(config)?;
        let ticketer = SessionTicketer::new(config.tls.ticket_lifetime)?;
        let ticket_key_reloads = Arc::new(TicketKeyReloads::default());
        let ticket_key_reloader = put_in_use(
            &ticketer,
            &ticket_key_reloads,
            config.tls.ticket_lifetime,
            ticket_keys,
        );
        let global_limit = GlobalLimit::new(config.max_connections);
        let listeners = ListenerSet::new();
        let session_ids = crate::tls::session_id_cache();
        let shared = Shared {
            certificates: certificates.clone(),
            global_limit: global_limit.clone(),
            ticketer: ticketer.clone(),
            session_ids: session_ids.clone(),
        };
        let plan = listeners.plan(config, &shared).await?;
        let admin = match config.metrics_listen {
            Some(address) => {
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| StartError::Bind {
                            name: "metrics".into(),
                            address,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let readiness = Readiness::new(
            Some(certificates.clone()),
            config.listeners.iter().map(backend_probe).collect(),
            config.readiness_interval,
        );
        let acme = crate::acme::AcmeService::new();
        let acme_responder = acme.prepare(config).await?;
        let relay_guards = guard_relays(config, &plan, &readiness).await?;
        let (requests, reload_requests) = mpsc::unbounded_channel();
        Ok(Proxy {
            config: config.clone(),
            listeners,
            initial: Some(plan),
            admin,
            metrics_handle,
            reloader: Some(reloader),
            certificates,
            reload_stats,
            certificate_labels,
            ticketer,
            session_ids,
            ticket_key_reloads,
            ticket_key_reloader,
            global_limit,
            readiness,
            relay_guards,
            supervisor: Arc::new(Unsupervised),
            config_path: None,
            config_bytes: None,
            hangup,
            reload_requests,
            reload_handle: ReloadHandle(requests),
            acme,
            acme_responder: Some(acme_responder),
        })
    }

    /// Reloads (SIGHUP, [`Proxy::reload_handle`]) re-read the whole
    /// configuration from `path`, not only the certificates.
    pub fn reload_from(mut self, path: impl Into<PathBuf>) -> Proxy {
        let path = path.into();
        // What `reload_on_change` compares the file with.
        self.config_bytes = std::fs::read(&path).ok();
        self.config_path = Some(path);
        self
    }

    /// Tells `supervisor` when the proxy is ready, reloads and stops.
    pub fn supervised_by(mut self, supervisor: Arc<dyn Supervisor>) -> Proxy {
        self.supervisor = supervisor;
        self
    }

    /// Requests configuration reloads from inside the process.
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload_handle.clone()
    }

    /// The bound address of each listener, by name (ports chosen by the OS
    /// when the configuration says `:0`).
    pub fn listener_addresses(&self) -> HashMap<String, SocketAddr> {
        match &self.initial {
            Some(plan) => plan
                .listeners()
                .map(|(settings, _, bound)| (settings.name.clone(), bound))
                .collect(),
            None => self.listeners.addresses().into_iter().collect(),
        }
    }

    /// The bound address of the metrics endpoint, if configured.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|socket| socket.local_addr().ok())
    }

    /// How many certificate reloads this proxy made, by result.
    pub fn certificate_reloads(&self) -> Arc<ReloadStats> {
        self.reload_stats.clone()
    }

    /// How many `ticket_keys` file reloads this proxy made, by result.
    pub fn ticket_key_reloads(&self) -> Arc<TicketKeyReloads> {
        self.ticket_key_reloads.clone()
    }

    /// Serves until `shutdown` completes, reloading the configuration on
    /// SIGHUP when [`Proxy::reload_from`] named its file; then drains:
    /// readiness turns false at once, listeners stop accepting, sessions
    /// still in inspection get the protocol's goodbye, and sessions in
    /// pass-through get up to `shutdown_grace` to finish (an SMTP DATA
    /// transfer in flight completes).
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut background = Background {
            certificate_reloads: JoinSet::new(),
            ticket_key_reloads: JoinSet::new(),
            relay_guards: JoinSet::new(),
        };
        if let Some(plan) = self.initial.take() {
            self.listeners.apply(plan, self.config.shutdown_grace);
        }
        // Certificate rotation: directory watch, polling, and SIGHUP unless
        // SIGHUP reloads the whole configuration.
        if let Some(mut reloader) = self.reloader.take() {
            if self.config_path.is_some() {
                reloader.leave_hangup_to_caller();
            }
            if let Some(responder) = self.acme_responder.take() {
                self.acme
                    .apply(&self.config, responder, reloader.reload_now())
                    .await;
            }
            background
                .certificate_reloads
                .spawn(reloader.run(self.config.certificate_poll_interval));
        }
        // The ticket key file: the same triggers.
        if let Some(reloader) = self.ticket_key_reloader.take() {
            background.ticket_key_reloads.spawn(reloader.run(
                self.config.certificate_poll_interval,
                self.config_path.is_none(),
            ));
        }
        for guard in std::mem::take(&mut self.relay_guards) {
            background
                .relay_guards
                .spawn(guard.run(self.config.relay_check_interval));
        }
        // Histogram samples (handshake durations) pile up in the recorder
        // until drained; with no scrape (no [metrics] listen, or a slow
        // scraper) that memory grew with every handshake. Drain on a timer,
        // as the exporter's own `install()` would.
        let mut upkeep_task = JoinSet::new();
        let upkeep = self.metrics_handle.clone();
        upkeep_task.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                upkeep.run_upkeep();
            }
        });
        let mut readiness_task = JoinSet::new();
        readiness_task.spawn(self.readiness.clone().run_checks());
        let mut admin_task = JoinSet::new();
        if let Some(admin) = self.admin.take() {
            info!(
                address = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                "serving /metrics, /healthz and /readyz"
            );
            admin_task.spawn(crate::admin::serve(
                admin,
                self.metrics_handle.clone(),
                self.readiness.clone(),
            ));
        }
        self.readiness.set_serving();
        self.supervisor
            .ready(&status_line(&self.listeners.names(), "serving"));

        tokio::pin!(shutdown);
        let mut change_poll = tokio::time::interval(CONFIG_CHANGE_POLL);
        change_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup = if self.config_path.is_some() {
            self.hangup.take()
        } else {
            None
        };
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(stream) => stream.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    info!("SIGHUP received: reloading the configuration");
                    self.reload(&mut background).await;
                }
                Some(()) = self.reload_requests.recv() => {
                    self.reload(&mut background).await;
                }
                _ = change_poll.tick(), if self.reloads_on_change() => {
                    if self.config_file_changed().await {
                        info!("configuration file changed: reloading the configuration");
                        self.reload(&mut background).await;
                    }
                }
            }
        }

        self.readiness.set_draining();
        self.supervisor.stopping(&format!(
            "draining {} open sessions (up to {} s)",
            self.listeners.open_sessions(),
            self.config.shutdown_grace.as_secs()
        ));
        background.relay_guards.shutdown().await;
        self.listeners.stop(self.config.shutdown_grace).await;
        admin_task.shutdown().await;
        readiness_task.shutdown().await;
        background.certificate_reloads.shutdown().await;
        self.acme.stop().await;
        background.ticket_key_reloads.shutdown().await;
    }

    /// Re-reads the configuration file and applies it, or logs why not and
    /// keeps the running one; the supervisor hears of both.
    async fn reload(&mut self, background: &mut Background) {
        let Some(path) = self.config_path.clone() else {
            info!("no configuration file to reload from: nothing to do");
            return;
        };
        self.supervisor.reloading();
        match self.try_reload(&path, background).await {
            Ok((changes, needs_restart)) => {
                metrics::config_reload(ConfigReloadResult::Ok);
                let names = |names: &[String]| names.join(",");
                info!(
                    config = %path.display(),
                    added = %names(&changes.added),
                    removed = %names(&changes.removed),
                    changed = %names(&changes.changed),
                    unchanged = %names(&changes.unchanged),
                    needs_restart = %needs_restart.join(","),
                    "configuration reloaded: new sessions use it, established sessions go on unchanged"
                );
                for setting in &needs_restart {
                    warn!(
                        config = %path.display(),
                        setting = %setting,
                        "configuration reloaded, but this setting changed and takes effect only after a restart"
                    );
                }
                let mut status = status_line(&self.listeners.names(), "serving");
                if !needs_restart.is_empty() {
                    status.push_str(&format!("; restart to apply: {}", needs_restart.join(", ")));
                }
                self.supervisor.reloaded(&status);
            }
            Err(reason) => {
                metrics::config_reload(ConfigReloadResult::Error);
                error!(
                    config = %path.display(),
                    error = %reason,
                    "configuration reload refused: still serving the previous configuration"
                );
                self.supervisor.reloaded(&format!(
                    "{}; the last reload was refused: {reason}",
                    status_line(&self.listeners.names(), "serving")
                ));
            }
        }
    }

    /// Validates the file completely (as `check` does: syntax, every key,
    /// every certificate, the listeners' sockets, the relay guard), then
    /// swaps it in. Returns what changed and the settings that changed but
    /// need a restart.
    async fn try_reload(
        &mut self,
        path: &Path,
        background: &mut Background,
    ) -> Result<(Changes, Vec<String>), ReloadError> {
        // Reading files and parsing keys blocks: not on the threads that
        // serve connections.
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        // Read is read: `reload_on_change` waits for the next change, even
        // if this one is refused.
        self.config_bytes = Some(bytes.clone());
        let path_owned = path.to_path_buf();
        let stats = self.reload_stats.clone();
        let ticket_stats = self.ticket_key_reloads.clone();
        type Loaded = (Config, Reloader, Option<TicketKeys>);
        let (config, mut reloader, ticket_keys) =
            tokio::task::spawn_blocking(move || -> Result<Loaded, ReloadError> {
                let text = String::from_utf8(bytes).map_err(|_| ConfigError::Read {
                    path: path_owned.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the file is not UTF-8 text",
                    ),
                })?;
                let config = Config::parse(&text, &path_owned)?;
                // Certificates that fail here count as a failed certificate
                // reload too, and a ticket key file as a failed key reload.
                let reloader = load_certificates(&config)
                    .inspect_err(|_| count_reload(&stats, ReloadResult::Error))?;
                let ticket_keys = load_ticket_keys(&config)
                    .inspect_err(|_| ticket_stats.count(ReloadResult::Error))?;
                Ok((config, reloader, ticket_keys))
            })
            .await
            .map_err(|error| ReloadError::Task(error.to_string()))??;
        let shared = Shared {
            certificates: self.certificates.clone(),
            global_limit: self.global_limit.clone(),
            ticketer: self.ticketer.clone(),
            session_ids: self.session_ids.clone(),
        };
        let plan = self.listeners.plan(&config, &shared).await?;
        let acme_responder = self.acme.prepare(&config).await?;
        // On refusal the plan is dropped here, closing what it bound.
        let guards = guard_relays(&config, &plan, &self.readiness).await?;

        // Everything checked: swap in.
        reloader.take_over(self.certificates.clone(), self.reload_stats.clone());
        let certificate_labels = reloader.labels();
        for gone in self
            .certificate_labels
            .iter()
            .filter(|label| !certificate_labels.contains(label))
        {
            metrics::retire_certificate(gone);
        }
        self.certificate_labels = certificate_labels;
        reloader.leave_hangup_to_caller();
        self.acme
            .apply(&config, acme_responder, reloader.reload_now())
            .await;
        background.certificate_reloads.shutdown().await;
        background
            .certificate_reloads
            .spawn(reloader.run(config.certificate_poll_interval));
        // The same ticketer with the new configuration's keys and lifetime:
        // tickets sealed with keys still in use go on resuming.
        background.ticket_key_reloads.shutdown().await;
        let from_file = ticket_keys.is_some();
        let ticket_key_reloader = put_in_use(
            &self.ticketer,
            &self.ticket_key_reloads,
            config.tls.ticket_lifetime,
            ticket_keys,
        );
        if from_file {
            self.ticket_key_reloads.count(ReloadResult::Ok);
        }
        if let Some(reloader) = ticket_key_reloader {
            background
                .ticket_key_reloads
                .spawn(reloader.run(config.certificate_poll_interval, false));
        }
        self.global_limit.set_max(config.max_connections);
        let changes = self.listeners.apply(plan, config.shutdown_grace);
        background.relay_guards.shutdown().await;
        for listener in &config.listeners {
            // Serving this configuration means no guarded backend is open.
            self.readiness.set_relay_open(&listener.name, None);
        }
        for guard in guards {
            background
                .relay_guards
                .spawn(guard.run(config.relay_check_interval));
        }
        self.readiness
            .set_probes(config.listeners.iter().map(backend_probe).collect());
        // No check of a removed listener runs from here on (a name that
        // moved to a new address is still served).
        for removed in &changes.removed {
            if !config
                .listeners
                .iter()
                .any(|listener| &listener.name == removed)
            {
                metrics::retire_listener(removed);
            }
        }
        let mut needs_restart = Vec::new();
        if config.metrics_listen != self.config.metrics_listen {
            needs_restart.push("[metrics] listen".to_string());
        }
        if config.readiness_interval != self.config.readiness_interval {
            needs_restart.push("readiness_interval".to_string());
        }
        self.config = config;
        Ok((changes, needs_restart))
    }
}

impl Proxy {
    /// Whether a change of the configuration file's content reloads it.
    fn reloads_on_change(&self) -> bool {
        self.config_path.is_some() && self.config.reload_on_change
    }

    /// Whether the configuration file's content differs from what was last
    /// read (a file that cannot be read now is no change: SIGHUP would say
    /// why).
    async fn config_file_changed(&self) -> bool {
        let Some(path) = &self.config_path else {
            return false;
        };
        match tokio::fs::read(path).await {
            Ok(bytes) => self.config_bytes.as_deref() != Some(bytes.as_slice()),
            Err(_) => false,
        }
    }
}

/// How often `reload_on_change` looks at the configuration file. Polling,
/// not a directory watch: a Kubernetes ConfigMap update swaps a symlink,
/// and a small file read every two seconds costs nothing.
const CONFIG_CHANGE_POLL: Duration = Duration::from_secs(2);

/// The one-line status a supervisor shows: what the proxy is doing and
/// which listeners it serves.
fn status_line(listeners: &[String], doing: &str) -> String {
    format!(
        "{doing} {} listeners: {}",
        listeners.len(),
        listeners.join(", ")
    )
}

/// Checks every guarded SMTP listener's backend at once, as its clients
/// arrive (the bound address, for listeners on port 0); returns the
/// periodic guards, or the error for a backend that would relay for anyone
/// under `relay_check = "refuse"`.
async fn guard_relays(
    config: &Config,
    plan: &Plan,
    readiness: &Arc<Readiness>,
) -> Result<Vec<Guard>, OpenRelay> {
    let mut contexts = Vec::new();
    let mut targets = Vec::new();
    for (listener, context, bound) in plan.listeners() {
        if let Some(target) = Target::for_listener(listener, &config.hostname, bound) {
            targets.push(target);
            contexts.push(context.clone());
        }
    }
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let findings = relay_guard::check_all(targets).await;
    relay_guard::judge_at_start(&findings)?;
    Ok(findings
        .into_iter()
        .zip(contexts)
        .map(|(finding, context)| {
            let first = finding.verdict.result();
            Guard::new(finding.target, context, readiness.clone(), first)
        })
        .collect())
}

/// What the readiness check needs to know about a listener's backend.
fn backend_probe(listener: &crate::config::ListenerConfig) -> BackendProbe {
    use crate::protocol::ClientIdentity;
    // A backend that expects a PROXY header reads one before it greets; the
    // check sends the form the PROXY protocol reserves for health checks.
    let preamble = match listener.client_identity {
        ClientIdentity::ProxyV1 => readiness::PROXY_V1_HEALTH_CHECK.to_vec(),
        ClientIdentity::ProxyV2 => readiness::PROXY_V2_LOCAL.to_vec(),
        ClientIdentity::None | ClientIdentity::Xclient => Vec::new(),
    };
    BackendProbe {
        listener: listener.name.clone(),
        protocol: listener.protocol,
        backend: listener.backend.clone(),
        connect_timeout: listener.backend_connect_timeout,
        preamble,
    }
}
