//! `mail-tls-proxy tickets rotate`: a new key at the end of a key file, the
//! oldest beyond `keep` dropped, the file replaced in one rename.
//!
//! The new key's 80 bytes come from the crypto provider's secure random
//! generator. The file is written next to itself under a temporary name
//! (so the rename stays on one filesystem), flushed to disk, given the
//! mode and owner of the file it replaces (0600 and the caller's for a new
//! file), then renamed over it, and the directory is flushed too: a proxy
//! reading the file at any moment sees the old keys or the new ones, and a
//! crash leaves one of the two. A file that is not a valid key file is not
//! touched (the error names the line); one that holds only comments gets
//! its first key.

use std::path::{Path, PathBuf};

use base64::Engine;

use super::file::{parse_key_file, KeyLine};
use super::{hex, TicketKeyError, KEY_LENGTH, NAME_LENGTH};
use crate::atomic_file::{self, FileMode};
use crate::tls::provider::fill_random;

/// Keys a rotation keeps by default: the new one and the two before it.
/// Rotated every 6 hours, a key seals tickets for 6 hours and opens them
/// for 12 more, the default `ticket_lifetime`.
pub const DEFAULT_KEEP: u16 = 3;

/// The comment a new key file starts with.
const NEW_FILE_HEADER: [&str; 3] = [
    "# mail-tls-proxy session ticket keys: one line per key, base64 of 80 random",
    "# bytes, oldest first; the last line seals new tickets, every line opens them.",
    "# Keep it private (0600). Rotate with: mail-tls-proxy tickets rotate --file <this file>",
];

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub path: PathBuf,
    /// The file did not exist and was made.
    pub created: bool,
    /// Keys in the file now, the new one included.
    pub keys: usize,
    /// Oldest keys dropped to keep `keep`.
    pub dropped: usize,
    /// The new key's name (hexadecimal): the one that seals new tickets.
    pub newest_name: String,
}

/// Adds a fresh key at the end of the key file at `path` (made if missing)
/// and drops the oldest keys beyond `keep` (at least 1: the new key).
pub fn rotate_key_file(path: &Path, keep: usize) -> Result<Rotation, TicketKeyError> {
    let keep = keep.max(1);
    let existing = match std::fs::read(path) {
        Ok(content) => Some(content),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(TicketKeyError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let (header, keys) = match &existing {
        None => (NEW_FILE_HEADER.map(String::from).to_vec(), Vec::new()),
        Some(content) => match parse_key_file(path, content) {
            Ok(file) => (file.header, file.keys),
            // Comments only (or empty): the first key goes in.
            Err(TicketKeyError::NoKey { .. }) => (
                String::from_utf8_lossy(content)
                    .lines()
                    .map(|line| line.trim().to_string())
                    .collect(),
                Vec::new(),
            ),
            Err(error) => return Err(error),
        },
    };
    let new_key = fresh_key(&keys)?;
    let kept_from = (keys.len() + 1).saturating_sub(keep);
    let mut lines: Vec<String> = header;
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    lines.extend(keys[kept_from..].iter().map(|key| key.text.clone()));
    lines.push(base64::engine::general_purpose::STANDARD.encode(new_key));
    let mut content = lines.join("\n");
    content.push('\n');
    replace_file(path, content.as_bytes())?;
    Ok(Rotation {
        path: path.to_path_buf(),
        created: existing.is_none(),
        keys: keys.len() - kept_from + 1,
        dropped: kept_from,
        newest_name: hex(&new_key[..NAME_LENGTH]),
    })
}

/// 80 random bytes whose name no key in `keys` has.
fn fresh_key(keys: &[KeyLine]) -> Result<[u8; KEY_LENGTH], TicketKeyError> {
    for _ in 0..3 {
        let mut key = [0u8; KEY_LENGTH];
        fill_random(&mut key).map_err(|_| TicketKeyError::Random)?;
        if !keys
            .iter()
            .any(|each| each.bytes[..NAME_LENGTH] == key[..NAME_LENGTH])
        {
            return Ok(key);
        }
    }
    // Three 128-bit collisions in a row: the generator is broken.
    Err(TicketKeyError::Random)
}

/// Replaces `path` with `content` atomically, keeping its mode and owner
/// (see the module documentation).
fn replace_file(path: &Path, content: &[u8]) -> Result<(), TicketKeyError> {
    atomic_file::replace(path, content, FileMode::KeepReplaced).map_err(|error| {
        TicketKeyError::Write {
            path: path.to_path_buf(),
            source: error.source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::{file_mode as mode, file_names, TestDir};
    use crate::tls::tickets::TicketKeys;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn key_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_missing_file_is_made_private_with_one_key() {
        let dir = TestDir::new("tickets-new");
        let path = dir.join("keys");
        let rotation = rotate_key_file(&path, usize::from(DEFAULT_KEEP)).expect("rotate");
        assert_eq!(
            (rotation.created, rotation.keys, rotation.dropped),
            (true, 1, 0)
        );
        assert_eq!(mode(&path), 0o600);
        let keys = TicketKeys::load(&path).expect("a valid key file");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.newest_name(), rotation.newest_name);
        assert!(std::fs::read_to_string(&path)
            .expect("read")
            .starts_with("# mail-tls-proxy session ticket keys"));
    }

    #[test]
    fn each_rotation_appends_and_keeps_the_newest_n() {
        let dir = TestDir::new("tickets-keep");
        let path = dir.join("keys");
        let mut names = Vec::new();
        for round in 0..5 {
            let rotation = rotate_key_file(&path, 3).expect("rotate");
            names.push(rotation.newest_name.clone());
            assert_eq!(rotation.keys, (round + 1).min(3));
            assert_eq!(rotation.dropped, usize::from(round >= 3));
            assert_eq!(
                TicketKeys::load(&path).expect("valid").newest_name(),
                names[round]
            );
        }
        let lines = key_lines(&path);
        assert_eq!(lines.len(), 3);
        // The kept lines are the last three made, oldest first.
        let keys = TicketKeys::load(&path).expect("valid");
        assert_eq!(keys.len(), 3);
        let loaded: Vec<String> = keys.into_keys().iter().map(|key| key.name_hex()).collect();
        assert_eq!(loaded, names[2..]);

        let rotation = rotate_key_file(&path, 1).expect("rotate");
        assert_eq!((rotation.keys, rotation.dropped), (1, 3));
        assert_eq!(key_lines(&path).len(), 1);
    }

    #[test]
    fn comments_mode_and_owner_are_kept_and_the_file_is_replaced_by_rename() {
        let dir = TestDir::new("tickets-replace");
        let path = dir.join("keys");
        let first = base64::engine::general_purpose::STANDARD.encode([5u8; KEY_LENGTH]);
        std::fs::write(&path, format!("# ours\n\n{first}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let before = std::fs::metadata(&path).expect("metadata");
        rotate_key_file(&path, 3).expect("rotate");
        let after = std::fs::metadata(&path).expect("metadata");
        // A new inode: renamed over, never written in place.
        assert_ne!(before.ino(), after.ino());
        assert_eq!(mode(&path), 0o640);
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        let content = std::fs::read_to_string(&path).expect("read");
        assert!(
            content.starts_with(&format!("# ours\n{first}\n")),
            "{content}"
        );
        assert_eq!(key_lines(&path).len(), 2);
        // No temporary file is left behind.
        let names = file_names(dir.path());
        assert_eq!(names, ["keys"]);
    }

    #[test]
    fn a_broken_file_is_not_touched_and_a_comment_only_file_gets_its_first_key() {
        let dir = TestDir::new("tickets-broken");
        let path = dir.join("keys");
        std::fs::write(&path, "not a key\n").expect("write");
        let error = rotate_key_file(&path, 3).expect_err("refused");
        assert!(error.to_string().contains("line 1: not base64"), "{error}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "not a key\n");

        std::fs::write(&path, "# empty for now\n").expect("write");
        let rotation = rotate_key_file(&path, 3).expect("rotate");
        assert_eq!((rotation.created, rotation.keys), (false, 1));
        let content = std::fs::read_to_string(&path).expect("read");
        assert!(content.starts_with("# empty for now\n"), "{content}");
        assert_eq!(TicketKeys::load(&path).expect("valid").len(), 1);
    }
}
