//! Benchmark harness for mail-tls-proxy: a load generator, a minimal fast
//! plaintext mail backend, and the report that compares proxies.
//!
//! Nothing here is part of the proxy binary. `bench/compare.sh` runs the
//! backend and the load generator (the two binaries of this crate) against
//! mail-tls-proxy, HAProxy and stunnel; `tests/smoke.rs` runs every figure for
//! a few hundred sessions against an in-process proxy so the harness cannot
//! rot.
//!
//! - [`backend`]: the plaintext IMAP, POP3, SMTP and echo servers.
//! - [`client`]: the TLS client configuration and the mail dialogue steps.
//! - [`figures`]: one function per figure of the benchmark.
//! - [`procstat`]: CPU time and RSS of a process, from `/proc`.
//! - [`record`]: the result lines the load generator prints.
//! - [`report`]: medians, ratios, Markdown tables and SVG charts.

pub mod backend;
pub mod client;
pub mod figures;
pub mod procstat;
pub mod record;
pub mod report;

/// Raises this process's open-file limit to its hard limit; returns the new
/// soft limit. Holding thousands of sessions needs it.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}
