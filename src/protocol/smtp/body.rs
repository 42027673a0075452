//! Message data while the proxy relays the session command by command:
//! DATA's body up to `CRLF.CRLF` (dot-stuffing ambiguous dot lines) and
//! BDAT chunks by their byte count.

use super::*;

impl SmtpInspector {
    /// XCLIENT mode: forwards one command and awaits its reply; DATA and
    /// BDAT are followed by raw bytes.
    pub(super) fn relay_command(
        &mut self,
        verb: &[u8],
        argument: &[u8],
        line: &[u8],
        out: &mut Output,
    ) -> Next {
        match verb {
            b"DATA" => {
                out.to_backend.extend_from_slice(line);
                self.data_line_crlf = line.ends_with(b"\r\n");
                self.state = State::ExpectReply(Pending::Data);
            }
            b"BDAT" => match bdat_size(argument) {
                Some(size) => {
                    out.to_backend.extend_from_slice(line);
                    self.state = if size == 0 {
                        State::ExpectReply(Pending::Relay)
                    } else {
                        State::Chunk(size)
                    };
                }
                // The chunk cannot be framed: it never reaches the backend,
                // and since its data follows at once and could only be read
                // as commands, the session ends here.
                None => {
                    out.to_client.extend_from_slice(BDAT_SYNTAX);
                    self.state = State::Done;
                    return Next::Close;
                }
            },
            _ => {
                out.to_backend.extend_from_slice(line);
                self.state = State::ExpectReply(Pending::Relay);
            }
        }
        Next::Continue
    }
}

/// The size of `BDAT chunk-size [LAST]` (RFC 3030), if the argument is that.
pub(super) fn bdat_size(argument: &[u8]) -> Option<u64> {
    let (size, rest) = split_word(argument);
    let last_ok = rest.is_empty() || rest.eq_ignore_ascii_case(b"LAST");
    if size.is_empty() || size.len() > 19 || !size.iter().all(u8::is_ascii_digit) || !last_ok {
        return None;
    }
    std::str::from_utf8(size).ok()?.parse().ok()
}

/// Where a message body's scan is, carried from one read to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BodyScan {
    at: LinePosition,
    /// The line before this one ended in CRLF (not a bare LF).
    previous_crlf: bool,
    /// The last byte relayed was a CR (a CRLF may straddle two reads).
    last_cr: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinePosition {
    /// Nothing of the line is seen yet.
    Start,
    /// The line so far is ".", held back.
    Dot,
    /// The line so far is ".\r", held back.
    DotCr,
    /// Anywhere else in a line.
    Middle,
}

impl BodyScan {
    /// After the DATA command's own line, whose terminator counts as the
    /// CRLF before a `.` that ends an empty body.
    pub(super) fn new(command_line_crlf: bool) -> Self {
        Self {
            at: LinePosition::Start,
            previous_crlf: command_line_crlf,
            last_cr: false,
        }
    }

    /// Copies body bytes to `to_backend` and returns how many were taken
    /// and whether they ended the body (`CRLF.CRLF`, the terminator
    /// included). Ambiguous dot lines are stuffed (see the module notes).
    pub(super) fn relay(&mut self, bytes: &[u8], to_backend: &mut Vec<u8>) -> (usize, bool) {
        let mut index = 0;
        while index < bytes.len() {
            let byte = bytes[index];
            match self.at {
                LinePosition::Start if byte == b'.' => {
                    self.at = LinePosition::Dot;
                    index += 1;
                }
                LinePosition::Start => self.at = LinePosition::Middle,
                LinePosition::Dot => match byte {
                    b'\r' => {
                        self.at = LinePosition::DotCr;
                        index += 1;
                    }
                    b'\n' => {
                        // ".\n": an end of data only to lenient servers.
                        to_backend.extend_from_slice(b"..\n");
                        index += 1;
                        self.line_ended(false);
                    }
                    _ => {
                        to_backend.push(b'.');
                        self.last_cr = false;
                        self.at = LinePosition::Middle;
                    }
                },
                LinePosition::DotCr if byte == b'\n' => {
                    index += 1;
                    if self.previous_crlf {
                        to_backend.extend_from_slice(b".\r\n");
                        return (index, true);
                    }
                    // "\n.\r\n": an end of data only to lenient servers.
                    to_backend.extend_from_slice(b"..\r\n");
                    self.line_ended(true);
                }
                LinePosition::DotCr => {
                    to_backend.extend_from_slice(b".\r");
                    self.last_cr = true;
                    self.at = LinePosition::Middle;
                }
                LinePosition::Middle => {
                    let rest = &bytes[index..];
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(end) => {
                            let crlf = match end {
                                0 => self.last_cr,
                                _ => rest[end - 1] == b'\r',
                            };
                            to_backend.extend_from_slice(&rest[..=end]);
                            index += end + 1;
                            self.line_ended(crlf);
                        }
                        None => {
                            to_backend.extend_from_slice(rest);
                            self.last_cr = rest.last() == Some(&b'\r');
                            index = bytes.len();
                        }
                    }
                }
            }
        }
        (index, false)
    }

    fn line_ended(&mut self, crlf: bool) {
        self.previous_crlf = crlf;
        self.last_cr = false;
        self.at = LinePosition::Start;
    }
}
