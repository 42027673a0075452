//! One client connection, from accept to close: the only place that does a
//! connection's I/O.
//!
//! Implicit TLS: handshake first, and only then connect to the backend, so a
//! port scan or a failed handshake costs the backend nothing. STARTTLS:
//! connect to the backend at accept and relay its greeting. Either way the
//! protocol's inspection machine ([`crate::protocol`]) then judges every line
//! until it hands the session to `splice`, which copies bytes in both
//! directions without looking at them. However a session ends, it is logged
//! once: its access line ([`access`]), and a failure line when something
//! failed.

mod access;
mod balancer;
pub mod core;
mod dialogue;
mod relay;
mod streams;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::source_is_trusted;
use crate::limits::{self, GlobalLimit, PerIpLimit};
use crate::metrics::{HandshakeFailure, ListenerMetrics, Rejection, TimeoutPhase};
use crate::protocol::proxy_header::parse::Received;
use crate::protocol::proxy_header::{self, TlsFacts};
use crate::protocol::{
    self, ClientIdentity, InspectorOptions, Protocol, Refusal, RequireTls, TlsMode,
};
use crate::tls::cork::Corked;

use access::{AccessRecord, EndedBy, Outcome, SessionEnd};
use balancer::BalancerHeaderError;
use dialogue::{Dialogue, Inspected};
use relay::{ReadAhead, RelayError};
pub(crate) use streams::{ActivityFlag, Counted};

/// The most a client line may hold before TLS or during inspection (RFC
/// 5321's command line limit is 512; IMAP commands before login are short).
pub const MAX_CLIENT_LINE: usize = 8 * 1024;
/// The most a backend line may hold during inspection (capability lists and
/// EHLO replies are far shorter).
pub const MAX_BACKEND_LINE: usize = 64 * 1024;

/// What every connection of one listener shares.
pub(crate) struct ListenerContext {
    pub(crate) name: String,
    pub(crate) protocol: Protocol,
    pub(crate) mode: TlsMode,
    pub(crate) backend: String,
    /// TLS for this listener, with its SNI policy (`sni_strict`).
    pub(crate) acceptor: crate::tls::Acceptor,
    pub(crate) metrics: ListenerMetrics,
    pub(crate) handshake_timeout: Duration,
    pub(crate) backend_connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) require_tls: RequireTls,
    pub(crate) max_inspected_commands: usize,
    pub(crate) global_limit: Arc<GlobalLimit>,
    pub(crate) per_ip_limit: Arc<PerIpLimit>,
    /// Turns true when the proxy starts shutting down.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// How the backend learns who the client is.
    pub(crate) client_identity: ClientIdentity,
    /// The proxy's host name (its EHLO before XCLIENT).
    pub(crate) hostname: Arc<str>,
    /// Set once a backend's missing or refused XCLIENT has been logged as a
    /// warning: once per listener, later sessions at debug level.
    pub(crate) identity_warning_logged: AtomicBool,
    /// Load balancers whose connections begin with a PROXY protocol header
    /// naming the real client; empty: none.
    pub(crate) accept_proxy_from: Vec<ipnet::IpNet>,
    /// How long a trusted source has to send that header.
    pub(crate) proxy_header_timeout: Duration,
    /// Set while the relay guard (`relay_check = "refuse"`) has found that
    /// the backend would relay for anyone arriving here: new connections
    /// get the protocol's temporary refusal instead of the backend.
    pub(crate) relay_open: AtomicBool,
    /// Log one INFO line per finished session.
    pub(crate) access_log: bool,
}

/// The two ends of the client's TCP connection.
#[derive(Debug, Clone, Copy)]
struct Endpoints {
    /// The client.
    peer: SocketAddr,
    /// The listener's address the client connected to.
    local: SocketAddr,
}

/// Which side ended a session abnormally; a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Backend,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("cannot connect to backend {backend}: {reason}")]
    BackendUnreachable {
        backend: String,
        reason: String,
        timed_out: bool,
    },
    #[error("client connection failed: {0}")]
    Client(std::io::Error),
    #[error("backend connection failed: {0}")]
    Backend(std::io::Error),
    #[error("client sent a line longer than {0} bytes")]
    ClientLineTooLong(usize),
    #[error("backend sent a line longer than {0} bytes")]
    BackendLineTooLong(usize),
    #[error("no data for {0:?}")]
    IdleTimeout(Duration),
    #[error("more than {0} commands before the dialogue was handed over")]
    TooManyCommands(usize),
    #[error("relaying failed: {0}")]
    Relay(RelayError),
    #[error(
        "backend {backend} did not accept the PROXY protocol {version} header ({evidence}): \
         configure it to expect the header from this proxy's address (Postfix: \
         smtpd_upstream_proxy_protocol = haproxy; Dovecot: haproxy = yes on the \
         inet_listener and the proxy's address in haproxy_trusted_networks) or set \
         client_identity = \"none\""
    )]
    ProxyHeaderRejected {
        backend: String,
        version: &'static str,
        evidence: String,
    },
    #[error("client sent a PROXY protocol header; refused (only trusted proxies may send one)")]
    ClientProxyHeader,
}

impl SessionError {
    /// Errors that say the client went away rather than that something is wrong.
    fn is_routine(&self) -> bool {
        match self {
            SessionError::Handshake(error) => error.kind() == std::io::ErrorKind::UnexpectedEof,
            SessionError::Client(_) => true,
            SessionError::Relay(error) => error.step.side() == Side::Client,
            _ => false,
        }
    }

    /// The side at fault, for the log line.
    pub(crate) fn side(&self) -> Side {
        match self {
            SessionError::BackendUnreachable { .. }
            | SessionError::Backend(_)
            | SessionError::BackendLineTooLong(_)
            | SessionError::ProxyHeaderRejected { .. } => Side::Backend,
            SessionError::Relay(error) => error.step.side(),
            _ => Side::Client,
        }
    }

    /// Whether the client's connection is still usable for a last close
    /// (TLS: close_notify) after this error.
    fn client_still_there(&self) -> bool {
        match self {
            SessionError::Handshake(_)
            | SessionError::HandshakeTimeout(_)
            | SessionError::Client(_) => false,
            SessionError::Relay(error) => error.step.side() == Side::Backend,
            _ => true,
        }
    }

    /// How the access log names this end.
    fn session_end(&self) -> SessionEnd {
        let reason = self.to_string();
        match self {
            SessionError::Handshake(error) => {
                match crate::tls::acceptor::handshake_failure(error) {
                    HandshakeFailure::Eof => {
                        SessionEnd::new(Outcome::ClientClosed, EndedBy::Client, reason)
                    }
                    HandshakeFailure::ProtocolVersion => SessionEnd::refused(reason),
                    _ => SessionEnd::new(Outcome::Error, EndedBy::Client, reason),
                }
            }
            SessionError::HandshakeTimeout(_) | SessionError::IdleTimeout(_) => {
                SessionEnd::new(Outcome::Timeout, EndedBy::Proxy, reason)
            }
            SessionError::BackendUnreachable {
                timed_out: true, ..
            } => SessionEnd::new(Outcome::Timeout, EndedBy::Backend, reason),
            SessionError::ClientLineTooLong(_)
            | SessionError::TooManyCommands(_)
            | SessionError::ClientProxyHeader => SessionEnd::refused(reason),
            SessionError::BackendUnreachable { .. }
            | SessionError::Client(_)
            | SessionError::Backend(_)
            | SessionError::BackendLineTooLong(_)
            | SessionError::ProxyHeaderRejected { .. }
            | SessionError::Relay(_) => SessionEnd::new(Outcome::Error, self.side().into(), reason),
        }
    }
}

/// Keeps the active-connections gauge right however the session ends.
struct ActiveGuard<'a>(&'a ListenerMetrics);

impl<'a> ActiveGuard<'a> {
    fn new(metrics: &'a ListenerMetrics) -> Self {
        metrics.connections.increment(1);
        metrics.active.increment(1.0);
        Self(metrics)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.decrement(1.0);
    }
}

/// Serves one accepted connection to its end, logging the outcome once (and
/// its access line, built by [`AccessRecord::log`] only).
pub(crate) async fn serve(
    context: Arc<ListenerContext>,
    mut client: TcpStream,
    peer: SocketAddr,
    id: u64,
) {
    let _active = ActiveGuard::new(&context.metrics);
    let started = Instant::now();
    let mut record = AccessRecord::new(context.access_log, peer, started);
    // Mail dialogue is small request/response lines: send each at once.
    let _ = client.set_nodelay(true);
    // Only needed to tell the backend who the client is; a socket
    // without a local address is a broken connection anyway.
    let local = client.local_addr().unwrap_or(peer);
    let mut endpoints = Endpoints { peer, local };
    // A trusted load balancer names the real client first; from then on
    // that client is the peer everywhere: logs, limits, what the backend
    // is told.
    let balancer = source_is_trusted(&context.accept_proxy_from, peer.ip());
    if balancer {
        let span =
            tracing::info_span!("connection", listener = %context.name, peer = %peer, id = id);
        match identify_via_balancer(&context, &mut client, endpoints)
            .instrument(span.clone())
            .await
        {
            Ok(identified) => endpoints = identified,
            // The balancer's own health check (a connect without a byte)
            // is not a session.
            Err(None) => return,
            Err(Some(end)) => {
                span.in_scope(|| record.log(end));
                return;
            }
        }
    }
    record.set_client(endpoints.peer);
    let span = tracing::info_span!(
        "connection",
        listener = %context.name,
        peer = %endpoints.peer,
        id = id,
        balancer = tracing::field::Empty
    );
    if balancer {
        span.record("balancer", tracing::field::display(peer));
    }
    let end = serve_client(&context, client, endpoints, &record)
        .instrument(span.clone())
        .await;
    span.in_scope(|| record.log(end));
}

/// Serves a client whose address is known: limits, the relay guard's
/// refusal, then the session; logs a failure and returns how it ended.
async fn serve_client(
    context: &ListenerContext,
    client: TcpStream,
    endpoints: Endpoints,
    record: &AccessRecord,
) -> SessionEnd {
    let started = Instant::now();
    let peer = endpoints.peer;
    let _slot = match limits::acquire(&context.global_limit, &context.per_ip_limit, peer.ip()) {
        Ok(slot) => slot,
        Err(limit) => {
            context.metrics.rejected(Rejection::Limit(limit));
            info!(limit = limit.as_str(), "connection refused: limit reached");
            refuse(context, client, Refusal::TooManyConnections, record).await;
            return SessionEnd::refused(format!("limit reached: {}", limit.as_str()));
        }
    };
    // The relay guard found that the backend would relay for anyone
    // arriving here: new connections get a temporary refusal, never the
    // backend. Checked per connection, after a balancer has named the
    // client, so the refusal is the protocol's own answer either way.
    if context
        .relay_open
        .load(std::sync::atomic::Ordering::Acquire)
    {
        context.metrics.rejected(Rejection::RelayOpen);
        debug!("connection refused: the relay guard found the backend open");
        refuse(context, client, Refusal::OpenRelay, record).await;
        return SessionEnd::refused("relay guard: the backend would relay for anyone");
    }
    let result = match context.mode {
        TlsMode::Implicit => serve_implicit(context, client, endpoints, record).await,
        TlsMode::StartTls => serve_starttls(context, client, endpoints, record).await,
    };
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(end) => {
            debug!(seconds, "session closed");
            end
        }
        Err(error) => {
            match &error {
                SessionError::HandshakeTimeout(_) => {
                    context.metrics.timed_out(TimeoutPhase::Handshake)
                }
                SessionError::IdleTimeout(_) => context.metrics.timed_out(TimeoutPhase::Idle),
                SessionError::BackendUnreachable {
                    timed_out: true, ..
                } => context.metrics.timed_out(TimeoutPhase::BackendConnect),
                _ => {}
            }
            let side = error.side().as_str();
            match error.side() {
                // A configuration mistake the operator must fix.
                Side::Backend if matches!(error, SessionError::ProxyHeaderRejected { .. }) => {
                    error!(side, seconds, %error, "session failed")
                }
                // A backend that resets or closes in pass-through: INFO,
                // not WARN. The proxy cannot tell a crash from a backend's
                // abrupt but normal end (Dovecot resets the connection
                // after a pipelined LOGOUT), and a warning per logout would
                // bury real ones; a backend that is down fails connects and
                // readiness, which warn.
                Side::Backend if matches!(error, SessionError::Relay(_)) => {
                    info!(side, seconds, %error, "session failed")
                }
                Side::Backend => warn!(side, seconds, %error, "session failed"),
                // A peer that connects and leaves (health probes, port
                // scanners) or resets mid-relay is routine: debug only.
                Side::Client if error.is_routine() => {
                    debug!(side, seconds, %error, "session ended")
                }
                Side::Client => info!(side, seconds, %error, "session failed"),
            }
            error.session_end()
        }
    }
}

/// Reads the PROXY header a trusted balancer starts its connections with:
/// the endpoints it names (the balancer's own when it relays no client), or
/// `Err` when the connection must be closed without a reply (no valid
/// header in time: nothing from such a connection may reach the backend),
/// with how the access log names that end (`None`: the balancer's health
/// check, which is not a session).
async fn identify_via_balancer(
    context: &ListenerContext,
    client: &mut TcpStream,
    balancer: Endpoints,
) -> Result<Endpoints, Option<SessionEnd>> {
    let read = balancer::read_header(client);
    match tokio::time::timeout(context.proxy_header_timeout, read).await {
        Ok(Ok(Received::Proxied {
            source,
            destination,
        })) => Ok(Endpoints {
            peer: source,
            local: destination,
        }),
        Ok(Ok(Received::Local)) => {
            debug!("PROXY header: the balancer's own connection (health check)");
            Ok(balancer)
        }
        // A balancer's plain TCP health check connects and leaves: neither
        // a header nor a wrong one, so not counted as a rejection.
        Ok(Err(BalancerHeaderError::ClosedSilent)) => {
            debug!("trusted source closed without sending anything");
            Err(None)
        }
        Ok(Err(error)) => {
            context.metrics.rejected(Rejection::ProxyHeader);
            info!(
                %error,
                "trusted source sent no valid PROXY header; connection closed without a reply"
            );
            Err(Some(SessionEnd::refused(format!(
                "no valid PROXY header: {error}"
            ))))
        }
        Err(_) => {
            context.metrics.timed_out(TimeoutPhase::ProxyHeader);
            info!(
                seconds = context.proxy_header_timeout.as_secs(),
                "trusted source sent no complete PROXY header in time; connection closed without a reply"
            );
            Err(Some(SessionEnd::new(
                Outcome::Timeout,
                EndedBy::Proxy,
                "no complete PROXY header in time",
            )))
        }
    }
}

/// Turns a connection away with the protocol's own temporary error; on an
/// implicit listener the reply needs TLS first.
async fn refuse(
    context: &ListenerContext,
    client: TcpStream,
    refusal: Refusal,
    record: &AccessRecord,
) {
    let reply = protocol::refusal_reply(context.protocol, refusal);
    match context.mode {
        TlsMode::StartTls => {
            let mut client = client;
            say_goodbye(&mut client, reply, record).await;
        }
        TlsMode::Implicit => {
            if let Ok(mut client) = handshake(context, client).await {
                record.tls_established(client.get_ref().1);
                say_goodbye(&mut client, reply, record).await;
            }
        }
    }
}

async fn serve_implicit(
    context: &ListenerContext,
    client: TcpStream,
    endpoints: Endpoints,
    record: &AccessRecord,
) -> Result<SessionEnd, SessionError> {
    let mut client = handshake(context, ReadAhead::new(client)).await?;
    record.tls_established(client.get_ref().1);
    let header = identity_header(context, endpoints, Some(client.get_ref().1));
    let result = serve_tls_session(context, &mut client, endpoints, header, record).await;
    close_after_failure(&mut client, result).await
}

/// An implicit-TLS session after its handshake: backend, inspection, then
/// pass-through or a close.
async fn serve_tls_session<C>(
    context: &ListenerContext,
    client: &mut C,
    endpoints: Endpoints,
    header: Option<Vec<u8>>,
    record: &AccessRecord,
) -> Result<SessionEnd, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut backend = connect_or_refuse(context, client, header, record).await?;
    let mut dialogue = Dialogue::new(
        context,
        record,
        protocol::new_inspector(
            context.protocol,
            &inspector_options(context, TlsMode::Implicit, endpoints),
        ),
    );
    let inspected = dialogue.run(client, &mut backend).await?;
    finish(
        context,
        dialogue.into_pending(),
        client,
        backend,
        inspected,
        record,
    )
    .await
}

/// After a failure that left the client's connection usable, closes it
/// cleanly (TLS: close_notify, behind whatever the proxy already wrote), so
/// the client sees the session end rather than a truncated connection.
async fn close_after_failure<C, T>(
    client: &mut C,
    result: Result<T, SessionError>,
) -> Result<T, SessionError>
where
    C: AsyncWrite + Unpin,
{
    if let Err(error) = &result {
        if error.client_still_there() {
            close(client).await;
        }
    }
    result
}

async fn serve_starttls(
    context: &ListenerContext,
    mut client: TcpStream,
    endpoints: Endpoints,
    record: &AccessRecord,
) -> Result<SessionEnd, SessionError> {
    // The backend connection starts before TLS, so a PROXY header can carry
    // the addresses only.
    let header = identity_header(context, endpoints, None);
    let mut backend = connect_or_refuse(context, &mut client, header, record).await?;
    let mut dialogue = Dialogue::new(
        context,
        record,
        protocol::new_inspector(
            context.protocol,
            &inspector_options(context, TlsMode::StartTls, endpoints),
        ),
    );
    let inspected = dialogue.run(&mut client, &mut backend).await;
    match close_after_failure(&mut client, inspected).await? {
        Inspected::Passthrough => {
            let result = splice(
                context,
                dialogue.into_pending(),
                &mut client,
                backend,
                record,
            )
            .await;
            return close_after_failure(&mut client, result).await;
        }
        Inspected::Closed(ended_by) => {
            close(&mut client).await;
            return Ok(SessionEnd::closed_by(ended_by));
        }
        Inspected::StartTls => {}
    }
    debug!("STARTTLS answered; TLS handshake starts");

    // Whatever the client sent behind STARTTLS is the start of its TLS
    // handshake, never a command; whatever the backend sent meanwhile would
    // be read as a reply inside TLS, so it is dropped.
    let early_client_bytes = dialogue.take_client_pending();
    let mut dropped = dialogue.discard_backend_pending();
    let mut client = handshake(context, ReadAhead::after(early_client_bytes, client)).await?;
    record.tls_established(client.get_ref().1);
    record.starttls_used();
    {
        let tls = client.get_ref().1;
        debug!(
            tls_version = %tls.protocol_version().map(proxy_header::tls_version_name).unwrap_or_default(),
            cipher = %tls
                .negotiated_cipher_suite()
                .map(|suite| proxy_header::openssl_cipher_name(suite.suite()))
                .unwrap_or_default(),
            "STARTTLS: TLS established"
        );
    }
    dropped += drain_ready(&backend);
    if dropped > 0 {
        warn!(
            bytes = dropped,
            "backend sent data around STARTTLS; dropped it"
        );
    }
    context.metrics.starttls.increment(1);
    dialogue.tls_established();
    let result = async {
        let inspected = dialogue.run(&mut client, &mut backend).await?;
        finish(
            context,
            dialogue.into_pending(),
            &mut client,
            backend,
            inspected,
            record,
        )
        .await
    }
    .await;
    close_after_failure(&mut client, result).await
}

/// What either side sent that inspection did not consume: (client, backend).
/// Taken out of the dialogue before pass-through starts, so the dialogue's
/// state is gone while a session copies bytes (an idle session's memory).
type Pending = (Vec<u8>, Vec<u8>);

/// Ends the inspection of a TLS session: hand-over to pass-through, or a
/// clean close (a machine never asks for a second STARTTLS once TLS is up).
async fn finish<C>(
    context: &ListenerContext,
    pending: Pending,
    client: &mut C,
    backend: TcpStream,
    inspected: Inspected,
    record: &AccessRecord,
) -> Result<SessionEnd, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    match inspected {
        Inspected::Passthrough => splice(context, pending, client, backend, record).await,
        Inspected::Closed(ended_by) => {
            close(client).await;
            Ok(SessionEnd::closed_by(ended_by))
        }
        Inspected::StartTls => {
            close(client).await;
            Ok(SessionEnd::closed_by(EndedBy::Client))
        }
    }
}

/// Connects to the backend (sending `header` first), or gives the client the
/// protocol's temporary failure and closes.
async fn connect_or_refuse<C>(
    context: &ListenerContext,
    client: &mut C,
    header: Option<Vec<u8>>,
    record: &AccessRecord,
) -> Result<TcpStream, SessionError>
where
    C: AsyncWrite + Unpin,
{
    match connect_backend(context, header).await {
        Ok(backend) => Ok(backend),
        Err(error) => {
            let reply = protocol::refusal_reply(context.protocol, Refusal::BackendUnavailable);
            say_goodbye(client, reply, record).await;
            Err(error)
        }
    }
}

/// Runs the TLS handshake with the client, within the listener's time limit.
///
/// The handshake runs boxed and the stream comes back boxed: a rustls
/// connection is over 1 KiB, and a task is allocated at the size of its
/// largest state for its whole life, so every copy of the stream held inline
/// by the session's futures would cost each idle session that much again.
async fn handshake<IO>(
    context: &ListenerContext,
    io: IO,
) -> Result<Box<TlsStream<Corked<IO>>>, SessionError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let accept = Box::pin(context.acceptor.accept(io));
    let result = tokio::time::timeout(context.handshake_timeout, accept).await;
    let took = started.elapsed();
    match result {
        Ok(Ok(stream)) => {
            context.metrics.handshake_finished(true, took);
            if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                context.metrics.handshake_resumed();
            }
            Ok(Box::new(stream))
        }
        Ok(Err(error)) => {
            context.metrics.handshake_finished(false, took);
            let reason = crate::tls::acceptor::handshake_failure(&error);
            context.metrics.handshake_error(reason);
            if reason == HandshakeFailure::ProtocolVersion {
                info!(
                    %error,
                    "refused a client without TLS 1.2 or 1.3 (TLS 1.0/1.1 are not supported, RFC 8996)"
                );
            }
            Err(SessionError::Handshake(error))
        }
        Err(_) => {
            context.metrics.handshake_finished(false, took);
            context.metrics.handshake_error(HandshakeFailure::Timeout);
            Err(SessionError::HandshakeTimeout(context.handshake_timeout))
        }
    }
}

fn inspector_options(
    context: &ListenerContext,
    mode: TlsMode,
    endpoints: Endpoints,
) -> InspectorOptions {
    InspectorOptions {
        mode,
        require_tls: context.require_tls,
        client_identity: context.client_identity,
        client: Some(endpoints.peer),
        server: Some(endpoints.local),
        hostname: context.hostname.clone(),
    }
}

/// The PROXY protocol header the listener sends its backend first, if any.
/// `tls` is the client's TLS session when it is already established
/// (implicit TLS): version 2 headers then carry its facts.
fn identity_header(
    context: &ListenerContext,
    endpoints: Endpoints,
    tls: Option<&rustls::ServerConnection>,
) -> Option<Vec<u8>> {
    match context.client_identity {
        ClientIdentity::ProxyV1 => Some(proxy_header::v1(endpoints.peer, endpoints.local)),
        ClientIdentity::ProxyV2 => {
            let version = tls.and_then(|tls| tls.protocol_version());
            let suite = tls.and_then(|tls| tls.negotiated_cipher_suite());
            Some(match (tls, version, suite) {
                (Some(tls), Some(version), Some(suite)) => {
                    let version = proxy_header::tls_version_name(version);
                    let cipher = proxy_header::openssl_cipher_name(suite.suite());
                    let facts = TlsFacts {
                        version: &version,
                        cipher: &cipher,
                        server_name: tls.server_name(),
                    };
                    proxy_header::v2(endpoints.peer, endpoints.local, Some(&facts))
                }
                _ => proxy_header::v2(endpoints.peer, endpoints.local, None),
            })
        }
        ClientIdentity::None | ClientIdentity::Xclient => None,
    }
}

/// Connects to the backend and sends `header` first, in one write
/// (receivers read it with one recv).
async fn connect_backend(
    context: &ListenerContext,
    header: Option<Vec<u8>>,
) -> Result<TcpStream, SessionError> {
    let mut backend = connect(context).await?;
    if let Some(header) = header {
        backend
            .write_all(&header)
            .await
            .map_err(SessionError::Backend)?;
    }
    Ok(backend)
}

async fn connect(context: &ListenerContext) -> Result<TcpStream, SessionError> {
    let unreachable = |reason: String, timed_out: bool| {
        context.metrics.backend_connect_errors.increment(1);
        SessionError::BackendUnreachable {
            backend: context.backend.clone(),
            reason,
            timed_out,
        }
    };
    match tokio::time::timeout(
        context.backend_connect_timeout,
        TcpStream::connect(context.backend.as_str()),
    )
    .await
    {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(error)) => Err(unreachable(error.to_string(), false)),
        Err(_) => Err(unreachable(
            format!("no answer within {:?}", context.backend_connect_timeout),
            true,
        )),
    }
}

/// Reads and drops whatever the backend has already sent, without waiting.
fn drain_ready(backend: &TcpStream) -> usize {
    let mut scratch = [0u8; 1024];
    let mut dropped = 0;
    // Bounded: a backend streaming data is not drained forever.
    for _ in 0..64 {
        match backend.try_read(&mut scratch) {
            Ok(0) | Err(_) => break,
            Ok(read) => dropped += read,
        }
    }
    dropped
}

/// Hands the session over to unparsed copying, starting with the bytes
/// either side sent that inspection did not consume. The copy ends when both
/// sides are done, or after `idle_timeout` without a byte either way. When
/// the backend fails (a reset, a close while the client still writes), the
/// client's connection is closed cleanly (TLS: close_notify) behind what the
/// backend sent.
async fn splice<C>(
    context: &ListenerContext,
    (client_pending, backend_pending): Pending,
    client: &mut C,
    mut backend: TcpStream,
    record: &AccessRecord,
) -> Result<SessionEnd, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    record.handed_over();
    debug!(
        client_bytes = client_pending.len(),
        backend_bytes = backend_pending.len(),
        "inspection over; pass-through starts"
    );
    if !client_pending.is_empty() {
        backend
            .write_all(&client_pending)
            .await
            .map_err(SessionError::Backend)?;
        context
            .metrics
            .bytes_to_backend
            .increment(client_pending.len() as u64);
        record.bytes.add_to_backend(client_pending.len() as u64);
    }
    if !backend_pending.is_empty() {
        client
            .write_all(&backend_pending)
            .await
            .map_err(SessionError::Client)?;
        client.flush().await.map_err(SessionError::Client)?;
        context
            .metrics
            .bytes_to_client
            .increment(backend_pending.len() as u64);
        record.bytes.add_to_client(backend_pending.len() as u64);
    }
    drop((client_pending, backend_pending));
    let activity = ActivityFlag::default();
    let mut backend = Counted::new(
        backend,
        (
            context.metrics.bytes_to_client.clone(),
            context.metrics.bytes_to_backend.clone(),
        ),
        &record.bytes,
        activity.clone(),
    );
    tokio::select! {
        copied = relay::copy_bidirectional(client, &mut backend) => match copied {
            Ok(relayed) => Ok(SessionEnd::closed_by(relayed.first_closed.into())),
            // One side had closed normally: the session was over, and the
            // other side's failure after it (a client that leaves without
            // close_notify, a backend that resets on the client's close) is
            // routine; the client still gets a clean close.
            Err(error) => match error.after_close_of {
                Some(side) => {
                    debug!(%error, "pass-through ended; the other side then failed");
                    close(client).await;
                    let mut end = SessionEnd::closed_by(side.into());
                    end.reason = Some(format!("then {error}"));
                    Ok(end)
                }
                None => Err(SessionError::Relay(error)),
            },
        },
        () = activity.idle_for(context.idle_timeout) => {
            Err(SessionError::IdleTimeout(context.idle_timeout))
        }
    }
}

/// Sends a last line and closes; the peer may already be gone.
async fn say_goodbye<C: AsyncWrite + Unpin>(client: &mut C, line: &[u8], record: &AccessRecord) {
    if client.write_all(line).await.is_ok() {
        record.bytes.add_to_client(line.len() as u64);
    }
    close(client).await;
}

/// Closes the client side cleanly (TLS close_notify where there is TLS).
async fn close<C: AsyncWrite + Unpin>(client: &mut C) {
    let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
}
