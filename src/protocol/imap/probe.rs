//! What the readiness check ([`crate::readiness`]) asks of an IMAP backend:
//! a `* OK` (or `* PREAUTH`) greeting, then `LOGOUT`.

use crate::protocol::{starts_with_ignore_case, Greeting};

/// What a good greeting starts with.
pub(super) const EXPECTED_GREETING: &str = "* OK";
/// Said before the check closes.
pub(super) const POLITE_QUIT: &[u8] = b"r1 LOGOUT\r\n";

/// The one greeting line: `* OK` or `* PREAUTH` accepts.
pub(super) fn judge_greeting(line: &[u8]) -> Greeting {
    if starts_with_ignore_case(line, b"* OK") || starts_with_ignore_case(line, b"* PREAUTH") {
        Greeting::Good
    } else {
        Greeting::Bad
    }
}
