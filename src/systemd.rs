//! systemd's notify protocol (`Type=notify`): the proxy's life-cycle moments
//! as `sd_notify` datagrams, and the watchdog keep-alive.
//!
//! [`SystemdNotifier`] is a [`Supervisor`]: `READY=1` once every listener is
//! bound, `RELOADING=1` with `MONOTONIC_USEC=` when a reload starts, `READY=1`
//! again when it has ended, `STOPPING=1` when the drain begins; each with a
//! `STATUS=` line for `systemctl status`. With `WatchdogSec=` set, the task
//! from [`SystemdNotifier::spawn_watchdog`] sends `WATCHDOG=1` at half the
//! interval from the async runtime itself, so a wedged runtime stops the
//! keep-alives and systemd restarts the service.
//!
//! Without `NOTIFY_SOCKET` in the environment (not started by systemd, or
//! not `Type=notify`) every call does nothing. The environment is left as
//! it is: nothing is unset.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

use crate::supervisor::Supervisor;

/// The variable systemd names its notification socket in.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells systemd about the proxy's life cycle over `NOTIFY_SOCKET`.
#[derive(Debug, Clone, Copy)]
pub struct SystemdNotifier {
    /// Whether `NOTIFY_SOCKET` was set when the notifier was made.
    enabled: bool,
}

impl SystemdNotifier {
    /// A notifier for the service manager named by `NOTIFY_SOCKET`, or one
    /// that does nothing when it is not set.
    pub fn new() -> SystemdNotifier {
        SystemdNotifier {
            enabled: std::env::var_os(NOTIFY_SOCKET).is_some_and(|path| !path.is_empty()),
        }
    }

    /// Whether notifications are sent at all.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The watchdog interval systemd expects keep-alives within
    /// (`WatchdogSec=`, passed as `WATCHDOG_USEC` for this process's
    /// `WATCHDOG_PID`), if it is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        sd_notify::watchdog_enabled().filter(|interval| !interval.is_zero())
    }

    /// Spawns, on the current tokio runtime, the task that sends
    /// `WATCHDOG=1` every half watchdog interval; `None` when the watchdog
    /// is off. Runs until aborted or the runtime ends.
    pub fn spawn_watchdog(&self) -> Option<JoinHandle<()>> {
        let interval = self.watchdog_interval()?;
        let notifier = *self;
        let period = interval / 2;
        tracing::info!(
            interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            "systemd watchdog on: keep-alive every half interval"
        );
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                notifier.send(&[NotifyState::Watchdog]);
            }
        }))
    }

    /// Sends `states` as one datagram; a failure is logged, never fatal
    /// (the proxy serves whether or not systemd hears of it).
    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(error) = sd_notify::notify(states) {
            tracing::warn!(%error, "cannot notify systemd");
        }
    }
}

impl Default for SystemdNotifier {
    fn default() -> Self {
        SystemdNotifier::new()
    }
}

impl Supervisor for SystemdNotifier {
    fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    fn reloading(&self) {
        // systemd (since 253) requires the monotonic time of the reload's
        // start with RELOADING=1, and fails the reload without it.
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading the configuration"),
            ]),
            Err(error) => {
                tracing::warn!(%error, "cannot read the monotonic clock; reload not announced to systemd");
            }
        }
    }

    fn reloaded(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_lines_are_the_protocol_words() {
        let lines: Vec<String> = [
            NotifyState::Ready,
            NotifyState::Reloading,
            NotifyState::MonotonicUsec(12),
            NotifyState::Stopping,
            NotifyState::Watchdog,
            NotifyState::Status("serving 1 listeners: imaps"),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            lines,
            [
                "READY=1",
                "RELOADING=1",
                "MONOTONIC_USEC=12",
                "STOPPING=1",
                "WATCHDOG=1",
                "STATUS=serving 1 listeners: imaps"
            ]
        );
    }

    #[test]
    fn the_monotonic_clock_is_read_in_microseconds() {
        let first = NotifyState::monotonic_usec_now().expect("CLOCK_MONOTONIC");
        std::thread::sleep(Duration::from_millis(2));
        let second = NotifyState::monotonic_usec_now().expect("CLOCK_MONOTONIC");
        match (first, second) {
            (NotifyState::MonotonicUsec(a), NotifyState::MonotonicUsec(b)) => {
                assert!(b - a >= 2_000, "{a} then {b}");
            }
            other => panic!("{other:?}"),
        }
    }
}
