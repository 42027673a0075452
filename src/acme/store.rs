//! The ACME state directory: where the account, the issued pairs, their
//! metadata, the renewal requests and the issuance lock live, and how
//! files get there (atomically: a temporary file, fsync, rename, fsync of
//! the directory; private keys and the account mode 0600).
//!
//! ```text
//! state_dir/account.json                        account credentials (0600)
//! state_dir/lock                                held by the instance that issues
//! state_dir/certificates/<first name>/fullchain.pem
//! state_dir/certificates/<first name>/privkey.pem   (0600)
//! state_dir/certificates/<first name>/state.json    names, dates, last error
//! state_dir/renew-requests/<first name>         `acme renew` asks for a renewal
//! ```

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic_file::{self, FileMode, WriteError};

/// The issued chain, leaf first.
pub(crate) const FULLCHAIN: &str = "fullchain.pem";
/// The issued pair's private key.
pub(crate) const PRIVKEY: &str = "privkey.pem";
/// What the issuing instance knows about an entry (see [`CertificateState`]).
pub(crate) const STATE: &str = "state.json";
/// The account credentials.
pub(crate) const ACCOUNT: &str = "account.json";
/// The issuance lock.
pub(crate) const LOCK: &str = "lock";
/// Renewal requests, one empty file per entry.
pub(crate) const RENEW_REQUESTS: &str = "renew-requests";

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct StateError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError {
        path: path.to_path_buf(),
        source,
    }
}

/// What is known about one entry besides its files: written by the
/// issuing instance after each attempt, read by `check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateState {
    /// The names of the last issued certificate.
    #[serde(default)]
    pub names: Vec<String>,
    /// Unix time of the last issuance.
    #[serde(default)]
    pub issued_at: Option<i64>,
    /// Not After of the last issued certificate.
    #[serde(default)]
    pub not_after: Option<i64>,
    /// When the next renewal is due (Unix time).
    #[serde(default)]
    pub next_renewal: Option<i64>,
    /// The reason of the last failed order, until one succeeds.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the last failed order failed.
    #[serde(default)]
    pub last_error_at: Option<i64>,
    /// When the failed order is tried again.
    #[serde(default)]
    pub next_retry: Option<i64>,
}

/// The state directory of an `[acme]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn account(&self) -> PathBuf {
        self.root.join(ACCOUNT)
    }

    pub(crate) fn lock(&self) -> PathBuf {
        self.root.join(LOCK)
    }

    /// The folder of the entry whose first name is `first_name`.
    pub(crate) fn certificate_dir(&self, first_name: &str) -> PathBuf {
        self.root.join("certificates").join(first_name)
    }

    pub(crate) fn renew_requests(&self) -> PathBuf {
        self.root.join(RENEW_REQUESTS)
    }

    /// Creates the directories the proxy writes into (mode 0700).
    pub(crate) fn create(&self) -> Result<(), StateError> {
        for dir in [
            self.root.clone(),
            self.root.join("certificates"),
            self.renew_requests(),
        ] {
            create_private_dir(&dir)?;
        }
        Ok(())
    }

    /// The entry's metadata; the default when there is none yet (or it
    /// cannot be read: it is informational only).
    pub fn certificate_state(&self, first_name: &str) -> CertificateState {
        std::fs::read(self.certificate_dir(first_name).join(STATE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    pub(crate) fn write_certificate_state(
        &self,
        first_name: &str,
        state: &CertificateState,
    ) -> Result<(), StateError> {
        let dir = self.certificate_dir(first_name);
        create_private_dir(&dir)?;
        let path = dir.join(STATE);
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|error| at(&path)(std::io::Error::other(error)))?;
        write_atomically(&path, &bytes, 0o644)
    }

    /// Writes an issued pair: both temporary files first, then the key and
    /// the chain renamed into place one right after the other, so a reader
    /// sees the old pair or the new one (a reader between the two renames
    /// sees a mismatch, which the certificate reload refuses and retries).
    pub(crate) fn write_pair(
        &self,
        first_name: &str,
        chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<(), StateError> {
        let dir = self.certificate_dir(first_name);
        create_private_dir(&dir)?;
        let key = dir.join(PRIVKEY);
        let chain = dir.join(FULLCHAIN);
        let key_temp = atomic_file::write_beside(&key, key_pem, FileMode::Exactly(0o600))?;
        let chain_temp =
            match atomic_file::write_beside(&chain, chain_pem, FileMode::Exactly(0o644)) {
                Ok(temp) => temp,
                Err(error) => {
                    let _ = std::fs::remove_file(&key_temp);
                    return Err(error.into());
                }
            };
        std::fs::rename(&key_temp, &key).map_err(at(&key))?;
        std::fs::rename(&chain_temp, &chain).map_err(at(&chain))?;
        Ok(atomic_file::sync_directory(&dir)?)
    }

    /// Asks the issuing instance to renew the entry `first_name` now.
    pub fn request_renewal(&self, first_name: &str) -> Result<PathBuf, StateError> {
        let dir = self.renew_requests();
        create_private_dir(&dir)?;
        let path = dir.join(first_name);
        write_atomically(&path, b"", 0o600)?;
        Ok(path)
    }

    /// The entries asked to renew (file names under `renew-requests/`).
    pub(crate) fn renewal_requests(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.renew_requests()) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| !name.starts_with('.'))
            .collect()
    }

    /// Removes a request once it is being acted on.
    pub(crate) fn clear_renewal_request(&self, first_name: &str) {
        let _ = std::fs::remove_file(self.renew_requests().join(first_name));
    }
}

/// Creates `dir` and its parents, new ones mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(at(dir))
}

/// Replaces `path` with `bytes` atomically (temporary file, fsync, rename,
/// fsync of the directory).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    atomic_file::replace(path, bytes, FileMode::Exactly(mode)).map_err(StateError::from)
}

impl From<WriteError> for StateError {
    fn from(error: WriteError) -> StateError {
        StateError {
            path: error.path,
            source: error.source,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_dir::file_names;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn temp_state(label: &str) -> StateDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "mail-tls-proxy-acme-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        StateDir::new(root)
    }

    #[test]
    fn a_pair_is_written_with_a_private_key_and_no_temporary_files() {
        let state = temp_state("pair");
        state
            .write_pair("mail.example.org", b"chain", b"key")
            .expect("write");
        let dir = state.certificate_dir("mail.example.org");
        assert_eq!(std::fs::read(dir.join(FULLCHAIN)).expect("read"), b"chain");
        assert_eq!(std::fs::read(dir.join(PRIVKEY)).expect("read"), b"key");
        let mode = std::fs::metadata(dir.join(PRIVKEY))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let names = file_names(&dir);
        assert_eq!(names.len(), 2, "{names:?}");
        let _ = std::fs::remove_dir_all(state.root());
    }

    #[test]
    fn metadata_and_renewal_requests_round_trip() {
        let state = temp_state("meta");
        assert_eq!(
            state.certificate_state("a.example"),
            CertificateState::default()
        );
        let written = CertificateState {
            names: vec!["a.example".into()],
            issued_at: Some(10),
            not_after: Some(20),
            next_renewal: Some(15),
            last_error: Some("rate limited".into()),
            last_error_at: Some(11),
            next_retry: Some(12),
        };
        state
            .write_certificate_state("a.example", &written)
            .expect("write");
        assert_eq!(state.certificate_state("a.example"), written);
        assert!(state.renewal_requests().is_empty());
        state.request_renewal("a.example").expect("request");
        assert_eq!(state.renewal_requests(), vec!["a.example".to_string()]);
        state.clear_renewal_request("a.example");
        assert!(state.renewal_requests().is_empty());
        let _ = std::fs::remove_dir_all(state.root());
    }
}
