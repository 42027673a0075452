//! Following the `ticket_keys` file: new keys without a reload.
//!
//! The file is re-read when [`crate::tls::watch`] reports a change in its
//! directory (a rename over it, a Kubernetes Secret volume's `..data`
//! symlink swap), every `certificate_poll_interval`, and on SIGHUP (with the
//! whole configuration, see [`crate::server`]). A file that reads the same
//! as last time is left alone. A changed file is checked whole: if it
//! passes, its keys replace the ones in use at once (for every listener:
//! they share the one ticketer); if not, the keys in use stay, an ERROR
//! names the file and the line, and the next change is tried again. Each
//! attempt on a changed file is counted in
//! `mail_tls_proxy_ticket_key_reloads_total{result}`, and
//! `mail_tls_proxy_ticket_keys` is the number of file keys in use.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info};

use super::file::read_key_file;
use super::{SessionTicketer, TicketKeys};
use crate::metrics::{self, ReloadResult};
use crate::tls::reload::Trigger;
use crate::tls::watch::{parent_directory, Triggers};

/// Ticket key reloads of this proxy, by result (the metrics are
/// process-wide).
#[derive(Debug, Default)]
pub struct TicketKeyReloads {
    ok: AtomicU64,
    errors: AtomicU64,
}

impl TicketKeyReloads {
    /// Reloads that put new keys in use (or, on a configuration reload,
    /// re-read and checked the file).
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Acquire)
    }

    /// Reloads that found the file unusable (the keys in use stayed).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Acquire)
    }

    /// Counts one reload, here and in the metrics.
    pub(crate) fn count(&self, result: ReloadResult) {
        let counter = match result {
            ReloadResult::Ok => &self.ok,
            ReloadResult::Error => &self.errors,
        };
        counter.fetch_add(1, Ordering::AcqRel);
        ::metrics::counter!(metrics::TICKET_KEY_RELOADS_TOTAL, "result" => result.as_str())
            .increment(1);
    }
}

/// The number of file keys in use (0: keys of this process only).
fn export_key_count(count: usize) {
    ::metrics::gauge!(metrics::TICKET_KEYS).set(count as f64);
}

/// Puts a configuration's ticket settings in use: `lifetime`, and `keys`
/// read from its `ticket_keys` file (or, without one, keys of this process).
/// Returns what follows the file from now on.
pub(crate) fn put_in_use(
    ticketer: &Arc<SessionTicketer>,
    stats: &Arc<TicketKeyReloads>,
    lifetime: Duration,
    keys: Option<TicketKeys>,
) -> Option<TicketKeyReloader> {
    ticketer.set_lifetime(lifetime);
    let Some(keys) = keys else {
        if let Err(error) = ticketer.use_generated_keys() {
            error!(%error, "session tickets: still sealed with the keys of the ticket_keys file configured before");
        }
        export_key_count(0);
        return None;
    };
    info!(
        file = %keys.path().display(),
        keys = keys.len(),
        newest = %keys.newest_name(),
        lifetime = lifetime.as_secs(),
        "session ticket keys loaded: the newest seals new tickets, every key opens them"
    );
    export_key_count(keys.len());
    let reloader = TicketKeyReloader {
        file: keys.path().to_path_buf(),
        observed: Ok(keys.content().to_vec()),
        served: keys.content().to_vec(),
        failing: None,
        ticketer: ticketer.clone(),
        stats: stats.clone(),
    };
    ticketer.use_file_keys(keys);
    Some(reloader)
}

/// Follows one `ticket_keys` file (see the module documentation).
pub(crate) struct TicketKeyReloader {
    file: PathBuf,
    /// What was read last (or why it could not be read).
    observed: Result<Vec<u8>, String>,
    /// The content whose keys are in use.
    served: Vec<u8>,
    /// The error of the last attempt, while the file stays broken.
    failing: Option<String>,
    ticketer: Arc<SessionTicketer>,
    stats: Arc<TicketKeyReloads>,
}

impl TicketKeyReloader {
    /// Re-reads the file; puts its keys in use if it changed and checks
    /// out. Returns whether new keys are in use.
    pub(crate) fn reload(&mut self, trigger: Trigger) -> bool {
        let observed = read_key_file(&self.file).map_err(|error| error.to_string());
        if observed == self.observed {
            return false;
        }
        self.observed = observed.clone();
        let keys = match observed {
            Ok(content) if content == self.served => {
                if self.failing.take().is_some() {
                    info!(
                        file = %self.file.display(),
                        trigger = %trigger.as_str(),
                        "session ticket key file is back to the keys in use"
                    );
                }
                return false;
            }
            Ok(content) => {
                TicketKeys::from_content(&self.file, &content).map_err(|error| error.to_string())
            }
            Err(message) => Err(message),
        };
        match keys {
            Ok(keys) => {
                self.failing = None;
                info!(
                    file = %self.file.display(),
                    trigger = %trigger.as_str(),
                    keys = keys.len(),
                    newest = %keys.newest_name(),
                    "session ticket keys reloaded: the newest seals new tickets, every key in the file opens them"
                );
                export_key_count(keys.len());
                self.served = keys.content().to_vec();
                self.ticketer.use_file_keys(keys);
                self.stats.count(ReloadResult::Ok);
                true
            }
            Err(message) => {
                error!(
                    file = %self.file.display(),
                    trigger = %trigger.as_str(),
                    error = %message,
                    "session ticket key reload refused: the keys in use stay; the next change is tried again"
                );
                self.failing = Some(message);
                self.stats.count(ReloadResult::Error);
                false
            }
        }
    }

    /// Watches the file's directory and polls every `poll_interval` (SIGHUP
    /// too when `hangup`: when no whole-configuration reload takes it)
    /// until the task is dropped.
    pub(crate) async fn run(mut self, poll_interval: Duration, hangup: bool) {
        let mut triggers = Triggers::start(&[parent_directory(&self.file)], hangup);
        // A change made between loading and watching.
        self.reload(Trigger::Watch);
        let start = tokio::time::Instant::now();
        let mut poll = tokio::time::interval_at(start + poll_interval, poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                trigger = triggers.next() => {
                    if trigger == Trigger::Watch {
                        triggers.settle().await;
                    }
                    trigger
                }
                _ = poll.tick() => Trigger::Poll,
            };
            // A SIGHUP re-reads even an unchanged file (and counts it).
            if trigger == Trigger::Signal {
                self.observed = Err(String::new());
            }
            self = match tokio::task::spawn_blocking(move || {
                self.reload(trigger);
                self
            })
            .await
            {
                Ok(reloader) => reloader,
                Err(error) => {
                    error!(%error, "session ticket key reload panicked; the file is no longer followed");
                    return;
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn line(fill: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([fill; super::super::KEY_LENGTH])
    }

    #[test]
    fn a_changed_file_swaps_keys_and_a_broken_one_keeps_them() {
        let dir = std::env::temp_dir().join(format!(
            "mail-tls-proxy-ticket-reload-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys");
        std::fs::write(&path, format!("{}\n", line(1))).expect("write");
        let ticketer = SessionTicketer::new(Duration::from_secs(3600)).expect("ticketer");
        let stats = Arc::new(TicketKeyReloads::default());
        let keys = TicketKeys::load(&path).expect("keys");
        let mut reloader = put_in_use(&ticketer, &stats, Duration::from_secs(3600), Some(keys))
            .expect("a file to follow");
        assert_eq!(reloader.file, path);
        assert_eq!(ticketer.key_names(), [super::super::hex(&[1; 16])]);
        assert!(!reloader.reload(Trigger::Poll));

        std::fs::write(&path, format!("{}\n{}\n", line(1), line(2))).expect("write");
        assert!(reloader.reload(Trigger::Watch));
        assert_eq!(ticketer.key_names().len(), 2);
        assert_eq!((stats.ok(), stats.errors()), (1, 0));

        std::fs::write(&path, format!("{}\n{}\n", line(1), &line(3)[..50])).expect("write");
        assert!(!reloader.reload(Trigger::Watch));
        assert_eq!(ticketer.key_names().len(), 2);
        assert_eq!((stats.ok(), stats.errors()), (1, 1));
        // Unchanged since: neither tried nor counted again.
        assert!(!reloader.reload(Trigger::Poll));
        assert_eq!(stats.errors(), 1);

        std::fs::remove_file(&path).expect("remove");
        assert!(!reloader.reload(Trigger::Poll));
        assert_eq!(stats.errors(), 2);
        assert_eq!(ticketer.key_names().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
