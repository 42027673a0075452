//! What sets a certificate reload off, besides the poll interval: a change
//! in a directory that holds a certificate or key file, and SIGHUP.
//!
//! Each file's parent directory is watched, not the file: editors and ACME
//! clients rename over files, and Kubernetes Secret volumes swap a `..data`
//! symlink, which a watch on the file itself would miss. Bursts of events
//! are debounced into one reload. A platform or limit that refuses the
//! watch leaves SIGHUP and polling (a warning says so).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::reload::Trigger;

/// Events closer together than this are one change.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(200);
/// A stream of events that never pauses still gets a reload this often.
pub(crate) const DEBOUNCE_MAX: Duration = Duration::from_secs(2);

/// SIGHUP and the directory watch, once started. Dropping it stops both.
pub(super) struct Triggers {
    watch: Option<Watch>,
    hangup: Option<Signal>,
}

/// A running directory watch: dropping the watcher stops it.
struct Watch {
    _watcher: notify::RecommendedWatcher,
    changes: mpsc::UnboundedReceiver<()>,
}

impl Triggers {
    /// Starts listening for SIGHUP when `hangup` is true (from now on it
    /// never falls to its default action, ending the process) and watching
    /// `directories` (none: no watch). Must run inside the runtime.
    pub(super) fn start(directories: &[PathBuf], hangup: bool) -> Triggers {
        let hangup = match hangup.then(|| signal(SignalKind::hangup())) {
            None => None,
            Some(Ok(stream)) => Some(stream),
            Some(Err(error)) => {
                warn!(
                    %error,
                    "cannot listen for SIGHUP; certificates reload on file changes and polling only"
                );
                None
            }
        };
        let watch = if directories.is_empty() {
            None
        } else {
            let (events, changes) = mpsc::unbounded_channel::<()>();
            watch(directories, events).map(|watcher| Watch {
                _watcher: watcher,
                changes,
            })
        };
        Triggers { watch, hangup }
    }

    /// Waits for the next file change ([`Trigger::Watch`]; call
    /// [`Triggers::settle`] before acting on it) or SIGHUP
    /// ([`Trigger::Signal`]). Never returns when neither can come.
    /// Cancel-safe: nothing is lost when another event wins a `select!`.
    pub(super) async fn next(&mut self) -> Trigger {
        tokio::select! {
            Some(()) = async {
                match self.watch.as_mut() {
                    Some(watch) => watch.changes.recv().await,
                    None => None,
                }
            } => Trigger::Watch,
            Some(()) = async {
                match self.hangup.as_mut() {
                    Some(stream) => stream.recv().await,
                    None => None,
                }
            } => {
                info!("SIGHUP received: reloading certificates");
                Trigger::Signal
            }
            else => std::future::pending().await,
        }
    }

    /// After a file change: waits until the burst of events it began is
    /// over (see [`debounce`]).
    pub(super) async fn settle(&mut self) {
        if let Some(watch) = self.watch.as_mut() {
            debounce(&mut watch.changes).await;
        }
    }
}

/// Waits until events pause for [`DEBOUNCE`] (at most [`DEBOUNCE_MAX`]).
async fn debounce(changes: &mut mpsc::UnboundedReceiver<()>) {
    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
    loop {
        let quiet = tokio::time::Instant::now() + DEBOUNCE;
        match tokio::time::timeout_at(quiet.min(deadline), changes.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

/// Starts a watcher on `directories`; `None` (with a warning) if the
/// platform or a limit refuses, leaving polling and SIGHUP.
fn watch(
    directories: &[PathBuf],
    events: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode, EventKind};
    use notify::Watcher;
    let handler = move |event: notify::Result<notify::Event>| match event {
        // Opening and reading (the proxy's own reads included) change nothing.
        Ok(event)
            if matches!(event.kind, EventKind::Access(kind)
                if kind != AccessKind::Close(AccessMode::Write)) => {}
        Ok(event) => {
            debug!(kind = ?event.kind, paths = ?event.paths, "certificate directory changed");
            let _ = events.send(());
        }
        Err(error) => {
            warn!(%error, "certificate watch error; checking the files");
            let _ = events.send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            warn!(%error, "cannot watch certificate directories; certificates reload on SIGHUP and polling only");
            return None;
        }
    };
    let mut watching = 0;
    for directory in directories {
        match watcher.watch(directory, notify::RecursiveMode::NonRecursive) {
            Ok(()) => {
                watching += 1;
                debug!(directory = %directory.display(), "watching for certificate changes");
            }
            Err(error) => warn!(
                directory = %directory.display(),
                %error,
                "cannot watch this certificate directory; its changes are found by polling and SIGHUP"
            ),
        }
    }
    (watching > 0).then_some(watcher)
}

/// The directory a path's change shows up in.
pub(super) fn parent_directory(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_file_name_is_in_the_current_directory() {
        assert_eq!(parent_directory(Path::new("cert.pem")), PathBuf::from("."));
        assert_eq!(
            parent_directory(Path::new("/etc/tls/cert.pem")),
            PathBuf::from("/etc/tls")
        );
    }
}
