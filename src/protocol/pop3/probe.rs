//! What the readiness check ([`crate::readiness`]) asks of a POP3 backend:
//! a `+OK` greeting, then `QUIT`.

use crate::protocol::{starts_with_ignore_case, Greeting};

/// What a good greeting starts with.
pub(super) const EXPECTED_GREETING: &str = "+OK";
/// Said before the check closes.
pub(super) const POLITE_QUIT: &[u8] = b"QUIT\r\n";

/// The one greeting line: `+OK` accepts.
pub(super) fn judge_greeting(line: &[u8]) -> Greeting {
    if starts_with_ignore_case(line, b"+OK") {
        Greeting::Good
    } else {
        Greeting::Bad
    }
}
