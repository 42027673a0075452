//! What each protocol's folder provides to the rest of the proxy: one
//! [`Spec`] per protocol, reached through [`Protocol`]'s methods, so that
//! nothing outside `src/protocol/` needs to know which protocol says what.
//!
//! A new protocol is a folder that fills in a [`Spec`] (its machine, its
//! replies, its greeting judge, its idle default) plus one line in
//! [`Protocol::spec`].

use std::time::Duration;

use super::gate::StartTlsReplies;
use super::{Goodbye, Inspector, InspectorOptions, Output, Protocol, Refusal};

/// One protocol's knowledge outside its machine.
pub(crate) struct Spec {
    /// The name used in configuration files, logs, metrics and ALPN.
    pub(crate) name: &'static str,
    /// The idle limit of a listener that sets none: the protocol's own.
    pub(crate) default_idle_timeout: Duration,
    /// The proxy's fixed replies in the protocol's words.
    pub(crate) replies: &'static Replies,
    /// Whether a backend line is an error answer.
    pub(crate) is_error_reply: fn(&[u8]) -> bool,
    /// How the readiness check judges one line of a backend's greeting.
    pub(crate) judge_greeting: fn(&[u8]) -> Greeting,
    /// What a good greeting starts with, for the readiness check's reason.
    pub(crate) expected_greeting: &'static str,
    /// What the readiness check says before it closes, so the backend logs
    /// a normal logout rather than a dropped client.
    pub(crate) polite_quit: &'static [u8],
    /// Whether the backend can be told the client by XCLIENT (an SMTP
    /// extension).
    pub(crate) xclient: bool,
    /// Whether the backend relays mail, so that the relay guard
    /// ([`crate::relay_guard`]) checks it.
    pub(crate) relays_mail: bool,
    /// What the backend must be configured with to accept a PROXY header.
    pub(crate) proxy_header_requirement: &'static str,
    /// Builds the protocol's inspection machine.
    pub(crate) new_inspector: fn(&InspectorOptions) -> Box<dyn Inspector>,
    /// What the machine contract test ([`super::contract`]) drives it with.
    #[cfg(test)]
    pub(crate) contract: &'static super::contract::Fixture,
}

/// The proxy's fixed replies in one protocol's words, each one CRLF line.
#[derive(Debug)]
pub(crate) struct Replies {
    /// The backend cannot be reached, or failed while the client waits for
    /// an answer (a temporary failure).
    pub(crate) service_unavailable: &'static [u8],
    /// A connection limit is reached.
    pub(crate) too_many_connections: &'static [u8],
    /// The client sent a PROXY protocol header.
    pub(crate) client_proxy_header: &'static [u8],
    /// The relay guard found the backend open (says nothing of why).
    pub(crate) open_relay: &'static [u8],
    /// Goodbyes for sessions the proxy ends during inspection.
    pub(crate) line_too_long: &'static [u8],
    pub(crate) too_many_commands: &'static [u8],
    pub(crate) idle_timeout: &'static [u8],
    pub(crate) shutting_down: &'static [u8],
    /// The answers to STARTTLS.
    pub(crate) starttls: StartTlsReplies,
}

impl Replies {
    /// The reply to a connection turned away before any machine exists.
    pub(crate) fn refusal(&self, refusal: Refusal) -> &'static [u8] {
        match refusal {
            Refusal::BackendUnavailable => self.service_unavailable,
            Refusal::TooManyConnections => self.too_many_connections,
            Refusal::ClientProxyHeader => self.client_proxy_header,
            Refusal::OpenRelay => self.open_relay,
        }
    }

    /// Writes the goodbye for a session the proxy ends, unless a TLS
    /// handshake is pending: the client would read anything sent then as
    /// TLS.
    pub(crate) fn write_goodbye(&self, reason: Goodbye, handshake_pending: bool, out: &mut Output) {
        if !handshake_pending {
            out.to_client.extend_from_slice(self.goodbye(reason));
        }
    }

    /// The goodbye for a session the proxy ends.
    pub(crate) fn goodbye(&self, reason: Goodbye) -> &'static [u8] {
        match reason {
            Goodbye::LineTooLong => self.line_too_long,
            Goodbye::TooManyCommands => self.too_many_commands,
            Goodbye::IdleTimeout => self.idle_timeout,
            Goodbye::ShuttingDown => self.shutting_down,
        }
    }
}

/// What one line of a backend's greeting says about the backend's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Greeting {
    /// A greeting that accepts the connection.
    Good,
    /// A continuation (SMTP `220-`): the greeting goes on.
    More,
    /// Anything else: a refusal, or not the protocol.
    Bad,
}

impl Protocol {
    /// The protocol's folder, as the rest of the proxy sees it.
    pub(crate) fn spec(self) -> &'static Spec {
        match self {
            Protocol::Smtp => &super::smtp::SPEC,
            Protocol::Imap => &super::imap::SPEC,
            Protocol::Pop3 => &super::pop3::SPEC,
        }
    }

    /// The idle limit of a listener that sets none: RFC 5321 section
    /// 4.5.3.2.7 (5 minutes for the server), RFC 9051 section 5.4 (at least
    /// 30 minutes), RFC 1939 section 3 (at least 10 minutes).
    pub(crate) fn default_idle_timeout(self) -> Duration {
        self.spec().default_idle_timeout
    }

    /// The reply a client gets when it is turned away before any machine
    /// exists (backend unreachable, connection limits).
    pub(crate) fn refusal_reply(self, refusal: Refusal) -> &'static [u8] {
        self.spec().replies.refusal(refusal)
    }

    /// Whether a backend line is an error answer: SMTP `4xx`/`5xx`, IMAP
    /// `BAD`/`NO`/`BYE` (tagged or untagged), POP3 `-ERR`.
    pub(crate) fn is_error_reply(self, line: &[u8]) -> bool {
        (self.spec().is_error_reply)(line)
    }

    /// Builds the inspection machine for a connection.
    pub(crate) fn new_inspector(self, options: &InspectorOptions) -> Box<dyn Inspector> {
        (self.spec().new_inspector)(options)
    }

    /// Whether a listener may tell its backend the client by XCLIENT.
    pub fn speaks_xclient(self) -> bool {
        self.spec().xclient
    }

    /// Whether the backend relays mail: the relay guard checks it.
    pub fn relays_mail(self) -> bool {
        self.spec().relays_mail
    }

    /// How the readiness check judges one line of a backend's greeting.
    pub(crate) fn judge_greeting(self, line: &[u8]) -> Greeting {
        (self.spec().judge_greeting)(line)
    }

    /// What a good greeting starts with (`220`, `* OK`, `+OK`).
    pub(crate) fn expected_greeting(self) -> &'static str {
        self.spec().expected_greeting
    }

    /// What the readiness check sends before closing (`QUIT`, `LOGOUT`).
    pub(crate) fn polite_quit(self) -> &'static [u8] {
        self.spec().polite_quit
    }
}

/// What Dovecot, which serves IMAP and POP3 alike, needs to accept the
/// PROXY header.
pub(crate) const DOVECOT_PROXY_HEADER: &str = "Dovecot: haproxy = yes on the inet_listener the \
    proxy connects to and the proxy's address in haproxy_trusted_networks (a backend not \
    expecting the header fails every session with a temporary error)";

/// Whether `line` starts with `prefix`, ASCII case ignored.
pub(crate) fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
}
