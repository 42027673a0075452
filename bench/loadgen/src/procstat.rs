//! CPU time and resident memory of a process, read from `/proc`.
//!
//! CPU time is `utime + stime` of `/proc/PID/stat`: every thread of the
//! process, including threads that have already exited (stunnel runs a
//! thread per connection), in clock ticks.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Total CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| Duration::from_secs_f64(ticks as f64 / ticks_per_second()))
        .ok_or_else(|| anyhow!("{path}: unexpected format"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces; fields restart after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // After ')': field 3 is state, so utime (14) and stime (15) are 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time of this process.
pub fn own_cpu_time() -> Duration {
    cpu_time(std::process::id()).unwrap_or_default()
}

/// Resident set size in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("{path}: no VmRSS"))
}

/// CPU time of several processes together (missing ones count as zero).
pub fn cpu_time_of(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|pid| cpu_time(*pid).ok()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let stat =
            "1234 (a b) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 100 1000 10";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_kib(std::process::id()).expect("rss") > 0);
        cpu_time(std::process::id()).expect("cpu");
    }
}
