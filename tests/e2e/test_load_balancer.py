"""mail-tls-proxy behind a real load balancer: Debian's HAProxy in `mode tcp`
sends the PROXY protocol (v1 with `send-proxy`, v2 with `send-proxy-v2`) to
listeners with `accept_proxy_from = ["127.0.0.1/32"]`, in front of a real
Postfix and Dovecot.

    client 127.0.0.2/.3 -> HAProxy 127.0.0.1 -> mail-tls-proxy -> Postfix/Dovecot
                       (PROXY v1/v2 naming the client)   (XCLIENT, PROXY v1/v2)

Every one of the six classic listeners (SMTP submission and SMTPS, IMAP and
IMAPS, POP3 and POP3S) sits behind two HAProxy frontends, one per PROXY
version; a seventh listener has `max_connections_per_ip = 2`.  The tests
prove from the backends' own evidence (Postfix's Received header and maillog,
Dovecot's login line), from the proxy's log and from its /metrics that the
client is the address in HAProxy's header, not HAProxy's; that a header from
an untrusted source is refused and one missing from a trusted source drops
the connection; and that HAProxy's own health checks (`check-send-proxy`: v1
with the balancer's own addresses, v2 LOCAL) are served.

HAProxy runs in the foreground (`haproxy -f CFG -db`) with its config, log and
stats socket in DIR/lb/; its log line for each client connection names the
address it connected to the proxy from (`%bi:%bp`)."""

from __future__ import annotations

import dataclasses
import os
import re
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from evidence import (
    LOG_WAIT_SECONDS,
    dovecot_login_line as dovecot_login,
    json_log_records,
    log_offset,
    topmost_received,
    wait_for_log_line,
)
from haproxy import (
    RunningHaproxy,
    find_haproxy,
    global_and_defaults,
    start_haproxy,
    stop_abandoned_processes,
    stop_haproxy,
)
from mail_clients import SENDER_ADDRESS, make_message, wait_for_delivery
from proxy_config import CertificateConfig, ListenerConfig, ProxyConfig
from identity_backends import SMTPD_PROXY_PROTOCOL, SMTPD_XCLIENT_FROM_PROXY, identity_backends
from proxy_process import RunningProxy, built_proxy_binary, stop_proxy
from source_address import (
    CLIENT_TIMEOUT_SECONDS,
    connect_from as connect_from_address,
    imap_login_from,
    pop3_login_from,
    read_until_closed,
    smtp_from,
)
from servers import MailServers, pick_free_loopback_ports, tail_of_file

CLIENT_IP = "127.0.0.2"
OTHER_CLIENT_IP = "127.0.0.3"
BALANCER_IP = "127.0.0.1"  # HAProxy connects to the proxy from here (`source`)
SPOOFED_IP = "203.0.113.9"
PROXY_HOSTNAME = "proxy.e2e.test"
PROXY_HEADER_TIMEOUT_SECONDS = 3
PER_IP_LIMIT = 2
HEALTH_WAIT_SECONDS = 30
SERVERS_DIR_NAME = "lb-servers"
LB_DIR_NAME = "lb"
BACKEND_BANNER = "220 mail.e2e.test ESMTP e2e"


@dataclasses.dataclass(frozen=True)
class LbListener:
    name: str
    protocol: str         # smtp | imap | pop3
    tls: str              # implicit | starttls
    client_identity: str  # how the proxy tells the backend
    backend: str          # key into the backend ports
    versions: tuple[str, ...] = ("v1", "v2")  # HAProxy frontends in front of it
    max_connections_per_ip: int | None = None


LB_LISTENERS = (
    LbListener("submission", "smtp", "starttls", "xclient", "smtp_xclient"),
    LbListener("smtps", "smtp", "implicit", "proxy-v2", "smtp_haproxy"),
    LbListener("imap", "imap", "starttls", "proxy-v1", "imap_haproxy"),
    LbListener("imaps", "imap", "implicit", "proxy-v2", "imap_haproxy"),
    LbListener("pop3", "pop3", "starttls", "proxy-v2", "pop3_haproxy"),
    LbListener("pop3s", "pop3", "implicit", "proxy-v1", "pop3_haproxy"),
    LbListener("limited", "smtp", "starttls", "xclient", "smtp_xclient", versions=("v2",),
               max_connections_per_ip=PER_IP_LIMIT),
)
LISTENER_BY_NAME = {spec.name: spec for spec in LB_LISTENERS}
# The HAProxy backend whose health check sends no PROXY header at all.
NO_HEADER_CONTROL = "control-no-header"
NO_HEADER_CONTROL_TARGET = "pop3"
# The pid files an abandoned run leaves in DIR/lb/, and the configuration each process runs.
ABANDONED_CONFIGS = {"haproxy.pid": "haproxy.cfg", "proxy.pid": "proxy.toml"}


def frontend_name(listener: str, version: str) -> str:
    return f"{listener}-{version}"


FRONTENDS = tuple(frontend_name(spec.name, version) for spec in LB_LISTENERS for version in spec.versions)


# -- HAProxy -----------------------------------------------------------------------

HEALTH_DIALOGUE = {
    # After the greeting, a clean goodbye: the check only passes if the
    # proxy relayed the real backend's banner (after TLS, on implicit
    # listeners) and its answer to a command.
    "smtp": [f'tcp-check expect string "{BACKEND_BANNER}"',
             'tcp-check send "QUIT\\r\\n"',
             'tcp-check expect string "221 2.0.0 Bye"'],
    "imap": ['tcp-check expect string "* OK"',
             'tcp-check send "a LOGOUT\\r\\n"',
             'tcp-check expect string "a OK Logout completed"'],
    "pop3": ['tcp-check expect string "+OK"',
             'tcp-check send "QUIT\\r\\n"',
             'tcp-check expect string "+OK Logging out"'],
}


def write_haproxy_config(path: Path, lb_dir: Path, frontend_ports: dict[str, int],
                         proxy_ports: dict[str, int], ca_file: Path) -> None:
    lines = global_and_defaults(lb_dir, BALANCER_IP)
    for spec in LB_LISTENERS:
        for version in spec.versions:
            name = frontend_name(spec.name, version)
            send = "send-proxy" if version == "v1" else "send-proxy-v2"
            # check-ssl: the check speaks TLS after its PROXY header, and
            # verifies the proxy's certificate like a client would.
            tls_check = (f" check-ssl verify required ca-file {ca_file} verifyhost localhost check-sni localhost"
                         if spec.tls == "implicit" else "")
            lines += [
                "",
                f"frontend {name}",
                f"    bind 127.0.0.1:{frontend_ports[name]}",
                f"    default_backend {name}",
                "",
                f"backend {name}",
                "    option tcp-check",
                *(f"    {rule}" for rule in HEALTH_DIALOGUE[spec.protocol]),
                f"    server proxy 127.0.0.1:{proxy_ports[spec.name]} {send} "
                f"check check-send-proxy inter 1s rise 1 fall 1{tls_check}",
            ]
    # The control: the same kind of check without any PROXY header must fail,
    # or the UP states above would prove nothing.
    lines += [
        "",
        f"backend {NO_HEADER_CONTROL}",
        "    option tcp-check",
        '    tcp-check send "CAPA\\r\\n"',
        '    tcp-check expect string "+OK"',
        f"    server proxy 127.0.0.1:{proxy_ports[NO_HEADER_CONTROL_TARGET]} check inter 1s rise 1 fall 1",
    ]
    path.write_text("\n".join(lines) + "\n")


# -- fixtures ----------------------------------------------------------------------

@dataclasses.dataclass
class LbSetup:
    servers: MailServers
    proxy: RunningProxy
    haproxy: RunningHaproxy

    def via(self, listener: str, version: str) -> int:
        """The HAProxy frontend port for this listener and PROXY version."""
        return self.haproxy.ports[frontend_name(listener, version)]

    def direct(self, listener: str) -> int:
        """The proxy's own listener port (not through HAProxy)."""
        return self.proxy.ports[listener]


@pytest.fixture(scope="module")
def lb_servers(scratch_dir) -> MailServers:
    # HAProxy is looked for before anything is started for it; a run that
    # was killed left a balancer and a proxy in front of its backends.
    yield from identity_backends(
        scratch_dir, SERVERS_DIR_NAME,
        {
            # Each trusts only the proxy (127.0.0.1) for what it says about
            # the client; relaying is then judged on the client's address.
            "smtp_haproxy": [SMTPD_PROXY_PROTOCOL],
            "smtp_xclient": [SMTPD_XCLIENT_FROM_PROXY],
        },
        before_start=find_haproxy,
        on_abandoned=lambda abandoned: stop_abandoned_processes(abandoned.parent / LB_DIR_NAME, ABANDONED_CONFIGS))


def write_proxy_config(path: Path, certificate_dir: Path, ports: dict[str, int], metrics_port: int,
                       backend_ports: dict[str, int]) -> None:
    ProxyConfig(
        hostname=PROXY_HOSTNAME,
        certificates=[CertificateConfig(certificate_dir / "fullchain.pem", certificate_dir / "privkey.pem")],
        metrics_port=metrics_port,
        listeners=[
            ListenerConfig(
                spec.name, spec.protocol, spec.tls, listen_port=ports[spec.name],
                backend=backend_ports[spec.backend], client_identity=spec.client_identity,
                accept_proxy_from=[f"{BALANCER_IP}/32"],
                proxy_header_timeout=PROXY_HEADER_TIMEOUT_SECONDS,
                max_connections_per_ip=spec.max_connections_per_ip,
            )
            for spec in LB_LISTENERS
        ],
    ).write(path)


PROBE_IP = "127.0.0.9"  # not in accept_proxy_from


def wait_for_lb_proxy(running: RunningProxy) -> str | None:
    """None once every port accepts connections, else what went wrong.  The
    probes come from PROBE_IP: from 127.0.0.1, a trusted source, a probe
    without a header would count as a rejected connection."""
    waiting_for = set(running.ports.values()) | {running.metrics_port}
    deadline = time.monotonic() + 30
    while waiting_for:
        if running.process.poll() is not None:
            return f"mail-tls-proxy exited with code {running.process.poll()} during start-up"
        for port in sorted(waiting_for):
            try:
                connect_from(PROBE_IP, port, timeout=0.5).close()
                waiting_for.discard(port)
            except OSError:
                pass
        if waiting_for and time.monotonic() > deadline:
            return f"mail-tls-proxy did not listen on {sorted(waiting_for)} within 30s"
        if waiting_for:
            time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def lb(lb_servers, test_certificate, scratch_dir) -> LbSetup:
    binary = built_proxy_binary()
    lb_dir = scratch_dir / LB_DIR_NAME
    lb_dir.mkdir(exist_ok=True)
    endpoints = lb_servers.endpoints
    backend_ports = dict(endpoints.extra_ports)
    config_file = lb_dir / "proxy.toml"
    log_file = lb_dir / "proxy.log"
    names = [spec.name for spec in LB_LISTENERS]
    for attempt in range(3):
        *listener_ports, metrics_port = pick_free_loopback_ports(len(names) + 1)
        ports = dict(zip(names, listener_ports))
        write_proxy_config(config_file, test_certificate.chain.parent, ports, metrics_port, backend_ports)
        # JSON lines: the connection span's fields (listener, peer) are
        # exact members; debug for the session's closing line.
        environment = dict(os.environ, NO_COLOR="1", MAIL_TLS_PROXY_LOG="info,mail_tls_proxy=debug")
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [str(binary), "--log-format", "json", "run", "--config", str(config_file)], cwd=scratch_dir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environment,
            )
        (lb_dir / "proxy.pid").write_text(f"{process.pid}\n")
        running = RunningProxy(ports=ports, metrics_port=metrics_port, ca_file=test_certificate.chain,
                               hostname="localhost", config_file=config_file, log_file=log_file,
                               process=process)
        problem = wait_for_lb_proxy(running)
        if problem is None:
            break
        stop_proxy(running)
        if "address" not in tail_of_file(log_file).lower() or attempt == 2:
            pytest.fail(f"{problem}; log:\n{tail_of_file(log_file)}", pytrace=False)
    try:
        haproxy = start_haproxy(
            lb_dir, FRONTENDS,
            lambda path, frontend_ports: write_haproxy_config(path, lb_dir, frontend_ports, ports,
                                                               test_certificate.chain))
        try:
            yield LbSetup(servers=lb_servers, proxy=running, haproxy=haproxy)
        finally:
            stop_haproxy(haproxy)
    finally:
        stop_proxy(running)


# -- clients from a chosen loopback address ---------------------------------------

def connect_from(source_ip: str, port: int, timeout: float | None = CLIENT_TIMEOUT_SECONDS) -> socket.socket:
    return connect_from_address(source_ip, "127.0.0.1", port, timeout)


def client_hello() -> bytes:
    """The first flight of a real TLS client, as raw bytes."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello  # a handshake record
    return hello


def without_waiting_line(received: bytes) -> list[bytes]:
    """Reply lines, minus Dovecot's "Waiting for authentication process"
    line that a loaded Dovecot may send before its real greeting."""
    return [line for line in received.split(b"\r\n")
            if not line.startswith(b"* OK Waiting for authentication process")]


# -- evidence: logs and metrics -------------------------------------------------------

def proxy_log_records(setup: LbSetup, start: int = 0) -> list[dict]:
    return json_log_records(setup.proxy.log_file, start)


def wait_for_proxy_record(setup: LbSetup, start: int, predicate, what: str) -> dict:
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while True:
        for record in proxy_log_records(setup, start):
            if predicate(record):
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no proxy log record {what}; tail:\n{tail_of_file(setup.proxy.log_file)}")
        time.sleep(0.1)


def balancer_address_for(setup: LbSetup, frontend: str, client: tuple[str, int], start: int) -> str:
    """From HAProxy's log: the address:port HAProxy connected to the proxy
    from for this client connection."""
    line = wait_for_log_line(
        setup.haproxy.log_file,
        rf"^lb frontend={re.escape(frontend)} client={re.escape(client[0])}:{client[1]} "
        rf"balancer=(\S+) server={re.escape(frontend)}/proxy$", start)
    return line.group(1)


def assert_proxy_logged_the_client(setup: LbSetup, listener: str, frontend: str, client: tuple[str, int],
                                   proxy_log_start: int, haproxy_log_start: int) -> None:
    """The proxy's log names the client HAProxy relayed (its exact
    address:port), never the connection HAProxy made for it."""
    client_peer = f"{client[0]}:{client[1]}"
    # "session closed", or "session ended" when the client left without a
    # TLS close_notify (Python's clients do).
    closing = wait_for_proxy_record(
        setup, proxy_log_start,
        lambda r: r.get("peer") == client_peer and r.get("message") in ("session closed", "session ended"),
        f"closing the session of peer={client_peer}")
    assert closing.get("listener") == listener, closing
    balancer = balancer_address_for(setup, frontend, client, haproxy_log_start)
    assert balancer.startswith(f"{BALANCER_IP}:"), balancer
    named_balancer = [r for r in proxy_log_records(setup, proxy_log_start) if r.get("peer") == balancer]
    assert named_balancer == [], named_balancer


def scrape_metrics(setup: LbSetup) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{setup.proxy.metrics_port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0 when the counter has not been
    touched yet (no sample exported)."""
    for sample_labels, value in re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}}\s+(\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', sample_labels)) == labels:
            return float(value)
    return 0.0


def rejected_for_proxy_header(setup: LbSetup, listener: str) -> float:
    return metric_value(scrape_metrics(setup), "mail_tls_proxy_rejected_connections_total",
                        listener=listener, reason="proxy_header")


def dovecot_login_line(setup: LbSetup, service: str, start: int) -> str:
    return dovecot_login(setup.servers.dovecot_log, service, setup.servers.endpoints.user, start)


def assert_backends_never_heard_of(setup: LbSetup, address: str, start: dict[str, int]) -> None:
    for log, key in ((setup.servers.postfix_log, "postfix"), (setup.servers.dovecot_log, "dovecot")):
        text = log.read_bytes()[start[key]:].decode(errors="replace")
        assert address not in text, text


def offsets(setup: LbSetup) -> dict[str, int]:
    return {"proxy": log_offset(setup.proxy.log_file), "haproxy": log_offset(setup.haproxy.log_file),
            "postfix": log_offset(setup.servers.postfix_log), "dovecot": log_offset(setup.servers.dovecot_log)}


# -- 7. HAProxy's health checks ----------------------------------------------------------

def test_haproxy_health_checks_with_proxy_headers_are_served(lb):
    """`check-send-proxy`: HAProxy 2.6 sends `PROXY TCP4 <its address>
    <server address> <ports>` (send-proxy) and a v2 LOCAL header
    (send-proxy-v2) on its checks.  Each check then speaks the protocol to
    the real backend through the proxy (TLS first on implicit listeners), so
    L7OK means the proxy served the balancer's own connection.  The control
    check, without a header, must fail."""
    def settled(row: dict[str, str]) -> bool:
        return not row["check_status"].startswith("* ") and row["check_status"] not in ("", "INI", "UNK")

    deadline = time.monotonic() + HEALTH_WAIT_SECONDS
    while True:
        stats = lb.haproxy.server_stats()
        served = {name: stats[name] for name in FRONTENDS}
        control = stats[NO_HEADER_CONTROL]
        done = (all(row["status"] == "UP" and row["check_status"] == "L7OK" for row in served.values())
                and settled(control) and control["status"] == "DOWN")
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    summary = {name: (row["status"], row["check_status"], row["check_desc"]) for name, row in stats.items()}
    for name, row in served.items():
        assert (row["status"], row["check_status"]) == ("UP", "L7OK"), summary
    assert control["status"] == "DOWN", summary
    assert control["check_status"] != "L7OK", summary
    # The control's connections reached the proxy and were dropped for the
    # missing header.
    assert rejected_for_proxy_header(lb, NO_HEADER_CONTROL_TARGET) >= 1


# -- 1 and 3. Postfix sees the client HAProxy relayed -------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("listener", ["submission", "smtps"])
def test_postfix_sees_the_client_behind_haproxy(lb, tls_context, listener, version):
    spec = LISTENER_BY_NAME[listener]
    start = offsets(lb)
    message = make_message(f"lb-{listener}-{version}", lb.servers.endpoints.address)
    # The certificate has IP:127.0.0.1.
    with smtp_from("127.0.0.1", lb.via(listener, version), spec.tls, CLIENT_IP, tls_context) as client:
        client_address = client.sock.getsockname()
        refused = client.sendmail(SENDER_ADDRESS, [lb.servers.endpoints.address], message.raw)
        assert refused == {}
        client.quit()
    received = topmost_received(wait_for_delivery(lb.servers.endpoints, message))
    # "from client.e2e.test (unknown [127.0.0.2]) by mail.e2e.test (Postfix) with ESMTP..."
    assert f"(unknown [{CLIENT_IP}])" in received, received
    assert "[127.0.0.1]" not in received, received
    queue_id = re.search(r"\bid ([0-9A-F]+)\b", received)
    assert queue_id, received
    # The smtpd service logs as postfix/<its extra_smtpd name>/smtpd.
    line = wait_for_log_line(lb.servers.postfix_log,
                             rf"postfix/{spec.backend}/smtpd\[\d+\]: {queue_id.group(1)}: client=(\S+)$",
                             start["postfix"])
    assert line.group(1) == f"unknown[{CLIENT_IP}]", line.group(0)
    assert_proxy_logged_the_client(lb, listener, frontend_name(listener, version), client_address,
                                   start["proxy"], start["haproxy"])


# -- 2 and 3. Dovecot sees the client HAProxy relayed ---------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("listener", ["imap", "imaps"])
def test_dovecot_imap_sees_the_client_behind_haproxy(lb, tls_context, listener, version):
    start = offsets(lb)
    client_address = imap_login_from("127.0.0.1", lb.via(listener, version), LISTENER_BY_NAME[listener].tls,
                                     CLIENT_IP, tls_context, lb.servers.endpoints.user, lb.servers.endpoints.password)
    line = dovecot_login_line(lb, "imap", start["dovecot"])
    assert f"rip={CLIENT_IP}," in line, line
    assert "rip=127.0.0.1," not in line, line
    assert_proxy_logged_the_client(lb, listener, frontend_name(listener, version), client_address,
                                   start["proxy"], start["haproxy"])


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("listener", ["pop3", "pop3s"])
def test_dovecot_pop3_sees_the_client_behind_haproxy(lb, tls_context, listener, version):
    start = offsets(lb)
    client_address = pop3_login_from("127.0.0.1", lb.via(listener, version), LISTENER_BY_NAME[listener].tls,
                                     CLIENT_IP, tls_context, lb.servers.endpoints.user, lb.servers.endpoints.password)
    line = dovecot_login_line(lb, "pop3", start["dovecot"])
    assert f"rip={CLIENT_IP}," in line, line
    assert "rip=127.0.0.1," not in line, line
    assert_proxy_logged_the_client(lb, listener, frontend_name(listener, version), client_address,
                                   start["proxy"], start["haproxy"])


# -- 4. max_connections_per_ip counts the real clients ---------------------------------------

TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections, try again later\r\n"


def open_smtp(port: int, source_ip: str) -> smtplib.SMTP:
    client = smtplib.SMTP(timeout=CLIENT_TIMEOUT_SECONDS, source_address=(source_ip, 0))
    code, banner = client.connect("127.0.0.1", port)
    assert (code, banner.decode()) == (220, BACKEND_BANNER[4:]), (code, banner)
    code, _ = client.ehlo("client.e2e.test")
    assert code == 250
    return client


def test_max_connections_per_ip_counts_the_clients_behind_haproxy(lb):
    port = lb.via("limited", "v2")
    start = offsets(lb)
    before = metric_value(scrape_metrics(lb), "mail_tls_proxy_rejected_connections_total",
                          listener="limited", reason="max_connections_per_ip")
    first = open_smtp(port, CLIENT_IP)
    second = open_smtp(port, CLIENT_IP)
    try:
        with connect_from(CLIENT_IP, port) as third:
            third_address = third.getsockname()
            refused = read_until_closed(third)
        assert refused == TOO_MANY_CONNECTIONS, refused
        # Meanwhile another client behind the same balancer is served.
        other = open_smtp(port, OTHER_CLIENT_IP)
        code, _ = other.noop()
        assert code == 250
        other.quit()
        # The two first sessions are still alive.
        assert first.noop()[0] == 250 and second.noop()[0] == 250
    finally:
        first.close()
        second.close()
    after = metric_value(scrape_metrics(lb), "mail_tls_proxy_rejected_connections_total",
                         listener="limited", reason="max_connections_per_ip")
    assert after - before == 1, (before, after)
    refusal = wait_for_proxy_record(
        lb, start["proxy"],
        lambda r: r.get("peer") == f"{third_address[0]}:{third_address[1]}" and "limit reached" in r.get("message", ""),
        f"'limit reached' for {third_address}")
    assert (refusal.get("listener"), refusal.get("limit")) == ("limited", "max_connections_per_ip"), refusal
    # Slots are given back per client too: 127.0.0.2 is served again once
    # its sessions have ended.
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while True:
        with connect_from(CLIENT_IP, port) as again:
            greeting = again.recv(4096)
        if greeting != TOO_MANY_CONNECTIONS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert greeting == f"{BACKEND_BANNER}\r\n".encode(), greeting


# -- 5. a header from a source not in accept_proxy_from is refused ------------------------------

CLIENT_PROXY_HEADER_REFUSAL = {
    "smtp": b"554 5.7.0 PROXY protocol headers are not accepted from clients\r\n",
    "imap": b"* BYE PROXY protocol headers are not accepted from clients\r\n",
    "pop3": b"-ERR PROXY protocol headers are not accepted from clients\r\n",
}
GREETING_START = {"smtp": f"{BACKEND_BANNER}\r\n".encode(), "imap": b"* OK ", "pop3": b"+OK "}


@pytest.mark.parametrize("listener", ["submission", "imap", "pop3"])
def test_an_untrusted_source_sending_a_header_is_refused(lb, listener):
    """127.0.0.2 is a client, not a balancer: its header is a command the
    proxy refuses with the protocol's error, and the backend, which gets the
    proxy's own account of the client, never hears of the spoofed address."""
    spec = LISTENER_BY_NAME[listener]
    start = offsets(lb)
    with connect_from(CLIENT_IP, lb.direct(listener)) as sock:
        sock.sendall(f"PROXY TCP4 {SPOOFED_IP} 127.0.0.1 1234 25\r\n".encode())
        received = read_until_closed(sock)
    lines = without_waiting_line(received)
    assert lines[0].startswith(GREETING_START[spec.protocol].rstrip(b"\r\n")), received
    assert received.endswith(CLIENT_PROXY_HEADER_REFUSAL[spec.protocol]), received
    assert len(lines) == 3 and lines[2] == b"", received  # greeting, refusal, nothing after
    if spec.protocol == "smtp":
        wait_for_log_line(lb.servers.postfix_log, r"postfix/smtp_xclient/smtpd\[\d+\]: disconnect from ",
                          start["postfix"])
    else:
        wait_for_log_line(lb.servers.dovecot_log, rf"{spec.protocol}-login: (?:Info: )?Disconnected: .*$",
                          start["dovecot"])
    assert_backends_never_heard_of(lb, SPOOFED_IP, start)


# Alert record: type 21, version 3.3, length 2, level fatal (2), decode_error (50).
FATAL_DECODE_ERROR_ALERT = b"\x15\x03\x03\x00\x02\x02\x32"


def test_an_untrusted_source_sending_a_header_to_an_implicit_listener_fails_the_handshake(lb):
    start = offsets(lb)
    with connect_from(CLIENT_IP, lb.direct("smtps")) as sock:
        sock.sendall(f"PROXY TCP4 {SPOOFED_IP} 127.0.0.1 1234 465\r\n".encode())
        received = read_until_closed(sock)
    # No plaintext reply: the "PROXY" bytes are no TLS record, so the
    # handshake ends with a fatal decode_error alert (TLS 1.2 record layer).
    assert received == FATAL_DECODE_ERROR_ALERT, received
    assert_backends_never_heard_of(lb, SPOOFED_IP, start)


# -- 6. a trusted source without a header is dropped -------------------------------------------

def test_a_trusted_source_without_a_header_is_dropped_on_a_starttls_listener(lb):
    before = rejected_for_proxy_header(lb, "submission")
    started = time.monotonic()
    with connect_from(BALANCER_IP, lb.direct("submission")) as sock:
        sock.sendall(b"EHLO x\r\n")
        received = read_until_closed(sock)
    elapsed = time.monotonic() - started
    assert received == b""
    assert elapsed < PROXY_HEADER_TIMEOUT_SECONDS, elapsed  # refused at once, not timed out
    assert rejected_for_proxy_header(lb, "submission") - before == 1


def test_a_trusted_source_without_a_header_is_dropped_on_an_implicit_listener(lb):
    before = rejected_for_proxy_header(lb, "imaps")
    started = time.monotonic()
    with connect_from(BALANCER_IP, lb.direct("imaps")) as sock:
        sock.sendall(client_hello())
        received = read_until_closed(sock)
    elapsed = time.monotonic() - started
    assert received == b""  # not even a TLS alert
    assert elapsed < PROXY_HEADER_TIMEOUT_SECONDS, elapsed
    assert rejected_for_proxy_header(lb, "imaps") - before == 1


def test_a_trusted_source_with_an_incomplete_header_times_out(lb):
    def timeouts() -> float:
        return metric_value(scrape_metrics(lb), "mail_tls_proxy_timeouts_total",
                            listener="smtps", phase="proxy_header")

    before_timeouts, before_rejected = timeouts(), rejected_for_proxy_header(lb, "smtps")
    started = time.monotonic()
    with connect_from(BALANCER_IP, lb.direct("smtps"), timeout=PROXY_HEADER_TIMEOUT_SECONDS + 10) as sock:
        sock.sendall(f"PROXY TCP4 {CLIENT_IP} ".encode())
        received = read_until_closed(sock)
    elapsed = time.monotonic() - started
    assert received == b""
    assert PROXY_HEADER_TIMEOUT_SECONDS - 0.5 <= elapsed < PROXY_HEADER_TIMEOUT_SECONDS + 2, elapsed
    assert timeouts() - before_timeouts == 1
    assert rejected_for_proxy_header(lb, "smtps") == before_rejected
