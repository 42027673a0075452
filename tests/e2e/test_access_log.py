"""The access log against real Dovecot: an IMAPS client logs in and pipelines
`a LOGOUT` with a command behind it, which Dovecot does not read (it closes
after its LOGOUT answer; a close with unread input is a TCP reset).  The
proxy's JSON access line for that client must say how the session ended and
by whom, and count exactly the bytes the client sent and received; the
client must get a clean TLS close (close_notify), not a bare TCP close."""

from __future__ import annotations

import json
import socket
import time

import pytest

from proxy_process import RunningProxy, proxy_binary_path, start_proxy_with_config, stop_proxy, unavailable

LOG_WAIT_SECONDS = 10
CLIENT_TIMEOUT_SECONDS = 10


@pytest.fixture(scope="module")
def json_proxy(mail_servers, test_certificate, scratch_dir) -> RunningProxy:
    binary = proxy_binary_path()
    if not binary.is_file():
        unavailable(f"proxy binary {binary} not built (cargo build, or set MAIL_TLS_PROXY_BIN)")

    def config_text(ports: dict[str, int], metrics_port: int) -> str:
        return (
            '[[certificate]]\ncert = "fullchain.pem"\nkey = "privkey.pem"\n\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n\n'
            '[[listener]]\nname = "imaps"\nprotocol = "imap"\ntls = "implicit"\n'
            f'listen = "127.0.0.1:{ports["imaps"]}"\nbackend = "127.0.0.1:{mail_servers.imap_port}"\n'
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAIL_TLS_PROXY_LOG_FORMAT", "json")
        running = start_proxy_with_config(binary, test_certificate.chain.parent, "access-log", ["imaps"],
                                          config_text, working_dir=scratch_dir)
    try:
        yield running
    finally:
        stop_proxy(running)


def access_line(proxy: RunningProxy, client_port: int) -> dict:
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while True:
        for line in proxy.log_file.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("message") == "session" and record.get("client_port") == client_port:
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no access line for client port {client_port}; log:\n"
                                 + proxy.log_file.read_text(errors="replace")[-4000:])
        time.sleep(0.1)


def test_a_pipelined_logout_ends_with_the_backend_and_a_clean_tls_close(json_proxy, tls_context, mail_servers):
    raw = socket.create_connection(("127.0.0.1", json_proxy.ports["imaps"]), timeout=CLIENT_TIMEOUT_SECONDS)
    client_port = raw.getsockname()[1]
    # An unclean end (no close_notify) raises SSLEOFError instead of reading
    # as the end of the stream.
    tls = tls_context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
    received = b""
    sent = b""

    def read_through(line_start: bytes) -> None:
        """Reads until a complete line starting with `line_start`."""
        nonlocal received
        while not any(line.startswith(line_start) for line in received.split(b"\r\n")[:-1]):
            chunk = tls.recv(4096)
            assert chunk, f"closed early; got {received!r}"
            received += chunk

    def send(data: bytes) -> None:
        nonlocal sent
        tls.sendall(data)
        sent += data

    read_through(b"* OK")
    send(f"l LOGIN {mail_servers.user} {mail_servers.password}\r\n".encode())
    read_through(b"l ")
    assert b"\r\nl OK" in received, received
    send(b"a LOGOUT\r\nb NOOP\r\n")
    while True:
        chunk = tls.recv(4096)  # SSLEOFError here: no close_notify
        if not chunk:
            break
        received += chunk
    tls.close()
    assert b"a OK" in received, received

    record = access_line(json_proxy, client_port)
    print("access line:", json.dumps(record))
    assert record["level"] == "INFO", record
    assert record["listener"] == "imaps", record
    assert record["client_ip"] == "127.0.0.1", record
    assert record["sni"] == "localhost", record
    assert record["tls_version"] in ("TLSv1.3", "TLSv1.2"), record
    assert record["starttls"] is False, record
    assert record["ended_by"] == "backend", record
    assert record["outcome"] in ("error", "backend_closed"), record
    if record["outcome"] == "error":
        assert "backend" in record["reason"], record
    # The LOGOUT's answer came back and Dovecot closed: everything the
    # client sent before that reached it...
    assert record["bytes_to_client"] == len(received), (record, received)
    # ...except perhaps `b NOOP`, written after Dovecot had closed.
    assert record["bytes_to_backend"] in (len(sent), len(sent) - len(b"b NOOP\r\n")), (record, sent)
