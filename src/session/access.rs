//! The access log: one INFO line (`session`) per finished session, on
//! listeners with `access_log = true` (the default).
//!
//! An [`AccessRecord`] is filled as the session goes (the client's address,
//! its TLS session and whether it resumed an earlier one, whether it came
//! by STARTTLS, refused commands, the bytes each way) and logged once, by
//! [`AccessRecord::log`], with how the session ended ([`SessionEnd`]). Its
//! fields are tracing fields, so `--log-format json` writes each as its own
//! key; the connection span adds `listener`, `peer` and `connection_id`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use tracing::info;

use crate::protocol::proxy_header;

use super::streams::ByteTally;
use super::Side;

/// How a session ended, as the access log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The client closed (or left during the handshake).
    ClientClosed,
    /// The backend closed first.
    BackendClosed,
    /// A timeout ended it (handshake, idle, backend connect, PROXY header).
    Timeout,
    /// The proxy turned the session away: a connection limit, the relay
    /// guard, the TLS policy, a PROXY header, a cap on lines or commands.
    Refused,
    /// A connection failed (a reset, a broken handshake, a backend that
    /// cannot be reached).
    Error,
    /// The proxy is shutting down and said goodbye.
    Shutdown,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::ClientClosed => "client_closed",
            Outcome::BackendClosed => "backend_closed",
            Outcome::Timeout => "timeout",
            Outcome::Refused => "refused",
            Outcome::Error => "error",
            Outcome::Shutdown => "shutdown",
        }
    }
}

/// Which side ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndedBy {
    Client,
    Backend,
    Proxy,
}

impl EndedBy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EndedBy::Client => "client",
            EndedBy::Backend => "backend",
            EndedBy::Proxy => "proxy",
        }
    }
}

impl From<Side> for EndedBy {
    fn from(side: Side) -> Self {
        match side {
            Side::Client => EndedBy::Client,
            Side::Backend => EndedBy::Backend,
        }
    }
}

/// How a session ended: the access line's `outcome`, `ended_by` and
/// `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionEnd {
    pub(crate) outcome: Outcome,
    pub(crate) ended_by: EndedBy,
    /// Why, for refusals, timeouts and errors.
    pub(crate) reason: Option<String>,
}

impl SessionEnd {
    /// A session one side closed normally (the proxy's close is its
    /// shutdown goodbye).
    pub(crate) fn closed_by(ended_by: EndedBy) -> Self {
        let outcome = match ended_by {
            EndedBy::Client => Outcome::ClientClosed,
            EndedBy::Backend => Outcome::BackendClosed,
            EndedBy::Proxy => Outcome::Shutdown,
        };
        Self {
            outcome,
            ended_by,
            reason: None,
        }
    }

    /// A session the proxy turned away.
    pub(crate) fn refused(reason: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Refused,
            ended_by: EndedBy::Proxy,
            reason: Some(reason.into()),
        }
    }

    pub(crate) fn new(outcome: Outcome, ended_by: EndedBy, reason: impl Into<String>) -> Self {
        Self {
            outcome,
            ended_by,
            reason: Some(reason.into()),
        }
    }
}

/// The client's TLS session, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TlsSummary {
    version: Cow<'static, str>,
    /// OpenSSL's name, as Postfix and Dovecot log it.
    cipher: Cow<'static, str>,
    sni: Option<String>,
    /// The handshake resumed an earlier session (a session ticket).
    resumed: bool,
}

/// What the access line says about one session, filled as it goes. Shared
/// by reference between the session's steps (every update takes `&self`).
#[derive(Debug)]
pub(crate) struct AccessRecord {
    enabled: bool,
    /// The real client: after a trusted balancer's PROXY header, the
    /// address it names.
    client: SocketAddr,
    started: Instant,
    /// Boxed: an idle session's future holds a pointer, not the strings.
    tls: OnceLock<Box<TlsSummary>>,
    starttls: AtomicBool,
    passthrough: AtomicBool,
    /// The first command the TLS policy refused (a fixed command word,
    /// never client bytes).
    refused_command: OnceLock<&'static str>,
    /// Plaintext bytes written to each side.
    pub(crate) bytes: ByteTally,
}

impl AccessRecord {
    pub(crate) fn new(enabled: bool, client: SocketAddr, started: Instant) -> Self {
        Self {
            enabled,
            client,
            started,
            tls: OnceLock::new(),
            starttls: AtomicBool::new(false),
            passthrough: AtomicBool::new(false),
            refused_command: OnceLock::new(),
            bytes: ByteTally::default(),
        }
    }

    /// The client a trusted balancer's PROXY header named.
    pub(crate) fn set_client(&mut self, client: SocketAddr) {
        self.client = client;
    }

    /// The client's TLS session is established.
    pub(crate) fn tls_established(&self, connection: &rustls::ServerConnection) {
        // Only the access line reads it: no copy of the SNI per session
        // where that line is off.
        if !self.enabled {
            return;
        }
        let version = connection
            .protocol_version()
            .map(proxy_header::tls_version_name)
            .unwrap_or_default();
        let cipher = connection
            .negotiated_cipher_suite()
            .map(|suite| proxy_header::openssl_cipher_name(suite.suite()))
            .unwrap_or_default();
        let _ = self.tls.set(Box::new(TlsSummary {
            version,
            cipher,
            sni: connection.server_name().map(str::to_string),
            resumed: connection.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }));
    }

    /// The client upgraded with STARTTLS (or STLS).
    pub(crate) fn starttls_used(&self) {
        self.starttls.store(true, Ordering::Relaxed);
    }

    /// Inspection is over; bytes are copied unparsed from now on.
    pub(crate) fn handed_over(&self) {
        self.passthrough.store(true, Ordering::Relaxed);
    }

    /// The TLS policy refused `command` (a command word).
    pub(crate) fn policy_refusal(&self, command: &'static str) {
        let _ = self.refused_command.set(command);
    }

    /// How the session is logged: a session that ended during inspection
    /// after the TLS policy refused a command was turned away (say, `AUTH`
    /// before STARTTLS, then `QUIT`), whoever closed it.
    fn judged(&self, end: SessionEnd) -> SessionEnd {
        let closed_normally = matches!(end.outcome, Outcome::ClientClosed | Outcome::BackendClosed);
        match self.refused_command.get() {
            Some(command) if closed_normally && !self.passthrough.load(Ordering::Relaxed) => {
                SessionEnd {
                    outcome: Outcome::Refused,
                    ended_by: end.ended_by,
                    reason: Some(format!("require_tls: {command} refused before TLS")),
                }
            }
            _ => end,
        }
    }

    /// Logs the session's access line (if the listener has the access log
    /// on). Call once, when the session is over.
    pub(crate) fn log(&self, end: SessionEnd) {
        if !self.enabled {
            return;
        }
        let end = self.judged(end);
        let tls = self.tls.get();
        info!(
            client_ip = %self.client.ip(),
            client_port = self.client.port(),
            sni = tls.and_then(|tls| tls.sni.as_deref()).unwrap_or(""),
            tls_version = tls.map_or("", |tls| &tls.version),
            cipher = tls.map_or("", |tls| &tls.cipher),
            resumed = tls.is_some_and(|tls| tls.resumed),
            starttls = self.starttls.load(Ordering::Relaxed),
            outcome = end.outcome.as_str(),
            ended_by = end.ended_by.as_str(),
            reason = end.reason.as_deref().unwrap_or(""),
            bytes_to_backend = self.bytes.to_backend(),
            bytes_to_client = self.bytes.to_client(),
            seconds = self.started.elapsed().as_secs_f64(),
            "session"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord {
        AccessRecord::new(
            true,
            "192.0.2.7:51234".parse().expect("address"),
            Instant::now(),
        )
    }

    #[test]
    fn outcomes_and_sides_have_fixed_names() {
        assert_eq!(
            [
                Outcome::ClientClosed,
                Outcome::BackendClosed,
                Outcome::Timeout,
                Outcome::Refused,
                Outcome::Error,
                Outcome::Shutdown,
            ]
            .map(Outcome::as_str),
            [
                "client_closed",
                "backend_closed",
                "timeout",
                "refused",
                "error",
                "shutdown"
            ]
        );
        assert_eq!(
            [EndedBy::Client, EndedBy::Backend, EndedBy::Proxy].map(EndedBy::as_str),
            ["client", "backend", "proxy"]
        );
        assert_eq!(
            SessionEnd::closed_by(EndedBy::Proxy).outcome,
            Outcome::Shutdown
        );
    }

    #[test]
    fn a_policy_refusal_makes_a_session_closed_in_inspection_refused() {
        let record = record();
        record.policy_refusal("AUTH");
        record.policy_refusal("MAIL");
        assert_eq!(
            record.judged(SessionEnd::closed_by(EndedBy::Client)),
            SessionEnd::new(
                Outcome::Refused,
                EndedBy::Client,
                "require_tls: AUTH refused before TLS"
            )
        );
        // A timeout stays a timeout.
        let timeout = SessionEnd::new(Outcome::Timeout, EndedBy::Proxy, "idle");
        assert_eq!(record.judged(timeout.clone()), timeout);
    }

    #[test]
    fn a_refusal_before_an_upgrade_and_hand_over_is_not_the_end() {
        let record = record();
        record.policy_refusal("AUTH");
        record.starttls_used();
        record.handed_over();
        assert_eq!(
            record.judged(SessionEnd::closed_by(EndedBy::Backend)),
            SessionEnd::closed_by(EndedBy::Backend)
        );
    }

    #[test]
    fn without_refusals_the_end_is_logged_as_it_came() {
        let record = record();
        assert_eq!(
            record.judged(SessionEnd::closed_by(EndedBy::Client)),
            SessionEnd::closed_by(EndedBy::Client)
        );
    }
}
