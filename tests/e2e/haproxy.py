"""Debian's HAProxy as the load balancer in front of mail-tls-proxy
processes: started in the foreground (`haproxy -f CFG -db`) from a
configuration the caller writes, with its log and stats socket next to it,
and asked about its servers over the stats socket.  Shared by
test_load_balancer.py (one proxy, every listener behind PROXY v1 and v2
frontends) and test_fleet.py (three proxies behind round-robin frontends)."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

from proxy_process import unavailable
from servers import pick_free_loopback_ports, process_is_alive, tail_of_file, terminate_pid

# One line per client connection, at its end: who connected, from which
# address:port HAProxy connected onwards for it, and to which server.
LOG_FORMAT = "lb frontend=%ft client=%ci:%cp balancer=%bi:%bp server=%b/%s"


@dataclasses.dataclass
class RunningHaproxy:
    process: subprocess.Popen
    config_file: Path
    log_file: Path
    stats_socket: Path
    ports: dict[str, int]  # frontend name -> port

    def command(self, line: str) -> str:
        """One command on the stats socket (the CLI closes after answering)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode(errors="replace")

    def server_rows(self) -> list[dict[str, str]]:
        """`show stat` rows of the servers (not the frontend/backend totals)."""
        text = self.command("show stat")
        assert text.startswith("# "), text
        rows = csv.DictReader(io.StringIO(text[2:]))
        return [row for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")]

    def server_stats(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of servers, by backend name (one server each)."""
        return {row["pxname"]: row for row in self.server_rows()}

    def server_status(self, backend: str) -> dict[str, str]:
        """Server name -> status (UP, DOWN, ...) in one backend."""
        return {row["svname"]: row["status"] for row in self.server_rows() if row["pxname"] == backend}


def find_haproxy() -> str:
    found = shutil.which("haproxy", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        unavailable("haproxy not installed (Debian package haproxy); run tests/e2e/install-deps.sh")
    return found


def global_and_defaults(lb_dir: Path, source_ip: str, *extra_defaults: str) -> list[str]:
    """The `global` and `defaults` sections every test configuration starts
    with: stats socket and log in lb_dir, `mode tcp`, LOG_FORMAT, and the
    address HAProxy connects to the proxies from."""
    return [
        "global",
        "    log stderr format raw local0 info",
        f"    stats socket {lb_dir / 'haproxy.sock'} mode 600 level admin",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        f'    log-format "{LOG_FORMAT}"',
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout check 3s",
        f"    source {source_ip}",
        *(f"    {line}" for line in extra_defaults),
    ]


def start_haproxy(lb_dir: Path, frontends: Sequence[str],
                  write_config: Callable[[Path, dict[str, int]], None]) -> RunningHaproxy:
    """Picks a free port per frontend, has write_config(path, ports) write the
    configuration (lb_dir/haproxy.cfg), checks it with `haproxy -c` and runs
    it until the stats socket answers; retried with fresh ports when one was
    taken meanwhile."""
    binary = find_haproxy()
    config_file = lb_dir / "haproxy.cfg"
    log_file = lb_dir / "haproxy.log"
    stats_socket = lb_dir / "haproxy.sock"
    for attempt in range(1, 4):
        ports = dict(zip(frontends, pick_free_loopback_ports(len(frontends))))
        write_config(config_file, ports)
        checked = subprocess.run([binary, "-c", "-f", str(config_file)], capture_output=True, text=True,
                                 timeout=60)
        if checked.returncode != 0:
            pytest.fail(f"haproxy -c rejects {config_file}:\n{checked.stdout}{checked.stderr}", pytrace=False)
        stats_socket.unlink(missing_ok=True)
        with open(log_file, "ab") as log:
            process = subprocess.Popen([binary, "-f", str(config_file), "-db"], cwd=lb_dir,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        (lb_dir / "haproxy.pid").write_text(f"{process.pid}\n")
        running = RunningHaproxy(process=process, config_file=config_file, log_file=log_file,
                                 stats_socket=stats_socket, ports=ports)
        # HAProxy binds every frontend before it serves its stats socket.
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            try:
                running.command("show info")
                return running
            except OSError:
                time.sleep(0.1)
        stop_haproxy(running)
        log_tail = tail_of_file(log_file)
        if "cannot bind" not in log_tail.lower() or attempt == 3:
            pytest.fail(f"haproxy did not start (exit code {process.poll()}); log:\n{log_tail}", pytrace=False)
    raise AssertionError("unreachable")


def stop_haproxy(running: RunningHaproxy) -> None:
    if running.process.poll() is None:
        running.process.terminate()
        try:
            running.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait(timeout=10)


def stop_abandoned_processes(directory: Path, configs: dict[str, str]) -> None:
    """Processes of an earlier run killed before its teardown, found by their
    pid files in directory (pid file name -> the configuration file next to
    it that the process runs); stopped only if that pid still runs that
    configuration (pids get reused)."""
    for pid_file in directory.glob("**/*.pid"):
        config = configs.get(pid_file.name)
        try:
            pid = int(pid_file.read_text())
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if config and str(pid_file.parent / config).encode() in command_line and process_is_alive(pid):
            terminate_pid(pid)
