"""What the backends and the proxy wrote down: log lines after an offset,
and the Received header a delivered message carries.  Shared by the tests
that prove who the backend saw."""

from __future__ import annotations

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
