#!/usr/bin/env python3
"""Measures what mail-tls-proxy costs, for the Kubernetes requests and limits
(deploy/kubernetes/deployment.yaml) and docs/operations.md, "Resources".

    python3 tests/e2e/measure_resources.py BINARY [--idle-sessions N] [--rate R] [--seconds S]

Runs BINARY with the seven listeners of deploy/kubernetes/configmap.yaml (on
free loopback ports, with a fresh self-signed certificate) in front of a tiny
plaintext IMAP/POP3/SMTP backend of its own (so the backend never limits the
load), then reports the proxy's resident memory (VmRSS, peak VmHWM) and CPU:

1. idle, after start-up;
2. with N idle TLS sessions open (IMAPS, greeting read);
3. while, on top of those, R new IMAPS sessions a second (full handshake,
   greeting, LOGOUT, close) arrive for S seconds.

Prints one JSON object. Load goes to 127.0.0.1 only and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGMAP = REPO_ROOT / "deploy" / "kubernetes" / "configmap.yaml"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def configmap_toml() -> str:
    """The config.toml embedded in the ConfigMap (a YAML block scalar)."""
    text = CONFIGMAP.read_text()
    block = text.split("config.toml: |\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines) + "\n"


def local_config(toml: str, cert_dir: Path, backends: dict[str, int], metrics_port: int) -> tuple[str, dict[str, int]]:
    """The ConfigMap's configuration with loopback ports, local certificate
    files and the given backend ports (by protocol)."""
    names = re.findall(r'^name\s*=\s*"([^"]+)"', toml, re.M)
    ports = dict(zip(names, free_ports(len(names))))
    out, current = [], None
    for line in toml.splitlines():
        match = re.match(r'name\s*=\s*"([^"]+)"', line)
        if match:
            current = match.group(1)
        protocol = re.match(r'protocol\s*=\s*"([^"]+)"', line)
        if protocol:
            current_protocol = protocol.group(1)
        if line.startswith("listen") and current and "9464" not in line:
            line = f'listen   = "127.0.0.1:{ports[current]}"'
        elif line.startswith("listen") and "9464" in line:
            line = f'listen = "127.0.0.1:{metrics_port}"'
        elif line.startswith("backend"):
            line = f'backend  = "127.0.0.1:{backends[current_protocol]}"'
        line = line.replace("/etc/mail-tls-proxy/tls/", f"{cert_dir}/")
        out.append(line)
    return "\n".join(out) + "\n", ports


async def serve_backend(protocol: str) -> tuple[asyncio.AbstractServer, int]:
    greeting = {"imap": b"* OK ready\r\n", "pop3": b"+OK ready\r\n", "smtp": b"220 ready ESMTP\r\n"}[protocol]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if protocol == "smtp":
                # The ConfigMap's SMTP listeners send a PROXY v2 header, as
                # the backend is told to expect (smtpd_upstream_proxy_protocol).
                fixed = await reader.readexactly(16)
                await reader.readexactly(int.from_bytes(fixed[14:16], "big"))
            writer.write(greeting)
            await writer.drain()
            while line := await reader.readline():
                word = line.split(b" ", 2)[1 if protocol == "imap" and b" " in line else 0].upper().strip()
                if word in (b"LOGOUT", b"QUIT"):
                    tag = line.split(b" ", 1)[0]
                    writer.write(b"* BYE\r\n" + tag + b" OK bye\r\n" if protocol == "imap" else b"+OK bye\r\n" if protocol == "pop3" else b"221 bye\r\n")
                    await writer.drain()
                    break
                if protocol == "smtp" and word.startswith(b"RCPT"):
                    # A closed relay, as a backend behind the proxy must be.
                    writer.write(b"554 5.7.1 Relay access denied\r\n")
                else:
                    writer.write(b"x OK\r\n" if protocol == "imap" else b"+OK\r\n" if protocol == "pop3" else b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    return server, server.sockets[0].getsockname()[1]


def memory(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) for key in ("VmRSS", "VmHWM")}
    return {"rss_kib": values["VmRSS"], "peak_rss_kib": values["VmHWM"]}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def open_idle_session(port: int, context: ssl.SSLContext, hold: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    await reader.readline()
    hold.append(writer)


async def one_session(port: int, context: ssl.SSLContext) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    await reader.readline()
    writer.write(b"a LOGOUT\r\n")
    await writer.drain()
    await reader.read()
    writer.close()


async def measure(binary: Path, idle_sessions: int, rate: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="mtp-measure-") as scratch:
        scratch_dir = Path(scratch)
        subprocess.run([str(binary), "cert", "self-signed", "--name", "localhost", "--out", str(scratch_dir)],
                       check=True, stdout=subprocess.DEVNULL)
        # The Secret's file names, as the ConfigMap expects them.
        (scratch_dir / "tls.crt").write_bytes((scratch_dir / "fullchain.pem").read_bytes())
        (scratch_dir / "tls.key").write_bytes((scratch_dir / "privkey.pem").read_bytes())
        servers, backends = [], {}
        for protocol in ("imap", "pop3", "smtp"):
            server, port = await serve_backend(protocol)
            servers.append(server)
            backends[protocol] = port
        (metrics_port,) = free_ports(1)
        text, ports = local_config(configmap_toml(), scratch_dir, backends, metrics_port)
        config = scratch_dir / "config.toml"
        config.write_text(text)
        log = open(scratch_dir / "proxy.log", "wb")
        process = subprocess.Popen([str(binary), "run", "--config", str(config)], stdout=log, stderr=log,
                                   env={**os.environ, "MAIL_TLS_PROXY_LOG": "warn"})
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", ports["imaps"]), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError((scratch_dir / "proxy.log").read_text())
                    await asyncio.sleep(0.1)
            await asyncio.sleep(2)
            result = {"listeners": len(ports), "idle": memory(process.pid)}

            context = ssl.create_default_context(cafile=str(scratch_dir / "fullchain.pem"))
            hold: list = []
            for start in range(0, idle_sessions, 50):
                await asyncio.gather(*(open_idle_session(ports["imaps"], context, hold)
                                       for _ in range(min(50, idle_sessions - start))))
            await asyncio.sleep(1)
            result["idle_sessions"] = {"count": len(hold), **memory(process.pid)}
            result["idle_sessions"]["kib_per_session"] = round(
                (result["idle_sessions"]["rss_kib"] - result["idle"]["rss_kib"]) / max(1, len(hold)), 1)

            cpu_before, wall_before = cpu_seconds(process.pid), time.monotonic()
            tasks, failures = [], 0
            for tick in range(int(seconds * 10)):
                tasks += [asyncio.create_task(one_session(ports["imaps"], context)) for _ in range(rate // 10)]
                await asyncio.sleep(max(0.0, wall_before + (tick + 1) / 10 - time.monotonic()))
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                failures += isinstance(outcome, BaseException)
            wall = time.monotonic() - wall_before
            cpu = cpu_seconds(process.pid) - cpu_before
            result["churn"] = {"sessions_per_second": rate, "seconds": round(wall, 1), "sessions": len(tasks),
                               "failed": failures, "cpu_cores": round(cpu / wall, 3), **memory(process.pid)}
            for writer in hold:
                writer.close()
            return result
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
            for server in servers:
                server.close()
                await server.wait_closed()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", type=Path)
    parser.add_argument("--idle-sessions", type=int, default=500)
    parser.add_argument("--rate", type=int, default=50, help="new TLS sessions a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    result = asyncio.run(measure(args.binary.resolve(), args.idle_sessions, args.rate, args.seconds))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
