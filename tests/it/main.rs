//! The integration tests: one binary, one module per capability, each
//! starting in-process proxies (or the real binary) on ephemeral ports in
//! front of scripted backends; `support` is the harness they share.
//!
//! Every test in this binary shares one process, so one global metrics
//! recorder: a test that asserts exact metric values uses listener names no
//! other test uses.

mod support;

mod all_listener_kinds;
mod backend_failures;
mod certificate_process;
mod certificate_rotation;
mod certificate_rotation_load;
mod certificate_selection;
mod client_identity;
mod connection_limits;
mod graceful_shutdown;
mod implicit_tls;
mod legacy_backends;
mod metrics_endpoint;
mod proxy_protocol_from_balancers;
mod readiness;
mod relay_guard;
mod starttls_integrity;
mod starttls_upgrade;
mod timeouts;
mod tls_policy;
