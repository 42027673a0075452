//! Start-up and the accept loops: binds every listener, loads certificates,
//! and spawns one task per accepted connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::{self, ListenerMetrics};
use crate::session::{self, ListenerContext};
use crate::tls::{self, CertificateError, CertificateStore, LoadedCertificate};

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
}

/// Loads the configured default certificate, or generates the self-signed
/// one when none is configured (with a warning: clients will not trust it).
pub fn load_certificate(config: &Config) -> Result<LoadedCertificate, CertificateError> {
    let provider = tls::provider::provider();
    match config.certificates.first() {
        Some(files) => tls::load_certified_key(files, &provider),
        None => {
            warn!(
                hostname = %config.hostname,
                "no [[certificate]] configured: serving a generated self-signed certificate that clients will not trust"
            );
            tls::self_signed(&config.hostname, &provider)
        }
    }
}

/// A proxy with every socket bound, ready to run.
pub struct Proxy {
    listeners: Vec<(TcpListener, Arc<ListenerContext>)>,
    admin: Option<TcpListener>,
    metrics_handle: PrometheusHandle,
    certificates: Arc<CertificateStore>,
    ready: Arc<AtomicBool>,
}

impl Proxy {
    /// Loads certificates and binds every socket; fails before serving anything.
    pub async fn bind(config: &Config) -> Result<Proxy, StartError> {
        let metrics_handle = metrics::install().map_err(StartError::Metrics)?;
        let certificate = load_certificate(config)?;
        let certificates = Arc::new(CertificateStore::new(certificate.certified_key));
        let acceptor = TlsAcceptor::from(tls::server_config(certificates.clone())?);

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
            let context = ListenerContext {
                name: listener.name.clone(),
                protocol: listener.protocol,
                mode: listener.tls,
                backend: listener.backend.clone(),
                acceptor: acceptor.clone(),
                metrics: ListenerMetrics::new(&listener.name),
                handshake_timeout: listener.handshake_timeout,
                backend_connect_timeout: listener.backend_connect_timeout,
                idle_timeout: listener.idle_timeout,
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
        Ok(Proxy {
            listeners,
            admin,
            metrics_handle,
            certificates,
            ready: Arc::new(AtomicBool::new(false)),
        })
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

    /// The certificate store, for reloads.
    pub fn certificates(&self) -> Arc<CertificateStore> {
        self.certificates.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut tasks = JoinSet::new();
        let connection_ids = Arc::new(AtomicU64::new(1));
        for (socket, context) in self.listeners {
            info!(
                listener = %context.name,
                protocol = %context.protocol,
                tls = %context.mode,
                address = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                backend = %context.backend,
                "listening"
            );
            tasks.spawn(accept_loop(socket, context, connection_ids.clone()));
        }
        if let Some(admin) = self.admin {
            info!(
                address = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                "serving /metrics, /healthz and /readyz"
            );
            tasks.spawn(crate::admin::serve(
                admin,
                self.metrics_handle,
                self.ready.clone(),
            ));
        }
        self.ready.store(true, Ordering::Release);
        shutdown.await;
        self.ready.store(false, Ordering::Release);
        info!("shutting down: no longer accepting connections");
        tasks.shutdown().await;
    }
}

async fn accept_loop(socket: TcpListener, context: Arc<ListenerContext>, ids: Arc<AtomicU64>) {
    loop {
        match socket.accept().await {
            Ok((stream, peer)) => {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(session::serve(context.clone(), stream, peer, id));
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
