//! The integration tests: one binary, one module per capability, each
//! starting in-process proxies (or the real binary) on ephemeral ports in
//! front of scripted backends; `support` is the harness they share.
//!
//! Every test in this binary shares one process, so one global metrics
//! recorder: a test that asserts exact metric values uses listener names no
//! other test uses (`support::Scrape::value` claims the name; a second
//! proxy of this binary using it fails the test).
//!
//! Tests that wait for the proxy's own timers (idle, handshake and PROXY
//! header timeouts, the shutdown grace, readiness and relay-check
//! intervals) run on paused tokio time (`start_paused = true`): the clock
//! moves only when every task of the test's runtime is idle and no socket
//! has anything ready, so a 1 s timeout costs no wall time and the measured
//! durations are exact. Tests on the real clock need it: the certificate
//! tests wait for file-system events from the watcher's own thread, and the
//! binary tests for a child process.

mod support;

mod access_log;
mod acme;
mod all_listener_kinds;
mod backend_failures;
mod certificate_process;
mod certificate_rotation;
mod certificate_rotation_load;
mod certificate_selection;
mod client_identity;
mod command_line;
mod config_reload;
mod connection_limits;
mod graceful_shutdown;
mod implicit_tls;
mod legacy_backends;
mod metrics_at_start;
mod metrics_endpoint;
mod package_assets;
mod proxy_protocol_from_balancers;
mod readiness;
mod relay_guard;
mod session_tickets;
mod starttls_integrity;
mod starttls_upgrade;
mod systemd_notify;
mod timeouts;
mod tls_policy;
