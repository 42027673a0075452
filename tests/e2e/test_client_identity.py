"""Telling the backend who the client is, proven with real Postfix and Dovecot.

A private Postfix + Dovecot pair is started with extra listeners for it:

- Postfix smtpd with `smtpd_upstream_proxy_protocol = haproxy` (behind a
  proxy-v1 and a proxy-v2 listener) and smtpd with
  `smtpd_authorized_xclient_hosts = 127.0.0.1` (behind xclient listeners);
- Dovecot IMAP and POP3 listeners with `haproxy = yes` and
  `haproxy_trusted_networks = 127.0.0.1/32` (behind proxy-v2 listeners).

Every client connects from 127.0.0.2 (Linux routes all of 127/8 to lo), the
proxy connects to the backends from 127.0.0.1, and each test asserts from the
backend's own evidence (Postfix's maillog and Received header, Dovecot's log)
that it saw 127.0.0.2.  The last tests show what a backend that does not
expect the PROXY header looks like to the client and in the proxy's log."""

from __future__ import annotations

import dataclasses
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest

from evidence import dovecot_login_line, log_offset, queue_id_of, topmost_received, wait_for_log_line
from identity_backends import SMTPD_PROXY_PROTOCOL, SMTPD_XCLIENT_FROM_PROXY, identity_backends
from mail_clients import SENDER_ADDRESS, MailMessage, make_message, wait_for_delivery
from proxy_config import CertificateConfig, ListenerConfig, ProxyConfig
from proxy_process import (
    RunningProxy,
    built_proxy_binary,
    proxy_binary_path,
    start_proxy_with_config,
    stop_proxy,
)
from source_address import (
    CLIENT_TIMEOUT_SECONDS,
    connect_from,
    imap_login_from,
    pop3_login_from,
    read_until_closed,
    smtp_from,
)
from servers import MailServerEndpoints, MailServers

CLIENT_IP = "127.0.0.2"
PROXY_HOSTNAME = "proxy.e2e.test"
SERVERS_DIR_NAME = "identity-servers"


@dataclasses.dataclass(frozen=True)
class IdentityListener:
    name: str
    protocol: str
    tls: str
    client_identity: str
    backend: str  # key into IdentitySetup.backend_ports


# Each listener names the backend port it fronts: the plain ones ("smtp",
# "imap", "pop3") do not expect a PROXY header.
IDENTITY_LISTENERS = (
    IdentityListener("smtp-v1", "smtp", "starttls", "proxy-v1", "smtp_haproxy"),
    IdentityListener("smtps-v2", "smtp", "implicit", "proxy-v2", "smtp_haproxy"),
    IdentityListener("smtp-xclient", "smtp", "starttls", "xclient", "smtp_xclient"),
    IdentityListener("smtps-xclient", "smtp", "implicit", "xclient", "smtp_xclient"),
    IdentityListener("imaps-v2", "imap", "implicit", "proxy-v2", "imap_haproxy"),
    IdentityListener("imap-v2", "imap", "starttls", "proxy-v2", "imap_haproxy"),
    IdentityListener("pop3s-v2", "pop3", "implicit", "proxy-v2", "pop3_haproxy"),
    IdentityListener("pop3-v2", "pop3", "starttls", "proxy-v2", "pop3_haproxy"),
    # Misconfigured on purpose: a PROXY header to backends that do not expect one.
    IdentityListener("smtp-unexpecting", "smtp", "starttls", "proxy-v2", "smtp"),
    IdentityListener("imaps-unexpecting", "imap", "implicit", "proxy-v2", "imap"),
    IdentityListener("pop3-unexpecting", "pop3", "starttls", "proxy-v1", "pop3"),
)


@dataclasses.dataclass
class IdentitySetup:
    servers: MailServerEndpoints
    proxy: RunningProxy
    postfix_log: Path
    dovecot_log: Path

    def port(self, name: str) -> int:
        return self.proxy.ports[name]


# -- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def identity_servers(scratch_dir) -> MailServers:
    yield from identity_backends(scratch_dir, SERVERS_DIR_NAME, {
        "smtp_haproxy": [SMTPD_PROXY_PROTOCOL],
        "smtp_xclient": [SMTPD_XCLIENT_FROM_PROXY],
    })


def identity_config_text(ports: dict[str, int], metrics_port: int, backend_ports: dict[str, int]) -> str:
    return ProxyConfig(
        hostname=PROXY_HOSTNAME,
        certificates=[CertificateConfig("fullchain.pem", "privkey.pem")],
        metrics_port=metrics_port,
        listeners=[
            ListenerConfig(
                spec.name, spec.protocol, spec.tls, listen_port=ports[spec.name],
                backend=backend_ports[spec.backend], client_identity=spec.client_identity,
                # Plaintext login before STARTTLS is not what these tests are about.
                require_tls="none" if spec.tls == "starttls" else None,
            )
            for spec in IDENTITY_LISTENERS
        ],
    ).to_toml()


@pytest.fixture(scope="module")
def identity(identity_servers, test_certificate, scratch_dir) -> IdentitySetup:
    binary = built_proxy_binary()
    endpoints = identity_servers.endpoints
    backend_ports = {"smtp": endpoints.smtp_port, "imap": endpoints.imap_port, "pop3": endpoints.pop3_port,
                     **endpoints.extra_ports}
    # identity.toml and identity.log next to fullchain.pem / privkey.pem.
    running = start_proxy_with_config(
        binary, test_certificate.chain.parent, "identity", [spec.name for spec in IDENTITY_LISTENERS],
        lambda ports, metrics_port: identity_config_text(ports, metrics_port, backend_ports),
        working_dir=scratch_dir)
    try:
        yield IdentitySetup(servers=endpoints, proxy=running, postfix_log=identity_servers.postfix_log,
                            dovecot_log=identity_servers.dovecot_log)
    finally:
        stop_proxy(running)


# -- clients that connect from 127.0.0.2 -----------------------------------------

def smtp_session(setup: IdentitySetup, listener: str, tls_context: ssl.SSLContext) -> smtplib.SMTP:
    spec = next(spec for spec in IDENTITY_LISTENERS if spec.name == listener)
    return smtp_from("localhost", setup.port(listener), spec.tls, CLIENT_IP, tls_context)


def send_through(setup: IdentitySetup, listener: str, tls_context: ssl.SSLContext, label: str) -> MailMessage:
    message = make_message(label, setup.servers.address)
    with smtp_session(setup, listener, tls_context) as client:
        assert client.sock.getsockname()[0] == CLIENT_IP
        refused = client.sendmail(SENDER_ADDRESS, [setup.servers.address], message.raw)
    assert refused == {}
    return message


# -- reading the backends' evidence --------------------------------------------------

# -- Postfix: PROXY protocol ------------------------------------------------------------

@pytest.mark.parametrize("listener,version", [("smtp-v1", "v1"), ("smtps-v2", "v2")])
def test_postfix_behind_proxy_protocol_sees_the_client_address(identity, tls_context, listener, version):
    message = send_through(identity, listener, tls_context, f"identity-{listener}")
    delivered = wait_for_delivery(identity.servers, message)
    received = topmost_received(delivered)
    # "from client.e2e.test (unknown [127.0.0.2]) by mail.e2e.test (Postfix) with ESMTP(S)..."
    assert f"[{CLIENT_IP}]" in received, received
    assert "[127.0.0.1]" not in received, received
    queue_id = queue_id_of(received)
    line = wait_for_log_line(identity.postfix_log,
                             rf"postfix/smtp_haproxy/smtpd\[\d+\]: {queue_id}: client=(\S+)")
    assert line.group(1) == f"unknown[{CLIENT_IP}]", line.group(0)


# -- Postfix: XCLIENT ---------------------------------------------------------------------

@pytest.mark.parametrize("listener", ["smtp-xclient", "smtps-xclient"])
def test_postfix_behind_xclient_sees_the_client_address(identity, tls_context, listener):
    message = send_through(identity, listener, tls_context, f"identity-{listener}")
    delivered = wait_for_delivery(identity.servers, message)
    received = topmost_received(delivered)
    assert f"[{CLIENT_IP}]" in received, received
    assert "[127.0.0.1]" not in received, received
    # The client's own EHLO name, given after XCLIENT's new greeting.
    assert received.lower().startswith("received: from client.e2e.test "), received
    queue_id = queue_id_of(received)
    line = wait_for_log_line(identity.postfix_log,
                             rf"postfix/smtp_xclient/smtpd\[\d+\]: {queue_id}: client=(\S+)")
    # NAME=[UNAVAILABLE]: "unknown", as for a client without reverse DNS.
    assert line.group(1) == f"unknown[{CLIENT_IP}]", line.group(0)


def test_a_client_xclient_is_refused_and_postfix_never_sees_it(identity, tls_context):
    spoofed = "192.0.2.66"
    start = log_offset(identity.postfix_log)
    with smtp_session(identity, "smtp-xclient", tls_context) as client:
        assert not client.has_extn("xclient"), client.esmtp_features
        code, text = client.docmd("XCLIENT", f"ADDR={spoofed} NAME=trusted.example")
        assert (code, text) == (550, b"5.7.1 XCLIENT and XFORWARD are not accepted from clients")
        code, _ = client.docmd("XFORWARD", f"ADDR={spoofed}")
        assert code == 550
        # Even after a mail transaction: the proxy still reads every command.
        client.mail(SENDER_ADDRESS)
        client.rcpt(identity.servers.address)
        client.rset()
        code, _ = client.docmd("XCLIENT", f"ADDR={spoofed}")
        assert code == 550
        client.quit()
    wait_for_log_line(identity.postfix_log, r"postfix/smtp_xclient/smtpd\[\d+\]: disconnect from ", start)
    log = identity.postfix_log.read_bytes()[start:].decode(errors="replace")
    assert spoofed not in log and "trusted.example" not in log, log
    assert f"unknown[{CLIENT_IP}]" in log, log


# -- Dovecot: PROXY protocol v2 ---------------------------------------------------------------

def login_line(setup: IdentitySetup, service: str, start: int) -> str:
    return dovecot_login_line(setup.dovecot_log, service, setup.servers.user, start)


def assert_tls_known_only_on_implicit_listeners(line: str, listener: str) -> None:
    """Dovecot calls a session "secured" when it knows the client used TLS.
    127.0.0.2 is neither its own address nor in login_trusted_networks, so
    only the PP2_TYPE_SSL TLV can tell it: sent on implicit-TLS listeners; on
    STARTTLS listeners the header went out before TLS, with addresses only."""
    implicit = next(spec for spec in IDENTITY_LISTENERS if spec.name == listener).tls == "implicit"
    assert (", secured," in line) == implicit, line


@pytest.mark.parametrize("listener", ["imaps-v2", "imap-v2"])
def test_dovecot_imap_behind_proxy_v2_sees_the_client_address(identity, tls_context, listener):
    start = log_offset(identity.dovecot_log)
    client = imap_login_from("localhost", identity.port(listener), "implicit" if listener == "imaps-v2" else "starttls",
                             CLIENT_IP, tls_context, identity.servers.user, identity.servers.password)
    assert client[0] == CLIENT_IP
    line = login_line(identity, "imap", start)
    assert f"rip={CLIENT_IP}," in line, line
    assert "rip=127.0.0.1," not in line, line
    assert_tls_known_only_on_implicit_listeners(line, listener)


@pytest.mark.parametrize("listener", ["pop3s-v2", "pop3-v2"])
def test_dovecot_pop3_behind_proxy_v2_sees_the_client_address(identity, tls_context, listener):
    start = log_offset(identity.dovecot_log)
    client = pop3_login_from("localhost", identity.port(listener), "implicit" if listener == "pop3s-v2" else "starttls",
                             CLIENT_IP, tls_context, identity.servers.user, identity.servers.password)
    assert client[0] == CLIENT_IP
    line = login_line(identity, "pop3", start)
    assert f"rip={CLIENT_IP}," in line, line
    assert "rip=127.0.0.1," not in line, line
    assert_tls_known_only_on_implicit_listeners(line, listener)


def test_a_client_sending_a_proxy_header_is_refused_and_dovecot_never_sees_it(identity):
    spoofed = "192.0.2.77"
    start = log_offset(identity.dovecot_log)
    with connect_from(CLIENT_IP, "127.0.0.1", identity.port("imap-v2"), CLIENT_TIMEOUT_SECONDS) as sock:
        sock.sendall(f"PROXY TCP4 {spoofed} 127.0.0.1 4000 143\r\na LOGIN alice secret\r\n".encode())
        received = read_until_closed(sock)
    assert received.startswith(b"* OK"), received
    assert received.endswith(b"* BYE PROXY protocol headers are not accepted from clients\r\n"), received
    # Dovecot saw the proxy's own header (client 127.0.0.2), then a client
    # that went away without a command.
    line = wait_for_log_line(identity.dovecot_log, r"imap-login: (?:Info: )?Disconnected: .*$", start).group(0)
    assert f"rip={CLIENT_IP}," in line, line
    log = identity.dovecot_log.read_bytes()[start:].decode(errors="replace")
    assert spoofed not in log and "Login:" not in log, log


# -- a backend that does not expect the header ----------------------------------------------------

TEMPORARY_FAILURE = {
    "smtp": b"421 4.3.2 Service not available, closing transmission channel\r\n",
    "imap": b"* BYE [UNAVAILABLE] Backend server not available\r\n",
    "pop3": b"-ERR [SYS/TEMP] Backend server not available\r\n",
}


@pytest.mark.parametrize("listener", ["smtp-unexpecting", "imaps-unexpecting", "pop3-unexpecting"])
def test_a_backend_not_expecting_the_header_fails_clearly(identity, tls_context, listener):
    spec = next(spec for spec in IDENTITY_LISTENERS if spec.name == listener)
    start = log_offset(identity.proxy.log_file)
    raw = connect_from(CLIENT_IP, "127.0.0.1", identity.port(listener), CLIENT_TIMEOUT_SECONDS)
    with raw:
        sock = tls_context.wrap_socket(raw, server_hostname="localhost") if spec.tls == "implicit" else raw
        received = read_until_closed(sock)
    # The backend's greeting, then the proxy's temporary failure, then the
    # close. A loaded Dovecot may first send its "Waiting for authentication
    # process" line before the real greeting; that one is not counted.
    received_lines = [line for line in received.split(b"\r\n")
                      if not line.startswith(b"* OK Waiting for authentication process")]
    received_core = b"\r\n".join(received_lines)
    assert received_lines[0][:1] in (b"2", b"*", b"+"), received
    assert received.endswith(TEMPORARY_FAILURE[spec.protocol]), received
    assert received_core.count(b"\r\n") == 2, received
    # And the operator is told what to fix.
    version = "v1" if spec.client_identity == "proxy-v1" else "v2"
    line = wait_for_log_line(identity.proxy.log_file,
                             rf"ERROR .*did not accept the PROXY protocol {version} header.*$", start).group(0)
    assert f"listener={listener}" in line or f'listener="{listener}"' in line or listener in line, line
    assert "smtpd_upstream_proxy_protocol = haproxy" in line and "haproxy_trusted_networks" in line, line


def test_check_warns_about_client_identity(identity):
    result = subprocess.run([str(proxy_binary_path()), "check", "--config", str(identity.proxy.config_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: listener ")]
    assert len(warnings) == len(IDENTITY_LISTENERS), result.stdout
    assert any("smtp-xclient" in line and "smtpd_authorized_xclient_hosts" in line for line in warnings)
    assert any("imaps-v2" in line and "haproxy_trusted_networks" in line for line in warnings)
    assert any("smtp-v1" in line and "smtpd_upstream_proxy_protocol = haproxy" in line for line in warnings)
