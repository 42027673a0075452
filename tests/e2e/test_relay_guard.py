"""The relay guard against a real Postfix: before an SMTP listener serves, the
proxy asks the backend what it would let a stranger do, arriving the way the
listener's clients arrive (EHLO, MAIL FROM:<>, RCPT TO a random address in
.invalid, RSET, QUIT; never DATA).

A private Postfix + Dovecot pair is started for this module with
`mynetworks = 127.0.0.0/8` and `permit_mynetworks`, as a stock Debian Postfix
has them: it relays for anything connecting from this host, which is where
the proxy connects from.  Its services:

- the main smtpd: no client identity, so every client of a proxy in front of
  it would be 127.0.0.1, trusted to relay anywhere (an open relay);
- `smtp_proxied` / `smtp_xclient`: `smtpd_upstream_proxy_protocol = haproxy`
  / `smtpd_authorized_xclient_hosts = 127.0.0.1`, mynetworks unchanged: how
  the shipped example configurations tell an operator to set up the backend;
- `smtp_proxied_host` / `smtp_xclient_host`: the same, with
  `mynetworks = 127.0.0.1/32` (the proxy's host only), so that a client on
  127.0.0.2 stands in for a stranger on the internet (all of 127/8 is
  loopback; a real stranger is outside mynetworks anyway).

The default test Postfix (conftest's mail_servers) trusts no network and is
the backend that does not relay for the proxy.

What `check` and `run` print is matched loosely (listener, backend, the
backend's reply, the fixes), not line by line."""

from __future__ import annotations

import os
import re
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from evidence import LOG_WAIT_SECONDS, log_offset, wait_for_log_line
from identity_backends import SMTPD_PROXY_PROTOCOL, SMTPD_XCLIENT_FROM_PROXY, identity_backends
from mail_clients import SENDER_ADDRESS, make_message
from proxy_config import CertificateConfig, ListenerConfig, ProxyConfig
from proxy_process import (
    REPO_ROOT,
    RunningProxy,
    built_proxy_binary,
    run_check,
    start_proxy_with_config,
    stop_proxy,
)
from servers import MailServerEndpoints, MailServers, find_program, pick_free_loopback_ports
from source_address import smtp_from

yaml = pytest.importorskip("yaml")  # PyYAML comes with yamllint (install-deps.sh)

SERVERS_DIR_NAME = "relay-servers"
CLIENT_IP = "127.0.0.2"
PROXY_HOSTNAME = "guard.e2e.test"
STRANGER_RECIPIENT = "someone@elsewhere.example"
# `run` refusing to start: the guard's dialogue takes milliseconds, the rest
# is start-up on a loaded 2-core machine.
RUN_EXIT_TIMEOUT_SECONDS = 60



def documented_configurations(document: str) -> dict[str, callable]:
    """The TOML blocks of a document that configure listeners."""
    blocks = re.findall(r"```toml\n(.*?)```", (REPO_ROOT / document).read_text(), re.S)
    return {f"{document} TOML block {index}": (lambda block=block: block)
            for index, block in enumerate(blocks, 1) if "[[listener]]" in block}


SHIPPED_CONFIGURATIONS = {
    "examples/quickstart.toml": lambda: (REPO_ROOT / "examples" / "quickstart.toml").read_text(),
    "deploy/kubernetes/configmap.yaml": lambda: yaml.safe_load(
        (REPO_ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())["data"]["config.toml"],
    "deploy/compose/mail-tls-proxy.toml": lambda: (REPO_ROOT / "deploy" / "compose" / "mail-tls-proxy.toml").read_text(),
    **documented_configurations("README.md"),
    **documented_configurations("docs/backends.md"),
}


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def relay_servers(scratch_dir) -> MailServers:
    yield from identity_backends(scratch_dir, SERVERS_DIR_NAME, {
        "smtp_proxied": [SMTPD_PROXY_PROTOCOL],
        "smtp_xclient": [SMTPD_XCLIENT_FROM_PROXY],
        "smtp_proxied_host": [SMTPD_PROXY_PROTOCOL, "mynetworks=127.0.0.1/32"],
        "smtp_xclient_host": [SMTPD_XCLIENT_FROM_PROXY, "mynetworks=127.0.0.1/32"],
    }, mynetworks="127.0.0.0/8")


@pytest.fixture(scope="module")
def binary() -> Path:
    return built_proxy_binary()


# -- configurations ------------------------------------------------------------------------

def smtp_listener(name: str, listen_port: int, backend_port: int, client_identity: str | None = None,
                  tls: str = "starttls") -> ListenerConfig:
    return ListenerConfig(
        name, "smtp", tls, listen_port=listen_port, backend=backend_port, client_identity=client_identity,
        # Port-25 style: mail without TLS is allowed; TLS is not the subject here.
        require_tls="none" if tls == "starttls" else None,
    )


def guard_config(listeners: list[ListenerConfig], metrics_port: int | None = None) -> ProxyConfig:
    return ProxyConfig(
        hostname=PROXY_HOSTNAME,
        certificates=[CertificateConfig("fullchain.pem", "privkey.pem")],
        metrics_port=metrics_port,
        listeners=listeners,
    )


def write_single_listener_config(path: Path, backend_port: int) -> tuple[str, str]:
    """One submission listener with the default client_identity ("none")
    and the default relay_check ("refuse"); returns (listener, backend)."""
    listen_port, metrics_port = pick_free_loopback_ports(2)
    guard_config([smtp_listener("submission", listen_port, backend_port)], metrics_port).write(path)
    return "submission", f"127.0.0.1:{backend_port}"


# -- the backends' evidence ------------------------------------------------------------------

def postfix_queue(config_dir: Path) -> str:
    result = subprocess.run([find_program("postqueue"), "-c", str(config_dir), "-p"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def wait_for_empty_queue(config_dir: Path, timeout: float = 30) -> None:
    """Mail from earlier tests may still be on its way into the maildir."""
    deadline = time.monotonic() + timeout
    while (listing := postfix_queue(config_dir)) != "Mail queue is empty":
        assert time.monotonic() < deadline, f"the queue does not drain:\n{listing}"
        time.sleep(0.2)


def assert_queue_is_empty(config_dir: Path) -> None:
    assert postfix_queue(config_dir) == "Mail queue is empty"


def assert_names_the_open_relay(output: str, listener: str, backend: str) -> None:
    """What an operator needs to act: which listener, which backend, what it
    answered the stranger's RCPT, and how to fix it (tell the backend who
    the client is, or stop trusting the proxy's address)."""
    assert re.search(rf"\b{re.escape(listener)}\b", output), output
    assert backend in output, output
    assert "250 2.1.5 Ok" in output, output
    assert "client_identity" in output, output
    assert "mynetworks" in output, output


def assert_reports_closed(output: str, listeners: list[str]) -> None:
    for listener in listeners:
        lines = [line for line in output.splitlines()
                 if re.search(rf"\b{re.escape(listener)}\b", line) and "closed" in line.lower()]
        assert lines, f"no closed relay-check result for listener {listener}:\n{output}"


# -- 1. a backend that relays for the proxy's address ------------------------------------------

def test_a_backend_trusting_the_proxy_address_fails_check_and_run(relay_servers, binary, test_certificate,
                                                                    scratch_dir):
    """mynetworks = 127.0.0.0/8 covers the proxy, and the listener passes no
    client identity: every client would be trusted to relay. `check` and
    `run` both refuse, and the dialogue never reached DATA."""
    servers = relay_servers.endpoints
    config = test_certificate.chain.parent / "relay-open.toml"
    listener, backend = write_single_listener_config(config, servers.smtp_port)
    start = log_offset(relay_servers.postfix_log)

    checked = run_check(binary, config)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, f"check passed an open relay:\n{output}"
    assert_names_the_open_relay(output, listener, backend)

    try:
        ran = subprocess.run([str(binary), "run", "--config", str(config)], cwd=scratch_dir,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=RUN_EXIT_TIMEOUT_SECONDS, env=dict(os.environ, NO_COLOR="1"))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"run kept serving in front of an open relay for {RUN_EXIT_TIMEOUT_SECONDS}s:\n"
                    f"{exc.stdout or ''}{exc.stderr or ''}", pytrace=False)
    output = ran.stdout + ran.stderr
    assert ran.returncode != 0, output
    assert_names_the_open_relay(output, listener, backend)

    # Postfix accepted the stranger's recipient (rcpt=1/1), and the guard
    # reset and quit: nothing was queued.
    wait_for_log_line(relay_servers.postfix_log, r"postfix/smtpd\[\d+\]: disconnect from \S+\[127\.0\.0\.1\] "
                                                 r"ehlo=1 mail=1 rcpt=1 rset=1 quit=1 commands=5$", start)
    assert "data=" not in relay_servers.postfix_log.read_bytes()[start:].decode(errors="replace")
    assert_queue_is_empty(relay_servers.postfix_config_dir)


# -- 2. the same Postfix, told who the client is -------------------------------------------------

GUARDED_LISTENERS = {  # listener -> (client_identity, backend service)
    "smtp-v2": ("proxy-v2", "smtp_proxied_host"),
    "smtp-xclient": ("xclient", "smtp_xclient_host"),
}


@pytest.fixture(scope="module")
def guarded_proxy(relay_servers, binary, test_certificate, scratch_dir) -> RunningProxy:
    backend_ports = relay_servers.endpoints.extra_ports

    def config_text(ports: dict[str, int], metrics_port: int) -> str:
        return guard_config([smtp_listener(name, ports[name], backend_ports[service], identity)
                             for name, (identity, service) in GUARDED_LISTENERS.items()],
                            metrics_port).to_toml()

    running = start_proxy_with_config(binary, test_certificate.chain.parent, "relay-guarded",
                                      list(GUARDED_LISTENERS), config_text, working_dir=scratch_dir)
    try:
        yield running
    finally:
        stop_proxy(running)


def test_check_passes_when_the_backend_sees_the_client(guarded_proxy, binary):
    checked = run_check(binary, guarded_proxy.config_file)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert_reports_closed(output, list(GUARDED_LISTENERS))


def wait_for_maildir_file(maildir: Path, message_id: str) -> Path:
    deadline = time.monotonic() + LOG_WAIT_SECONDS * 2
    needle = f"Message-ID: {message_id}".encode()
    while True:
        for path in (maildir / "new").iterdir():
            try:
                if needle in path.read_bytes():
                    return path
            except FileNotFoundError:  # moved to cur/ meanwhile
                continue
        assert time.monotonic() < deadline, f"{message_id} not delivered into {maildir}/new"
        time.sleep(0.1)


@pytest.mark.parametrize("listener", list(GUARDED_LISTENERS))
def test_a_stranger_cannot_relay_but_local_mail_is_delivered(guarded_proxy, relay_servers, tls_context, listener):
    _, service = GUARDED_LISTENERS[listener]
    servers: MailServerEndpoints = relay_servers.endpoints
    start = log_offset(relay_servers.postfix_log)
    message = make_message(f"relay-guard-{listener}", servers.address)
    with smtp_from("localhost", guarded_proxy.ports[listener], "starttls", CLIENT_IP, tls_context) as client:
        assert client.sock.getsockname()[0] == CLIENT_IP
        assert client.mail(SENDER_ADDRESS)[0] == 250
        assert client.rcpt(STRANGER_RECIPIENT) == (554, f"5.7.1 <{STRANGER_RECIPIENT}>: Relay access denied".encode())
        assert client.rcpt(servers.address)[0] == 250
        code, reply = client.data(message.raw)
        assert code == 250, reply
        client.quit()
    wait_for_maildir_file(servers.maildir, message.message_id)
    # Postfix judged the relay attempt on the client's own address.
    wait_for_log_line(relay_servers.postfix_log,
                      rf"postfix/{service}/smtpd\[\d+\]: NOQUEUE: reject: RCPT from unknown\[{re.escape(CLIENT_IP)}\]: "
                      rf"554 5\.7\.1 <{re.escape(STRANGER_RECIPIENT)}>: Relay access denied", start)


# -- 3. a Postfix that does not relay for the proxy ------------------------------------------------

def test_check_against_a_closed_backend_passes_and_leaves_nothing_behind(mail_servers, binary, test_certificate):
    """The default test Postfix trusts no network. The guard's dialogue is
    EHLO, MAIL, RCPT (refused), RSET, QUIT: Postfix counts exactly those, and
    the queue stays empty."""
    layout = MailServers(mail_servers.base_dir)  # paths only; the session's servers are running
    config_dir, maillog = layout.postfix_config_dir, layout.postfix_log
    config = test_certificate.chain.parent / "relay-closed.toml"
    listener, _ = write_single_listener_config(config, mail_servers.smtp_port)
    wait_for_empty_queue(config_dir)
    start = log_offset(maillog)

    checked = run_check(binary, config)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert_reports_closed(output, [listener])

    rejected = wait_for_log_line(
        maillog, r"postfix/smtpd\[\d+\]: NOQUEUE: reject: RCPT from \S+\[127\.0\.0\.1\]: 554 5\.7\.1 .*$", start)
    assert "Relay access denied" in rejected.group(0), rejected.group(0)
    assert re.search(r" from=<> to=<[^@>]+@[^>]+\.invalid> proto=ESMTP helo=<" + re.escape(PROXY_HOSTNAME) + ">$",
                     rejected.group(0)), rejected.group(0)
    wait_for_log_line(maillog, r"postfix/smtpd\[\d+\]: disconnect from \S+\[127\.0\.0\.1\] "
                               r"ehlo=1 mail=1 rcpt=0/1 rset=1 quit=1 commands=4/5$", start)
    assert_queue_is_empty(config_dir)


# -- the shipped configurations, with their backends set up as their comments say -------------------

def shipped_listeners(text: str) -> list[dict]:
    return tomllib.loads(text)["listener"]


def backend_for(listener: dict, servers: MailServerEndpoints) -> int:
    """The test backend configured as the shipped file's comments tell the
    operator: a PROXY-protocol smtpd service (or an XCLIENT one) on the
    stock-Debian-like Postfix, Dovecot's haproxy listeners for IMAP/POP3."""
    identity = listener.get("client_identity", "none")
    protocol = listener["protocol"]
    if protocol == "smtp":
        return {"proxy-v1": servers.extra_ports["smtp_proxied"], "proxy-v2": servers.extra_ports["smtp_proxied"],
                "xclient": servers.extra_ports["smtp_xclient"], "none": servers.smtp_port}[identity]
    plain = {"imap": servers.imap_port, "pop3": servers.pop3_port}[protocol]
    return servers.extra_ports[f"{protocol}_haproxy"] if identity.startswith("proxy-") else plain


def for_this_machine(text: str, servers: MailServerEndpoints, certificate_dir: Path) -> str:
    """Only addresses, ports and certificate paths change."""
    listeners = {listener["name"]: listener for listener in shipped_listeners(text)}
    ports = iter(pick_free_loopback_ports(len(listeners) + 1))
    section, current, lines = None, None, []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section, current = stripped.split("#", 1)[0].strip(), None
        elif m := re.match(r'name\s*=\s*"([^"]+)"', stripped):
            current = listeners.get(m.group(1)) if section == "[[listener]]" else None
        elif re.match(r"listen\s*=", stripped) and section in ("[[listener]]", "[metrics]"):
            line = f'listen = "127.0.0.1:{next(ports)}"'
        elif re.match(r"backend\s*=", stripped) and current is not None:
            line = f'backend = "127.0.0.1:{backend_for(current, servers)}"'
        elif re.match(r"cert\s*=", stripped) and section == "[[certificate]]":
            line = f'cert = "{certificate_dir / "fullchain.pem"}"'
        elif re.match(r"key\s*=", stripped) and section == "[[certificate]]":
            line = f'key = "{certificate_dir / "privkey.pem"}"'
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("shipped", list(SHIPPED_CONFIGURATIONS))
def test_shipped_configuration_passes_its_own_relay_guard(shipped, relay_servers, binary, test_certificate):
    text = SHIPPED_CONFIGURATIONS[shipped]()
    smtp = [listener for listener in shipped_listeners(text) if listener["protocol"] == "smtp"]
    assert smtp, shipped
    for listener in smtp:
        assert listener.get("client_identity") in ("proxy-v2", "xclient"), (shipped, listener)
        assert listener.get("relay_check", "refuse") != "off", (shipped, listener)
    config = test_certificate.chain.parent / f"shipped-{re.sub(r'[^a-z0-9]+', '-', shipped.lower())}.toml"
    config.write_text(for_this_machine(text, relay_servers.endpoints, test_certificate.chain.parent))
    checked = run_check(binary, config)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, f"{config}:\n{output}"
    assert_reports_closed(output, [listener["name"] for listener in smtp])
