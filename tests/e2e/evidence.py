"""What the backends and the proxy wrote down: log lines after an offset,
and the Received header a delivered message carries.  Shared by the tests
that prove who the backend saw."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from servers import tail_of_file

LOG_WAIT_SECONDS = 10


def log_offset(path: Path) -> int:
    return path.stat().st_size


def wait_for_log_line(path: Path, pattern: str, start: int = 0) -> re.Match:
    """The first match of `pattern` after byte offset `start`."""
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    regex = re.compile(pattern, re.M)
    while True:
        found = regex.search(path.read_bytes()[start:].decode(errors="replace"))
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no line matching {pattern!r} in {path}; tail:\n{tail_of_file(path)}")
        time.sleep(0.1)


def dovecot_login_line(dovecot_log: Path, service: str, user: str, start: int = 0) -> str:
    """Dovecot's login line for `user` on `service` ("imap", "pop3") after
    byte offset start; it names the client (rip=) Dovecot saw."""
    return wait_for_log_line(dovecot_log, rf"{service}-login: (?:Info: )?Login: user=<{user}>.*$", start).group(0)


def json_log_records(path: Path, start: int = 0) -> list[dict]:
    """The proxy's JSON log records after byte offset start (other lines
    skipped)."""
    records = []
    for line in path.read_bytes()[start:].decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def topmost_received(delivered: bytes) -> str:
    """The Received header the backend Postfix added (unfolded)."""
    headers = delivered.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode(errors="replace")
    unfolded = re.sub(r"\n[ \t]+", " ", headers)
    received = [line for line in unfolded.split("\n") if line.lower().startswith("received:")]
    assert received, headers
    return received[0]


def queue_id_of(received: str) -> str:
    found = re.search(r"\bid ([0-9A-F]+)\b", received)
    assert found, received
    return found.group(1)
