//! POP3's own words: the proxy's replies, and whether a backend line is an
//! error answer.

use crate::protocol::{Replies, StartTlsReplies};

/// The proxy's fixed replies (temporary failures carry RFC 3206's
/// `[SYS/TEMP]`; the proxy closes after each of them).
pub(crate) const REPLIES: Replies = Replies {
    service_unavailable: SERVICE_UNAVAILABLE,
    too_many_connections: b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    client_proxy_header: b"-ERR PROXY protocol headers are not accepted from clients\r\n",
    open_relay: b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n",
    line_too_long: LINE_TOO_LONG,
    too_many_commands: TOO_MANY_COMMANDS,
    idle_timeout: IDLE_TIMEOUT,
    shutting_down: SHUTTING_DOWN,
    starttls: StartTlsReplies {
        begin: BEGIN_TLS,
        already_active: TLS_ALREADY_ACTIVE,
        syntax: STLS_SYNTAX,
    },
};

/// Reply to a client whose backend cannot be reached (RFC 3206 response code).
pub const SERVICE_UNAVAILABLE: &[u8] = b"-ERR [SYS/TEMP] Backend server not available\r\n";
/// Reply to a client line over the cap, before the connection is closed.
pub(crate) const LINE_TOO_LONG: &[u8] = b"-ERR Line too long\r\n";
/// Goodbyes for sessions the proxy ends during inspection.
pub(crate) const TOO_MANY_COMMANDS: &[u8] = b"-ERR Too many commands\r\n";
pub(crate) const IDLE_TIMEOUT: &[u8] = b"-ERR Idle timeout\r\n";
pub(crate) const SHUTTING_DOWN: &[u8] = b"-ERR [SYS/TEMP] Server shutting down\r\n";
/// Reply to STLS; the handshake starts right after it.
pub const BEGIN_TLS: &[u8] = b"+OK Begin TLS negotiation\r\n";
/// Reply to STLS once TLS is already active (RFC 2595 section 4 wording).
pub(crate) const TLS_ALREADY_ACTIVE: &[u8] = b"-ERR Command not permitted when TLS active\r\n";
/// Reply to STLS with arguments.
pub(crate) const STLS_SYNTAX: &[u8] = b"-ERR STLS takes no arguments\r\n";
/// The capability line the proxy adds to CAPA replies before TLS.
pub(crate) const STLS_CAPABILITY: &[u8] = b"STLS\r\n";
/// The CAPA reply served before TLS when the backend does not know CAPA.
pub const SYNTHESIZED_CAPA: &[u8] = b"+OK Capability list follows\r\nSTLS\r\n.\r\n";
/// Reply to USER, PASS, APOP and AUTH refused by the listener's policy
/// before TLS (RFC 3206 response code).
pub(crate) const AUTH_BEFORE_TLS: &[u8] = b"-ERR [AUTH] Must issue STLS command first\r\n";
/// Reply to other commands refused by the policy before TLS, and to a line
/// holding a NUL or a bare CR before TLS under any policy (the pre-TLS line
/// policy) unless its word is one of the above.
pub(crate) const COMMAND_BEFORE_TLS: &[u8] = b"-ERR Must issue STLS command first\r\n";

/// Whether a backend line is an error answer: `-ERR`.
pub(crate) fn is_error_reply(line: &[u8]) -> bool {
    line.starts_with(b"-ERR")
}
