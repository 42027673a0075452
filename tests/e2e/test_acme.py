"""The proxy's built-in ACME client against a real ACME server, Pebble
(pebble.py), with the real proxy binary in front of the real Dovecot and
Postfix (an SMTP STARTTLS and an IMAPS listener).

Pebble validates for real (http-01 and tls-alpn-01 against the proxy's own
responders, names resolved to 127.0.0.1 by its DNS server) unless a test
says otherwise, and issues under a root it makes at each start; clients
trust that root only, and name mail.example.test (SNI and verification).

What is proven: issuance with each challenge type and a chain openssl and
Python verify; the self-signed placeholder before the first issuance; a
forced renewal under continuous handshakes (no failure, the new certificate
served within a second of its log line, TLSA unchanged with reuse_key and
changed without it); a restart serving the stored pair without ordering; a
configuration reload that leaves [acme] as it was keeping the renewal work
(no second lock, no order); a start with Pebble down or refusing, retried
until issuance; Pebble's injected failures (bad nonces) survived."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import imaplib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pebble import Pebble, missing_pebble_programs
from proxy_config import AcmeCertificateConfig, AcmeConfig, ListenerConfig, ProxyConfig
from proxy_process import (
    ADDRESS_IN_USE_MARKERS,
    START_ATTEMPTS,
    RunningProxy,
    proxy_binary_path,
    stop_proxy,
    unavailable,
    wait_for_proxy_ports,
)
from servers import MailServerEndpoints, pick_free_loopback_ports, tail_of_file

NAME = "mail.example.test"
CONTACT = "mailto:postmaster@example.org"
ISSUED = "acme: certificate issued"
ORDER_FAILED = "acme: order failed"         # the start of the message
PLACEHOLDER_WARNING = "acme: no certificate issued yet: serving a self-signed placeholder"
LOCK_HELD = "acme: this instance holds the issuance lock"
# An order against Pebble at full speed takes a second or two; the bound
# leaves room for a loaded machine.
ISSUANCE_TIMEOUT_SECONDS = 30
CLIENT_TIMEOUT_SECONDS = 10
TOOL_TIMEOUT_SECONDS = 30
# X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
SELF_SIGNED_VERIFY_CODE = 18


def proxy_lacks_acme() -> bool:
    """True when the built binary has no `tlsa` command (no ACME support);
    a binary that is not built yet is the fixtures' business."""
    binary = proxy_binary_path()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return False
    probe = subprocess.run([str(binary), "tlsa", "--help"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return probe.returncode != 0


pytestmark = pytest.mark.skipif(proxy_lacks_acme(),
                                reason="the proxy binary has no ACME support (`mail-tls-proxy tlsa --help` fails)")


# ---------------------------------------------------------------------------
# Pebble and the proxy
# ---------------------------------------------------------------------------

@pytest.fixture
def acme_dir(scratch_dir, request) -> Path:
    path = scratch_dir / "acme" / re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name.removeprefix("test_"))
    path.mkdir(parents=True)
    return path


@pytest.fixture
def pebble(acme_dir) -> Pebble:
    """A Pebble of the test's own, not started: the test starts it with the
    settings it needs (or leaves it down)."""
    missing = missing_pebble_programs()
    if missing:
        unavailable(f"{', '.join(missing)} not installed; run tests/e2e/install-deps.sh")
    if shutil.which("openssl") is None:
        unavailable("openssl not installed; run tests/e2e/install-deps.sh")
    http_port, tls_port = pick_free_loopback_ports(2)
    server = Pebble(acme_dir / "pebble", http_port=http_port, tls_port=tls_port)
    server.choose_ports()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def binary() -> Path:
    path = proxy_binary_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        unavailable(f"proxy binary {path} not built (cargo build, or set MAIL_TLS_PROXY_BIN)")
    return path


@dataclasses.dataclass
class AcmeProxy:
    """One run of the proxy with an [acme] table; its log is JSON lines."""
    running: RunningProxy
    state_dir: Path
    log_offset: int     # where this run's lines start in the log file

    @property
    def config_file(self) -> Path:
        return self.running.config_file

    @property
    def imaps_port(self) -> int:
        return self.running.ports["imaps"]

    @property
    def submission_port(self) -> int:
        return self.running.ports["submission"]

    def records(self) -> list[dict]:
        """This run's log lines, parsed."""
        with open(self.running.log_file, "rb") as log:
            log.seek(self.log_offset)
            lines = log.read().decode(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def acme_records(self, message: str) -> list[dict]:
        """Records whose message is, or starts with, `message`."""
        return [record for record in self.records() if str(record.get("message", "")).startswith(message)]

    def wait_for(self, message: str, count: int = 1, timeout: float = ISSUANCE_TIMEOUT_SECONDS) -> dict:
        """The count-th log record with this message, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.acme_records(message)
            if len(found) >= count:
                return found[count - 1]
            if self.running.process.poll() is not None:
                raise AssertionError(f"the proxy exited with {self.running.process.returncode} waiting for "
                                     f"{message!r}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {message!r} (#{count}) within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        return tail_of_file(self.running.log_file, max_lines=60)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()


def write_acme_config(path: Path, pebble: Pebble, mail_servers: MailServerEndpoints, state_dir: Path,
                      challenge: str, reuse_key: bool | None, ports: dict[str, int], metrics_port: int) -> None:
    ProxyConfig(
        acme=AcmeConfig(
            directory=pebble.directory_url,
            contact=CONTACT,
            state_dir=state_dir,
            challenge=challenge,
            http_listen=f"127.0.0.1:{pebble.http_port}" if challenge == "http-01" else None,
            tls_alpn_listen=f"127.0.0.1:{pebble.tls_port}" if challenge == "tls-alpn-01" else None,
            ca_bundle=pebble.https_ca,
        ),
        certificates=[AcmeCertificateConfig([NAME], reuse_key=reuse_key)],
        metrics_port=metrics_port,
        listeners=[
            ListenerConfig("submission", "smtp", "starttls", listen_port=ports["submission"],
                           backend=mail_servers.smtp_port),
            ListenerConfig("imaps", "imap", "implicit", listen_port=ports["imaps"], backend=mail_servers.imap_port),
        ],
    ).write(path)


def start_acme_proxy(binary: Path, directory: Path, pebble: Pebble, mail_servers: MailServerEndpoints,
                     challenge: str = "http-01", reuse_key: bool | None = None, stem: str = "proxy",
                     state_dir: Path | None = None) -> AcmeProxy:
    """Writes DIR/STEM.toml and runs the proxy on it (log: DIR/STEM.log,
    JSON lines) until every listener and /metrics accept connections.  The
    challenge responder listens on the port Pebble validates on; when a port
    was taken meanwhile, it starts again on fresh ones."""
    state_dir = state_dir or directory / "state"
    config_file, log_file = directory / f"{stem}.toml", directory / f"{stem}.log"
    environment = dict(os.environ, NO_COLOR="1", MAIL_TLS_PROXY_LOG_FORMAT="json")
    environment.setdefault("RUST_LOG", "info")
    for attempt in range(1, START_ATTEMPTS + 1):
        submission, imaps, metrics_port = pick_free_loopback_ports(3)
        ports = {"submission": submission, "imaps": imaps}
        write_acme_config(config_file, pebble, mail_servers, state_dir, challenge, reuse_key, ports, metrics_port)
        log_offset = log_file.stat().st_size if log_file.exists() else 0
        with open(log_file, "ab") as log:
            process = subprocess.Popen([str(binary), "run", "--config", str(config_file)], cwd=directory,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=environment)
        running = RunningProxy(ports=ports, metrics_port=metrics_port, ca_file=pebble.https_ca, hostname=NAME,
                               config_file=config_file, log_file=log_file, process=process)
        problem = wait_for_proxy_ports(running)
        if problem is None:
            return AcmeProxy(running=running, state_dir=state_dir, log_offset=log_offset)
        stop_proxy(running)
        log_tail = tail_of_file(log_file)
        if not any(marker in log_tail.lower() for marker in ADDRESS_IN_USE_MARKERS) or attempt == START_ATTEMPTS:
            pytest.fail(f"{problem}; log:\n{log_tail}", pytrace=False)
        pebble.move_validation_ports(*pick_free_loopback_ports(2))
    raise AssertionError("unreachable")


@pytest.fixture
def proxies():
    """Stops every proxy a test started, failed or not."""
    started: list[AcmeProxy] = []
    yield started
    for proxy in started:
        stop_proxy(proxy.running)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

def trusting_only(root: Path) -> ssl.SSLContext:
    """Verifies the chain against `root` alone (no system roots) and the
    name mail.example.test."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(root))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclasses.dataclass(frozen=True)
class Leaf:
    der: bytes

    def openssl_text(self, *options: str) -> str:
        return subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", *options], input=self.der,
                              capture_output=True, check=True, timeout=TOOL_TIMEOUT_SECONDS).stdout.decode()

    @property
    def serial(self) -> str:
        return self.openssl_text("-serial").strip().split("=", 1)[1]

    @property
    def subject_alt_names(self) -> list[str]:
        text = self.openssl_text("-ext", "subjectAltName")
        return [name.strip() for name in text.splitlines()[-1].split(",")] if "Alternative Name" in text else []

    @property
    def self_signed(self) -> bool:
        return self.openssl_text("-subject").split("=", 1)[1] == self.openssl_text("-issuer").split("=", 1)[1]

    @property
    def spki_sha256(self) -> str:
        """What a `3 1 1` TLSA record holds: SHA-256 of the DER
        SubjectPublicKeyInfo."""
        public_pem = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-pubkey"], input=self.der,
                                    capture_output=True, check=True, timeout=TOOL_TIMEOUT_SECONDS).stdout
        spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=public_pem,
                              capture_output=True, check=True, timeout=TOOL_TIMEOUT_SECONDS).stdout
        return hashlib.sha256(spki).hexdigest()


def served_leaf_unverified(port: int) -> Leaf:
    """The leaf the IMAPS listener serves for mail.example.test, whoever
    signed it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_SECONDS) as raw:
        with context.wrap_socket(raw, server_hostname=NAME) as tls:
            return Leaf(tls.getpeercert(binary_form=True))


def served_leaf_verified(port: int, root: Path) -> Leaf:
    """The leaf of a handshake verified against `root` for mail.example.test
    (raises ssl.SSLCertVerificationError otherwise)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_SECONDS) as raw:
        with trusting_only(root).wrap_socket(raw, server_hostname=NAME) as tls:
            return Leaf(tls.getpeercert(binary_form=True))


class IMAP4SSLOnLoopback(imaplib.IMAP4_SSL):
    """imaplib's IMAPS client for a host name that does not resolve here:
    it connects to 127.0.0.1 and verifies the certificate for `host`."""

    def _create_socket(self, timeout):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def imaps_login_verified(proxy: AcmeProxy, root: Path, mail_servers: MailServerEndpoints) -> dict:
    """Logs in to Dovecot through the IMAPS listener, verifying against
    `root` only; returns the verified peer certificate."""
    client = IMAP4SSLOnLoopback(NAME, proxy.imaps_port, ssl_context=trusting_only(root),
                                timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        peer = client.sock.getpeercert()
        status, _ = client.login(mail_servers.user, mail_servers.password)
        assert status == "OK"
        status, _ = client.select("INBOX", readonly=True)
        assert status == "OK"
    finally:
        client.logout()
    return peer


def s_client_smtp_starttls(proxy: AcmeProxy, root: Path) -> subprocess.CompletedProcess:
    """openssl s_client through the SMTP STARTTLS listener, verifying the
    chain against `root` and the name, then EHLO and QUIT inside TLS."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.submission_port}", "-starttls", "smtp",
         "-servername", NAME, "-verify_hostname", NAME, "-CAfile", str(root), "-verify_return_error",
         "-showcerts", "-ign_eof"],
        input=b"EHLO client.e2e.test\r\nQUIT\r\n", capture_output=True, timeout=TOOL_TIMEOUT_SECONDS,
    )


def first_pem_certificate(text: str) -> bytes:
    match = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    assert match, text
    return ssl.PEM_cert_to_DER_cert(match.group(0))


def assert_served_chain_verifies(proxy: AcmeProxy, root: Path, mail_servers: MailServerEndpoints) -> Leaf:
    """Both clients verify the served chain against Pebble's root for
    mail.example.test, and the leaf names exactly mail.example.test."""
    result = s_client_smtp_starttls(proxy, root)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, f"s_client exited {result.returncode}:\n{output}\n{result.stderr.decode()}"
    assert "Verify return code: 0 (ok)" in output, output
    inside_tls = output.split("Verify return code: 0 (ok)", 1)[1]
    assert re.search(r"^250[ -]", inside_tls, re.M) and re.search(r"^221 ", inside_tls, re.M), inside_tls
    smtp_leaf = Leaf(first_pem_certificate(output))
    assert smtp_leaf.subject_alt_names == [f"DNS:{NAME}"]
    assert not smtp_leaf.self_signed

    peer = imaps_login_verified(proxy, root, mail_servers)
    assert peer["subjectAltName"] == (("DNS", NAME),), peer
    imap_leaf = served_leaf_verified(proxy.imaps_port, root)
    assert imap_leaf == smtp_leaf, "both listeners serve the one certificate"
    return imap_leaf


def assert_placeholder_served(proxy: AcmeProxy, root: Path | None) -> Leaf:
    """A self-signed certificate for mail.example.test that no client
    verifying against Pebble's root accepts."""
    leaf = served_leaf_unverified(proxy.imaps_port)
    assert leaf.self_signed
    assert f"DNS:{NAME}" in leaf.subject_alt_names
    if root is not None:
        with pytest.raises(ssl.SSLCertVerificationError) as refused:
            served_leaf_verified(proxy.imaps_port, root)
        assert refused.value.verify_code == SELF_SIGNED_VERIFY_CODE, refused.value
        result = s_client_smtp_starttls(proxy, root)
        assert result.returncode != 0
        assert "self-signed certificate" in (result.stdout + result.stderr).decode(errors="replace")
    return leaf


def run_cli(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_SECONDS, env=dict(os.environ, NO_COLOR="1"))


def tlsa_records(binary: Path, proxy: AcmeProxy) -> list[str]:
    """The records (lines that are not `;` comments) `mail-tls-proxy tlsa`
    prints."""
    result = run_cli(binary, "tlsa", "-c", str(proxy.config_file))
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip() and not line.startswith(";")]


def expected_tlsa(proxy: AcmeProxy, leaf: Leaf) -> list[str]:
    """One DANE-EE SPKI SHA-256 record for the name on the SMTP listener's
    port."""
    return [f"_{proxy.submission_port}._tcp.{NAME}. IN TLSA 3 1 1 {leaf.spki_sha256}"]


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Label set (as written) -> value for every sample of `name`."""
    return {labels: float(value)
            for labels, value in re.findall(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", text, re.M)}


def record_time(record: dict) -> float:
    return datetime.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def parse_utc(text: str) -> float:
    """A time as the proxy writes it in messages: `YYYY-MM-DD HH:MM:SS UTC`."""
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S UTC").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def check_line(binary: Path, proxy: AcmeProxy) -> str:
    """`check`'s line about the ACME certificate."""
    result = run_cli(binary, "check", "-c", str(proxy.config_file))
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"acme certificate {NAME} ")]
    assert len(lines) == 1, result.stdout
    return lines[0]


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_issues_a_certificate_that_clients_verify(binary, pebble, acme_dir, mail_servers, proxies, challenge):
    pebble.start(authz_reuse_percent=0)
    proxy = start_acme_proxy(binary, acme_dir, pebble, mail_servers, challenge=challenge)
    proxies.append(proxy)
    issued = proxy.wait_for(ISSUED)
    assert issued.get("certificate") == NAME, issued
    wait_until_served(proxy, pebble.issuing_root, issued)

    leaf = assert_served_chain_verifies(proxy, pebble.issuing_root, mail_servers)
    # One order, validated for real: the proxy answers only the challenge
    # type configured (the other port Pebble knows has no responder).
    assert pebble.order_count() == 1
    assert pebble.issued_serials() == [int(leaf.serial, 16)]
    assert proxy.acme_records(ORDER_FAILED) == []

    # What was stored is what is served.
    stored = proxy.state_dir / "certificates" / NAME
    assert Leaf(first_pem_certificate((stored / "fullchain.pem").read_text())) == leaf
    assert (stored / "privkey.pem").is_file()
    assert (proxy.state_dir / "account.json").is_file()

    metrics = proxy.metrics()
    orders = metric_samples(metrics, "mail_tls_proxy_acme_orders_total")
    assert orders == {'{result="ok"}': 1.0, '{result="error"}': 0.0}, orders
    not_after = ssl.cert_time_to_seconds(leaf.openssl_text("-enddate").strip().split("=", 1)[1])
    expiry = metric_samples(metrics, "mail_tls_proxy_certificate_expiry_timestamp_seconds")
    assert expiry.get(f'{{certificate="{NAME}"}}') == not_after, expiry
    next_renewal = metric_samples(metrics, "mail_tls_proxy_acme_next_renewal_timestamp_seconds")
    assert time.time() < next_renewal.get(f'{{certificate="{NAME}"}}', 0) < not_after, next_renewal

    line = check_line(binary, proxy)
    assert "issued until " in line and line.endswith(", last error: none"), line


def wait_until_served(proxy: AcmeProxy, root: Path, issued: dict) -> Leaf:
    """The IMAPS listener serves a chain that verifies against `root`
    within a second of the `acme: certificate issued` line `issued`."""
    bound = record_time(issued) + 1.0
    while True:
        try:
            return served_leaf_verified(proxy.imaps_port, root)
        except ssl.SSLCertVerificationError:
            assert time.time() < bound, f"not served a second after the issued line:\n{proxy.log_tail()}"
            time.sleep(0.02)


def issued_and_served(proxy: AcmeProxy, root: Path) -> Leaf:
    return wait_until_served(proxy, root, proxy.wait_for(ISSUED))


def continuous_handshakes(port: int, root: Path, stop: threading.Event, results: list, failures: list,
                          max_handshakes: int = 5000, max_seconds: float = 60) -> None:
    """Handshakes with the IMAPS listener until stopped, verifying against
    `root`: (start time, leaf serial) per success, (start time, error) per
    failure.  Bounded in count and time."""
    context = trusting_only(root)
    deadline = time.monotonic() + max_seconds
    while not stop.is_set() and len(results) + len(failures) < max_handshakes and time.monotonic() < deadline:
        started = time.time()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_SECONDS) as raw:
                with context.wrap_socket(raw, server_hostname=NAME) as tls:
                    results.append((started, tls.getpeercert()["serialNumber"].upper()))
        except (OSError, ssl.SSLError) as error:
            failures.append((started, repr(error)))
        time.sleep(0.01)


@pytest.mark.parametrize("reuse_key", [True, False], ids=["reuse_key", "new_key"])
def test_forced_renewal_under_continuous_handshakes(binary, pebble, acme_dir, mail_servers, proxies, reuse_key):
    pebble.start()
    proxy = start_acme_proxy(binary, acme_dir, pebble, mail_servers, reuse_key=reuse_key)
    proxies.append(proxy)
    first = issued_and_served(proxy, pebble.issuing_root)
    tlsa_before = tlsa_records(binary, proxy)
    assert tlsa_before == expected_tlsa(proxy, first)

    stop = threading.Event()
    results: list[tuple[float, str]] = []
    failures: list[tuple[float, str]] = []
    loop = threading.Thread(target=continuous_handshakes,
                            args=(proxy.imaps_port, pebble.issuing_root, stop, results, failures))
    loop.start()
    try:
        time.sleep(0.5)
        renew = run_cli(binary, "acme", "renew", "-c", str(proxy.config_file))
        assert renew.returncode == 0, (renew.stdout, renew.stderr)
        issued_at = record_time(proxy.wait_for(ISSUED, count=2))
        # Keep handshaking past the one-second bound.
        while time.time() < issued_at + 1.5:
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join(timeout=30)

    assert failures == [], f"{len(failures)} failed handshakes of {len(failures) + len(results)}: {failures[:3]}"
    second = served_leaf_verified(proxy.imaps_port, pebble.issuing_root)
    old_serial, new_serial = first.serial.upper(), second.serial.upper()
    assert new_serial != old_serial
    assert {serial for _, serial in results} == {old_serial, new_serial}
    first_new = min(started for started, serial in results if serial == new_serial)
    assert first_new <= issued_at + 1.0, f"new certificate first served {first_new - issued_at:.3f} s after the log line"
    after_the_bound = {serial for started, serial in results if started >= issued_at + 1.0}
    assert after_the_bound == {new_serial}
    assert pebble.order_count() == 2
    assert pebble.issued_serials() == [int(old_serial, 16), int(new_serial, 16)]

    tlsa_after = tlsa_records(binary, proxy)
    assert tlsa_after == expected_tlsa(proxy, second)
    if reuse_key:
        assert tlsa_after == tlsa_before
    else:
        assert tlsa_after != tlsa_before


@pytest.mark.parametrize("pebble_at_restart", ["up", "down"])
def test_a_restart_serves_the_stored_pair_without_ordering(binary, pebble, acme_dir, mail_servers, proxies,
                                                           pebble_at_restart):
    """The stored pair is served from the first handshake and nothing is
    ordered, whether or not the ACME server can be reached."""
    pebble.start(authz_reuse_percent=0)
    proxy = start_acme_proxy(binary, acme_dir, pebble, mail_servers)
    proxies.append(proxy)
    issued_leaf = issued_and_served(proxy, pebble.issuing_root)
    stop_proxy(proxy.running)
    if pebble_at_restart == "down":
        pebble.stop_pebble()

    restarted = start_acme_proxy(binary, acme_dir, pebble, mail_servers, stem="restarted",
                                 state_dir=proxy.state_dir)
    proxies.append(restarted)
    # The first handshakes get the stored certificate, verified.
    assert assert_served_chain_verifies(restarted, pebble.issuing_root, mail_servers) == issued_leaf
    # It holds the issuance lock and has planned the renewal, and orders
    # nothing.
    restarted.wait_for(LOCK_HELD)
    time.sleep(2)
    assert pebble.order_count() == 1
    for message in (ISSUED, ORDER_FAILED, "acme: account registered", "acme: renewal requested",
                    "acme: the configured names changed"):
        assert restarted.acme_records(message) == [], restarted.log_tail()
    assert restarted.acme_records(PLACEHOLDER_WARNING) == []
    metrics = restarted.metrics()
    orders = metric_samples(metrics, "mail_tls_proxy_acme_orders_total")
    assert sum(orders.values()) == 0, orders
    not_after = ssl.cert_time_to_seconds(issued_leaf.openssl_text("-enddate").strip().split("=", 1)[1])
    next_renewal = metric_samples(metrics, "mail_tls_proxy_acme_next_renewal_timestamp_seconds")
    assert time.time() < next_renewal.get(f'{{certificate="{NAME}"}}', 0) < not_after, next_renewal
    line = check_line(binary, restarted)
    assert "issued until " in line and line.endswith(", last error: none"), line


def test_a_reload_that_leaves_acme_as_it_was_keeps_the_renewals_going(binary, pebble, acme_dir, mail_servers,
                                                                     proxies):
    """SIGHUP with the [acme] table and entries unchanged: the renewal work
    runs on (it does not take the issuance lock again or ask the CA for
    anything) and the issued certificate stays served."""
    pebble.start(authz_reuse_percent=0)
    proxy = start_acme_proxy(binary, acme_dir, pebble, mail_servers)
    proxies.append(proxy)
    issued_leaf = issued_and_served(proxy, pebble.issuing_root)
    assert len(proxy.acme_records(LOCK_HELD)) == 1
    for count in (1, 2):
        proxy.running.process.send_signal(signal.SIGHUP)
        proxy.wait_for("configuration reloaded", count=count, timeout=30)
        proxy.wait_for("acme: [acme] and its certificates unchanged; renewals go on", count=count, timeout=5)
    time.sleep(2)
    assert len(proxy.acme_records(LOCK_HELD)) == 1, proxy.log_tail()
    assert proxy.acme_records(ORDER_FAILED) == [], proxy.log_tail()
    assert len(proxy.acme_records(ISSUED)) == 1
    assert pebble.order_count() == 1
    assert assert_served_chain_verifies(proxy, pebble.issuing_root, mail_servers) == issued_leaf


@pytest.mark.parametrize("pebble_at_start", ["down", "refusing"])
def test_without_a_working_acme_server_the_placeholder_is_served_and_issuance_retried(
        binary, pebble, acme_dir, mail_servers, proxies, pebble_at_start):
    """Down: connection refused.  Refusing: Pebble rejects every nonce, so
    every signed request fails.  The proxy starts all the same, serves the
    self-signed placeholder and says so, logs the failed order with its
    next retry; once Pebble works, the retry issues.  With Pebble down the
    retry is the scheduled one, at the time logged; when refusing it is
    `acme renew`'s retry-now."""
    if pebble_at_start == "refusing":
        pebble.start(nonce_reject_percent=100)
    proxy = start_acme_proxy(binary, acme_dir, pebble, mail_servers)
    proxies.append(proxy)
    # Clients verifying against Pebble's root (or any other) refuse it.
    assert_placeholder_served(proxy, pebble.issuing_root if pebble.running else pebble.https_ca)
    warning = proxy.wait_for(PLACEHOLDER_WARNING)
    assert warning["level"] == "WARN" and warning.get("names") == NAME, warning
    failed = proxy.wait_for(ORDER_FAILED)
    assert failed["level"] == "WARN" and failed.get("certificate") == NAME, failed
    next_retry = parse_utc(failed["next_retry"])
    if pebble_at_start == "refusing":
        assert "badNonce" in failed["reason"], failed

    # The failure is in the state directory for `check` to tell.
    deadline = time.monotonic() + 5
    while "last error at " not in (line := check_line(binary, proxy)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ("not issued yet (a self-signed placeholder is served until the first issuance), last error at "
            in line and "(next retry at " in line), line

    if pebble.running:
        pebble.stop_pebble()
    pebble.start(authz_reuse_percent=0)

    if pebble_at_start == "refusing":
        renew = run_cli(binary, "acme", "renew", "-c", str(proxy.config_file))
        assert renew.returncode == 0, (renew.stdout, renew.stderr)
        issued = proxy.wait_for(ISSUED)
    else:
        # The scheduled retry (at most a minute after the failure).
        deadline = max(next_retry - time.time(), 0) + ISSUANCE_TIMEOUT_SECONDS
        issued = wait_for_issued_or_second_failure(proxy, deadline)
        if issued is None:
            # The retry came before Pebble was up (the first retry may be
            # as soon as a second later): it happened, and failed; retry now.
            assert len(proxy.acme_records(ORDER_FAILED)) == 2
            assert run_cli(binary, "acme", "renew", "-c", str(proxy.config_file)).returncode == 0
            issued = proxy.wait_for(ISSUED)
        else:
            assert record_time(issued) >= next_retry, (issued, failed)
    assert record_time(issued) > record_time(failed)
    wait_until_served(proxy, pebble.issuing_root, issued)
    assert_served_chain_verifies(proxy, pebble.issuing_root, mail_servers)
    assert pebble.order_count() == 1


def wait_for_issued_or_second_failure(proxy: AcmeProxy, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        issued = proxy.acme_records(ISSUED)
        if issued:
            return issued[0]
        if len(proxy.acme_records(ORDER_FAILED)) > 1:
            return None
        time.sleep(0.1)
    raise AssertionError(f"no retry within {timeout:.0f} s:\n{proxy.log_tail()}")


def issued_retrying_failures_now(binary: Path, proxy: AcmeProxy, count: int) -> tuple[dict, int]:
    """Waits for the count-th issuance; each order that fails meanwhile is
    retried at once with `acme renew` (at most twice).  Returns the issued
    line and how many orders failed."""
    deadline = time.monotonic() + ISSUANCE_TIMEOUT_SECONDS
    failed_before = len(proxy.acme_records(ORDER_FAILED))
    retried = 0
    while len(proxy.acme_records(ISSUED)) < count:
        failed = proxy.acme_records(ORDER_FAILED)
        if len(failed) - failed_before > retried:
            assert retried < 2, f"three orders failed:\n{proxy.log_tail()}"
            retried += 1
            assert run_cli(binary, "acme", "renew", "-c", str(proxy.config_file)).returncode == 0
        assert time.monotonic() < deadline, f"not issued within {ISSUANCE_TIMEOUT_SECONDS} s:\n{proxy.log_tail()}"
        time.sleep(0.05)
    return proxy.acme_records(ISSUED)[count - 1], retried


def test_injected_failures_are_survived(binary, pebble, acme_dir, mail_servers, proxies):
    """Real validation, Pebble's default authorization reuse (the renewal
    may find its authorization valid already), and 20% of good nonces
    rejected as bad: the client retries each rejected request with a fresh
    nonce and the order goes through.  An order that fails all the same (a
    request rejected three times in a row) is retried, here at once with
    `acme renew` (the backoff schedule is tested apart), and issuance
    succeeds within the bound; then a renewal under the same conditions."""
    pebble.start(always_valid=False, nonce_reject_percent=20)
    proxy = start_acme_proxy(binary, acme_dir, pebble, mail_servers)
    proxies.append(proxy)
    issued, failed_orders = issued_retrying_failures_now(binary, proxy, count=1)
    assert "Configured to reject 20% of good nonces" in pebble.log_since_start()
    assert pebble.order_count() >= failed_orders + 1
    wait_until_served(proxy, pebble.issuing_root, issued)
    assert_served_chain_verifies(proxy, pebble.issuing_root, mail_servers)

    assert run_cli(binary, "acme", "renew", "-c", str(proxy.config_file)).returncode == 0
    renewed, _ = issued_retrying_failures_now(binary, proxy, count=2)
    wait_until_served(proxy, pebble.issuing_root, renewed)
    assert all("badNonce" in record["reason"] for record in proxy.acme_records(ORDER_FAILED)), \
        proxy.acme_records(ORDER_FAILED)
