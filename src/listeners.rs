//! The listening sockets and what each one serves, across configuration
//! reloads.
//!
//! A listener is kept by its configured `listen` address: a reload that
//! leaves the address alone keeps the socket (the kernel's accept queue is
//! never closed, so not one connection is refused during a reload) and only
//! swaps the [`ListenerContext`] that new sessions are served with. A new
//! address is bound before anything changes; an address that is gone stops
//! accepting and its sessions drain under `shutdown_grace`. Established
//! sessions hold the context they started with and are never touched.
//!
//! A change happens in two steps so that a reload either applies completely
//! or not at all: [`ListenerSet::plan`] binds what is new and builds every
//! context (any error leaves the running set as it is), then
//! [`ListenerSet::apply`] swaps them in.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

use crate::config::{Config, ListenerConfig};
use crate::limits::{GlobalLimit, PerIpLimit};
use crate::metrics::ListenerMetrics;
use crate::session::{self, ListenerContext};
use crate::tls::{self, CertificateStore};

/// Why a listener set cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("listener {name:?}: cannot listen on {address}: {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {name:?}: TLS configuration: {source}")]
    Tls {
        name: String,
        #[source]
        source: rustls::Error,
    },
}

/// The listeners being served.
pub(crate) struct ListenerSet {
    slots: Vec<Slot>,
    /// Listeners removed by a reload whose sessions are still draining.
    draining: Vec<JoinHandle<()>>,
    sessions: SessionTracker,
    connection_ids: Arc<AtomicU64>,
}

/// One listening socket, for as long as its address stays configured.
struct Slot {
    /// The configured `listen` value (a reload keeps the socket while it
    /// stays the same, port 0 included).
    configured: SocketAddr,
    /// What the socket is bound to.
    bound: SocketAddr,
    /// The settings of the context served now (to tell what a reload
    /// changed).
    settings: ListenerConfig,
    /// The context new sessions start with.
    context: watch::Sender<Arc<ListenerContext>>,
    /// Turns true when this listener stops: sessions still in inspection
    /// say goodbye (every context of this listener holds a receiver).
    shutdown: watch::Receiver<bool>,
    /// Kept across reloads, so clients already connected still count.
    per_ip_limit: Arc<PerIpLimit>,
    /// Stops accepting and drains the sessions within the grace given.
    stop: Option<oneshot::Sender<Duration>>,
    task: JoinHandle<()>,
}

/// A listener set worked out and bound, not yet serving.
pub(crate) struct Plan {
    listeners: Vec<Planned>,
}

struct Planned {
    settings: ListenerConfig,
    context: Arc<ListenerContext>,
    bound: SocketAddr,
    place: Place,
}

enum Place {
    /// The running slot at this index keeps its socket.
    Existing(usize),
    /// A socket bound for this plan.
    New {
        socket: TcpListener,
        shutdown: watch::Sender<bool>,
        shutdown_receiver: watch::Receiver<bool>,
    },
}

/// What applying a plan changed, by listener name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Changes {
    pub(crate) added: Vec<String>,
    pub(crate) removed: Vec<String>,
    pub(crate) changed: Vec<String>,
    pub(crate) unchanged: Vec<String>,
}

/// What every listener of one configuration shares.
pub(crate) struct Shared {
    pub(crate) certificates: Arc<CertificateStore>,
    pub(crate) global_limit: Arc<GlobalLimit>,
    /// The process's one session ticketer (kept across reloads, so tickets
    /// survive them).
    pub(crate) ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The process's one TLS 1.2 session-ID cache (kept likewise).
    pub(crate) session_ids: Arc<dyn rustls::server::StoresServerSessions>,
}

impl Plan {
    /// Each planned listener's settings, context and bound address.
    pub(crate) fn listeners(
        &self,
    ) -> impl Iterator<Item = (&ListenerConfig, &Arc<ListenerContext>, SocketAddr)> {
        self.listeners
            .iter()
            .map(|planned| (&planned.settings, &planned.context, planned.bound))
    }
}

impl ListenerSet {
    pub(crate) fn new() -> ListenerSet {
        ListenerSet {
            slots: Vec::new(),
            draining: Vec::new(),
            sessions: SessionTracker::default(),
            connection_ids: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Binds every listener of `config` whose address is not served yet and
    /// builds every listener's context. Nothing running changes; on error
    /// the sockets bound here are closed again.
    pub(crate) async fn plan(&self, config: &Config, shared: &Shared) -> Result<Plan, PlanError> {
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut claimed = vec![false; self.slots.len()];
        for settings in &config.listeners {
            let existing = self.keeps(settings, &claimed);
            if let Some(index) = existing {
                claimed[index] = true;
            }
            let (place, bound, shutdown, per_ip_limit) = match existing {
                Some(index) => {
                    // The new cap is set by `apply`: a plan that is dropped
                    // (a reload refused later) changes nothing.
                    let slot = &self.slots[index];
                    (
                        Place::Existing(index),
                        slot.bound,
                        slot.shutdown.clone(),
                        slot.per_ip_limit.clone(),
                    )
                }
                None => {
                    let socket = TcpListener::bind(settings.listen).await.map_err(|source| {
                        PlanError::Bind {
                            name: settings.name.clone(),
                            address: settings.listen,
                            source,
                        }
                    })?;
                    let bound = socket.local_addr().unwrap_or(settings.listen);
                    let (shutdown, shutdown_receiver) = watch::channel(false);
                    (
                        Place::New {
                            socket,
                            shutdown,
                            shutdown_receiver: shutdown_receiver.clone(),
                        },
                        bound,
                        shutdown_receiver,
                        PerIpLimit::new(settings.max_connections_per_ip),
                    )
                }
            };
            let context = listener_context(settings, config, shared, shutdown, per_ip_limit)?;
            listeners.push(Planned {
                settings: settings.clone(),
                context: Arc::new(context),
                bound,
                place,
            });
        }
        Ok(Plan { listeners })
    }

    /// The running slot that keeps serving `settings`: the one bound to
    /// the same configured address. Port 0 means "any port" and may be
    /// configured more than once, so there the name must match too.
    fn keeps(&self, settings: &ListenerConfig, claimed: &[bool]) -> Option<usize> {
        self.slots.iter().enumerate().position(|(index, slot)| {
            !claimed[index]
                && slot.configured == settings.listen
                && (settings.listen.port() != 0 || slot.settings.name == settings.name)
        })
    }

    /// Serves `plan`: new sessions of kept listeners start with their new
    /// context, new listeners start accepting, listeners not in the plan
    /// stop accepting and drain within `grace`.
    pub(crate) fn apply(&mut self, plan: Plan, grace: Duration) -> Changes {
        let mut changes = Changes::default();
        let mut old: Vec<Option<Slot>> = self.slots.drain(..).map(Some).collect();
        let mut slots = Vec::with_capacity(plan.listeners.len());
        for planned in plan.listeners {
            let name = planned.settings.name.clone();
            match planned.place {
                Place::Existing(index) => {
                    let Some(mut slot) = old.get_mut(index).and_then(Option::take) else {
                        continue;
                    };
                    if slot.settings == planned.settings {
                        changes.unchanged.push(name);
                    } else {
                        changes.changed.push(name);
                    }
                    slot.per_ip_limit
                        .set_max(planned.settings.max_connections_per_ip);
                    slot.context.send_replace(planned.context);
                    slot.settings = planned.settings;
                    slots.push(slot);
                }
                Place::New {
                    socket,
                    shutdown,
                    shutdown_receiver,
                } => {
                    log_listening(&planned.context, planned.bound);
                    let per_ip_limit = planned.context.per_ip_limit.clone();
                    let (context, context_receiver) = watch::channel(planned.context);
                    let (stop, stop_receiver) = oneshot::channel();
                    let task = tokio::spawn(accept_loop(AcceptLoop {
                        socket,
                        context: context_receiver,
                        shutdown,
                        stop: stop_receiver,
                        ids: self.connection_ids.clone(),
                        sessions: self.sessions.clone(),
                    }));
                    changes.added.push(name);
                    slots.push(Slot {
                        configured: planned.settings.listen,
                        bound: planned.bound,
                        settings: planned.settings,
                        context,
                        shutdown: shutdown_receiver,
                        per_ip_limit,
                        stop: Some(stop),
                        task,
                    });
                }
            }
        }
        for mut slot in old.into_iter().flatten() {
            let name = slot.settings.name.clone();
            info!(
                listener = %name,
                address = %slot.bound,
                grace_seconds = grace.as_secs(),
                "listener removed: stopped accepting; its sessions drain"
            );
            if let Some(stop) = slot.stop.take() {
                let _ = stop.send(grace);
            }
            self.draining.push(slot.task);
            changes.removed.push(name);
        }
        self.draining.retain(|task| !task.is_finished());
        self.slots = slots;
        changes
    }

    /// The bound address of each listener served now, by name.
    pub(crate) fn addresses(&self) -> Vec<(String, SocketAddr)> {
        self.slots
            .iter()
            .map(|slot| (slot.settings.name.clone(), slot.bound))
            .collect()
    }

    /// The names of the listeners served now.
    pub(crate) fn names(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|slot| slot.settings.name.clone())
            .collect()
    }

    /// Sessions open on every listener, removed ones included.
    pub(crate) fn open_sessions(&self) -> usize {
        self.sessions.open()
    }

    /// Stops every listener: no more accepts, sessions in inspection say
    /// goodbye, the rest get `grace` to finish and are then closed. Returns
    /// once every listener's sessions are gone.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        for slot in &mut self.slots {
            if let Some(stop) = slot.stop.take() {
                let _ = stop.send(grace);
            }
        }
        info!(
            open_sessions = self.sessions.open(),
            grace_seconds = grace.as_secs(),
            "shutting down: stopped accepting; waiting for open sessions"
        );
        if tokio::time::timeout(grace, self.sessions.all_closed())
            .await
            .is_err()
        {
            warn!(
                open_sessions = self.sessions.open(),
                "shutdown grace period over; closing the remaining sessions"
            );
        } else {
            info!("all sessions closed");
        }
        // Listeners removed earlier may have more grace left than this
        // drain gives: the drain wins.
        for task in self.draining.drain(..) {
            task.abort();
        }
        for slot in self.slots.drain(..) {
            let _ = slot.task.await;
        }
    }
}

/// One listener's context for one configuration.
fn listener_context(
    settings: &ListenerConfig,
    config: &Config,
    shared: &Shared,
    shutdown: watch::Receiver<bool>,
    per_ip_limit: Arc<PerIpLimit>,
) -> Result<ListenerContext, PlanError> {
    let tls_error = |source| PlanError::Tls {
        name: settings.name.clone(),
        source,
    };
    let acceptor = tls::Acceptor::new(
        tls::server_config(
            shared.certificates.clone(),
            settings.min_tls_version,
            settings.protocol,
            shared.ticketer.clone(),
            shared.session_ids.clone(),
        )
        .map_err(tls_error)?,
        shared.certificates.clone(),
        settings.sni_strict,
    );
    Ok(ListenerContext {
        name: settings.name.clone(),
        protocol: settings.protocol,
        mode: settings.tls,
        backend: settings.backend.clone(),
        acceptor,
        metrics: ListenerMetrics::new(&settings.name),
        handshake_timeout: settings.handshake_timeout,
        backend_connect_timeout: settings.backend_connect_timeout,
        idle_timeout: settings.idle_timeout,
        require_tls: settings.require_tls,
        max_inspected_commands: settings.max_inspected_commands,
        global_limit: shared.global_limit.clone(),
        per_ip_limit,
        shutdown,
        client_identity: settings.client_identity,
        hostname: Arc::from(config.hostname.as_str()),
        identity_warning_logged: AtomicBool::new(false),
        accept_proxy_from: settings.accept_proxy_from.clone(),
        proxy_header_timeout: settings.proxy_header_timeout,
        relay_open: AtomicBool::new(false),
        access_log: settings.access_log,
    })
}

fn log_listening(context: &ListenerContext, address: SocketAddr) {
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
        %address,
        backend = %context.backend,
        "listening"
    );
}

/// What one listener's accept task owns.
struct AcceptLoop {
    socket: TcpListener,
    context: watch::Receiver<Arc<ListenerContext>>,
    shutdown: watch::Sender<bool>,
    stop: oneshot::Receiver<Duration>,
    ids: Arc<AtomicU64>,
    sessions: SessionTracker,
}

/// Accepts until told to stop, serving each connection with the context
/// current at its accept; then closes the socket, tells the sessions, and
/// gives them the grace period before closing what is left.
async fn accept_loop(mut accept: AcceptLoop) {
    let mut sessions = JoinSet::new();
    let grace = loop {
        tokio::select! {
            grace = &mut accept.stop => break grace.unwrap_or(Duration::ZERO),
            accepted = accept.socket.accept() => match accepted {
                Ok((stream, peer)) => {
                    let id = accept.ids.fetch_add(1, Ordering::Relaxed);
                    let tracked = accept.sessions.start();
                    let context = accept.context.borrow().clone();
                    sessions.spawn(async move {
                        session::serve(context, stream, peer, id).await;
                        drop(tracked);
                    });
                }
                Err(error) => {
                    // Typically out of file descriptors: back off instead
                    // of spinning, and keep serving the open connections.
                    let name = accept.context.borrow().name.clone();
                    warn!(listener = %name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    };
    drop(accept.socket);
    let _ = accept.shutdown.send(true);
    let all_finished = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_finished).await.is_err() {
        sessions.shutdown().await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{acquire, LimitReached};
    use std::net::IpAddr;
    use std::path::Path;

    fn config(max_connections_per_ip: usize) -> Config {
        let text = format!(
            r#"
[[listener]]
name = "imaps"
protocol = "imap"
tls = "implicit"
listen = "127.0.0.1:0"
backend = "127.0.0.1:1"
max_connections_per_ip = {max_connections_per_ip}
"#
        );
        Config::parse(&text, Path::new("/etc/mail-tls-proxy/config.toml")).expect("config")
    }

    /// How many connections one address gets on the set's only listener.
    fn room_for_one_address(set: &ListenerSet) -> usize {
        let global = GlobalLimit::new(1000);
        let ip: IpAddr = "192.0.2.7".parse().expect("address");
        let mut slots = Vec::new();
        loop {
            match acquire(&global, &set.slots[0].per_ip_limit, ip) {
                Ok(slot) => slots.push(slot),
                Err(LimitReached::PerIp) => return slots.len(),
                Err(other) => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_plan_that_is_not_applied_changes_no_limit() {
        let first = config(2);
        let shared = Shared {
            certificates: crate::server::load_certificates(&first)
                .expect("certificates")
                .store(),
            global_limit: GlobalLimit::new(100),
            ticketer: crate::tls::SessionTicketer::new(Duration::from_secs(60)).expect("ticketer"),
            session_ids: crate::tls::session_id_cache(),
        };
        let mut set = ListenerSet::new();
        let plan = set.plan(&first, &shared).await.expect("plan");
        set.apply(plan, Duration::ZERO);
        assert_eq!(room_for_one_address(&set), 2);

        // A reload refused after planning (a later check failed): the
        // running listener keeps its limit.
        let refused = set.plan(&config(5), &shared).await.expect("plan");
        drop(refused);
        assert_eq!(room_for_one_address(&set), 2);

        let applied = set.plan(&config(5), &shared).await.expect("plan");
        let changes = set.apply(applied, Duration::ZERO);
        assert_eq!(changes.changed, ["imaps"]);
        assert_eq!(room_for_one_address(&set), 5);
        set.stop(Duration::ZERO).await;
    }
}
