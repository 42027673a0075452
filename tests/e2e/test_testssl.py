"""External check of the TLS the proxy offers: testssl.sh (Debian's package)
against one implicit listener (IMAPS) and one STARTTLS listener of another
protocol (SMTP submission). Any finding testssl.sh rates worse than OK/INFO in
the protocols, ciphers or vulnerabilities sections fails the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from proxy_process import unavailable

# testssl.sh --fast takes about a minute a port on this machine.
TESTSSL_TIMEOUT_SECONDS = 300

# Sections of testssl.sh's JSON whose findings we judge (by "id" prefix or
# the section testssl names in "id"): protocol offers, cipher categories,
# forward secrecy, and the known vulnerabilities.
JUDGED_IDS = (
    "SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3",
    "cipherlist_", "FS", "cipher_order",
    "heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego", "secure_client_renego",
    "CRIME_TLS", "BREACH", "POODLE_SSL", "fallback_SCSV", "SWEET32", "FREAK", "DROWN",
    "LOGJAM", "BEAST", "LUCKY13", "RC4", "winshock",
)
ACCEPTABLE_SEVERITIES = {"OK", "INFO"}


def find_testssl() -> str:
    binary = shutil.which("testssl") or shutil.which("testssl.sh")
    if binary is None:
        unavailable("testssl.sh is not installed (Debian package testssl.sh)")
    return binary


def run_testssl(binary: str, port: int, starttls: str | None, out_dir) -> list[dict]:
    json_file = out_dir / f"testssl-{port}.json"
    command = [binary, "--fast", "--quiet", "--color", "0", "--warnings", "off",
               "--protocols", "--std", "--fs", "--vulnerable",
               "--jsonfile", str(json_file)]
    if starttls:
        command += ["--starttls", starttls]
    command.append(f"127.0.0.1:{port}")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=TESTSSL_TIMEOUT_SECONDS,
                               env={**os.environ, "TERM": "dumb"})
    assert json_file.exists(), f"testssl.sh wrote no report (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-2000:]}"
    findings = json.loads(json_file.read_text())
    assert findings, "testssl.sh reported nothing"
    return findings


def judged_problems(findings: list[dict]) -> list[str]:
    problems = []
    for finding in findings:
        finding_id = finding.get("id", "")
        severity = finding.get("severity", "")
        # testssl.sh warns where its own OpenSSL cannot test something (RC4
        # here); that is a note about the scanner, not a finding about us.
        if "not supported by local OpenSSL" in finding.get("finding", ""):
            continue
        if finding_id.startswith(JUDGED_IDS) and severity not in ACCEPTABLE_SEVERITIES:
            problems.append(f"{finding_id} [{severity}]: {finding.get('finding', '')}")
    return problems


@pytest.mark.parametrize("listener, starttls", [("imaps", None), ("submission", "smtp")])
def test_testssl_finds_nothing_wrong(proxy, scratch_dir, listener, starttls):
    binary = find_testssl()
    findings = run_testssl(binary, proxy.ports[listener], starttls, scratch_dir)
    ids = {finding.get("id", "") for finding in findings}
    # The scan really ran: it judged the protocol offers and vulnerabilities.
    assert {"TLS1_2", "TLS1_3", "heartbleed"} <= ids, sorted(ids)
    offered = {f["id"]: f.get("finding", "") for f in findings if f.get("id") in ("SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3")}
    assert "not offered" in offered["TLS1"] and "not offered" in offered["TLS1_1"], offered
    assert "offered" in offered["TLS1_3"] and "not" not in offered["TLS1_3"], offered
    assert judged_problems(findings) == []
