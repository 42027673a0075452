//! Who issues: the instance holding the lock on `state_dir/lock`.
//!
//! Several replicas may share one state directory; only one of them should
//! talk to the CA (one order per renewal, one account's rate limits). The
//! lock is an exclusive advisory lock on an open file (`flock`): the
//! kernel releases it when its holder exits or crashes, so another replica
//! takes over issuance at its next try. Replicas without it serve the
//! files the holder writes (the certificate watch picks them up).

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::store::StateError;

/// The issuance lock, held until dropped.
#[derive(Debug)]
pub(crate) struct IssuanceLock {
    _file: File,
    path: PathBuf,
}

impl IssuanceLock {
    /// Takes the lock at `path` if no one holds it; `Ok(None)` if another
    /// process (or another manager in this one) does.
    pub(crate) fn try_acquire(path: &Path) -> Result<Option<IssuanceLock>, StateError> {
        let error = |source| StateError {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(error)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(IssuanceLock {
                _file: file,
                path: path.to_path_buf(),
            })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(source)) => Err(error(source)),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let state = crate::acme::store::tests::temp_state("lock");
        state.create().expect("create");
        let first = IssuanceLock::try_acquire(&state.lock())
            .expect("lock")
            .expect("free");
        assert!(IssuanceLock::try_acquire(&state.lock())
            .expect("lock")
            .is_none());
        drop(first);
        assert!(IssuanceLock::try_acquire(&state.lock())
            .expect("lock")
            .is_some());
        let _ = std::fs::remove_dir_all(state.root());
    }
}
