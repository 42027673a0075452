//! The real `mail-tls-proxy` binary as a child process: `run` with its log
//! lines collected, signals, and one-shot commands such as `check` (with
//! their exit codes: [`finish`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{eventually, STEP};

pub const BINARY: &str = env!("CARGO_BIN_EXE_mail-tls-proxy");

/// `line` without ANSI escape sequences.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs the binary with `args` (and `--config config`) to completion:
/// (success, stdout, stderr without colours).
pub fn run_binary(args: &[&str], config: Option<&Path>) -> (bool, String, String) {
    let mut command = Command::new(BINARY);
    command.args(args).env("NO_COLOR", "1");
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let output = command.output().expect("run the binary");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        strip_ansi(&String::from_utf8_lossy(&output.stderr)),
    )
}

/// The binary as a command with colours off and no configuration, health
/// check URL or service manager variables inherited from the test's own
/// environment; the test adds arguments and variables.
pub fn binary_command() -> Command {
    let mut command = Command::new(BINARY);
    command.env("NO_COLOR", "1");
    for inherited in [
        "MAIL_TLS_PROXY_CONFIG",
        "MAIL_TLS_PROXY_HEALTHCHECK_URL",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        command.env_remove(inherited);
    }
    command
}

/// How a one-shot command ended.
#[derive(Debug)]
pub struct Finished {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    /// Without colours.
    pub stderr: String,
}

/// Runs `command` to completion.
pub fn finish(command: &mut Command) -> Finished {
    let output = command
        .stdin(Stdio::null())
        .output()
        .expect("run the binary");
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: strip_ansi(&String::from_utf8_lossy(&output.stderr)),
    }
}

/// The proxy binary, running `run --config`, with its log lines collected;
/// killed when dropped.
pub struct ProxyProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl ProxyProcess {
    pub fn spawn(config: &Path) -> ProxyProcess {
        let mut command = Command::new(BINARY);
        command.args(["run", "--config"]).arg(config);
        ProxyProcess::spawn_command(command)
    }

    /// Starts `command` (the binary, or a shell that execs it) with its log
    /// lines collected.
    pub fn spawn_command(command: Command) -> ProxyProcess {
        ProxyProcess::spawn_with_log_filter(command, "info")
    }

    /// Starts `command` logging what `filter` (`MAIL_TLS_PROXY_LOG`) lets
    /// through, with its log lines collected.
    pub fn spawn_with_log_filter(mut command: Command, filter: &str) -> ProxyProcess {
        let mut child = command
            .env("NO_COLOR", "1")
            .env("MAIL_TLS_PROXY_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the proxy binary");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("lock").push(strip_ansi(&line));
            }
        });
        ProxyProcess { child, log }
    }

    /// The log lines collected so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("lock").clone()
    }

    /// Waits for a log line containing every one of `parts`; returns it.
    pub async fn wait_for_log(&self, parts: &[&str]) -> String {
        self.wait_for_log_line(parts, |_| true).await
    }

    /// As [`ProxyProcess::wait_for_log`], among the lines `also` accepts.
    pub async fn wait_for_log_line(&self, parts: &[&str], also: impl Fn(&str) -> bool) -> String {
        let find = || {
            self.log
                .lock()
                .expect("lock")
                .iter()
                .find(|line| also(line) && parts.iter().all(|part| line.contains(part)))
                .cloned()
        };
        eventually(
            || find().is_some(),
            || {
                format!(
                    "no log line with {parts:?}; log:\n{}",
                    self.log.lock().expect("lock").join("\n")
                )
            },
        )
        .await;
        find().expect("found")
    }

    /// The address a `listening` (or metrics) log line announces.
    pub async fn address(&self, parts: &[&str]) -> SocketAddr {
        let line = self.wait_for_log(parts).await;
        let field = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("address="))
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        field.parse().expect("an address")
    }

    /// Sends the signal `name` (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits (up to [`STEP`]) for the process to exit.
    pub async fn wait_for_exit(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the binary did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address whose port is free now, for a child process to bind
/// (its configuration must name the port before it starts).
pub fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}
