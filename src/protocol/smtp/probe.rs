//! What the readiness check ([`crate::readiness`]) asks of an SMTP backend:
//! a `220` greeting (possibly multi-line), then `QUIT`.

use crate::protocol::{starts_with_ignore_case, Greeting};

/// What a good greeting starts with.
pub(super) const EXPECTED_GREETING: &str = "220";
/// Said before the check closes.
pub(super) const POLITE_QUIT: &[u8] = b"QUIT\r\n";

/// One greeting line: `220-` goes on, `220 ` (or a bare `220`) accepts.
pub(super) fn judge_greeting(line: &[u8]) -> Greeting {
    if starts_with_ignore_case(line, b"220-") {
        Greeting::More
    } else if starts_with_ignore_case(line, b"220 ") || line.trim_ascii_end() == b"220" {
        Greeting::Good
    } else {
        Greeting::Bad
    }
}
