"""A fleet: three mail-tls-proxy replicas behind one load balancer, sharing
one session ticket key file, in front of a real Postfix and Dovecot.

    client 127.0.0.2 -> HAProxy 127.0.0.1 -> replica a|b|c -> Postfix / Dovecot
                   (round robin, PROXY v2)      (XCLIENT, PROXY v2 naming the client)

HAProxy (`mode tcp`, `balance roundrobin`, `send-proxy-v2`) checks each
replica's `/readyz` on its metrics port (`option httpchk`, `check port`),
and redispatches a connection a dead replica refuses (`option redispatch`,
`retries`).  Besides the round-robin frontends, one frontend per replica and
listener reaches that replica alone, for clients that cannot choose their
source address (`openssl s_client` connects from 127.0.0.1, which the
replicas trust to send a PROXY header, so it must come through HAProxy).

The tests: a TLS session from one replica resumes on another (Python's ssl
and `openssl s_client -sess_out/-sess_in`, implicit TLS and STARTTLS), with
the resuming replica's access log and metrics saying so; `mail-tls-proxy
tickets rotate` on the shared file is picked up by every replica without a
restart, old tickets resume while their key is in the file and get a full
handshake once it is dropped; one replica SIGKILLed and another reloaded
(SIGHUP, a changed setting) while clients log in and send mail through
HAProxy: only sessions on the killed replica fail, every session on the
others succeeds, new sessions avoid the dead one; and Dovecot and Postfix
log the real client (127.0.0.2), never HAProxy or a replica.

Everything lives in DIR/fleet/: HAProxy's configuration, log and socket,
and per replica DIR/fleet/<name>/ with its configuration, JSON log and pid."""

from __future__ import annotations

import base64
import dataclasses
import imaplib
import itertools
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from evidence import (
    LOG_WAIT_SECONDS,
    dovecot_login_line,
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
from proxy_config import CertificateConfig, ListenerConfig, ProxyConfig, key_values
from identity_backends import SMTPD_XCLIENT_FROM_PROXY, identity_backends
from proxy_process import built_proxy_binary
from servers import MailServers, pick_free_loopback_ports, stop_child, tail_of_file
from source_address import CLIENT_TIMEOUT_SECONDS, Imaps, connect_from, imap_login_from, smtp_from

CLIENT_IP = "127.0.0.2"
BALANCER_IP = "127.0.0.1"  # HAProxy connects to the replicas from here (`source`)
REPLICAS = ("a", "b", "c")
SERVERS_DIR_NAME = "fleet-servers"
FLEET_DIR_NAME = "fleet"
ABANDONED_CONFIGS = {"haproxy.pid": "haproxy.cfg", "proxy.pid": "proxy.toml"}
TICKET_LIFETIME_SECONDS = 3600
CHECK_INTERVAL_MS = 300


@dataclasses.dataclass(frozen=True)
class FleetListener:
    name: str
    protocol: str
    tls: str
    client_identity: str
    backend: str  # key into the backends' extra ports


FLEET_LISTENERS = (
    FleetListener("imaps", "imap", "implicit", "proxy-v2", "imap_haproxy"),
    FleetListener("imap", "imap", "starttls", "proxy-v2", "imap_haproxy"),
    FleetListener("submission", "smtp", "starttls", "xclient", "smtp_xclient"),
)


def balanced(listener: str) -> str:
    """The round-robin frontend in front of every replica."""
    return f"fleet-{listener}"


def only(replica: str, listener: str) -> str:
    """The frontend that reaches one replica."""
    return f"only-{replica}-{listener}"


FRONTENDS = tuple([balanced(spec.name) for spec in FLEET_LISTENERS]
                  + [only(replica, spec.name) for replica in REPLICAS for spec in FLEET_LISTENERS])


# -- the replicas -------------------------------------------------------------------

@dataclasses.dataclass
class Replica:
    name: str
    directory: Path
    ports: dict[str, int]
    metrics_port: int
    process: subprocess.Popen | None = None

    @property
    def config_file(self) -> Path:
        return self.directory / "proxy.toml"

    @property
    def log_file(self) -> Path:
        return self.directory / "proxy.log"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def readyz(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def records(self, start: int = 0) -> list[dict]:
        """The JSON log records after byte offset start."""
        return json_log_records(self.log_file, start)

    def access_lines(self, start: int = 0) -> list[dict]:
        return [r for r in self.records(start) if r.get("message") == "session"]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include these; 0 when
    there is none."""
    total = 0.0
    for sample_labels, value in re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}}\s+(\S+)$", text, re.M):
        if labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', sample_labels)).items():
            total += float(value)
    for value in re.findall(rf"^{re.escape(name)}\s+(\S+)$", text, re.M):
        if not labels:
            total += float(value)
    return total


def write_replica_config(replica: Replica, certificate_dir: Path, ticket_keys: Path, backend_ports: dict[str, int],
                         idle_timeout: int | None = None) -> None:
    text = ProxyConfig(
        hostname="proxy.e2e.test",
        certificates=[CertificateConfig(certificate_dir / "fullchain.pem", certificate_dir / "privkey.pem")],
        metrics_port=replica.metrics_port,
        # Fast backend checks: /readyz is HAProxy's health check.
        readiness_interval=1,
        shutdown_grace=5,
        listeners=[
            ListenerConfig(spec.name, spec.protocol, spec.tls, listen_port=replica.ports[spec.name],
                           backend=backend_ports[spec.backend], client_identity=spec.client_identity,
                           accept_proxy_from=[f"{BALANCER_IP}/32"], idle_timeout=idle_timeout)
            for spec in FLEET_LISTENERS
        ],
    ).to_toml()
    text += "\n[tls]\n" + key_values([("ticket_keys", str(ticket_keys)),
                                      ("ticket_lifetime", TICKET_LIFETIME_SECONDS)])
    replica.config_file.write_text(text)


def launch_replica(replica: Replica, binary: Path) -> None:
    environment = dict(os.environ, NO_COLOR="1", MAIL_TLS_PROXY_LOG="info", MAIL_TLS_PROXY_LOG_FORMAT="json")
    with open(replica.log_file, "ab") as log:
        replica.process = subprocess.Popen(
            [str(binary), "run", "--config", str(replica.config_file)], cwd=replica.directory,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environment)
    (replica.directory / "proxy.pid").write_text(f"{replica.process.pid}\n")


def wait_until_ready(replica: Replica, seconds: float = 30) -> str | None:
    """None once /readyz answers 200, else what went wrong."""
    deadline = time.monotonic() + seconds
    while replica.readyz() != 200:
        if replica.process.poll() is not None:
            return f"replica {replica.name} exited with code {replica.process.poll()} during start-up"
        if time.monotonic() > deadline:
            return f"replica {replica.name} not ready within {seconds:.0f}s"
        time.sleep(0.1)
    return None


def stop_replica(replica: Replica) -> None:
    stop_child(replica.process, grace_seconds=15)


def new_ticket_key() -> str:
    return base64.b64encode(os.urandom(80)).decode()


# -- HAProxy ------------------------------------------------------------------------

def write_haproxy_config(path: Path, lb_dir: Path, ports: dict[str, int], replicas: dict[str, Replica]) -> None:
    lines = global_and_defaults(lb_dir, BALANCER_IP,
                                # A connection a dead replica refuses is
                                # retried on another one at once.
                                "option redispatch 1", "retries 3", "timeout connect 2s")
    for spec in FLEET_LISTENERS:
        name = balanced(spec.name)
        lines += [
            "", f"frontend {name}", f"    bind 127.0.0.1:{ports[name]}", f"    default_backend {name}",
            "", f"backend {name}",
            "    balance roundrobin",
            # The health check is the replica's /readyz on its metrics port.
            "    option httpchk",
            "    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost",
            "    http-check expect status 200",
            f"    default-server send-proxy-v2 check inter {CHECK_INTERVAL_MS}ms rise 1 fall 1",
            *(f"    server {replica.name} 127.0.0.1:{replica.ports[spec.name]} check port {replica.metrics_port}"
              for replica in replicas.values()),
        ]
        for replica in replicas.values():
            single = only(replica.name, spec.name)
            lines += [
                "", f"frontend {single}", f"    bind 127.0.0.1:{ports[single]}", f"    default_backend {single}",
                "", f"backend {single}",
                f"    server {replica.name} 127.0.0.1:{replica.ports[spec.name]} send-proxy-v2",
            ]
    path.write_text("\n".join(lines) + "\n")


# -- fixtures -----------------------------------------------------------------------

@dataclasses.dataclass
class Fleet:
    servers: MailServers
    replicas: dict[str, Replica]
    haproxy: RunningHaproxy
    ticket_keys: Path
    certificate: Path
    binary: Path
    backend_ports: dict[str, int]
    certificate_dir: Path

    def via(self, listener: str) -> int:
        return self.haproxy.ports[balanced(listener)]

    def via_only(self, replica: str, listener: str) -> int:
        return self.haproxy.ports[only(replica, listener)]

    def offsets(self) -> dict[str, int]:
        offsets = {name: log_offset(replica.log_file) for name, replica in self.replicas.items()}
        offsets.update(haproxy=log_offset(self.haproxy.log_file), postfix=log_offset(self.servers.postfix_log),
                       dovecot=log_offset(self.servers.dovecot_log))
        return offsets


@pytest.fixture(scope="module")
def fleet_servers(scratch_dir) -> MailServers:
    yield from identity_backends(
        scratch_dir, SERVERS_DIR_NAME,
        # Each trusts only the replicas' address (127.0.0.1) for what they
        # say about the client.
        {"smtp_xclient": [SMTPD_XCLIENT_FROM_PROXY]},
        before_start=find_haproxy,
        on_abandoned=lambda abandoned: stop_abandoned_processes(abandoned.parent / FLEET_DIR_NAME, ABANDONED_CONFIGS))


@pytest.fixture(scope="module")
def fleet(fleet_servers, test_certificate, scratch_dir) -> Fleet:
    binary = built_proxy_binary()
    fleet_dir = scratch_dir / FLEET_DIR_NAME
    fleet_dir.mkdir(exist_ok=True)
    ticket_keys = fleet_dir / "ticket-keys"
    ticket_keys.write_text(new_ticket_key() + "\n")
    ticket_keys.chmod(0o600)
    backend_ports = dict(fleet_servers.endpoints.extra_ports)
    replicas: dict[str, Replica] = {}
    try:
        for name in REPLICAS:
            for attempt in range(3):
                *ports, metrics_port = pick_free_loopback_ports(len(FLEET_LISTENERS) + 1)
                directory = fleet_dir / name
                directory.mkdir(exist_ok=True)
                replica = Replica(name, directory, dict(zip([s.name for s in FLEET_LISTENERS], ports)), metrics_port)
                write_replica_config(replica, test_certificate.chain.parent, ticket_keys, backend_ports)
                launch_replica(replica, binary)
                problem = wait_until_ready(replica)
                if problem is None:
                    replicas[name] = replica
                    break
                stop_replica(replica)
                if "address" not in tail_of_file(replica.log_file).lower() or attempt == 2:
                    pytest.fail(f"{problem}; log:\n{tail_of_file(replica.log_file)}", pytrace=False)
        haproxy = start_haproxy(fleet_dir, FRONTENDS,
                                lambda path, ports: write_haproxy_config(path, fleet_dir, ports, replicas))
        try:
            setup = Fleet(servers=fleet_servers, replicas=replicas, haproxy=haproxy, ticket_keys=ticket_keys,
                          certificate=test_certificate.chain, binary=binary, backend_ports=backend_ports,
                          certificate_dir=test_certificate.chain.parent)
            wait_for_servers_up(setup, REPLICAS)
            yield setup
        finally:
            stop_haproxy(haproxy)
    finally:
        for replica in replicas.values():
            stop_replica(replica)


def wait_for_servers_up(fleet: Fleet, names, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while True:
        states = {spec.name: fleet.haproxy.server_status(balanced(spec.name)) for spec in FLEET_LISTENERS}
        if all(states[listener].get(name) == "UP" for listener in states for name in names):
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.1)


@pytest.fixture(scope="module")
def client_context(test_certificate) -> ssl.SSLContext:
    """One context for every connection (a session resumes only within the
    context that made it); TLS 1.3, whose tickets arrive after the
    handshake."""
    context = ssl.create_default_context(cafile=str(test_certificate.chain))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


# -- clients ------------------------------------------------------------------------

@dataclasses.dataclass
class TlsResult:
    reused: bool
    client: tuple[str, int]
    session: ssl.SSLSession


def imaps_handshake(context: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None) -> TlsResult:
    """An implicit-TLS IMAP connection from CLIENT_IP: handshake, greeting
    (which also brings the tickets), LOGOUT."""
    with connect_from(CLIENT_IP, "127.0.0.1", port) as raw:
        client = raw.getsockname()
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            greeting = tls.recv(4096)
            assert greeting.startswith(b"* OK"), greeting
            tls.sendall(b"a LOGOUT\r\n")
            answer = b""
            while b"a OK" not in answer:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                answer += chunk
            return TlsResult(reused=tls.session_reused, client=client, session=tls.session)


def access_line_for(replica: Replica, client: tuple[str, int], start: int) -> dict:
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while True:
        for record in replica.access_lines(start):
            if (record.get("client_ip"), record.get("client_port")) == client:
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no access line for {client} in {replica.log_file}; tail:\n"
                                 f"{tail_of_file(replica.log_file)}")
        time.sleep(0.1)


def resumed_handshakes(replica: Replica, listener: str) -> float:
    return metric_value(replica.metrics(), "mail_tls_proxy_tls_resumptions_total", listener=listener)


# -- 1. a session from one replica resumes on another ---------------------------------

def test_a_session_from_one_replica_resumes_on_another(fleet, client_context):
    a, b = fleet.replicas["a"], fleet.replicas["b"]
    first = imaps_handshake(client_context, a.ports["imaps"])
    assert not first.reused
    start = b.log_file.stat().st_size
    resumed_before = resumed_handshakes(b, "imaps")
    second = imaps_handshake(client_context, b.ports["imaps"], session=first.session)
    assert second.reused, "replica b did not resume the session replica a made"
    line = access_line_for(b, second.client, start)
    assert line["resumed"] is True and line["tls_version"] == "TLSv1.3", line
    assert resumed_handshakes(b, "imaps") == resumed_before + 1
    # And a full handshake is logged as such.
    assert access_line_for(a, first.client, 0)["resumed"] is False


def test_a_session_resumes_on_every_replica_through_the_load_balancer(fleet, client_context):
    first = imaps_handshake(client_context, fleet.replicas["c"].ports["imaps"])
    start = fleet.offsets()
    clients = []
    for _ in REPLICAS:
        result = imaps_handshake(client_context, fleet.via("imaps"), session=first.session)
        assert result.reused, result.client
        clients.append(result.client)
    served_by = {}
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while len(served_by) < len(clients) and time.monotonic() < deadline:
        for name, replica in fleet.replicas.items():
            for record in replica.access_lines(start[name]):
                if (record.get("client_ip"), record.get("client_port")) in clients:
                    assert record["resumed"] is True, record
                    served_by[(record["client_ip"], record["client_port"])] = name
        time.sleep(0.1)
    served_by = set(served_by.values())
    # Round robin: the three connections went to the three replicas.
    assert served_by == set(REPLICAS), served_by


def s_client(port: int, ca_file: Path, session_option: list[str], starttls: str | None, commands: str) -> str:
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
               "-CAfile", str(ca_file), "-verify_return_error", "-tls1_3", "-crlf", "-ign_eof", "-msg",
               *session_option]
    if starttls:
        command += ["-starttls", starttls]
    result = subprocess.run(command, input=commands, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def tickets_received(output: str) -> int:
    """NewSessionTicket messages s_client received (its -msg trace)."""
    return sum(1 for line in output.splitlines() if line.startswith("<<<") and "NewSessionTicket" in line)


@pytest.mark.parametrize("listener, starttls, commands", [
    ("imaps", None, "a LOGOUT\n"),
    ("imap", "imap", "a LOGOUT\n"),
    ("submission", "smtp", "QUIT\n"),
])
def test_openssl_session_from_replica_a_is_reused_on_replica_b(fleet, tmp_path, listener, starttls, commands):
    session = tmp_path / f"{listener}.pem"
    first = s_client(fleet.via_only("a", listener), fleet.certificate, ["-sess_out", str(session)], starttls, commands)
    assert "New, TLSv1.3" in first, first
    assert session.stat().st_size > 0
    start = fleet.offsets()
    second = s_client(fleet.via_only("b", listener), fleet.certificate, ["-sess_in", str(session)], starttls, commands)
    assert "Reused, TLSv1.3" in second, second
    # Two new tickets after the full handshake, one after the resumed one.
    assert (tickets_received(first), tickets_received(second)) == (2, 1), first + second
    # Replica b's access line: the client is s_client's address (HAProxy's
    # header names it), and the session was resumed.
    b = fleet.replicas["b"]
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while not [r for r in b.access_lines(start["b"]) if r.get("listener") == listener]:
        assert time.monotonic() < deadline, tail_of_file(b.log_file)
        time.sleep(0.1)
    line = [r for r in b.access_lines(start["b"]) if r.get("listener") == listener][-1]
    assert line["resumed"] is True and line["client_ip"] == "127.0.0.1", line
    assert line["starttls"] is (starttls is not None), line


# -- 2. ticket key rotation ----------------------------------------------------------

def ticket_key_reloads(replica: Replica) -> float:
    return metric_value(replica.metrics(), "mail_tls_proxy_ticket_key_reloads_total", result="ok")


def rotate(fleet: Fleet, *arguments: str) -> None:
    """`mail-tls-proxy tickets rotate` on the shared file; returns once every
    replica has reloaded it (its reload counter moved)."""
    before = {name: ticket_key_reloads(replica) for name, replica in fleet.replicas.items()}
    result = subprocess.run([str(fleet.binary), "tickets", "rotate", "--file", str(fleet.ticket_keys), *arguments],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    deadline = time.monotonic() + 10
    for name, replica in fleet.replicas.items():
        while ticket_key_reloads(replica) <= before[name]:
            assert replica.process.poll() is None, tail_of_file(replica.log_file)
            assert time.monotonic() < deadline, f"replica {name} did not reload the ticket keys:\n" \
                                                f"{tail_of_file(replica.log_file)}"
            time.sleep(0.1)


def key_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_rotation_keeps_old_tickets_while_their_key_is_in_the_file(fleet, client_context):
    a, b, c = (fleet.replicas[name] for name in REPLICAS)
    pids = {name: replica.process.pid for name, replica in fleet.replicas.items()}
    keys_before = key_lines(fleet.ticket_keys)
    old = imaps_handshake(client_context, a.ports["imaps"])

    rotate(fleet)  # a new key seals; the previous one still opens
    keys_after = key_lines(fleet.ticket_keys)
    assert keys_after[:-1] == keys_before[-len(keys_after) + 1:] and keys_after[-1] not in keys_before
    assert imaps_handshake(client_context, b.ports["imaps"], session=old.session).reused
    new = imaps_handshake(client_context, c.ports["imaps"])
    assert imaps_handshake(client_context, a.ports["imaps"], session=new.session).reused

    rotate(fleet, "--keep", "1")  # the key that sealed `old` is gone
    assert len(key_lines(fleet.ticket_keys)) == 1
    start = b.log_file.stat().st_size
    full = imaps_handshake(client_context, b.ports["imaps"], session=old.session)
    assert not full.reused, "a ticket under a dropped key was accepted"
    assert access_line_for(b, full.client, start)["resumed"] is False
    # Tickets under the key now in the file resume anywhere, and no replica restarted.
    assert imaps_handshake(client_context, c.ports["imaps"], session=full.session).reused
    assert {name: replica.process.pid for name, replica in fleet.replicas.items()} == pids
    assert all(replica.process.poll() is None for replica in fleet.replicas.values())


# -- 3. the mail servers see the real client -----------------------------------------

def test_dovecot_and_postfix_log_the_real_client_not_the_balancer_or_a_replica(fleet, client_context):
    start = fleet.offsets()
    imap_client = imap_login_from("127.0.0.1", fleet.via("imaps"), "implicit", CLIENT_IP, client_context,
                                  fleet.servers.endpoints.user, fleet.servers.endpoints.password)
    login = dovecot_login_line(fleet.servers.dovecot_log, "imap", fleet.servers.endpoints.user, start["dovecot"])
    assert f"rip={CLIENT_IP}," in login and "rip=127.0.0.1," not in login, login

    message = make_message("fleet-identity", fleet.servers.endpoints.address)
    with smtp_from("127.0.0.1", fleet.via("submission"), "starttls", CLIENT_IP, client_context) as smtp:
        assert smtp.sendmail(SENDER_ADDRESS, [fleet.servers.endpoints.address], message.raw) == {}
    received = topmost_received(wait_for_delivery(fleet.servers.endpoints, message))
    assert f"(unknown [{CLIENT_IP}])" in received and "[127.0.0.1]" not in received, received
    queue_id = re.search(r"\bid ([0-9A-F]+)\b", received).group(1)
    line = wait_for_log_line(fleet.servers.postfix_log,
                             rf"postfix/smtp_xclient/smtpd\[\d+\]: {queue_id}: client=(\S+)$", start["postfix"])
    assert line.group(1) == f"unknown[{CLIENT_IP}]", line.group(0)
    # The replica that served the IMAP session logged the client too.
    served = [name for name, replica in fleet.replicas.items()
              if any((r.get("client_ip"), r.get("client_port")) == imap_client for r in replica.access_lines(start[name]))]
    assert len(served) == 1, served


# -- 4. one replica killed and one reloaded under load -------------------------------

@dataclasses.dataclass
class Session:
    kind: str
    client: tuple[str, int] | None
    started: float
    ended: float
    error: str | None


# Client ports for the load test, each used once: the logs of HAProxy and
# of the replicas then name every session by its port alone.  Below the
# ephemeral range, where nothing else picks ports.
_load_ports = itertools.count(20000 + os.getpid() % 4000)
_load_ports_lock = threading.Lock()


def connect_once(port: int, timeout: float | None) -> socket.socket:
    """A connection from CLIENT_IP on a client port no other session of the
    test uses."""
    while True:
        with _load_ports_lock:
            source_port = next(_load_ports)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((CLIENT_IP, source_port))
        except OSError:
            sock.close()
            continue
        try:
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return sock


class RecordedImaps(Imaps):
    """Imaps that writes its client address into `record` as soon as the
    TCP connection exists, before the handshake that may fail."""

    def __init__(self, port: int, context: ssl.SSLContext, record: dict):
        self.record = record
        super().__init__("127.0.0.1", port, CLIENT_IP, context)

    def _create_socket(self, timeout):
        raw = connect_once(self.port, timeout)
        self.record["client"] = raw.getsockname()
        return self.ssl_context.wrap_socket(raw, server_hostname=self.host)


class RecordedSmtp(smtplib.SMTP):
    def __init__(self, record: dict):
        self.record = record
        super().__init__(timeout=CLIENT_TIMEOUT_SECONDS, source_address=(CLIENT_IP, 0))
        self._host = "127.0.0.1"  # the name STARTTLS checks the certificate for (it has IP:127.0.0.1)

    def _get_socket(self, host, port, timeout):
        sock = connect_once(port, timeout)
        self.record["client"] = sock.getsockname()
        return sock


def imaps_session(fleet: Fleet, context: ssl.SSLContext, record: dict) -> None:
    """A real login: LOGIN, SELECT, NOOP, LOGOUT."""
    client = RecordedImaps(fleet.via("imaps"), context, record)
    assert client.login(fleet.servers.endpoints.user, fleet.servers.endpoints.password)[0] == "OK"
    assert client.select("INBOX", readonly=True)[0] == "OK"
    assert client.noop()[0] == "OK"
    assert client.logout()[0] == "BYE"


def submission_session(fleet: Fleet, context: ssl.SSLContext, record: dict, sequence: int) -> None:
    """EHLO, STARTTLS, EHLO, one message to the test user, QUIT."""
    smtp = RecordedSmtp(record)
    try:
        smtp.connect("127.0.0.1", fleet.via("submission"))
        smtp.ehlo("client.e2e.test")
        smtp.starttls(context=context)
        smtp.ehlo("client.e2e.test")
        message = make_message(f"fleet-load-{sequence}", fleet.servers.endpoints.address)
        assert smtp.sendmail(SENDER_ADDRESS, [fleet.servers.endpoints.address], message.raw) == {}
        assert smtp.quit()[0] == 221
    finally:
        smtp.close()


def client_loop(fleet: Fleet, context: ssl.SSLContext, worker: int, stop: threading.Event,
                sessions: list[Session], lock: threading.Lock) -> None:
    sequence = 0
    while not stop.is_set():
        sequence += 1
        kind = "imaps" if (worker + sequence) % 2 else "submission"
        started = time.monotonic()
        record: dict = {}
        error = None
        try:
            if kind == "imaps":
                imaps_session(fleet, context, record)
            else:
                submission_session(fleet, context, record, worker * 1000 + sequence)
        except Exception as exc:  # a failure is what is measured here
            error = f"{type(exc).__name__}: {exc}"
        with lock:
            sessions.append(Session(kind, record.get("client"), started, time.monotonic(), error))


def haproxy_servers(fleet: Fleet, start: int) -> dict[int, str]:
    """Client port -> the replica HAProxy finally connected it to.  (HAProxy
    logs to stderr without blocking, so under load a line may be missing.)"""
    text = fleet.haproxy.log_file.read_bytes()[start:].decode(errors="replace")
    return {int(port): server for port, server in re.findall(
        rf"^lb frontend=fleet-\S+ client={re.escape(CLIENT_IP)}:(\d+) balancer=\S+ server=\S+/(\S+)$", text, re.M)}


def access_lines_by_port(fleet: Fleet, start: dict[str, int]) -> dict[int, tuple[str, dict]]:
    """Client port -> (replica, its access line)."""
    found = {}
    for name, replica in fleet.replicas.items():
        for record in replica.access_lines(start[name]):
            if record.get("client_ip") == CLIENT_IP:
                found[record["client_port"]] = (name, record)
    return found


def test_killing_one_replica_and_reloading_another_fails_only_the_killed_replicas_sessions(fleet, client_context):
    a, b = fleet.replicas["a"], fleet.replicas["b"]
    start = fleet.offsets()
    config_reloads = metric_value(a.metrics(), "mail_tls_proxy_config_reloads_total", result="ok")
    sessions: list[Session] = []
    lock = threading.Lock()
    stop = threading.Event()
    workers = [threading.Thread(target=client_loop, args=(fleet, client_context, n, stop, sessions, lock))
               for n in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2)
        # A changed setting for replica a's new sessions, applied by SIGHUP.
        write_replica_config(a, fleet.certificate_dir, fleet.ticket_keys, fleet.backend_ports, idle_timeout=600)
        a.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while metric_value(a.metrics(), "mail_tls_proxy_config_reloads_total", result="ok") <= config_reloads:
            assert time.monotonic() < deadline, tail_of_file(a.log_file)
            time.sleep(0.1)
        time.sleep(1)
        # A session held open on b, logged in, ends with it.
        held = RecordedImaps(fleet.via_only("b", "imaps"), client_context, {})
        assert held.login(fleet.servers.endpoints.user, fleet.servers.endpoints.password)[0] == "OK"
        killed_at = time.monotonic()
        b.process.kill()
        b.process.wait(timeout=10)
        # HAProxy's /readyz check marks it down.
        deadline = time.monotonic() + 5
        while any(fleet.haproxy.server_status(balanced(spec.name)).get("b") != "DOWN" for spec in FLEET_LISTENERS):
            assert time.monotonic() < deadline, fleet.haproxy.command("show stat")
            time.sleep(0.05)
        down_at = time.monotonic()
        with pytest.raises((OSError, imaplib.IMAP4.abort, ssl.SSLError)):
            held.noop()
        time.sleep(3)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)

    ports = [s.client[1] for s in sessions if s.client]
    assert len(ports) == len(set(ports))
    # A session's access line is written as its replica ends it, after the
    # client is done; replica b's last ones died with it.
    expected = {s.client[1] for s in sessions if not s.error and s.ended < killed_at - 1}
    expected |= {s.client[1] for s in sessions if not s.error and s.started > down_at}
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while True:
        served = access_lines_by_port(fleet, start)
        if expected <= served.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    balanced_to = haproxy_servers(fleet, start["haproxy"])

    def replica_of(session: Session) -> str | None:
        if session.client is None:
            return None
        port = session.client[1]
        return served[port][0] if port in served else balanced_to.get(port)

    failed = [s for s in sessions if s.error]
    succeeded = [s for s in sessions if not s.error]
    summary = [(s.kind, s.client, replica_of(s), s.error) for s in failed]

    # Every session succeeded unless it was on replica b, the one killed:
    # the reload of replica a and the death of b cost the other replicas'
    # sessions nothing.  Each is in its replica's access log, and where
    # HAProxy logged it, HAProxy names the same replica.
    assert expected <= served.keys(), sorted(expected - served.keys())
    for session in succeeded:
        port = session.client[1]
        if port in served and port in balanced_to:
            assert served[port][0] == balanced_to[port], (session, served[port], balanced_to[port])
    for session in sessions:
        if replica_of(session) in ("a", "c"):
            assert session.error is None, (session, replica_of(session))
    for session in failed:
        assert session.client is not None, summary
        port = session.client[1]
        assert port not in served and balanced_to.get(port, "b") == "b", summary
        assert session.started < down_at and session.ended >= killed_at, summary
    assert len(failed) <= 4, summary  # at most the sessions open on b at the time
    # New sessions avoided the dead replica.
    after = [s for s in sessions if s.started > down_at]
    assert after and all(s.error is None and replica_of(s) in ("a", "c") for s in after), \
        [(s.kind, s.client, replica_of(s), s.error) for s in after]
    assert {replica_of(s) for s in after} == {"a", "c"}
    # Round robin gave each replica its share before the kill.
    assert {replica_of(s) for s in succeeded if s.ended < killed_at} >= set(REPLICAS)
    assert {s.kind for s in succeeded} == {"imaps", "submission"}
    # Replica a reloaded once, under load, and stays up.
    assert a.process.poll() is None and fleet.replicas["c"].process.poll() is None
    assert [r for r in a.records(start["a"]) if r.get("message", "").startswith("configuration reloaded")], \
        tail_of_file(a.log_file)
