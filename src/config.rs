//! The configuration file: TOML in, a validated [`Config`] out.
//!
//! Parsing happens in two steps ("parse, don't validate"): serde reads the
//! file into raw structs that reject unknown keys (a typo must never silently
//! disable a security setting), then `Config::from_raw` checks every value
//! and produces typed settings the rest of the proxy can trust. Every error
//! names the file, the key and the reason.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::protocol::{ClientIdentity, Protocol, RequireTls, TlsMode};

/// A configuration that cannot be used; the message names file, key, reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Option<String>,
    /// Connections open at once, across all listeners.
    max_connections: Option<usize>,
    /// Seconds pass-through sessions get to finish after SIGTERM/SIGINT.
    shutdown_grace: Option<u64>,
    /// Seconds between checks of the certificate files (a fallback for
    /// filesystems without change notification).
    certificate_poll_interval: Option<u64>,
    /// Seconds between readiness checks of the backends.
    readiness_interval: Option<u64>,
    /// Seconds between relay-guard checks of the SMTP backends.
    relay_check_interval: Option<u64>,
    /// Reload when the configuration file's content changes (checked every
    /// two seconds), as SIGHUP does.
    reload_on_change: Option<bool>,
    /// TLS settings shared by every listener.
    tls: Option<RawTls>,
    #[serde(default, rename = "certificate")]
    certificates: Vec<RawCertificate>,
    metrics: Option<RawMetrics>,
    /// Certificates from an ACME CA (RFC 8555) for the entries with `acme`.
    acme: Option<crate::acme::settings::RawAcme>,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    /// DNS names to get the certificate for from the `[acme]` CA, instead
    /// of `cert` and `key`.
    acme: Option<Vec<String>>,
    /// ACME entries: the private key type.
    key_type: Option<crate::acme::settings::KeyType>,
    /// ACME entries: keep the private key across renewals.
    reuse_key: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

/// `[tls]`: settings of every listener's TLS.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    /// A file of session ticket keys shared by a fleet of replicas.
    ticket_keys: Option<PathBuf>,
    /// Seconds a session ticket is good for.
    ticket_lifetime: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    protocol: RawProtocol,
    tls: RawTlsMode,
    listen: String,
    backend: String,
    /// Seconds a client may take from accept to an established TLS session.
    handshake_timeout: Option<u64>,
    /// Seconds allowed for the backend's TCP connect.
    backend_connect_timeout: Option<u64>,
    /// Seconds of silence tolerated, in inspection and in pass-through.
    idle_timeout: Option<u64>,
    /// STARTTLS listeners: what may happen before TLS (auth | all | none).
    require_tls: Option<RawRequireTls>,
    /// The lowest TLS version accepted ("1.2" or "1.3").
    min_tls_version: Option<String>,
    /// Connections open at once from one client IP address.
    max_connections_per_ip: Option<usize>,
    /// Commands the proxy reads before it hands the session over.
    max_inspected_commands: Option<usize>,
    /// Refuse (unrecognized_name) a handshake whose SNI no certificate names.
    sni_strict: Option<bool>,
    /// How the backend learns the client's address.
    client_identity: Option<RawClientIdentity>,
    /// SMTP listeners: what to do when the backend would relay for anyone.
    relay_check: Option<RawRelayCheck>,
    /// Sources (addresses or CIDR prefixes) whose connections begin with a
    /// PROXY protocol header naming the real client.
    accept_proxy_from: Option<Vec<String>>,
    /// Seconds a trusted source has to send its PROXY header.
    proxy_header_timeout: Option<u64>,
    /// One INFO line per finished session (the access log).
    access_log: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawRelayCheck {
    Refuse,
    Warn,
    Off,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawClientIdentity {
    None,
    ProxyV1,
    ProxyV2,
    Xclient,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawRequireTls {
    Auth,
    All,
    None,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawProtocol {
    Smtp,
    Imap,
    Pop3,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawTlsMode {
    Implicit,
    Starttls,
}

/// A certificate chain and its private key, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
}

/// One listening socket and the backend it fronts.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Unique; the `listener` label in logs and metrics.
    pub name: String,
    pub protocol: Protocol,
    pub tls: TlsMode,
    pub listen: SocketAddr,
    /// `host:port`; resolved at each connect so a backend's DNS name may change.
    pub backend: String,
    pub(crate) handshake_timeout: Duration,
    pub(crate) backend_connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) require_tls: RequireTls,
    pub(crate) min_tls_version: TlsVersion,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) max_inspected_commands: usize,
    /// Refuse a handshake whose SNI names a host no certificate covers,
    /// instead of serving the default certificate.
    pub sni_strict: bool,
    /// How the backend learns who the client is (PROXY header, XCLIENT).
    pub client_identity: ClientIdentity,
    /// What the relay guard does if the backend would relay for a stranger
    /// arriving through this listener (`Off` for IMAP and POP3).
    pub(crate) relay_check: RelayCheck,
    /// Load balancers whose connections start with a PROXY protocol header;
    /// empty: no source may send one.
    pub(crate) accept_proxy_from: Vec<IpNet>,
    /// How long a trusted source has to send its PROXY header.
    pub(crate) proxy_header_timeout: Duration,
    /// Log one INFO line per finished session (client, TLS, outcome,
    /// bytes, duration).
    pub access_log: bool,
}

/// What the relay guard does when an SMTP backend accepts a relay recipient
/// from a stranger arriving through the listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RelayCheck {
    /// `check` fails, `run` refuses to start, and a later finding stops the
    /// listener from serving until a check passes.
    #[default]
    Refuse,
    /// Log an error and set the metric; keep serving.
    Warn,
    /// Never ask.
    Off,
}

impl RelayCheck {
    /// The name used in configuration files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayCheck::Refuse => "refuse",
            RelayCheck::Warn => "warn",
            RelayCheck::Off => "off",
        }
    }
}

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsVersion {
    Tls12,
    Tls13,
}

/// `[tls]`: what every listener's TLS shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Session ticket keys shared with other replicas (one base64 line of
    /// 80 bytes per key, newest last); `None`: keys of this process only.
    pub ticket_keys: Option<PathBuf>,
    /// How long a session ticket may resume a session.
    pub ticket_lifetime: Duration,
}

/// Half a day: a mail client reconnecting during the working day resumes,
/// while a stolen ticket (or the key that sealed it) opens a session for
/// no longer than that.
pub const DEFAULT_TICKET_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// RFC 8446, 4.6.1: servers must not use a lifetime over 7 days.
pub const MAX_TICKET_LIFETIME: Duration = Duration::from_secs(7 * 86400);

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The name a generated self-signed certificate is issued for.
    pub hostname: String,
    /// The first is the default certificate. Empty: a self-signed one is generated.
    pub(crate) certificates: Vec<CertificateFiles>,
    pub metrics_listen: Option<SocketAddr>,
    pub listeners: Vec<ListenerConfig>,
    pub(crate) max_connections: usize,
    pub(crate) shutdown_grace: Duration,
    /// How often certificate files are re-read even without a change event.
    pub(crate) certificate_poll_interval: Duration,
    /// `[tls]`: session tickets.
    pub tls: TlsSettings,
    /// How often `/readyz` re-checks that every backend greets.
    pub(crate) readiness_interval: Duration,
    /// How often the relay guard asks each SMTP backend again.
    pub(crate) relay_check_interval: Duration,
    /// Reload when the file's content changes, without a signal (a
    /// Kubernetes ConfigMap update, a configuration management run).
    pub(crate) reload_on_change: bool,
    /// The `[acme]` table and the entries of `certificates` it issues
    /// (their files are in its state directory).
    pub acme: Option<crate::acme::settings::AcmeConfig>,
}

/// RFC 8314 and common practice: a TLS handshake finishes in seconds.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Enough for a busy small-site mail server; each idle TLS session costs
/// tens of KiB, so this bounds memory too.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// One address rarely needs more; NAT gateways may, so it is configurable.
pub(crate) const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 100;
/// Real clients need a handful of commands before TLS or login; a loop of
/// NOOPs is cut off here.
pub const DEFAULT_MAX_INSPECTED_COMMANDS: usize = 50;
pub(crate) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Certificate files are watched; this poll only catches what a watch misses.
pub(crate) const DEFAULT_CERTIFICATE_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// Kubernetes probes every 10 s by default: one backend check per probe.
pub(crate) const DEFAULT_READINESS_INTERVAL: Duration = Duration::from_secs(10);
/// A backend's relay policy changes with its configuration, rarely: hourly
/// costs it one short SMTP dialogue per listener.
pub(crate) const DEFAULT_RELAY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// A load balancer sends its header with the connection's first bytes.
pub(crate) const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text that was read from `path`.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: error.to_string().trim_end().to_string(),
        })?;
        Config::from_raw(raw, path)
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        let base = path.parent().unwrap_or_else(|| Path::new("."));

        let hostname = match raw.hostname {
            Some(name) => {
                if !is_dns_name(&name) {
                    return Err(invalid(
                        "hostname".into(),
                        format!("{name:?} is not a DNS host name"),
                    ));
                }
                name
            }
            None => machine_hostname(),
        };

        let acme_settings = raw
            .acme
            .map(|table| crate::acme::settings::parse_acme(table, base))
            .transpose()
            .map_err(|(key, reason)| invalid(key, reason))?;
        let mut certificates = Vec::with_capacity(raw.certificates.len());
        let mut acme_certificates = Vec::new();
        for (index, raw) in raw.certificates.into_iter().enumerate() {
            let key = |field: &str| format!("certificate[{index}].{field}");
            let Some(names) = raw.acme else {
                let (Some(cert), Some(key_file)) = (raw.cert, raw.key) else {
                    return Err(invalid(
                        key("cert"),
                        "needs cert and key (files), or acme (DNS names for the [acme] CA)".into(),
                    ));
                };
                if raw.key_type.is_some() || raw.reuse_key.is_some() {
                    let field = if raw.key_type.is_some() {
                        "key_type"
                    } else {
                        "reuse_key"
                    };
                    return Err(invalid(key(field), "applies to acme entries only".into()));
                }
                certificates.push(CertificateFiles {
                    cert: base.join(cert),
                    key: base.join(key_file),
                });
                continue;
            };
            if raw.cert.is_some() || raw.key.is_some() {
                let field = if raw.cert.is_some() { "cert" } else { "key" };
                return Err(invalid(
                    key(field),
                    "an acme entry gets its files from the [acme] CA; give either acme or cert and key".into(),
                ));
            }
            let Some(settings) = &acme_settings else {
                return Err(invalid(
                    key("acme"),
                    "needs an [acme] table (directory, state_dir, challenge)".into(),
                ));
            };
            let names = crate::acme::settings::parse_acme_names(&names)
                .map_err(|reason| invalid(key("acme"), reason))?;
            let files = crate::acme::settings::acme_files(&settings.state_dir, &names[0]);
            if acme_certificates
                .iter()
                .any(|other: &crate::acme::settings::AcmeCertificate| other.names[0] == names[0])
            {
                return Err(invalid(
                    key("acme"),
                    format!("{:?} is the first name of another acme entry (it names the entry's folder in state_dir)", names[0]),
                ));
            }
            certificates.push(files.clone());
            acme_certificates.push(crate::acme::settings::AcmeCertificate {
                names,
                key_type: raw.key_type.unwrap_or_default(),
                reuse_key: raw.reuse_key.unwrap_or(false),
                files,
            });
        }
        let acme = acme_settings.map(|settings| crate::acme::settings::AcmeConfig {
            settings,
            certificates: acme_certificates,
        });

        let metrics_listen = match raw.metrics {
            Some(metrics) => Some(metrics.listen.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "metrics.listen".into(),
                    format!(
                        "{:?} is not an address and port (e.g. 127.0.0.1:9464 or [::1]:9464)",
                        metrics.listen
                    ),
                )
            })?),
            None => None,
        };

        if raw.listeners.is_empty() {
            return Err(invalid(
                "listener".into(),
                "at least one [[listener]] is required".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        let mut listeners = Vec::with_capacity(raw.listeners.len());
        for (index, raw) in raw.listeners.into_iter().enumerate() {
            let key = |field: &str| format!("listener[{index}].{field}");
            if raw.name.is_empty()
                || !raw
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?} must be non-empty letters, digits, '-' or '_'",
                        raw.name
                    ),
                ));
            }
            if !names.insert(raw.name.clone()) {
                return Err(invalid(
                    key("name"),
                    format!("{:?} is used by another listener", raw.name),
                ));
            }
            let listen = raw.listen.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    key("listen"),
                    format!(
                        "{:?} is not an address and port (e.g. 0.0.0.0:993 or [::]:993)",
                        raw.listen
                    ),
                )
            })?;
            if listen.port() != 0 && !addresses.insert(listen) {
                return Err(invalid(
                    key("listen"),
                    format!("{listen} is used by another listener"),
                ));
            }
            if !is_host_and_port(&raw.backend) {
                return Err(invalid(
                    key("backend"),
                    format!(
                        "{:?} is not host:port (e.g. 127.0.0.1:143 or mail.internal:143)",
                        raw.backend
                    ),
                ));
            }
            let protocol = match raw.protocol {
                RawProtocol::Smtp => Protocol::Smtp,
                RawProtocol::Imap => Protocol::Imap,
                RawProtocol::Pop3 => Protocol::Pop3,
            };
            let tls = match raw.tls {
                RawTlsMode::Implicit => TlsMode::Implicit,
                RawTlsMode::Starttls => TlsMode::StartTls,
            };
            let require_tls =
                match (raw.require_tls, tls) {
                    (Some(_), TlsMode::Implicit) => return Err(invalid(
                        key("require_tls"),
                        "applies to starttls listeners only (implicit listeners are always TLS)"
                            .into(),
                    )),
                    (Some(RawRequireTls::Auth) | None, _) => RequireTls::Auth,
                    (Some(RawRequireTls::All), _) => RequireTls::All,
                    (Some(RawRequireTls::None), _) => RequireTls::None,
                };
            let min_tls_version = match raw.min_tls_version.as_deref() {
                None | Some("1.2") => TlsVersion::Tls12,
                Some("1.3") => TlsVersion::Tls13,
                Some(other) => {
                    return Err(invalid(
                        key("min_tls_version"),
                        format!("{other:?} is not \"1.2\" or \"1.3\" (older versions are not supported: RFC 8996)"),
                    ))
                }
            };
            let at_least_one = |value: Option<usize>, field: &str, default: usize| match value {
                Some(0) => Err(invalid(key(field), "must be at least 1".into())),
                Some(count) => Ok(count),
                None => Ok(default),
            };
            let max_connections_per_ip = at_least_one(
                raw.max_connections_per_ip,
                "max_connections_per_ip",
                DEFAULT_MAX_CONNECTIONS_PER_IP,
            )?;
            let max_inspected_commands = at_least_one(
                raw.max_inspected_commands,
                "max_inspected_commands",
                DEFAULT_MAX_INSPECTED_COMMANDS,
            )?;
            let client_identity = match raw.client_identity {
                None | Some(RawClientIdentity::None) => ClientIdentity::None,
                Some(RawClientIdentity::ProxyV1) => ClientIdentity::ProxyV1,
                Some(RawClientIdentity::ProxyV2) => ClientIdentity::ProxyV2,
                Some(RawClientIdentity::Xclient) if protocol.speaks_xclient() => {
                    ClientIdentity::Xclient
                }
                Some(RawClientIdentity::Xclient) => {
                    return Err(invalid(
                        key("client_identity"),
                        format!(
                            "\"xclient\" is an SMTP extension; a {protocol} listener can use \"proxy-v1\" or \"proxy-v2\""
                        ),
                    ))
                }
            };
            let relay_check = match (raw.relay_check, protocol.relays_mail()) {
                (None, true) => RelayCheck::Refuse,
                (None, false) => RelayCheck::Off,
                (Some(RawRelayCheck::Refuse), true) => RelayCheck::Refuse,
                (Some(RawRelayCheck::Warn), true) => RelayCheck::Warn,
                (Some(RawRelayCheck::Off), true) => RelayCheck::Off,
                (Some(_), false) => {
                    return Err(invalid(
                        key("relay_check"),
                        format!("applies to smtp listeners only (this one is {protocol})"),
                    ))
                }
            };
            let accept_proxy_from = raw
                .accept_proxy_from
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(position, source)| {
                    parse_source(source).ok_or_else(|| {
                        invalid(
                            format!("listener[{index}].accept_proxy_from[{position}]"),
                            format!(
                                "{source:?} is not an address or CIDR prefix (e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32)"
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<IpNet>, ConfigError>>()?;
            let seconds = |value: Option<u64>, field: &str, default: Duration| match value {
                Some(0) => Err(invalid(key(field), "must be at least 1 second".into())),
                Some(secs) => Ok(Duration::from_secs(secs)),
                None => Ok(default),
            };
            listeners.push(ListenerConfig {
                name: raw.name,
                protocol,
                tls,
                listen,
                backend: raw.backend,
                handshake_timeout: seconds(
                    raw.handshake_timeout,
                    "handshake_timeout",
                    DEFAULT_HANDSHAKE_TIMEOUT,
                )?,
                backend_connect_timeout: seconds(
                    raw.backend_connect_timeout,
                    "backend_connect_timeout",
                    DEFAULT_BACKEND_CONNECT_TIMEOUT,
                )?,
                idle_timeout: seconds(
                    raw.idle_timeout,
                    "idle_timeout",
                    protocol.default_idle_timeout(),
                )?,
                require_tls,
                min_tls_version,
                max_connections_per_ip,
                max_inspected_commands,
                sni_strict: raw.sni_strict.unwrap_or(false),
                client_identity,
                relay_check,
                accept_proxy_from,
                proxy_header_timeout: seconds(
                    raw.proxy_header_timeout,
                    "proxy_header_timeout",
                    DEFAULT_PROXY_HEADER_TIMEOUT,
                )?,
                access_log: raw.access_log.unwrap_or(true),
            });
        }

        let max_connections = match raw.max_connections {
            Some(0) => {
                return Err(invalid(
                    "max_connections".into(),
                    "must be at least 1".into(),
                ))
            }
            Some(count) => count,
            None => DEFAULT_MAX_CONNECTIONS,
        };
        let shutdown_grace = raw
            .shutdown_grace
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE);

        let certificate_poll_interval = match raw.certificate_poll_interval {
            Some(0) => {
                return Err(invalid(
                    "certificate_poll_interval".into(),
                    "must be at least 1 second".into(),
                ))
            }
            Some(secs) => Duration::from_secs(secs),
            None => DEFAULT_CERTIFICATE_POLL_INTERVAL,
        };
        let readiness_interval = match raw.readiness_interval {
            Some(0) => {
                return Err(invalid(
                    "readiness_interval".into(),
                    "must be at least 1 second".into(),
                ))
            }
            Some(secs) => Duration::from_secs(secs),
            None => DEFAULT_READINESS_INTERVAL,
        };
        let relay_check_interval = match raw.relay_check_interval {
            Some(0) => {
                return Err(invalid(
                    "relay_check_interval".into(),
                    "must be at least 1 second".into(),
                ))
            }
            Some(secs) => Duration::from_secs(secs),
            None => DEFAULT_RELAY_CHECK_INTERVAL,
        };

        let raw_tls = raw.tls.unwrap_or_default();
        let ticket_lifetime = match raw_tls.ticket_lifetime {
            Some(secs) if secs == 0 || secs > MAX_TICKET_LIFETIME.as_secs() => {
                return Err(invalid(
                    "tls.ticket_lifetime".into(),
                    format!(
                        "must be 1 to {} seconds (RFC 8446 caps a ticket's lifetime at 7 days)",
                        MAX_TICKET_LIFETIME.as_secs()
                    ),
                ))
            }
            Some(secs) => Duration::from_secs(secs),
            None => DEFAULT_TICKET_LIFETIME,
        };
        let tls = TlsSettings {
            ticket_keys: raw_tls.ticket_keys.map(|file| base.join(file)),
            ticket_lifetime,
        };

        Ok(Config {
            hostname,
            certificates,
            metrics_listen,
            listeners,
            max_connections,
            shutdown_grace,
            certificate_poll_interval,
            tls,
            readiness_interval,
            relay_check_interval,
            reload_on_change: raw.reload_on_change.unwrap_or(false),
            acme,
        })
    }
}

/// An address (`192.0.2.7`, `2001:db8::7`) or a CIDR prefix (`10.0.0.0/8`).
/// An IPv4 prefix also matches the IPv4-mapped IPv6 form of its addresses
/// (see [`source_is_trusted`]).
fn parse_source(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|net| net.trunc())
}

/// Whether a connection from `peer` comes from one of `sources`. A
/// dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 addresses; they
/// match the IPv4 prefixes they belong to.
pub(crate) fn source_is_trusted(sources: &[IpNet], peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    sources.iter().any(|net| net.contains(&peer))
}

/// `host:port` with a non-empty host (name, IPv4, or `[IPv6]`) and a port 1..=65535.
fn is_host_and_port(value: &str) -> bool {
    if value.parse::<SocketAddr>().is_ok() {
        return !value.ends_with(":0");
    }
    match value.rsplit_once(':') {
        Some((host, port)) => {
            is_dns_name(host) && port.parse::<u16>().map(|port| port != 0).unwrap_or(false)
        }
        None => false,
    }
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The machine's host name, for the generated certificate; `localhost` if unknown.
fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| is_dns_name(name))
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[certificate]]
cert = "certs/fullchain.pem"
key = "certs/privkey.pem"

[metrics]
listen = "127.0.0.1:9464"

[[listener]]
name = "imaps"
protocol = "imap"
tls = "implicit"
listen = "0.0.0.0:993"
backend = "127.0.0.1:143"

[[listener]]
name = "submission"
protocol = "smtp"
tls = "starttls"
listen = "[::]:587"
backend = "legacy-mail:25"
idle_timeout = 60
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/mail-tls-proxy/config.toml"))
    }

    fn error_of(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn a_full_config_is_read_with_paths_relative_to_the_file() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(
            config.certificates,
            vec![CertificateFiles {
                cert: "/etc/mail-tls-proxy/certs/fullchain.pem".into(),
                key: "/etc/mail-tls-proxy/certs/privkey.pem".into(),
            }]
        );
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(config.listeners.len(), 2);
        let imaps = &config.listeners[0];
        assert_eq!(
            (imaps.name.as_str(), imaps.protocol, imaps.tls),
            ("imaps", Protocol::Imap, TlsMode::Implicit)
        );
        assert_eq!(imaps.idle_timeout, Duration::from_secs(1800));
        assert_eq!(imaps.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        let submission = &config.listeners[1];
        assert_eq!(submission.listen, "[::]:587".parse().unwrap());
        assert_eq!(submission.backend, "legacy-mail:25");
        assert_eq!(submission.tls, TlsMode::StartTls);
        assert_eq!(submission.idle_timeout, Duration::from_secs(60));
        assert_eq!(submission.require_tls, RequireTls::Auth);
        assert_eq!(submission.min_tls_version, TlsVersion::Tls12);
        assert_eq!(
            submission.max_connections_per_ip,
            DEFAULT_MAX_CONNECTIONS_PER_IP
        );
        assert_eq!(config.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    }

    #[test]
    fn security_settings_are_read_and_checked() {
        let text = MINIMAL
            .replace("idle_timeout = 60", "idle_timeout = 60\nrequire_tls = \"all\"\nmin_tls_version = \"1.3\"\nmax_connections_per_ip = 5")
            .replace("\n[[certificate]]", "max_connections = 7\nshutdown_grace = 3\n\n[[certificate]]");
        let config = parse(&text).expect("valid");
        assert_eq!(config.max_connections, 7);
        assert_eq!(config.shutdown_grace, Duration::from_secs(3));
        let submission = &config.listeners[1];
        assert_eq!(submission.require_tls, RequireTls::All);
        assert_eq!(submission.min_tls_version, TlsVersion::Tls13);
        assert_eq!(submission.max_connections_per_ip, 5);

        let message = error_of(&MINIMAL.replace(
            "backend = \"127.0.0.1:143\"",
            "backend = \"127.0.0.1:143\"\nrequire_tls = \"all\"",
        ));
        assert!(
            message.contains("listener[0].require_tls: applies to starttls listeners only"),
            "{message}"
        );
        let message = error_of(&MINIMAL.replace("idle_timeout = 60", "min_tls_version = \"1.1\""));
        assert!(
            message.contains("listener[1].min_tls_version") && message.contains("RFC 8996"),
            "{message}"
        );
        let message = error_of(&MINIMAL.replace("idle_timeout = 60", "require_tls = \"maybe\""));
        assert!(message.contains("maybe"), "{message}");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let message = error_of(&MINIMAL.replace(
            "backend = \"127.0.0.1:143\"",
            "backend = \"127.0.0.1:143\"\nrequire_tsl = \"all\"",
        ));
        assert!(
            message.contains("/etc/mail-tls-proxy/config.toml"),
            "{message}"
        );
        assert!(message.contains("require_tsl"), "{message}");
    }

    #[test]
    fn invalid_values_name_file_key_and_reason() {
        let cases = [
            ("protocol = \"imap\"", "protocol = \"nntp\"", "nntp"),
            ("tls = \"implicit\"", "tls = \"always\"", "always"),
            (
                "listen = \"0.0.0.0:993\"",
                "listen = \"993\"",
                "listener[0].listen",
            ),
            (
                "backend = \"127.0.0.1:143\"",
                "backend = \"127.0.0.1\"",
                "listener[0].backend",
            ),
            (
                "name = \"imaps\"",
                "name = \"submission\"",
                "listener[1].name: \"submission\" is used by another listener",
            ),
            ("name = \"imaps\"", "name = \"im aps\"", "listener[0].name"),
            (
                "listen = \"127.0.0.1:9464\"",
                "listen = \"localhost\"",
                "metrics.listen",
            ),
            (
                "idle_timeout = 60",
                "idle_timeout = 0",
                "listener[1].idle_timeout: must be at least 1 second",
            ),
        ];
        for (from, to, expected) in cases {
            let message = error_of(&MINIMAL.replacen(from, to, 1));
            assert!(
                message.starts_with("/etc/mail-tls-proxy/config.toml"),
                "{message}"
            );
            assert!(message.contains(expected), "{to}: {message}");
        }
    }

    #[test]
    fn no_listener_is_an_error() {
        let message = error_of("hostname = \"mx.example\"\n");
        assert!(message.contains("at least one [[listener]]"), "{message}");
    }

    #[test]
    fn no_certificate_means_a_generated_one_for_the_hostname() {
        let text = "hostname = \"mx.example.org\"\n[[listener]]\nname = \"a\"\nprotocol = \"pop3\"\ntls = \"starttls\"\nlisten = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:110\"\n";
        let config = parse(text).expect("valid");
        assert!(config.certificates.is_empty());
        assert_eq!(config.hostname, "mx.example.org");
        assert_eq!(config.metrics_listen, None);
    }

    #[test]
    fn host_and_port_forms() {
        assert!(is_host_and_port("127.0.0.1:143"));
        assert!(is_host_and_port("[::1]:143"));
        assert!(is_host_and_port("mail.internal:25"));
        assert!(!is_host_and_port("mail.internal"));
        assert!(!is_host_and_port("mail.internal:0"));
        assert!(!is_host_and_port(":25"));
        assert!(!is_host_and_port("bad host:25"));
    }

    #[test]
    fn client_identity_is_read_per_listener_and_xclient_is_smtp_only() {
        let config = parse(MINIMAL).expect("valid");
        assert!(config
            .listeners
            .iter()
            .all(|listener| listener.client_identity == ClientIdentity::None));
        let text = MINIMAL
            .replace(
                "backend = \"127.0.0.1:143\"",
                "backend = \"127.0.0.1:143\"\nclient_identity = \"proxy-v2\"",
            )
            .replace(
                "idle_timeout = 60",
                "idle_timeout = 60\nclient_identity = \"xclient\"",
            );
        let config = parse(&text).expect("valid");
        assert_eq!(config.listeners[0].client_identity, ClientIdentity::ProxyV2);
        assert_eq!(config.listeners[1].client_identity, ClientIdentity::Xclient);
        let text = MINIMAL.replace(
            "idle_timeout = 60",
            "idle_timeout = 60\nclient_identity = \"proxy-v1\"",
        );
        assert_eq!(
            parse(&text).expect("valid").listeners[1].client_identity,
            ClientIdentity::ProxyV1
        );

        let message = error_of(&MINIMAL.replace(
            "backend = \"127.0.0.1:143\"",
            "backend = \"127.0.0.1:143\"\nclient_identity = \"xclient\"",
        ));
        assert!(
            message.contains("listener[0].client_identity: \"xclient\" is an SMTP extension"),
            "{message}"
        );
        let message =
            error_of(&MINIMAL.replace("idle_timeout = 60", "client_identity = \"proxy-v3\""));
        assert!(message.contains("proxy-v3"), "{message}");
    }

    #[test]
    fn readiness_interval_is_read_and_checked() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.readiness_interval, DEFAULT_READINESS_INTERVAL);
        let config = parse(&format!("readiness_interval = 3\n{MINIMAL}")).expect("valid");
        assert_eq!(config.readiness_interval, Duration::from_secs(3));
        let message = error_of(&format!("readiness_interval = 0\n{MINIMAL}"));
        assert!(
            message.contains("readiness_interval: must be at least 1 second"),
            "{message}"
        );
    }

    #[test]
    fn certificate_polling_and_strict_sni() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(
            config.certificate_poll_interval,
            DEFAULT_CERTIFICATE_POLL_INTERVAL
        );
        assert!(config.listeners.iter().all(|listener| !listener.sni_strict));
        let text = format!("certificate_poll_interval = 5\n{MINIMAL}")
            .replace("idle_timeout = 60", "idle_timeout = 60\nsni_strict = true");
        let config = parse(&text).expect("valid");
        assert_eq!(config.certificate_poll_interval, Duration::from_secs(5));
        assert!(!config.listeners[0].sni_strict);
        assert!(config.listeners[1].sni_strict);
        let message = error_of(&format!("certificate_poll_interval = 0\n{MINIMAL}"));
        assert!(
            message.contains("certificate_poll_interval: must be at least 1 second"),
            "{message}"
        );
        let message = error_of(&MINIMAL.replace("idle_timeout = 60", "sni_strict = \"yes\""));
        assert!(message.contains("sni_strict"), "{message}");
    }

    #[test]
    fn relay_check_is_smtp_only_and_on_by_default() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.listeners[0].relay_check, RelayCheck::Off);
        assert_eq!(config.listeners[1].relay_check, RelayCheck::Refuse);
        assert_eq!(config.relay_check_interval, DEFAULT_RELAY_CHECK_INTERVAL);
        for (value, expected) in [
            ("refuse", RelayCheck::Refuse),
            ("warn", RelayCheck::Warn),
            ("off", RelayCheck::Off),
        ] {
            let text = format!("relay_check_interval = 60\n{MINIMAL}").replace(
                "idle_timeout = 60",
                &format!("idle_timeout = 60\nrelay_check = \"{value}\""),
            );
            let config = parse(&text).expect("valid");
            assert_eq!(config.listeners[1].relay_check, expected);
            assert_eq!(config.relay_check_interval, Duration::from_secs(60));
        }
        let message = error_of(&MINIMAL.replace(
            "backend = \"127.0.0.1:143\"",
            "backend = \"127.0.0.1:143\"\nrelay_check = \"warn\"",
        ));
        assert!(
            message.contains(
                "listener[0].relay_check: applies to smtp listeners only (this one is imap)"
            ),
            "{message}"
        );
        let message = error_of(&MINIMAL.replace("idle_timeout = 60", "relay_check = \"maybe\""));
        assert!(message.contains("maybe"), "{message}");
        let message = error_of(&format!("relay_check_interval = 0\n{MINIMAL}"));
        assert!(
            message.contains("relay_check_interval: must be at least 1 second"),
            "{message}"
        );
    }

    #[test]
    fn the_access_log_is_on_by_default_and_off_per_listener() {
        let config = parse(MINIMAL).expect("valid");
        assert!(config.listeners.iter().all(|listener| listener.access_log));
        let config =
            parse(&MINIMAL.replace("idle_timeout = 60", "idle_timeout = 60\naccess_log = false"))
                .expect("valid");
        assert!(config.listeners[0].access_log);
        assert!(!config.listeners[1].access_log);
        let message = error_of(&MINIMAL.replace("idle_timeout = 60", "access_log = \"no\""));
        assert!(message.contains("access_log"), "{message}");
    }

    #[test]
    fn proxy_sources_are_addresses_or_prefixes() {
        let config = parse(MINIMAL).expect("valid");
        assert!(config.listeners[0].accept_proxy_from.is_empty());
        assert_eq!(
            config.listeners[0].proxy_header_timeout,
            DEFAULT_PROXY_HEADER_TIMEOUT
        );
        let text = MINIMAL.replace(
            "backend = \"127.0.0.1:143\"",
            "backend = \"127.0.0.1:143\"\naccept_proxy_from = [\"10.1.2.3/8\", \"192.0.2.7\", \"2001:db8::/32\"]\nproxy_header_timeout = 2",
        );
        let config = parse(&text).expect("valid");
        let sources = &config.listeners[0].accept_proxy_from;
        let shown: Vec<String> = sources.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        assert_eq!(
            config.listeners[0].proxy_header_timeout,
            Duration::from_secs(2)
        );
        let ip = |text: &str| text.parse::<IpAddr>().expect("address");
        assert!(source_is_trusted(sources, ip("10.200.0.1")));
        assert!(source_is_trusted(sources, ip("::ffff:10.200.0.1")));
        assert!(source_is_trusted(sources, ip("192.0.2.7")));
        assert!(!source_is_trusted(sources, ip("192.0.2.8")));
        assert!(source_is_trusted(sources, ip("2001:db8:ffff::1")));
        assert!(!source_is_trusted(sources, ip("2001:db9::1")));
        assert!(!source_is_trusted(&[], ip("10.0.0.1")));

        for bad in ["10.0.0.0/33", "example.org", "", "10.0.0"] {
            let message = error_of(&MINIMAL.replace(
                "backend = \"127.0.0.1:143\"",
                &format!(
                    "backend = \"127.0.0.1:143\"\naccept_proxy_from = [\"192.0.2.1\", \"{bad}\"]"
                ),
            ));
            assert!(
                message.contains("listener[0].accept_proxy_from[1]: ")
                    && message.contains("is not an address or CIDR prefix"),
                "{bad}: {message}"
            );
        }
        let message = error_of(&MINIMAL.replace(
            "backend = \"127.0.0.1:143\"",
            "backend = \"127.0.0.1:143\"\nproxy_header_timeout = 0",
        ));
        assert!(
            message.contains("listener[0].proxy_header_timeout: must be at least 1 second"),
            "{message}"
        );
    }

    #[test]
    fn the_tls_table_names_ticket_keys_and_their_lifetime() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(
            config.tls,
            TlsSettings {
                ticket_keys: None,
                ticket_lifetime: DEFAULT_TICKET_LIFETIME,
            }
        );
        let config = parse(&format!(
            "{MINIMAL}\n[tls]\nticket_keys = \"tickets/keys\"\nticket_lifetime = 3600\n"
        ))
        .expect("valid");
        assert_eq!(
            config.tls,
            TlsSettings {
                ticket_keys: Some("/etc/mail-tls-proxy/tickets/keys".into()),
                ticket_lifetime: Duration::from_secs(3600),
            }
        );
        for lifetime in ["0", "604801"] {
            let message = error_of(&format!("{MINIMAL}\n[tls]\nticket_lifetime = {lifetime}\n"));
            assert!(
                message.contains("tls.ticket_lifetime: must be 1 to 604800 seconds"),
                "{message}"
            );
        }
        let message = error_of(&format!("{MINIMAL}\n[tls]\nticket_key = \"keys\"\n"));
        assert!(message.contains("ticket_key"), "{message}");
    }
}
