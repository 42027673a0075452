//! Every metric the proxy exports: names, labels and help texts, in one place.
//!
//! The proxy's own names carry the `mail_tls_proxy_` prefix, and per-listener
//! series the `listener` label (the listener's configured name). The process
//! series (CPU, memory, file descriptors, start time) keep the usual
//! unprefixed `process_` names every Prometheus client exports, so generic
//! process dashboards work unchanged.
//!
//! Every series a dashboard or alert reads exists from start-up: the
//! process-wide ones when the recorder is installed ([`install`]), the
//! listener ones when [`ListenerMetrics::new`] registers every label value of
//! the typed label enums below (each lists its variants in `ALL`) at zero.
//! Per-connection code gets pre-resolved handles from [`ListenerMetrics`] so
//! the hot path does no name lookups.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::limits::LimitReached;

pub(crate) const CONNECTIONS_TOTAL: &str = "mail_tls_proxy_connections_total";
pub(crate) const ACTIVE_CONNECTIONS: &str = "mail_tls_proxy_active_connections";
pub(crate) const TLS_HANDSHAKES_TOTAL: &str = "mail_tls_proxy_tls_handshakes_total";
pub(crate) const TLS_HANDSHAKE_DURATION_SECONDS: &str =
    "mail_tls_proxy_tls_handshake_duration_seconds";
/// Per listener: the successful handshakes that resumed a session from a
/// ticket (a subset of `TLS_HANDSHAKES_TOTAL{result="ok"}`).
pub(crate) const TLS_RESUMPTIONS_TOTAL: &str = "mail_tls_proxy_tls_resumptions_total";
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
/// Set by the readiness checks (see [`crate::readiness`]) after each round;
/// the first round runs at start-up.
pub(crate) const BACKEND_UP: &str = "mail_tls_proxy_backend_up";
/// Set by the relay guard (see [`crate::relay_guard`]) for every SMTP
/// listener it checks: `result` is closed, open or unknown; 1 for the
/// latest result, 0 for the other two.
pub(crate) const RELAY_CHECK: &str = "mail_tls_proxy_relay_check";
/// Process-wide: configuration reloads by `result` (ok, error).
pub(crate) const CONFIG_RELOADS_TOTAL: &str = "mail_tls_proxy_config_reloads_total";
/// Process-wide: reloads of the `[tls] ticket_keys` file by `result`.
pub(crate) const TICKET_KEY_RELOADS_TOTAL: &str = "mail_tls_proxy_ticket_key_reloads_total";
/// Process-wide: session ticket keys in use from the `ticket_keys` file (0:
/// keys of this process only).
pub(crate) const TICKET_KEYS: &str = "mail_tls_proxy_ticket_keys";
/// Process-wide: always 1, with the running version as the `version` label.
pub(crate) const BUILD_INFO: &str = "mail_tls_proxy_build_info";
/// Process-wide: ACME orders by `result` (ok, error), both from start-up
/// (see [`crate::acme`]).
pub(crate) const ACME_ORDERS_TOTAL: &str = "mail_tls_proxy_acme_orders_total";
/// Per ACME certificate (`certificate`: its first name): when it is due
/// for renewal, as a Unix time; 0 until known.
pub(crate) const ACME_NEXT_RENEWAL_TIMESTAMP_SECONDS: &str =
    "mail_tls_proxy_acme_next_renewal_timestamp_seconds";

/// The process series, collected on each scrape (see
/// [`collect_process_metrics`]). Unprefixed, as every Prometheus client
/// names them.
pub(crate) const PROCESS_CPU_SECONDS_TOTAL: &str = "process_cpu_seconds_total";
pub(crate) const PROCESS_RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";
pub(crate) const PROCESS_VIRTUAL_MEMORY_BYTES: &str = "process_virtual_memory_bytes";
pub(crate) const PROCESS_VIRTUAL_MEMORY_MAX_BYTES: &str = "process_virtual_memory_max_bytes";
pub(crate) const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub(crate) const PROCESS_MAX_FDS: &str = "process_max_fds";
pub(crate) const PROCESS_START_TIME_SECONDS: &str = "process_start_time_seconds";
pub(crate) const PROCESS_THREADS: &str = "process_threads";
/// Every process series name, as the collector writes them.
#[cfg(test)]
const PROCESS_METRICS: [&str; 8] = [
    PROCESS_CPU_SECONDS_TOTAL,
    PROCESS_RESIDENT_MEMORY_BYTES,
    PROCESS_VIRTUAL_MEMORY_BYTES,
    PROCESS_VIRTUAL_MEMORY_MAX_BYTES,
    PROCESS_OPEN_FDS,
    PROCESS_MAX_FDS,
    PROCESS_START_TIME_SECONDS,
    PROCESS_THREADS,
];

/// The `command` label every listener's [`POLICY_REFUSALS_TOTAL`] starts
/// with (at zero). The commands a policy refuses differ by protocol and are
/// named by the protocol machines; "other" is the one label every protocol
/// can produce, so the series exists for every listener from start-up.
const POLICY_REFUSAL_COMMAND_AT_START: &str = "other";

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
            register_process_wide();
            collect_process_metrics();
            Ok(handle)
        })
        .clone()
}

/// Reads the process series (CPU time, memory, file descriptors, start
/// time, threads) from the operating system into the recorder: called before
/// each `/metrics` render, so a scrape sees current values.
pub(crate) fn collect_process_metrics() {
    PROCESS_COLLECTOR.collect();
}

/// Writes the unprefixed `process_` series (see [`PROCESS_METRICS`]).
static PROCESS_COLLECTOR: LazyLock<metrics_process::Collector> =
    LazyLock::new(|| metrics_process::Collector::new(""));

/// The process-wide series that exist from start-up: the build, the
/// configuration and ticket key reload counters at zero, and the number of
/// ticket keys from a file (none yet).
fn register_process_wide() {
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for result in ConfigReloadResult::ALL {
        metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => result.as_str()).increment(0);
    }
    for result in AcmeOrderResult::ALL {
        metrics::counter!(ACME_ORDERS_TOTAL, "result" => result.as_str()).increment(0);
    }
    for result in ReloadResult::ALL {
        metrics::counter!(TICKET_KEY_RELOADS_TOTAL, "result" => result.as_str()).increment(0);
    }
    metrics::gauge!(TICKET_KEYS).increment(0.0);
}

/// Counts one configuration reload by what it came to.
pub(crate) fn config_reload(result: ConfigReloadResult) {
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => result.as_str()).increment(1);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        PROCESS_CPU_SECONDS_TOTAL,
        Unit::Seconds,
        "User and system CPU time used by the process (whole seconds)."
    );
    describe_gauge!(
        PROCESS_RESIDENT_MEMORY_BYTES,
        Unit::Bytes,
        "Resident memory of the process."
    );
    describe_gauge!(
        PROCESS_VIRTUAL_MEMORY_BYTES,
        Unit::Bytes,
        "Virtual memory of the process."
    );
    describe_gauge!(
        PROCESS_VIRTUAL_MEMORY_MAX_BYTES,
        Unit::Bytes,
        "Limit on the process's virtual memory."
    );
    describe_gauge!(PROCESS_OPEN_FDS, "Open file descriptors.");
    describe_gauge!(
        PROCESS_MAX_FDS,
        "Limit on open file descriptors (each client session holds two)."
    );
    describe_gauge!(
        PROCESS_START_TIME_SECONDS,
        Unit::Seconds,
        "Start of the process, as a Unix time."
    );
    describe_gauge!(PROCESS_THREADS, "Operating system threads of the process.");
    describe_counter!(CONNECTIONS_TOTAL, "Client connections accepted.");
    describe_gauge!(ACTIVE_CONNECTIONS, "Client connections open now.");
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "TLS handshakes with clients, by result (ok, error)."
    );
    describe_counter!(
        TLS_RESUMPTIONS_TOTAL,
        "Successful TLS handshakes that resumed an earlier session from a session ticket (counted in tls_handshakes_total{result=\"ok\"} too)."
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
        "1 if the listener's backend answered its greeting in the last readiness check, else 0 (checks run in the background from start-up, every readiness_interval)."
    );
    describe_gauge!(
        RELAY_CHECK,
        "Latest relay guard check of an SMTP listener's backend, by result: 1 for the current result (closed: it refused a stranger's outside recipient; open: it would relay for anyone arriving through the proxy; unknown: the check could not tell), 0 for the other two."
    );
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Configuration reloads by result: ok (the new configuration is in use), error (it was refused; the previous one is still in use)."
    );
    describe_counter!(
        TICKET_KEY_RELOADS_TOTAL,
        "Reloads of the [tls] ticket_keys file by result: ok (its keys are in use), error (it was refused; the keys in use stay)."
    );
    describe_gauge!(
        TICKET_KEYS,
        "Session ticket keys in use from the [tls] ticket_keys file; 0 without one (keys of this process only)."
    );
    describe_counter!(
        ACME_ORDERS_TOTAL,
        "ACME certificate orders by result: ok (a certificate was issued and stored), error (the order failed; it is retried with backoff and the served certificate stays)."
    );
    describe_gauge!(
        ACME_NEXT_RENEWAL_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "When each ACME certificate is due for renewal, as a Unix time, by certificate (its first name); 0 until known. In the past while renewal keeps failing."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label is the running proxy's version."
    );
}

/// Records the latest relay guard result of `listener`: 1 for `result`, 0
/// for the others, so all three series always exist.
/// A listener a configuration reload removed: its gauges of state it no
/// longer has (backend up, relay check) turn NaN, "not measured", so no
/// alert keeps firing on its last value. The recorder cannot drop a series;
/// it goes at the next restart.
pub(crate) fn retire_listener(listener: &str) {
    metrics::gauge!(BACKEND_UP, "listener" => listener.to_string()).set(f64::NAN);
    for each in crate::relay_guard::RelayResult::ALL {
        metrics::gauge!(RELAY_CHECK, "listener" => listener.to_string(), "result" => each.as_str())
            .set(f64::NAN);
    }
}

/// A certificate a configuration reload removed: its expiry turns NaN
/// (nothing served to expire), so the expiry alerts stop firing on it.
pub(crate) fn retire_certificate(label: &str) {
    metrics::gauge!(CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, "certificate" => label.to_string())
        .set(f64::NAN);
}

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

/// What an ACME order came to: the `result` of [`ACME_ORDERS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcmeOrderResult {
    /// A certificate was issued, checked and stored.
    Ok,
    /// The order failed; it is retried later.
    Error,
}

impl AcmeOrderResult {
    pub(crate) const ALL: [AcmeOrderResult; 2] = [AcmeOrderResult::Ok, AcmeOrderResult::Error];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AcmeOrderResult::Ok => "ok",
            AcmeOrderResult::Error => "error",
        }
    }
}

/// What a configuration reload came to: the `result` of
/// [`CONFIG_RELOADS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConfigReloadResult {
    /// The new configuration is in use.
    Ok,
    /// The new configuration was refused; the previous one is still in use.
    Error,
}

impl ConfigReloadResult {
    pub(crate) const ALL: [ConfigReloadResult; 2] =
        [ConfigReloadResult::Ok, ConfigReloadResult::Error];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConfigReloadResult::Ok => "ok",
            ConfigReloadResult::Error => "error",
        }
    }
}

/// One counter per value of a label enum, in the order of its `ALL`.
fn counters_by_label<T: Copy, const N: usize>(
    all: [T; N],
    counter: impl Fn(T) -> Counter,
) -> [(T, Counter); N] {
    all.map(|value| {
        let handle = counter(value);
        // Exported from the start (at zero), like every other series.
        handle.increment(0);
        (value, handle)
    })
}

/// The handle for `value` in `counters` (built from the enum's `ALL`, which
/// holds every variant: a unit test checks it).
fn counter_for<T: PartialEq, const N: usize>(
    counters: &[(T, Counter); N],
    value: T,
) -> Option<&Counter> {
    counters
        .iter()
        .find(|(each, _)| *each == value)
        .map(|(_, counter)| counter)
}

/// Handles for one listener's metrics, resolved once at start-up.
#[derive(Clone)]
pub(crate) struct ListenerMetrics {
    listener: String,
    pub(crate) connections: Counter,
    pub(crate) active: Gauge,
    pub(crate) handshakes_ok: Counter,
    pub(crate) handshakes_error: Counter,
    pub(crate) resumptions: Counter,
    pub(crate) handshake_duration: Histogram,
    pub(crate) starttls: Counter,
    pub(crate) backend_connect_errors: Counter,
    pub(crate) bytes_to_backend: Counter,
    pub(crate) bytes_to_client: Counter,
    rejections: [(Rejection, Counter); Rejection::ALL.len()],
    timeouts: [(TimeoutPhase, Counter); TimeoutPhase::ALL.len()],
    handshake_errors: [(HandshakeFailure, Counter); HandshakeFailure::ALL.len()],
}

impl ListenerMetrics {
    /// Registers every series of `listener`, each label combination at zero,
    /// so dashboards and alerts see the listener before its first
    /// connection.
    pub(crate) fn new(listener: &str) -> Self {
        let name = listener.to_string();
        let rejections = counters_by_label(
            Rejection::ALL,
            |reason| metrics::counter!(REJECTED_CONNECTIONS_TOTAL, "listener" => name.clone(), "reason" => reason.as_str()),
        );
        let timeouts = counters_by_label(
            TimeoutPhase::ALL,
            |phase| metrics::counter!(TIMEOUTS_TOTAL, "listener" => name.clone(), "phase" => phase.as_str()),
        );
        let handshake_errors = counters_by_label(
            HandshakeFailure::ALL,
            |reason| metrics::counter!(TLS_HANDSHAKE_ERRORS_TOTAL, "listener" => name.clone(), "reason" => reason.as_str()),
        );
        metrics::counter!(POLICY_REFUSALS_TOTAL, "listener" => name.clone(), "command" => POLICY_REFUSAL_COMMAND_AT_START)
            .increment(0);
        let metrics = Self {
            listener: name.clone(),
            connections: metrics::counter!(CONNECTIONS_TOTAL, "listener" => name.clone()),
            active: metrics::gauge!(ACTIVE_CONNECTIONS, "listener" => name.clone()),
            handshakes_ok: metrics::counter!(TLS_HANDSHAKES_TOTAL, "listener" => name.clone(), "result" => "ok"),
            handshakes_error: metrics::counter!(TLS_HANDSHAKES_TOTAL, "listener" => name.clone(), "result" => "error"),
            resumptions: metrics::counter!(TLS_RESUMPTIONS_TOTAL, "listener" => name.clone()),
            handshake_duration: metrics::histogram!(TLS_HANDSHAKE_DURATION_SECONDS, "listener" => name.clone()),
            starttls: metrics::counter!(STARTTLS_TOTAL, "listener" => name.clone()),
            backend_connect_errors: metrics::counter!(BACKEND_CONNECT_ERRORS_TOTAL, "listener" => name.clone()),
            bytes_to_backend: metrics::counter!(BYTES_TOTAL, "listener" => name.clone(), "direction" => "client_to_backend"),
            bytes_to_client: metrics::counter!(BYTES_TOTAL, "listener" => name, "direction" => "backend_to_client"),
            rejections,
            timeouts,
            handshake_errors,
        };
        for counter in [
            &metrics.connections,
            &metrics.handshakes_ok,
            &metrics.handshakes_error,
            &metrics.resumptions,
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
        match counter_for(&self.rejections, reason) {
            Some(counter) => counter.increment(1),
            None => metrics::counter!(REJECTED_CONNECTIONS_TOTAL, "listener" => self.listener.clone(), "reason" => reason.as_str())
                .increment(1),
        }
    }

    /// A session ended by a timeout in `phase`.
    pub(crate) fn timed_out(&self, phase: TimeoutPhase) {
        match counter_for(&self.timeouts, phase) {
            Some(counter) => counter.increment(1),
            None => metrics::counter!(TIMEOUTS_TOTAL, "listener" => self.listener.clone(), "phase" => phase.as_str())
                .increment(1),
        }
    }

    /// A command refused by the listener's TLS policy.
    pub(crate) fn policy_refusal(&self, command: &'static str) {
        metrics::counter!(POLICY_REFUSALS_TOTAL, "listener" => self.listener.clone(), "command" => command)
            .increment(1);
    }

    /// A failed handshake, by reason.
    pub(crate) fn handshake_error(&self, reason: HandshakeFailure) {
        match counter_for(&self.handshake_errors, reason) {
            Some(counter) => counter.increment(1),
            None => metrics::counter!(TLS_HANDSHAKE_ERRORS_TOTAL, "listener" => self.listener.clone(), "reason" => reason.as_str())
                .increment(1),
        }
    }

    /// A successful handshake that resumed a session (after
    /// [`ListenerMetrics::handshake_finished`] counted it).
    pub(crate) fn handshake_resumed(&self) {
        self.resumptions.increment(1);
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
        assert_eq!(
            labels(&ConfigReloadResult::ALL, ConfigReloadResult::as_str),
            ["ok", "error"]
        );
        assert_eq!(
            labels(&AcmeOrderResult::ALL, AcmeOrderResult::as_str),
            ["ok", "error"]
        );
    }

    /// Each label enum's `ALL` holds every variant exactly once: `ordinal`
    /// matches exhaustively (a new variant does not compile without an arm)
    /// and numbers the variants 0..n, and `ALL` must yield exactly 0..n.
    fn covers_every_variant<T: Copy>(all: &[T], variants: usize, ordinal: fn(T) -> usize) {
        let mut seen: Vec<usize> = all.iter().map(|each| ordinal(*each)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..variants).collect::<Vec<_>>());
    }

    #[test]
    fn every_label_enum_lists_all_its_variants() {
        covers_every_variant(&AcmeOrderResult::ALL, 2, |each| match each {
            AcmeOrderResult::Ok => 0,
            AcmeOrderResult::Error => 1,
        });
        covers_every_variant(&HandshakeFailure::ALL, 9, |each| match each {
            HandshakeFailure::Eof => 0,
            HandshakeFailure::UnrecognizedName => 1,
            HandshakeFailure::ProtocolVersion => 2,
            HandshakeFailure::Incompatible => 3,
            HandshakeFailure::NoApplicationProtocol => 4,
            HandshakeFailure::InvalidMessage => 5,
            HandshakeFailure::Other => 6,
            HandshakeFailure::Io => 7,
            HandshakeFailure::Timeout => 8,
        });
        covers_every_variant(&TimeoutPhase::ALL, 4, |each| match each {
            TimeoutPhase::ProxyHeader => 0,
            TimeoutPhase::Handshake => 1,
            TimeoutPhase::BackendConnect => 2,
            TimeoutPhase::Idle => 3,
        });
        covers_every_variant(&Rejection::ALL, 4, |each| match each {
            Rejection::Limit(LimitReached::Global) => 0,
            Rejection::Limit(LimitReached::PerIp) => 1,
            Rejection::ProxyHeader => 2,
            Rejection::RelayOpen => 3,
        });
        covers_every_variant(&ReloadResult::ALL, 2, |each| match each {
            ReloadResult::Ok => 0,
            ReloadResult::Error => 1,
        });
        covers_every_variant(&ConfigReloadResult::ALL, 2, |each| match each {
            ConfigReloadResult::Ok => 0,
            ConfigReloadResult::Error => 1,
        });
        use crate::relay_guard::RelayResult;
        covers_every_variant(&RelayResult::ALL, 3, |each| match each {
            RelayResult::Closed => 0,
            RelayResult::Open => 1,
            RelayResult::Unknown => 2,
        });
    }

    /// A recorder of this test's own (the global one belongs to the
    /// process), and its rendering after `register` ran against it.
    fn render_after(register: impl FnOnce()) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, register);
        handle.render()
    }

    #[test]
    fn a_new_listener_exports_every_label_combination_at_zero() {
        let rendered = render_after(|| {
            let listener = ListenerMetrics::new("fresh");
            // Counting through a handle moves the registered series.
            listener.rejected(Rejection::Limit(LimitReached::PerIp));
            listener.timed_out(TimeoutPhase::Idle);
            listener.handshake_error(HandshakeFailure::Eof);
        });
        let value = |series: &str| -> Option<&str> {
            rendered
                .lines()
                .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        };
        let mut expected: Vec<(String, &str)> = Vec::new();
        for reason in Rejection::ALL {
            let count = if reason == Rejection::Limit(LimitReached::PerIp) {
                "1"
            } else {
                "0"
            };
            expected.push((
                format!(
                    "{REJECTED_CONNECTIONS_TOTAL}{{listener=\"fresh\",reason=\"{}\"}}",
                    reason.as_str()
                ),
                count,
            ));
        }
        for phase in TimeoutPhase::ALL {
            let count = if phase == TimeoutPhase::Idle {
                "1"
            } else {
                "0"
            };
            expected.push((
                format!(
                    "{TIMEOUTS_TOTAL}{{listener=\"fresh\",phase=\"{}\"}}",
                    phase.as_str()
                ),
                count,
            ));
        }
        for reason in HandshakeFailure::ALL {
            let count = if reason == HandshakeFailure::Eof {
                "1"
            } else {
                "0"
            };
            expected.push((
                format!(
                    "{TLS_HANDSHAKE_ERRORS_TOTAL}{{listener=\"fresh\",reason=\"{}\"}}",
                    reason.as_str()
                ),
                count,
            ));
        }
        for series in [
            format!("{CONNECTIONS_TOTAL}{{listener=\"fresh\"}}"),
            format!("{ACTIVE_CONNECTIONS}{{listener=\"fresh\"}}"),
            format!("{TLS_HANDSHAKES_TOTAL}{{listener=\"fresh\",result=\"ok\"}}"),
            format!("{TLS_HANDSHAKES_TOTAL}{{listener=\"fresh\",result=\"error\"}}"),
            format!("{TLS_RESUMPTIONS_TOTAL}{{listener=\"fresh\"}}"),
            format!("{STARTTLS_TOTAL}{{listener=\"fresh\"}}"),
            format!("{BACKEND_CONNECT_ERRORS_TOTAL}{{listener=\"fresh\"}}"),
            format!("{BYTES_TOTAL}{{listener=\"fresh\",direction=\"client_to_backend\"}}"),
            format!("{BYTES_TOTAL}{{listener=\"fresh\",direction=\"backend_to_client\"}}"),
            format!("{POLICY_REFUSALS_TOTAL}{{listener=\"fresh\",command=\"other\"}}"),
        ] {
            expected.push((series, "0"));
        }
        for (series, count) in expected {
            assert_eq!(value(&series), Some(count), "{series} in\n{rendered}");
        }
    }

    #[test]
    fn build_info_config_reloads_and_process_series_exist_from_the_start() {
        let rendered = render_after(|| {
            register_process_wide();
            config_reload(ConfigReloadResult::Error);
            collect_process_metrics();
        });
        let version = env!("CARGO_PKG_VERSION");
        for line in [
            format!("{BUILD_INFO}{{version=\"{version}\"}} 1"),
            format!("{CONFIG_RELOADS_TOTAL}{{result=\"ok\"}} 0"),
            format!("{CONFIG_RELOADS_TOTAL}{{result=\"error\"}} 1"),
            format!("{TICKET_KEY_RELOADS_TOTAL}{{result=\"ok\"}} 0"),
            format!("{TICKET_KEY_RELOADS_TOTAL}{{result=\"error\"}} 0"),
            format!("{TICKET_KEYS} 0"),
        ] {
            assert!(
                rendered.lines().any(|each| each == line),
                "{line} in\n{rendered}"
            );
        }
        // The collector writes exactly the names this module declares.
        let process: Vec<&str> = rendered
            .lines()
            .filter(|line| line.starts_with("process_"))
            .filter_map(|line| line.split(' ').next())
            .collect();
        let mut declared = PROCESS_METRICS.to_vec();
        declared.sort_unstable();
        let mut written = process.clone();
        written.sort_unstable();
        assert_eq!(written, declared, "{rendered}");
    }
}
