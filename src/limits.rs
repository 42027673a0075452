//! Connection limits: the process-wide cap and the per-listener, per-client-IP
//! cap. A slot is held by a guard and given back when the session ends,
//! however it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Which limit turned a connection away (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitReached {
    Global,
    PerIp,
}

impl LimitReached {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LimitReached::Global => "max_connections",
            LimitReached::PerIp => "max_connections_per_ip",
        }
    }
}

/// The process-wide count of open client connections.
#[derive(Debug)]
pub(crate) struct GlobalLimit {
    open: AtomicUsize,
    /// Changed by a configuration reload; connections already open stay.
    max: AtomicUsize,
}

impl GlobalLimit {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// A new cap for connections accepted from now on.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// Open connections per client address, for one listener.
#[derive(Debug)]
pub(crate) struct PerIpLimit {
    open: Mutex<HashMap<IpAddr, usize>>,
    /// Changed by a configuration reload; connections already open stay.
    max: AtomicUsize,
}

impl PerIpLimit {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            max: AtomicUsize::new(max),
        })
    }

    /// A new cap for connections accepted from now on.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }
}

/// Holds one slot in both limits until dropped.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    global: Arc<GlobalLimit>,
    per_ip: Arc<PerIpLimit>,
    ip: IpAddr,
}

/// Takes a slot for a connection from `ip`, or says which limit is full.
pub(crate) fn acquire(
    global: &Arc<GlobalLimit>,
    per_ip: &Arc<PerIpLimit>,
    ip: IpAddr,
) -> Result<ConnectionSlot, LimitReached> {
    let previous = global.open.fetch_add(1, Ordering::AcqRel);
    if previous >= global.max.load(Ordering::Acquire) {
        global.open.fetch_sub(1, Ordering::AcqRel);
        return Err(LimitReached::Global);
    }
    // A poisoned lock only means another task panicked mid-update of a
    // counter; the map itself is still usable.
    let mut open = per_ip
        .open
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let count = open.entry(ip).or_insert(0);
    if *count >= per_ip.max.load(Ordering::Acquire) {
        drop(open);
        global.open.fetch_sub(1, Ordering::AcqRel);
        return Err(LimitReached::PerIp);
    }
    *count += 1;
    Ok(ConnectionSlot {
        global: global.clone(),
        per_ip: per_ip.clone(),
        ip,
    })
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.global.open.fetch_sub(1, Ordering::AcqRel);
        let mut open = self
            .per_ip
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Keep the map as small as the set of connected clients.
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_ip_and_globally_and_given_back() {
        let global = GlobalLimit::new(3);
        let per_ip = PerIpLimit::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = acquire(&global, &per_ip, a).expect("first");
        let _second = acquire(&global, &per_ip, a).expect("second");
        assert_eq!(
            acquire(&global, &per_ip, a).unwrap_err(),
            LimitReached::PerIp
        );
        let _third = acquire(&global, &per_ip, b).expect("other ip");
        assert_eq!(
            acquire(&global, &per_ip, b).unwrap_err(),
            LimitReached::Global
        );
        assert_eq!(global.open(), 3);
        drop(first);
        assert_eq!(global.open(), 2);
        let _again = acquire(&global, &per_ip, a).expect("slot given back");
    }

    #[test]
    fn a_lowered_cap_turns_away_new_connections_and_keeps_the_open_ones() {
        let global = GlobalLimit::new(10);
        let per_ip = PerIpLimit::new(10);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let first = acquire(&global, &per_ip, a).expect("first");
        let second = acquire(&global, &per_ip, a).expect("second");
        per_ip.set_max(1);
        assert_eq!(
            acquire(&global, &per_ip, a).unwrap_err(),
            LimitReached::PerIp
        );
        global.set_max(2);
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(
            acquire(&global, &per_ip, b).unwrap_err(),
            LimitReached::Global
        );
        drop((first, second));
        assert_eq!(global.open(), 0);
        let _again = acquire(&global, &per_ip, a).expect("room again");
    }

    #[test]
    fn the_per_ip_map_forgets_clients_that_left() {
        let global = GlobalLimit::new(10);
        let per_ip = PerIpLimit::new(10);
        let slot = acquire(&global, &per_ip, "198.51.100.7".parse().unwrap()).expect("slot");
        drop(slot);
        assert!(per_ip.open.lock().unwrap().is_empty());
        assert_eq!(global.open(), 0);
    }
}
