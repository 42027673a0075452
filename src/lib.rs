//! mail-tls-proxy: a TLS front door for plaintext-only SMTP, IMAP and POP3
//! servers.
//!
//! Layout, one concept per module:
//! - [`config`]: the TOML file, validated into typed settings.
//! - [`protocol`]: sans-IO inspection machines (SMTP, IMAP, POP3) and the
//!   bounded line buffer they are fed from. No sockets, no async.
//! - [`session`]: one connection's I/O: TLS, backend connect, driving the
//!   machine, then unparsed copying.
//! - [`server`]: start-up, serving, configuration reloads;
//!   [`listeners`]: the listening sockets and accept loops, kept across
//!   reloads.
//! - [`tls`]: crypto provider, certificate loading, the swappable store.
//! - [`acme`]: certificates from an ACME CA (HTTP-01, TLS-ALPN-01), their
//!   renewal, and the DANE records for the served keys.
//! - `metrics`: every metric name; `admin`: `/metrics`, `/healthz`, `/readyz`;
//!   `readiness`: what `/readyz` checks (listeners, certificates, backends).
//! - [`relay_guard`]: asks each SMTP backend whether it would relay for a
//!   stranger arriving through the proxy; refuses to start, or stops serving
//!   a listener, while one would.
//! - [`supervisor`]: the life-cycle moments a service manager is told of
//!   (ready, reloading, stopping).
//! - [`systemd`]: those moments told to systemd (`Type=notify`), and its
//!   watchdog's keep-alive.
//! - `atomic_file`: files written for other readers (ACME state, ticket
//!   key files), replaced atomically.
//! - [`logging`]: text or JSON log lines; [`healthcheck`]: the container
//!   health check client; [`time`]: Unix times as UTC dates (one calendar
//!   for logs and certificates).

#![forbid(unsafe_code)]

pub mod acme;
pub(crate) mod admin;
pub(crate) mod atomic_file;
pub mod config;
pub mod healthcheck;
pub(crate) mod limits;
pub mod listeners;
pub mod logging;
pub(crate) mod metrics;
pub mod protocol;
pub(crate) mod readiness;
pub mod relay_guard;
pub mod server;
pub mod session;
pub mod supervisor;
pub mod systemd;
#[cfg(test)]
pub(crate) mod test_dir;
pub mod time;
pub mod tls;
