//! The `ticket_keys` file: reading and checking it.
//!
//! Format: one key per line, oldest first, newest last. A key is the
//! standard base64 (with padding) of 80 random bytes, the size of HAProxy's
//! `tls-ticket-keys` and nginx's `ssl_session_ticket_key` keys, so the same
//! `openssl rand 80 | base64 -w0` makes one. The first 16 bytes name the
//! key (every ticket starts with its key's name); the other 64 are the
//! secret that the AES-256-GCM key is derived from (HKDF-SHA256). Blank
//! lines and lines starting with `#` are ignored.
//!
//! A file is used whole or not at all: a line that is not base64, does not
//! decode to 80 bytes, or repeats an earlier key's name, and a file without
//! any key, are refused with the file and the line named.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use tracing::warn;

use super::TicketKey;

/// Bytes of one key: its name, then its secret.
pub const KEY_LENGTH: usize = 80;
/// Bytes of a key's name.
pub const NAME_LENGTH: usize = 16;

/// How to make a key, for error messages and comments.
pub(crate) const MAKE_A_KEY: &str = "openssl rand 80 | base64 -w0";

/// A ticket key file that cannot be used, or a rotation that failed.
#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("{path}: cannot read the session ticket keys: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {reason}")]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: no session ticket key in the file (one line per key, base64 of 80 random bytes, newest last: {MAKE_A_KEY})")]
    NoKey { path: PathBuf },
    #[error("cannot make a session ticket key: the secure random generator failed")]
    Random,
    #[error("{path}: cannot write the session ticket keys: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TicketKeyError {
    /// Whether the file is at fault (unreadable or invalid): only fixing it
    /// helps, as with an invalid configuration.
    pub fn is_file_error(&self) -> bool {
        matches!(
            self,
            TicketKeyError::Read { .. }
                | TicketKeyError::BadLine { .. }
                | TicketKeyError::NoKey { .. }
        )
    }
}

/// One key line of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyLine {
    /// 1-based.
    pub(crate) number: usize,
    /// The line as written (trimmed).
    pub(crate) text: String,
    pub(crate) bytes: [u8; KEY_LENGTH],
}

/// A checked file: its leading comment lines and its keys, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyFile {
    /// The comment and blank lines before the first key.
    pub(crate) header: Vec<String>,
    pub(crate) keys: Vec<KeyLine>,
}

/// Checks the content of a key file read from `path`.
pub(crate) fn parse_key_file(path: &Path, content: &[u8]) -> Result<KeyFile, TicketKeyError> {
    let bad_line = |line: usize, reason: String| TicketKeyError::BadLine {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut header = Vec::new();
    let mut keys: Vec<KeyLine> = Vec::new();
    for (index, raw) in content.split(|byte| *byte == b'\n').enumerate() {
        let number = index + 1;
        let Ok(text) = std::str::from_utf8(raw) else {
            return Err(bad_line(
                number,
                format!("not base64 (not even text); a key is one line of base64 of 80 random bytes: {MAKE_A_KEY}"),
            ));
        };
        let text = text.trim();
        if text.is_empty() || text.starts_with('#') {
            if keys.is_empty() {
                header.push(text.to_string());
            }
            continue;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|error| {
                bad_line(
                    number,
                    format!("not base64 ({error}); a key is one line of base64 of 80 random bytes: {MAKE_A_KEY}"),
                )
            })?;
        let bytes: [u8; KEY_LENGTH] = decoded.as_slice().try_into().map_err(|_| {
            bad_line(
                number,
                format!(
                    "{} bytes where a key has 80 (a 16-byte name, then 64 secret bytes): {MAKE_A_KEY}",
                    decoded.len()
                ),
            )
        })?;
        if let Some(earlier) = keys
            .iter()
            .find(|key| key.bytes[..NAME_LENGTH] == bytes[..NAME_LENGTH])
        {
            return Err(bad_line(
                number,
                format!(
                    "the same key name (first 16 bytes) as line {}: make every key anew",
                    earlier.number
                ),
            ));
        }
        keys.push(KeyLine {
            number,
            text: text.to_string(),
            bytes,
        });
    }
    if keys.is_empty() {
        return Err(TicketKeyError::NoKey {
            path: path.to_path_buf(),
        });
    }
    Ok(KeyFile { header, keys })
}

/// Reads `path` (following symbolic links: a Kubernetes Secret volume).
pub(crate) fn read_key_file(path: &Path) -> Result<Vec<u8>, TicketKeyError> {
    std::fs::read(path).map_err(|source| TicketKeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The keys of a checked `ticket_keys` file, oldest first (the last one
/// seals new tickets).
#[derive(Debug)]
pub struct TicketKeys {
    path: PathBuf,
    /// The bytes the keys were read from (to tell a change).
    content: Vec<u8>,
    keys: Vec<Arc<TicketKey>>,
}

impl TicketKeys {
    /// Reads and checks the key file at `path`; warns when others than its
    /// owner and group may read it.
    pub fn load(path: &Path) -> Result<TicketKeys, TicketKeyError> {
        let content = read_key_file(path)?;
        TicketKeys::from_content(path, &content)
    }

    /// Checks `content`, read from `path`, and makes its keys.
    pub(crate) fn from_content(path: &Path, content: &[u8]) -> Result<TicketKeys, TicketKeyError> {
        let file = parse_key_file(path, content)?;
        warn_if_world_readable(path);
        let keys = file
            .keys
            .iter()
            .map(|line| TicketKey::from_bytes(&line.bytes).map(Arc::new))
            .collect::<Option<Vec<_>>>()
            .ok_or(TicketKeyError::Random)?;
        Ok(TicketKeys {
            path: path.to_path_buf(),
            content: content.to_vec(),
            keys,
        })
    }

    /// The file the keys were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many keys the file holds (never 0).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a file without a key is refused.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name of the key that seals new tickets, as hexadecimal.
    pub fn newest_name(&self) -> String {
        self.keys
            .last()
            .map(|key| key.name_hex())
            .unwrap_or_default()
    }

    pub(crate) fn content(&self) -> &[u8] {
        &self.content
    }

    pub(crate) fn into_keys(self) -> Vec<Arc<TicketKey>> {
        self.keys
    }
}

/// Ticket keys decrypt every session resumed with them (TLS 1.2 tickets
/// hold the session's master secret): no other local user may read them.
fn warn_if_world_readable(path: &Path) {
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode();
        if mode & 0o004 != 0 {
            warn!(
                file = %path.display(),
                mode = %format!("{:04o}", mode & 0o7777),
                "session ticket keys are readable by every local user: chmod 0600 (or 0640 for a group), or defaultMode: 0400 on a Kubernetes Secret volume"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_line(fill: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([fill; KEY_LENGTH])
    }

    fn error_of(content: &str) -> String {
        match parse_key_file(Path::new("/etc/keys"), content.as_bytes()) {
            Ok(file) => panic!("accepted: {file:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn keys_comments_and_blank_lines() {
        let content = format!(
            "# fleet keys\n\n{}\n  # between\n{}\r\n\n",
            key_line(1),
            key_line(2)
        );
        let file = parse_key_file(Path::new("/etc/keys"), content.as_bytes()).expect("valid");
        assert_eq!(file.header, ["# fleet keys", ""]);
        assert_eq!(file.keys.len(), 2);
        assert_eq!((file.keys[0].number, file.keys[1].number), (3, 5));
        assert_eq!(file.keys[0].bytes, [1; KEY_LENGTH]);
        assert_eq!(file.keys[1].text, key_line(2));
        // A line is 108 characters of base64.
        assert_eq!(key_line(0).len(), 108);
    }

    #[test]
    fn every_refusal_names_the_file_and_the_line() {
        let good = key_line(1);
        let cases = [
            (
                format!("{good}\n{}\n", &good[..60]),
                "/etc/keys: line 2: 45 bytes where a key has 80 (a 16-byte name, then 64 secret bytes): openssl rand 80 | base64 -w0",
            ),
            (
                format!("{good}\n{}\n", &good[..59]),
                "/etc/keys: line 2: not base64 (",
            ),
            (
                format!("# a\n{}\n", base64::engine::general_purpose::STANDARD.encode([7u8; 48])),
                "/etc/keys: line 2: 48 bytes where a key has 80",
            ),
            (
                format!("{}\n", base64::engine::general_purpose::STANDARD.encode([7u8; 81])),
                "/etc/keys: line 1: 81 bytes where a key has 80",
            ),
            (
                format!("{good}\nnot*base64!\n"),
                "/etc/keys: line 2: not base64 (Invalid symbol 42, offset 3.); a key is one line of base64 of 80 random bytes: openssl rand 80 | base64 -w0",
            ),
            (
                format!("{good}\n\n{good}\n"),
                "/etc/keys: line 3: the same key name (first 16 bytes) as line 1: make every key anew",
            ),
            (
                "# only a comment\n\n".to_string(),
                "/etc/keys: no session ticket key in the file (one line per key, base64 of 80 random bytes, newest last: openssl rand 80 | base64 -w0)",
            ),
            (
                String::new(),
                "/etc/keys: no session ticket key in the file",
            ),
        ];
        for (content, expected) in cases {
            let message = error_of(&content);
            assert!(message.starts_with(expected), "{content:?}: {message}");
        }
        // Same name, different secret: still the same name.
        let mut other = [1u8; KEY_LENGTH];
        other[NAME_LENGTH] = 9;
        let twin = base64::engine::general_purpose::STANDARD.encode(other);
        assert!(error_of(&format!("{good}\n{twin}\n")).contains("line 2: the same key name"));
        // Not text at all.
        let message = match parse_key_file(Path::new("/etc/keys"), b"\xff\xfe\n") {
            Ok(_) => panic!("accepted"),
            Err(error) => error.to_string(),
        };
        assert!(
            message.starts_with("/etc/keys: line 1: not base64"),
            "{message}"
        );
    }

    #[test]
    fn file_errors_are_told_from_others() {
        let path = PathBuf::from("/etc/keys");
        assert!(TicketKeyError::NoKey { path: path.clone() }.is_file_error());
        assert!(!TicketKeyError::Random.is_file_error());
        let io = || std::io::Error::other("x");
        assert!(TicketKeyError::Read {
            path: path.clone(),
            source: io()
        }
        .is_file_error());
        assert!(!TicketKeyError::Write { path, source: io() }.is_file_error());
    }
}
