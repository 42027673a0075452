"""Running the mail-tls-proxy binary for the end-to-end tests: where it is,
the config it gets, and starting/stopping it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from proxy_config import CertificateConfig, ListenerConfig, ProxyConfig
from servers import MailServerEndpoints, pick_free_loopback_ports, stop_child, tail_of_file, terminate_pid

REPO_ROOT = Path(__file__).resolve().parents[2]
PROXY_STARTUP_TIMEOUT_SECONDS = 30
RUNNING_IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Missing prerequisites fail under CI=true and skip elsewhere."""
    if RUNNING_IN_CI:
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def need(program: str) -> str:
    """The path of `program` (sbin directories included), or unavailable."""
    found = shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        unavailable(f"{program} is not installed (tests/e2e/install-deps.sh installs it)")
    return found


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs `command` capturing its text output (5 minutes unless told)."""
    kwargs.setdefault("timeout", 300)
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


@dataclasses.dataclass(frozen=True)
class ListenerSpec:
    name: str
    protocol: str   # smtp | imap | pop3
    tls: str        # implicit | starttls


# The six listeners of the one proxy process, named after the classic ports.
LISTENERS = (
    ListenerSpec("submission", "smtp", "starttls"),  # 587-style
    ListenerSpec("smtps", "smtp", "implicit"),       # 465-style
    ListenerSpec("imap", "imap", "starttls"),
    ListenerSpec("imaps", "imap", "implicit"),
    ListenerSpec("pop3", "pop3", "starttls"),
    ListenerSpec("pop3s", "pop3", "implicit"),
)


@dataclasses.dataclass
class RunningProxy:
    ports: dict[str, int]          # listener name -> proxy port
    metrics_port: int
    ca_file: Path                  # what clients trust (the self-signed leaf)
    hostname: str                  # name in the certificate; clients use it
    config_file: Path
    log_file: Path
    process: subprocess.Popen

    def port(self, protocol: str, tls: str) -> int:
        for spec in LISTENERS:
            if spec.protocol == protocol and spec.tls == tls:
                return self.ports[spec.name]
        raise KeyError((protocol, tls))


def proxy_binary_path() -> Path:
    configured = os.environ.get("MAIL_TLS_PROXY_BIN")
    if configured:
        return Path(configured).resolve()
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    if not target_dir.is_absolute():
        target_dir = REPO_ROOT / target_dir
    return target_dir / "debug" / "mail-tls-proxy"


def built_proxy_binary() -> Path:
    """proxy_binary_path(), skipping (or failing in CI) when it is not built."""
    binary = proxy_binary_path()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        unavailable(f"proxy binary {binary} not built (cargo build, or set MAIL_TLS_PROXY_BIN)")
    return binary


def write_proxy_config(path: Path, backends: MailServerEndpoints, ports: dict[str, int], metrics_port: int) -> None:
    backend_port = {"smtp": backends.smtp_port, "imap": backends.imap_port, "pop3": backends.pop3_port}
    ProxyConfig(
        # Certificate paths are relative on purpose: the format says they
        # resolve against the config file's directory, and the proxy runs
        # from elsewhere.
        certificates=[CertificateConfig("fullchain.pem", "privkey.pem")],
        metrics_port=metrics_port,
        listeners=[ListenerConfig(spec.name, spec.protocol, spec.tls, listen_port=ports[spec.name],
                                  backend=backend_port[spec.protocol])
                   for spec in LISTENERS],
    ).write(path)


def port_accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


ADDRESS_IN_USE_MARKERS = ("address already in use", "address in use", "os error 98")
START_ATTEMPTS = 3


def start_proxy(binary: Path, backends: MailServerEndpoints, certificate_dir: Path, hostname: str,
                working_dir: Path) -> RunningProxy:
    """Writes the config next to fullchain.pem/privkey.pem in certificate_dir,
    starts the proxy and waits until every port accepts connections.

    Ports are picked free but released before the proxy binds them, so some
    other process (parallel cargo tests, say) can grab one in between; if
    the proxy dies of "address in use", try again with fresh ports."""
    for attempt in range(1, START_ATTEMPTS + 1):
        running = launch_proxy(binary, backends, certificate_dir, hostname, working_dir)
        problem = wait_for_proxy_ports(running)
        if problem is None:
            return running
        stop_proxy(running)
        log_tail = tail_of_file(running.log_file)
        port_was_taken = any(marker in log_tail.lower() for marker in ADDRESS_IN_USE_MARKERS)
        if not port_was_taken or attempt == START_ATTEMPTS:
            pytest.fail(f"{problem}; log:\n{log_tail}", pytrace=False)
    raise AssertionError("unreachable")


def launch_proxy(binary: Path, backends: MailServerEndpoints, certificate_dir: Path, hostname: str,
                 working_dir: Path) -> RunningProxy:
    names = [spec.name for spec in LISTENERS]
    *listener_ports, metrics_port = pick_free_loopback_ports(len(names) + 1)
    ports = dict(zip(names, listener_ports))
    config_file = certificate_dir / "mail-tls-proxy.toml"
    write_proxy_config(config_file, backends, ports, metrics_port)
    log_file = certificate_dir / "proxy.log"

    environment = dict(os.environ)
    environment.setdefault("RUST_LOG", "info")
    environment.setdefault("NO_COLOR", "1")  # plain text in proxy.log
    with open(log_file, "ab") as log:
        # working_dir is not the config's directory, so relative certificate
        # paths only work if the proxy resolves them against the config file.
        process = subprocess.Popen(
            [str(binary), "run", "--config", str(config_file)],
            cwd=working_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=environment,
        )
    # Lets a later run stop this proxy if the test process dies without
    # tearing down (see stop_abandoned_proxy).
    (certificate_dir / "proxy.pid").write_text(f"{process.pid}\n")
    return RunningProxy(ports=ports, metrics_port=metrics_port, ca_file=certificate_dir / "fullchain.pem",
                        hostname=hostname, config_file=config_file, log_file=log_file, process=process)


def wait_for_proxy_ports(running: RunningProxy) -> str | None:
    """None once every port accepts connections, else what went wrong."""
    waiting_for = set(running.ports.values()) | {running.metrics_port}
    deadline = time.monotonic() + PROXY_STARTUP_TIMEOUT_SECONDS
    while waiting_for:
        exit_code = running.process.poll()
        if exit_code is not None:
            return f"mail-tls-proxy exited with code {exit_code} during start-up"
        waiting_for = {port for port in waiting_for if not port_accepts_connections(port)}
        if waiting_for and time.monotonic() > deadline:
            return (f"mail-tls-proxy did not listen on {sorted(waiting_for)} within "
                    f"{PROXY_STARTUP_TIMEOUT_SECONDS}s")
        if waiting_for:
            time.sleep(0.1)
    return None


def start_proxy_with_config(binary: Path, certificate_dir: Path, stem: str, names: list[str],
                            config_text: Callable[[dict[str, int], int], str], working_dir: Path,
                            hostname: str = "localhost") -> RunningProxy:
    """`mail-tls-proxy run` on a configuration of the caller's:
    config_text(ports, metrics_port) returns the TOML for the listener ports
    picked free (name -> port).  It is written to certificate_dir/STEM.toml
    (next to fullchain.pem and privkey.pem), the log goes to STEM.log, and
    start-up is retried with fresh ports when one was taken meanwhile."""
    config_file = certificate_dir / f"{stem}.toml"
    log_file = certificate_dir / f"{stem}.log"
    for attempt in range(1, START_ATTEMPTS + 1):
        *listener_ports, metrics_port = pick_free_loopback_ports(len(names) + 1)
        ports = dict(zip(names, listener_ports))
        config_file.write_text(config_text(ports, metrics_port))
        environment = dict(os.environ, NO_COLOR="1")
        environment.setdefault("RUST_LOG", "info")
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [str(binary), "run", "--config", str(config_file)], cwd=working_dir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environment,
            )
        running = RunningProxy(ports=ports, metrics_port=metrics_port, ca_file=certificate_dir / "fullchain.pem",
                               hostname=hostname, config_file=config_file, log_file=log_file, process=process)
        problem = wait_for_proxy_ports(running)
        if problem is None:
            return running
        stop_proxy(running)
        log_tail = tail_of_file(log_file)
        port_was_taken = any(marker in log_tail.lower() for marker in ADDRESS_IN_USE_MARKERS)
        if not port_was_taken or attempt == START_ATTEMPTS:
            pytest.fail(f"{problem}; log:\n{log_tail}", pytrace=False)
    raise AssertionError("unreachable")


def run_check(binary: Path, config_file: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`mail-tls-proxy check --config FILE`, its output captured as text."""
    environment = dict(os.environ, NO_COLOR="1")
    return subprocess.run([str(binary), "check", "--config", str(config_file)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, env=environment)


def stop_abandoned_proxy(certificate_dir: Path) -> None:
    pid_file = certificate_dir / "proxy.pid"
    try:
        pid = int(pid_file.read_text())
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    # Only if that pid still runs *this* config (pids get reused).
    if str(certificate_dir / "mail-tls-proxy.toml").encode() in command_line:
        terminate_pid(pid)


def stop_proxy(running: RunningProxy) -> None:
    stop_child(running.process)
