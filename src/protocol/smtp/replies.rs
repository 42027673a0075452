//! SMTP's own words: the proxy's replies, and how a backend reply line
//! reads (its code, whether it is the last line, whether it is an error).

use crate::protocol::{trim_eol, Replies, StartTlsReplies};

/// The proxy's fixed replies (temporary failures are 421: the client
/// retries; the proxy closes after each of them).
pub(crate) const REPLIES: Replies = Replies {
    service_unavailable: SERVICE_UNAVAILABLE,
    too_many_connections: b"421 4.7.0 Too many connections, try again later\r\n",
    client_proxy_header: b"554 5.7.0 PROXY protocol headers are not accepted from clients\r\n",
    open_relay: b"421 4.3.2 Service temporarily unavailable, try again later\r\n",
    line_too_long: LINE_TOO_LONG,
    too_many_commands: TOO_MANY_COMMANDS,
    idle_timeout: IDLE_TIMEOUT,
    shutting_down: SHUTTING_DOWN,
    starttls: StartTlsReplies {
        begin: READY_TO_START_TLS,
        already_active: TLS_ALREADY_ACTIVE,
        syntax: STARTTLS_SYNTAX,
    },
};

/// Reply to a client whose backend cannot be reached.
pub const SERVICE_UNAVAILABLE: &[u8] =
    b"421 4.3.2 Service not available, closing transmission channel\r\n";
/// Reply to STARTTLS; the handshake starts right after it.
pub const READY_TO_START_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
/// Reply to STARTTLS once TLS is already active (implicit TLS or a second STARTTLS).
pub(crate) const TLS_ALREADY_ACTIVE: &[u8] = b"503 5.5.1 TLS already active\r\n";
/// Reply to STARTTLS with parameters (RFC 3207 section 4).
pub(crate) const STARTTLS_SYNTAX: &[u8] = b"501 5.5.4 Syntax error (no parameters allowed)\r\n";
/// Reply to a client line over the cap, before the connection is closed.
pub(crate) const LINE_TOO_LONG: &[u8] = b"421 4.7.0 Line too long, closing connection\r\n";
/// Reply to commands the listener's TLS policy refuses before STARTTLS (RFC 3207).
pub(crate) const MUST_STARTTLS: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
/// Goodbyes for sessions the proxy ends during inspection.
pub(crate) const TOO_MANY_COMMANDS: &[u8] = b"421 4.7.0 Too many commands, closing connection\r\n";
pub(crate) const IDLE_TIMEOUT: &[u8] = b"421 4.4.2 Idle timeout, closing connection\r\n";
pub(crate) const SHUTTING_DOWN: &[u8] = b"421 4.3.2 Service shutting down, closing connection\r\n";
/// Reply to a client's own XCLIENT or XFORWARD: only the proxy may tell the
/// backend who the client is.
pub(crate) const IDENTITY_COMMAND_REFUSED: &[u8] =
    b"550 5.7.1 XCLIENT and XFORWARD are not accepted from clients\r\n";
/// Reply to a BDAT whose size cannot be read (the chunk cannot be framed).
pub(crate) const BDAT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n";
/// Reply to a command line holding a bare CR while the proxy reads the
/// session: a backend that ends lines at CR would see a second command.
pub(crate) const BARE_CR: &[u8] = b"500 5.5.2 Syntax error: bare CR in a command line\r\n";
/// Reply to a command line holding a NUL before TLS: a backend that ends
/// strings at NUL would read another command than the proxy judged.
pub(crate) const NUL_IN_LINE: &[u8] = b"500 5.5.2 Syntax error: NUL in a command line\r\n";

/// The reply code and whether this is the reply's last line. A line that is
/// not `ddd`, `ddd text` or `ddd-text` ends the reply (code 0), so a broken
/// backend cannot keep the machine collecting forever.
pub(crate) fn parse_reply_line(line: &[u8]) -> (u16, bool) {
    let text = trim_eol(line);
    let code = match text.get(..3) {
        Some(digits) if digits.iter().all(u8::is_ascii_digit) => digits
            .iter()
            .fold(0u16, |acc, digit| acc * 10 + u16::from(digit - b'0')),
        _ => return (0, true),
    };
    (code, text.get(3) != Some(&b'-'))
}

/// The text of a reply line after `ddd-` / `ddd `, without terminator.
pub(super) fn reply_text(line: &[u8]) -> &[u8] {
    trim_eol(line).get(4..).unwrap_or_default()
}

/// Whether a backend line is an error answer: `4xx` or `5xx`.
pub(crate) fn is_error_reply(line: &[u8]) -> bool {
    let line = trim_eol(line);
    matches!(line.first(), Some(b'4' | b'5'))
        && line
            .get(1..3)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
}
