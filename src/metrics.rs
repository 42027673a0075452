//! Every metric the proxy exports: names, labels and help texts, in one place.
//!
//! All names carry the `mail_tls_proxy_` prefix and the `listener` label (the
//! listener's configured name). Per-connection code gets pre-resolved handles
//! from [`ListenerMetrics`] so the hot path does no name lookups.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::limits::LimitReached;

pub(crate) const CONNECTIONS_TOTAL: &str = "mail_tls_proxy_connections_total";
pub(crate) const ACTIVE_CONNECTIONS: &str = "mail_tls_proxy_active_connections";
pub(crate) const TLS_HANDSHAKES_TOTAL: &str = "mail_tls_proxy_tls_handshakes_total";
pub(crate) const TLS_HANDSHAKE_DURATION_SECONDS: &str =
    "mail_tls_proxy_tls_handshake_duration_seconds";
pub(crate) const STARTTLS_TOTAL: &str = "mail_tls_proxy_starttls_total";
pub(crate) const BACKEND_CONNECT_ERRORS_TOTAL: &str = "mail_tls_proxy_backend_connect_errors_total";
pub(crate) const BYTES_TOTAL: &str = "mail_tls_proxy_bytes_total";
pub(crate) const TLS_HANDSHAKE_ERRORS_TOTAL: &str = "mail_tls_proxy_tls_handshake_errors_total";
pub(crate) const REJECTED_CONNECTIONS_TOTAL: &str = "mail_tls_proxy_rejected_connections_total";
pub(crate) const TIMEOUTS_TOTAL: &str = "mail_tls_proxy_timeouts_total";
pub(crate) const POLICY_REFUSALS_TOTAL: &str = "mail_tls_proxy_policy_refusals_total";
/// Process-wide (no `listener` label): certificates are shared by listeners.
pub(crate) const CERTIFICATE_RELOADS_TOTAL: &str = "mail_tls_proxy_certificate_reloads_total";
pub(crate) const CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str =
    "mail_tls_proxy_certificate_expiry_timestamp_seconds";
pub(crate) const CERTIFICATE_RELOAD_TIMESTAMP_SECONDS: &str =
    "mail_tls_proxy_certificate_reload_timestamp_seconds";
/// Set by the readiness checks (see [`crate::readiness`]), once they run.
pub(crate) const BACKEND_UP: &str = "mail_tls_proxy_backend_up";
/// Set by the relay guard (see [`crate::relay_guard`]) for every SMTP
/// listener it checks: `result` is closed, open or unknown; 1 for the
/// latest result, 0 for the other two.
pub(crate) const RELAY_CHECK: &str = "mail_tls_proxy_relay_check";

/// Handshakes take milliseconds; the buckets resolve 1 ms to 10 s.
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls, e.g.
/// from tests that start several proxies in one process, share it) and
/// returns the handle that renders `/metrics`.
pub(crate) fn install() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        TLS_HANDSHAKE_DURATION_SECONDS.to_string(),
                    ),
                    HANDSHAKE_BUCKETS,
                )
                .map_err(|error| error.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|_| "another metrics recorder is already installed".to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CONNECTIONS_TOTAL, "Client connections accepted.");
    describe_gauge!(ACTIVE_CONNECTIONS, "Client connections open now.");
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "TLS handshakes with clients, by result (ok, error)."
    );
    describe_histogram!(
        TLS_HANDSHAKE_DURATION_SECONDS,
        Unit::Seconds,
        "Time from the start of a TLS handshake to its end."
    );
    describe_counter!(STARTTLS_TOTAL, "STARTTLS/STLS upgrades completed.");
    describe_counter!(
        BACKEND_CONNECT_ERRORS_TOTAL,
        "Connections to the backend that failed or timed out."
    );
    describe_counter!(
        BYTES_TOTAL,
        Unit::Bytes,
        "Plaintext bytes relayed, by direction (client_to_backend, backend_to_client)."
    );
    describe_counter!(
        TLS_HANDSHAKE_ERRORS_TOTAL,
        "Failed TLS handshakes by reason (protocol_version, no_application_protocol, unrecognized_name, timeout, eof, other)."
    );
    describe_counter!(
        REJECTED_CONNECTIONS_TOTAL,
        "Connections turned away, by reason: a limit (max_connections, max_connections_per_ip), a trusted load balancer's connection without a valid PROXY header (proxy_header), or the relay guard refusing new connections while the backend would relay for anyone (relay_open)."
    );
    describe_counter!(
        TIMEOUTS_TOTAL,
        "Sessions ended by a timeout, by phase (proxy_header, handshake, backend_connect, idle)."
    );
    describe_counter!(
        POLICY_REFUSALS_TOTAL,
        "Commands refused by the listener's TLS policy, by command (e.g. AUTH before STARTTLS)."
    );
    describe_counter!(
        CERTIFICATE_RELOADS_TOTAL,
        "Certificate reloads by result: ok (new certificates swapped in, or SIGHUP re-checked them), error (a changed pair could not be used; the previous one is still served)."
    );
    describe_gauge!(
        CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Not After of each served leaf certificate, as a Unix time, by certificate (its first DNS name, or its file name)."
    );
    describe_gauge!(
        CERTIFICATE_RELOAD_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Unix time of the last successful certificate load (start-up or reload)."
    );
    describe_gauge!(
        BACKEND_UP,
        "1 if the listener's backend answered its greeting in the last readiness check, else 0 (checks start with the first /readyz request)."
    );
    describe_gauge!(
        RELAY_CHECK,
        "Latest relay guard check of an SMTP listener's backend, by result: 1 for the current result (closed: it refused a stranger's outside recipient; open: it would relay for anyone arriving through the proxy; unknown: the check could not tell), 0 for the other two."
    );
}

/// Records the latest relay guard result of `listener`: 1 for `result`, 0
/// for the others, so all three series always exist.
pub(crate) fn set_relay_check(listener: &str, result: crate::relay_guard::RelayResult) {
    for each in crate::relay_guard::RelayResult::ALL {
        metrics::gauge!(RELAY_CHECK, "listener" => listener.to_string(), "result" => each.as_str())
            .set(if each == result { 1.0 } else { 0.0 });
    }
}

/// Why a TLS handshake with a client failed: the `reason` of
/// [`TLS_HANDSHAKE_ERRORS_TOTAL`]. Classified by
/// [`crate::tls::acceptor::handshake_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    /// The client closed the connection before the handshake ended.
    Eof,
    /// `sni_strict`: the client asked for a name no certificate covers.
    UnrecognizedName,
    /// The client offers no TLS version the listener accepts (TLS 1.0/1.1,
    /// or 1.2 where `min_tls_version = "1.3"`).
    ProtocolVersion,
    /// Some other parameter in common is missing (cipher suite, group,
    /// signature scheme).
    Incompatible,
    /// The client offers ALPN, but not this listener's protocol (ALPACA).
    NoApplicationProtocol,
    /// The client's bytes are not a valid TLS message (e.g. plaintext).
    InvalidMessage,
    /// Any other TLS error.
    Other,
    /// An I/O error that is not a TLS error.
    Io,
    /// The handshake did not finish within `handshake_timeout`.
    Timeout,
}

impl HandshakeFailure {
    #[cfg(test)]
    pub(crate) const ALL: [HandshakeFailure; 9] = [
        HandshakeFailure::Eof,
        HandshakeFailure::UnrecognizedName,
        HandshakeFailure::ProtocolVersion,
        HandshakeFailure::Incompatible,
        HandshakeFailure::NoApplicationProtocol,
        HandshakeFailure::InvalidMessage,
        HandshakeFailure::Other,
        HandshakeFailure::Io,
        HandshakeFailure::Timeout,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Eof => "eof",
            HandshakeFailure::UnrecognizedName => "unrecognized_name",
            HandshakeFailure::ProtocolVersion => "protocol_version",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::NoApplicationProtocol => "no_application_protocol",
            HandshakeFailure::InvalidMessage => "invalid_message",
            HandshakeFailure::Other => "other",
            HandshakeFailure::Io => "io",
            HandshakeFailure::Timeout => "timeout",
        }
    }
}

/// Where a session was when a timeout ended it: the `phase` of
/// [`TIMEOUTS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeoutPhase {
    /// A trusted load balancer sent no complete PROXY header in time.
    ProxyHeader,
    /// The client's TLS handshake took longer than `handshake_timeout`.
    Handshake,
    /// The backend did not accept the connection in time.
    BackendConnect,
    /// Neither side sent anything for `idle_timeout`.
    Idle,
}

impl TimeoutPhase {
    #[cfg(test)]
    pub(crate) const ALL: [TimeoutPhase; 4] = [
        TimeoutPhase::ProxyHeader,
        TimeoutPhase::Handshake,
        TimeoutPhase::BackendConnect,
        TimeoutPhase::Idle,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::ProxyHeader => "proxy_header",
            TimeoutPhase::Handshake => "handshake",
            TimeoutPhase::BackendConnect => "backend_connect",
            TimeoutPhase::Idle => "idle",
        }
    }
}

/// Why a connection was turned away before it reached the backend: the
/// `reason` of [`REJECTED_CONNECTIONS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// A connection limit was full (see [`crate::limits`]).
    Limit(LimitReached),
    /// A trusted load balancer's connection came without a valid PROXY
    /// header.
    ProxyHeader,
    /// The relay guard found the backend open and refuses new connections.
    RelayOpen,
}

impl Rejection {
    #[cfg(test)]
    pub(crate) const ALL: [Rejection; 4] = [
        Rejection::Limit(LimitReached::Global),
        Rejection::Limit(LimitReached::PerIp),
        Rejection::ProxyHeader,
        Rejection::RelayOpen,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Rejection::Limit(limit) => limit.as_str(),
            Rejection::ProxyHeader => "proxy_header",
            Rejection::RelayOpen => "relay_open",
        }
    }
}

/// What a certificate reload came to: the `result` of
/// [`CERTIFICATE_RELOADS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReloadResult {
    /// New certificates were swapped in (or SIGHUP re-checked them all).
    Ok,
    /// A changed pair could not be used; its previous version is served.
    Error,
}

impl ReloadResult {
    pub(crate) const ALL: [ReloadResult; 2] = [ReloadResult::Ok, ReloadResult::Error];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Error => "error",
        }
    }
}

/// Handles for one listener's metrics, resolved once at start-up.
#[derive(Clone)]
pub(crate) struct ListenerMetrics {
    listener: String,
    pub(crate) connections: Counter,
    pub(crate) active: Gauge,
    pub(crate) handshakes_ok: Counter,
    pub(crate) handshakes_error: Counter,
    pub(crate) handshake_duration: Histogram,
    pub(crate) starttls: Counter,
    pub(crate) backend_connect_errors: Counter,
    pub(crate) bytes_to_backend: Counter,
    pub(crate) bytes_to_client: Counter,
}

impl ListenerMetrics {
    pub(crate) fn new(listener: &str) -> Self {
        let name = listener.to_string();
        let metrics = Self {
            listener: name.clone(),
            connections: metrics::counter!(CONNECTIONS_TOTAL, "listener" => name.clone()),
            active: metrics::gauge!(ACTIVE_CONNECTIONS, "listener" => name.clone()),
            handshakes_ok: metrics::counter!(TLS_HANDSHAKES_TOTAL, "listener" => name.clone(), "result" => "ok"),
            handshakes_error: metrics::counter!(TLS_HANDSHAKES_TOTAL, "listener" => name.clone(), "result" => "error"),
            handshake_duration: metrics::histogram!(TLS_HANDSHAKE_DURATION_SECONDS, "listener" => name.clone()),
            starttls: metrics::counter!(STARTTLS_TOTAL, "listener" => name.clone()),
            backend_connect_errors: metrics::counter!(BACKEND_CONNECT_ERRORS_TOTAL, "listener" => name.clone()),
            bytes_to_backend: metrics::counter!(BYTES_TOTAL, "listener" => name.clone(), "direction" => "client_to_backend"),
            bytes_to_client: metrics::counter!(BYTES_TOTAL, "listener" => name, "direction" => "backend_to_client"),
        };
        // Export every series from the start (at zero), so dashboards and
        // alerts see the listener before its first connection.
        for counter in [
            &metrics.connections,
            &metrics.handshakes_ok,
            &metrics.handshakes_error,
            &metrics.starttls,
            &metrics.backend_connect_errors,
            &metrics.bytes_to_backend,
            &metrics.bytes_to_client,
        ] {
            counter.increment(0);
        }
        metrics.active.increment(0.0);
        metrics
    }

    /// A connection turned away, and why.
    pub(crate) fn rejected(&self, reason: Rejection) {
        metrics::counter!(REJECTED_CONNECTIONS_TOTAL, "listener" => self.listener.clone(), "reason" => reason.as_str())
            .increment(1);
    }

    /// A session ended by a timeout in `phase`.
    pub(crate) fn timed_out(&self, phase: TimeoutPhase) {
        metrics::counter!(TIMEOUTS_TOTAL, "listener" => self.listener.clone(), "phase" => phase.as_str())
            .increment(1);
    }

    /// A command refused by the listener's TLS policy.
    pub(crate) fn policy_refusal(&self, command: &'static str) {
        metrics::counter!(POLICY_REFUSALS_TOTAL, "listener" => self.listener.clone(), "command" => command)
            .increment(1);
    }

    /// A failed handshake, by reason.
    pub(crate) fn handshake_error(&self, reason: HandshakeFailure) {
        metrics::counter!(TLS_HANDSHAKE_ERRORS_TOTAL, "listener" => self.listener.clone(), "reason" => reason.as_str())
            .increment(1);
    }

    pub(crate) fn handshake_finished(&self, ok: bool, took: Duration) {
        if ok {
            self.handshakes_ok.increment(1);
        } else {
            self.handshakes_error.increment(1);
        }
        self.handshake_duration.record(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label values dashboards, alerts and the help texts name: they
    /// must never change, and no two variants may share one.
    #[test]
    fn label_values_are_fixed_and_distinct() {
        fn labels<T: Copy>(all: &[T], as_str: fn(T) -> &'static str) -> Vec<&'static str> {
            let labels: Vec<&'static str> = all.iter().map(|each| as_str(*each)).collect();
            let mut unique = labels.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), labels.len(), "{labels:?}");
            labels
        }
        assert_eq!(
            labels(&HandshakeFailure::ALL, HandshakeFailure::as_str),
            [
                "eof",
                "unrecognized_name",
                "protocol_version",
                "incompatible",
                "no_application_protocol",
                "invalid_message",
                "other",
                "io",
                "timeout"
            ]
        );
        assert_eq!(
            labels(&TimeoutPhase::ALL, TimeoutPhase::as_str),
            ["proxy_header", "handshake", "backend_connect", "idle"]
        );
        assert_eq!(
            labels(&Rejection::ALL, Rejection::as_str),
            [
                "max_connections",
                "max_connections_per_ip",
                "proxy_header",
                "relay_open"
            ]
        );
        assert_eq!(
            labels(&ReloadResult::ALL, ReloadResult::as_str),
            ["ok", "error"]
        );
    }
}
