//! Files the proxy writes for other readers (ACME state, session ticket key
//! files), replaced atomically: the new content goes to a temporary file
//! beside the target (so the rename stays on one filesystem), is flushed to
//! disk, renamed over the target, and the directory is flushed too. A
//! reader at any moment sees the old content or the new, and a crash leaves
//! one of the two.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a file could not be written: the path the failing step touched (the
/// temporary file, the target or its directory) and the error.
#[derive(Debug)]
pub(crate) struct WriteError {
    pub(crate) path: PathBuf,
    pub(crate) source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError {
        path: path.to_path_buf(),
        source,
    }
}

/// The mode (and owner) a written file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileMode {
    /// This mode, whatever the replaced file had.
    Exactly(u32),
    /// The mode and owner of the file replaced; 0600 and the caller's own
    /// when there is none yet.
    KeepReplaced,
}

/// Replaces `path` with `bytes` atomically (see the module documentation).
/// The temporary file is removed when a step fails.
pub(crate) fn replace(path: &Path, bytes: &[u8], mode: FileMode) -> Result<(), WriteError> {
    let temporary = write_beside(path, bytes, mode)?;
    if let Err(error) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(at(path)(error));
    }
    sync_directory(&directory_of(path))
}

/// Writes `bytes` to a temporary file next to `path`, with `mode`, flushed
/// to disk; returns its path for the caller to rename over `path` (then
/// [`sync_directory`]). Nothing is left behind when it fails.
pub(crate) fn write_beside(
    path: &Path,
    bytes: &[u8],
    mode: FileMode,
) -> Result<PathBuf, WriteError> {
    let name = path.file_name().ok_or_else(|| {
        at(path)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let temporary = directory_of(path).join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let replaced = match mode {
        FileMode::Exactly(_) => None,
        FileMode::KeepReplaced => std::fs::metadata(path).ok(),
    };
    let new_mode = match mode {
        FileMode::Exactly(mode) => mode,
        FileMode::KeepReplaced => 0o600,
    };
    let written = write_new(&temporary, bytes, new_mode, replaced.as_ref());
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(at(&temporary)(error));
    }
    Ok(temporary)
}

/// Flushes `dir`'s entries (a rename into it) to disk.
pub(crate) fn sync_directory(dir: &Path) -> Result<(), WriteError> {
    std::fs::File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(at(dir))
}

/// The directory `path` is in (`.` for a bare file name).
fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes a new file at `temporary` (a leftover of an interrupted write by
/// this same process id is removed first) with `mode`, or the mode and owner
/// of `replaced`, and flushes it to disk.
fn write_new(
    temporary: &Path,
    bytes: &[u8],
    mode: u32,
    replaced: Option<&std::fs::Metadata>,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(temporary)?;
    file.write_all(bytes)?;
    if let Some(replaced) = replaced {
        let ours = file.metadata()?;
        if (ours.uid(), ours.gid()) != (replaced.uid(), replaced.gid()) {
            std::os::unix::fs::fchown(&file, Some(replaced.uid()), Some(replaced.gid()))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(
            replaced.permissions().mode() & 0o7777,
        ))?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::{file_mode as mode, file_names, TestDir};

    #[test]
    fn an_exact_mode_is_given_even_over_a_file_with_another() {
        let dir = TestDir::new("atomic-exact");
        let path = dir.join("state.json");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        replace(&path, b"new", FileMode::Exactly(0o600)).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(file_names(dir.path()), ["state.json"]);
    }

    #[test]
    fn keeping_the_replaced_mode_makes_a_new_file_private() {
        let dir = TestDir::new("atomic-keep");
        let path = dir.join("keys");
        replace(&path, b"first", FileMode::KeepReplaced).expect("create");
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let before = std::fs::metadata(&path).expect("metadata");
        replace(&path, b"second", FileMode::KeepReplaced).expect("replace");
        let after = std::fs::metadata(&path).expect("metadata");
        assert_ne!(
            before.ino(),
            after.ino(),
            "renamed over, not written in place"
        );
        assert_eq!(mode(&path), 0o640);
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        assert_eq!(file_names(dir.path()), ["keys"]);
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file_and_names_the_step() {
        let dir = TestDir::new("atomic-fail");
        let path = dir.join("missing-folder").join("file");
        let error = replace(&path, b"x", FileMode::Exactly(0o600)).expect_err("no folder");
        assert!(error.path.starts_with(dir.join("missing-folder")));
        assert_eq!(file_names(dir.path()), Vec::<String>::new());
        let error = replace(Path::new("/"), b"x", FileMode::Exactly(0o600)).expect_err("no name");
        assert_eq!(error.path, PathBuf::from("/"));
    }
}
