//! Start-up and the accept loops: binds every listener, loads certificates,
//! asks the relay guard about every SMTP backend before serving, and spawns
//! one task per accepted connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::Config;
use crate::limits::{GlobalLimit, PerIpLimit};
use crate::metrics::{self, ListenerMetrics};
use crate::readiness::{self, BackendProbe, Readiness};
use crate::relay_guard::{self, Guard, OpenRelay, Target};
use crate::session::{self, ListenerContext};
use crate::supervisor::{Supervisor, Unsupervised};
use crate::tls::{self, CertificateError, ReloadStats, Reloader};

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Certificate(#[from] CertificateError),
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

/// Loads and checks every configured certificate, or generates the
/// self-signed default when none is configured (with a warning: clients will
/// not trust it). The error names the file and the reason.
pub fn load_certificates(config: &Config) -> Result<Reloader, CertificateError> {
    Reloader::load(&config.certificates, &config.hostname)
}

/// A proxy with every socket bound, ready to run.
pub struct Proxy {
    listeners: Vec<(TcpListener, Arc<ListenerContext>)>,
    admin: Option<TcpListener>,
    metrics_handle: PrometheusHandle,
    reloader: Reloader,
    certificate_poll_interval: Duration,
    readiness: Arc<Readiness>,
    shutdown: watch::Sender<bool>,
    shutdown_grace: Duration,
    /// One periodic relay check per guarded SMTP listener.
    relay_guards: Vec<Guard>,
    relay_check_interval: Duration,
    /// Told when the proxy is ready, reloads and stops.
    supervisor: Arc<dyn Supervisor>,
    /// The configuration file reloads re-read (SIGHUP); none: reloads
    /// re-read certificates only.
    config_path: Option<PathBuf>,
}

impl Proxy {
    /// Loads certificates, binds every socket and asks the relay guard about
    /// every SMTP backend (all at once); fails before serving anything,
    /// including when a backend would relay for anyone under
    /// `relay_check = "refuse"` ([`StartError::OpenRelay`]).
    pub async fn bind(config: &Config) -> Result<Proxy, StartError> {
        let metrics_handle = metrics::install().map_err(StartError::Metrics)?;
        let mut reloader = load_certificates(config)?;
        // From here on, any change to the certificate files is seen.
        reloader.start_watching();
        let certificates = reloader.store();
        let global_limit = GlobalLimit::new(config.max_connections);
        let (shutdown, shutdown_receiver) = watch::channel(false);

        let mut listeners = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            let socket =
                TcpListener::bind(listener.listen)
                    .await
                    .map_err(|source| StartError::Bind {
                        name: listener.name.clone(),
                        address: listener.listen,
                        source,
                    })?;
            let acceptor = tls::Acceptor::new(
                tls::server_config(
                    certificates.clone(),
                    listener.min_tls_version,
                    listener.protocol,
                )?,
                certificates.clone(),
                listener.sni_strict,
            );
            let context = ListenerContext {
                name: listener.name.clone(),
                protocol: listener.protocol,
                mode: listener.tls,
                backend: listener.backend.clone(),
                acceptor,
                metrics: ListenerMetrics::new(&listener.name),
                handshake_timeout: listener.handshake_timeout,
                backend_connect_timeout: listener.backend_connect_timeout,
                idle_timeout: listener.idle_timeout,
                require_tls: listener.require_tls,
                max_inspected_commands: listener.max_inspected_commands,
                global_limit: global_limit.clone(),
                per_ip_limit: PerIpLimit::new(listener.max_connections_per_ip),
                shutdown: shutdown_receiver.clone(),
                client_identity: listener.client_identity,
                hostname: Arc::from(config.hostname.as_str()),
                identity_warning_logged: AtomicBool::new(false),
                accept_proxy_from: listener.accept_proxy_from.clone(),
                proxy_header_timeout: listener.proxy_header_timeout,
                relay_open: AtomicBool::new(false),
                access_log: listener.access_log,
            };
            listeners.push((socket, Arc::new(context)));
        }
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
        let relay_guards = guard_relays(config, &listeners, &readiness).await?;
        Ok(Proxy {
            listeners,
            admin,
            metrics_handle,
            reloader,
            certificate_poll_interval: config.certificate_poll_interval,
            readiness,
            shutdown,
            shutdown_grace: config.shutdown_grace,
            relay_guards,
            relay_check_interval: config.relay_check_interval,
            supervisor: Arc::new(Unsupervised),
            config_path: None,
        })
    }

    /// Reloads (SIGHUP) re-read the whole configuration from `path`, not
    /// only the certificates.
    pub fn reload_from(mut self, path: impl Into<PathBuf>) -> Proxy {
        self.config_path = Some(path.into());
        self
    }

    /// Tells `supervisor` when the proxy is ready, reloads and stops.
    pub fn supervised_by(mut self, supervisor: Arc<dyn Supervisor>) -> Proxy {
        self.supervisor = supervisor;
        self
    }

    /// The bound address of each listener, by name (ports chosen by the OS
    /// when the configuration says `:0`).
    pub fn listener_addresses(&self) -> HashMap<String, SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(socket, context)| {
                socket
                    .local_addr()
                    .ok()
                    .map(|address| (context.name.clone(), address))
            })
            .collect()
    }

    /// The bound address of the metrics endpoint, if configured.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|socket| socket.local_addr().ok())
    }

    /// How many certificate reloads this proxy made, by result.
    pub fn certificate_reloads(&self) -> Arc<ReloadStats> {
        self.reloader.stats()
    }

    /// Serves until `shutdown` completes, then drains: readiness turns false
    /// at once, listeners stop accepting, sessions still in inspection get
    /// the protocol's goodbye, and sessions in pass-through get up to
    /// `shutdown_grace` to finish (an SMTP DATA transfer in flight completes).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut accept_tasks = JoinSet::new();
        let sessions = SessionTracker::default();
        let connection_ids = Arc::new(AtomicU64::new(1));
        let listener_names: Vec<String> = self
            .listeners
            .iter()
            .map(|(_, context)| context.name.clone())
            .collect();
        for (socket, context) in self.listeners {
            info!(
                listener = %context.name,
                protocol = %context.protocol,
                tls = %context.mode,
                require_tls = context.require_tls.as_str(),
                client_identity = context.client_identity.as_str(),
                accept_proxy_from = %context
                    .accept_proxy_from
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                address = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                backend = %context.backend,
                "listening"
            );
            accept_tasks.spawn(accept_loop(
                socket,
                context,
                connection_ids.clone(),
                sessions.clone(),
            ));
        }
        // Certificate rotation: directory watch, SIGHUP, polling.
        let mut reload_task = JoinSet::new();
        reload_task.spawn(self.reloader.run(self.certificate_poll_interval));
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
        let mut relay_guard_tasks = JoinSet::new();
        for guard in self.relay_guards {
            relay_guard_tasks.spawn(guard.run(self.relay_check_interval));
        }
        let mut readiness_task = JoinSet::new();
        readiness_task.spawn(self.readiness.clone().run_checks());
        let mut admin_task = JoinSet::new();
        if let Some(admin) = self.admin {
            info!(
                address = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                "serving /metrics, /healthz and /readyz"
            );
            admin_task.spawn(crate::admin::serve(
                admin,
                self.metrics_handle,
                self.readiness.clone(),
            ));
        }
        self.readiness.set_serving();
        self.supervisor.ready(&status_line(&listener_names, "serving"));
        shutdown.await;

        self.readiness.set_draining();
        self.supervisor.stopping(&format!(
            "draining {} open sessions (up to {} s)",
            sessions.open(),
            self.shutdown_grace.as_secs()
        ));
        accept_tasks.shutdown().await;
        relay_guard_tasks.shutdown().await;
        let _ = self.shutdown.send(true);
        info!(
            open_sessions = sessions.open(),
            grace_seconds = self.shutdown_grace.as_secs(),
            "shutting down: stopped accepting; waiting for open sessions"
        );
        if tokio::time::timeout(self.shutdown_grace, sessions.all_closed())
            .await
            .is_err()
        {
            warn!(
                open_sessions = sessions.open(),
                "shutdown grace period over; closing the remaining sessions"
            );
        } else {
            info!("all sessions closed");
        }
        admin_task.shutdown().await;
        reload_task.shutdown().await;
    }
}

/// The one-line status a supervisor shows: what the proxy is doing and
/// which listeners it serves.
fn status_line(listeners: &[String], doing: &str) -> String {
    format!("{doing} {} listeners: {}", listeners.len(), listeners.join(", "))
}

/// Checks every guarded SMTP listener's backend at once, as its clients
/// arrive (the bound address, for listeners on port 0); returns the
/// periodic guards, or the error for a backend that would relay for anyone
/// under `relay_check = "refuse"`.
async fn guard_relays(
    config: &Config,
    listeners: &[(TcpListener, Arc<ListenerContext>)],
    readiness: &Arc<Readiness>,
) -> Result<Vec<Guard>, OpenRelay> {
    let mut contexts = Vec::new();
    let mut targets = Vec::new();
    for (listener, (socket, context)) in config.listeners.iter().zip(listeners) {
        let listening_on = socket.local_addr().unwrap_or(listener.listen);
        if let Some(target) = Target::for_listener(listener, &config.hostname, listening_on) {
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

/// Counts open sessions so shutdown can wait for them.
#[derive(Clone, Default)]
struct SessionTracker {
    inner: Arc<TrackerInner>,
}

#[derive(Default)]
struct TrackerInner {
    open: AtomicUsize,
    all_closed: Notify,
}

/// Held by a session's task; dropping it counts the session as closed.
struct TrackedSession(SessionTracker);

impl SessionTracker {
    fn start(&self) -> TrackedSession {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        TrackedSession(self.clone())
    }

    fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.inner.all_closed.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackedSession {
    fn drop(&mut self) {
        if self.0.inner.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.inner.all_closed.notify_waiters();
        }
    }
}

async fn accept_loop(
    socket: TcpListener,
    context: Arc<ListenerContext>,
    ids: Arc<AtomicU64>,
    sessions: SessionTracker,
) {
    loop {
        match socket.accept().await {
            Ok((stream, peer)) => {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let tracked = sessions.start();
                let context = context.clone();
                tokio::spawn(async move {
                    session::serve(context, stream, peer, id).await;
                    drop(tracked);
                });
            }
            Err(error) => {
                // Typically out of file descriptors: back off instead of
                // spinning, and keep serving the connections already open.
                warn!(listener = %context.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
