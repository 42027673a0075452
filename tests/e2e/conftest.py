"""pytest fixtures for the end-to-end suite: real Dovecot + Postfix backends,
a throwaway TLS certificate, and the mail-tls-proxy binary in front of them.

Under CI=true anything missing (root, Dovecot/Postfix, the proxy binary) is a
failure; elsewhere it is a skip with the reason, so a developer without the
daemons or without a built proxy still gets a clean run."""

from __future__ import annotations

import dataclasses
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The helper modules sit next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_process import (  # noqa: E402
    RunningProxy,
    proxy_binary_path,
    start_proxy,
    stop_abandoned_proxy,
    stop_proxy,
    unavailable,
)
from servers import (  # noqa: E402
    MailServerEndpoints,
    MailServers,
    ServerSetupError,
    missing_programs,
    stop_abandoned_instances,
    tail_of_file,
)

CERTIFICATE_HOSTNAME = "localhost"
SCRATCH_DIR_PREFIX = "mail-e2e-"

# Log files worth showing when a test fails; filled in by the fixtures.
_logs_to_show_on_failure: dict[str, Path] = {}
_setup_failure_logs_shown = False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # A failed session fixture errors every test that uses it; its logs are
    # shown once, not for each of them.
    global _setup_failure_logs_shown
    if report.failed and (report.when != "setup" or not _setup_failure_logs_shown):
        _setup_failure_logs_shown = _setup_failure_logs_shown or report.when == "setup"
        for title, path in _logs_to_show_on_failure.items():
            if path.exists():
                report.sections.append((f"{title} ({path})", tail_of_file(path, max_lines=30)))


@pytest.fixture(scope="session")
def scratch_dir(request):
    # Short path under /tmp: Dovecot's unix sockets live below it (108-byte
    # limit), and the daemons' unprivileged uids must be able to traverse it.
    path = Path(tempfile.mkdtemp(prefix=SCRATCH_DIR_PREFIX, dir="/tmp"))
    path.chmod(0o755)
    yield path
    # Full logs and configs are worth keeping when something failed.
    if os.environ.get("E2E_KEEP_DIR") == "1" or request.session.testsfailed:
        print(f"\nkept end-to-end scratch directory {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mail_servers(scratch_dir) -> MailServerEndpoints:
    if os.geteuid() != 0:
        unavailable("the end-to-end backends (Dovecot, Postfix) must be started as root")
    missing = missing_programs()
    if missing:
        unavailable(f"{', '.join(missing)} not installed; run tests/e2e/install-deps.sh")
    # Daemons of an earlier run that was killed before its teardown.
    for abandoned in stop_abandoned_instances(f"/tmp/{SCRATCH_DIR_PREFIX}*/servers"):
        stop_abandoned_proxy(abandoned.parent / "proxy")
        shutil.rmtree(abandoned.parent, ignore_errors=True)
    # smtp_haproxy: the smtpd service the shipped configurations' SMTP
    # listeners (client_identity = "proxy-v2") are meant to front.
    servers = MailServers(scratch_dir / "servers", owner_pid=os.getpid(),
                          extra_smtpd={"smtp_haproxy": ["smtpd_upstream_proxy_protocol=haproxy"]})
    _logs_to_show_on_failure["Postfix maillog"] = servers.postfix_log
    _logs_to_show_on_failure["Dovecot log"] = servers.dovecot_log
    try:
        endpoints = servers.start()
    except ServerSetupError as exc:
        pytest.fail(f"could not start the mail servers: {exc}", pytrace=False)
    try:
        yield endpoints
    finally:
        servers.stop()


@dataclasses.dataclass(frozen=True)
class CertificateFiles:
    chain: Path
    key: Path


@pytest.fixture(scope="session")
def test_certificate(scratch_dir) -> CertificateFiles:
    """Self-signed P-256 certificate for "localhost", made fresh per run so no
    key is ever committed.  The leaf doubles as the clients' trust anchor."""
    if shutil.which("openssl") is None:
        unavailable("openssl not installed; run tests/e2e/install-deps.sh")
    directory = scratch_dir / "proxy"
    directory.mkdir(exist_ok=True)
    chain, key = directory / "fullchain.pem", directory / "privkey.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", f"/CN={CERTIFICATE_HOSTNAME}",
         "-addext", f"subjectAltName=DNS:{CERTIFICATE_HOSTNAME},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(chain)],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    return CertificateFiles(chain=chain, key=key)


@pytest.fixture(scope="session")
def tls_context(test_certificate) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(test_certificate.chain))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@pytest.fixture(scope="session")
def proxy(mail_servers, test_certificate, scratch_dir) -> RunningProxy:
    binary = proxy_binary_path()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        unavailable(f"proxy binary {binary} not built (cargo build, or set MAIL_TLS_PROXY_BIN)")
    _logs_to_show_on_failure["mail-tls-proxy log"] = test_certificate.chain.parent / "proxy.log"
    running = start_proxy(binary, mail_servers, test_certificate.chain.parent, CERTIFICATE_HOSTNAME,
                          working_dir=scratch_dir)
    try:
        yield running
    finally:
        stop_proxy(running)
