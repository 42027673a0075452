//! IMAP's own words: the proxy's replies, and whether a backend line is an
//! error answer.

use crate::protocol::{split_word, trim_eol, Replies, StartTlsReplies};

/// The proxy's fixed replies (temporary failures carry RFC 5530's
/// `[UNAVAILABLE]`; each `* BYE` is followed by the close).
pub(crate) const REPLIES: Replies = Replies {
    service_unavailable: SERVICE_UNAVAILABLE,
    too_many_connections: b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
    client_proxy_header: b"* BYE PROXY protocol headers are not accepted from clients\r\n",
    open_relay: b"* BYE [UNAVAILABLE] Service temporarily unavailable, try again later\r\n",
    line_too_long: LINE_TOO_LONG,
    too_many_commands: TOO_MANY_COMMANDS,
    idle_timeout: IDLE_TIMEOUT,
    shutting_down: SHUTTING_DOWN,
    starttls: StartTlsReplies {
        begin: BEGIN_TLS,
        already_active: TLS_ALREADY_ACTIVE,
        syntax: STARTTLS_SYNTAX,
    },
};

/// Reply when a backend pre-authenticates a session before TLS on a
/// listener with `require_tls = "all"`.
pub(crate) const PREAUTH_WITHOUT_TLS: &[u8] =
    b"* BYE [PRIVACYREQUIRED] Pre-authenticated session refused without TLS\r\n";
/// Reply to a client whose backend cannot be reached (RFC 5530 response code).
pub const SERVICE_UNAVAILABLE: &[u8] = b"* BYE [UNAVAILABLE] Backend server not available\r\n";
/// Reply to a client line over the cap, before the connection is closed.
pub(crate) const LINE_TOO_LONG: &[u8] = b"* BYE Line too long\r\n";
/// Goodbyes for sessions the proxy ends during inspection.
pub(crate) const TOO_MANY_COMMANDS: &[u8] = b"* BYE Too many commands\r\n";
pub(crate) const IDLE_TIMEOUT: &[u8] = b"* BYE Autologout; idle for too long\r\n";
pub(crate) const SHUTTING_DOWN: &[u8] = b"* BYE [UNAVAILABLE] Server shutting down\r\n";
/// Tagged reply to STARTTLS (after `tag SP`); the handshake starts right after it.
pub const BEGIN_TLS: &[u8] = b"OK Begin TLS negotiation now\r\n";
/// Tagged reply to STARTTLS (after `tag SP`) once TLS is already active
/// (implicit TLS or a second STARTTLS).
pub(crate) const TLS_ALREADY_ACTIVE: &[u8] = b"BAD TLS is already active\r\n";
/// Tagged reply to STARTTLS (after `tag SP`) with arguments.
pub(crate) const STARTTLS_SYNTAX: &[u8] = b"BAD STARTTLS takes no arguments\r\n";
/// Tagged reply (after `tag SP`) to LOGIN and AUTHENTICATE refused by the
/// listener's policy before TLS (RFC 5530 response code).
pub(crate) const LOGIN_BEFORE_TLS: &[u8] = b"NO [PRIVACYREQUIRED] Must issue STARTTLS first\r\n";
/// Tagged reply (after `tag SP`) to other commands refused by the policy
/// before TLS.
pub(crate) const COMMAND_BEFORE_TLS: &[u8] = b"BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n";
/// Tagged reply (after `tag SP`) to a command carrying a literal before TLS
/// under a restricting policy.
pub(crate) const LITERAL_BEFORE_TLS: &[u8] =
    b"BAD [PRIVACYREQUIRED] Literals are not accepted before STARTTLS\r\n";
/// Reply to a line that is not `tag SP command` before TLS under a
/// restricting policy, and to a line holding a NUL or a bare CR before TLS
/// under any policy (the pre-TLS line policy); it is not tagged, since the
/// line is not trusted to be a command.
pub(crate) const GARBAGE_BEFORE_TLS: &[u8] =
    b"* BAD [PRIVACYREQUIRED] Must issue STARTTLS first\r\n";

/// Whether a backend line is an error answer: `BAD`, `NO` or `BYE`, tagged
/// or untagged.
pub(crate) fn is_error_reply(line: &[u8]) -> bool {
    let (_tag, rest) = split_word(trim_eol(line));
    let (status, _) = split_word(rest);
    [&b"BAD"[..], b"NO", b"BYE"]
        .iter()
        .any(|word| status.eq_ignore_ascii_case(word))
}
