"""End-to-end tests against real, unmodified Debian Dovecot and Postfix.

Part 1 talks to the plaintext backends directly and proves the harness.
Part 2 goes through mail-tls-proxy (six listeners in one process) with the
stock Python clients, curl, openssl s_client and swaks."""

from __future__ import annotations

import imaplib
import poplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest

from proxy_process import LISTENERS, RunningProxy, unavailable
from mail_clients import (
    SENDER_ADDRESS,
    MailMessage,
    assert_message_intact,
    find_imap_uid_direct,
    find_pop3_number_direct,
    imap_fetch_by_message_id,
    make_message,
    pop3_retrieve_by_message_id,
    wait_for_delivery,
)
from servers import MailServerEndpoints

CLIENT_TIMEOUT_SECONDS = 15
TOOL_TIMEOUT_SECONDS = 30


def send_plain(servers: MailServerEndpoints, message: MailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", servers.smtp_port, timeout=CLIENT_TIMEOUT_SECONDS) as client:
        refused = client.sendmail(SENDER_ADDRESS, [servers.address], message.raw)
    assert refused == {}


# ---------------------------------------------------------------------------
# Part 1: straight to the backends, no proxy, no TLS.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def message_sent_directly(mail_servers) -> MailMessage:
    message = make_message("direct", mail_servers.address)
    send_plain(mail_servers, message)
    wait_for_delivery(mail_servers, message)
    return message


def test_backend_smtp_does_not_offer_starttls_itself(mail_servers):
    # The proxy is what adds STARTTLS; a backend offering it would make the
    # proxy tests meaningless.
    with smtplib.SMTP("127.0.0.1", mail_servers.smtp_port, timeout=CLIENT_TIMEOUT_SECONDS) as client:
        code, _ = client.ehlo("client.e2e.test")
        assert code == 250
        assert not client.has_extn("starttls")


def test_backend_smtp_accepts_and_delivers_mail(mail_servers):
    message = make_message("direct-smtp", mail_servers.address)
    send_plain(mail_servers, message)
    assert_message_intact(wait_for_delivery(mail_servers, message), message, "backend IMAP")


def test_backend_imap_finds_message_by_message_id(mail_servers, message_sent_directly):
    client = imaplib.IMAP4("127.0.0.1", mail_servers.imap_port, timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        assert "STARTTLS" not in client.capabilities
        client.login(mail_servers.user, mail_servers.password)
        client.select("INBOX")
        fetched = imap_fetch_by_message_id(client, message_sent_directly.message_id)
    finally:
        client.logout()
    assert fetched is not None
    assert_message_intact(fetched, message_sent_directly, "backend IMAP")


def test_backend_pop3_retrieves_message(mail_servers, message_sent_directly):
    client = poplib.POP3("127.0.0.1", mail_servers.pop3_port, timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        assert "STLS" not in client.capa()
        client.user(mail_servers.user)
        client.pass_(mail_servers.password)
        fetched = pop3_retrieve_by_message_id(client, message_sent_directly.message_id)
    finally:
        client.quit()
    assert fetched is not None
    assert_message_intact(fetched, message_sent_directly, "backend POP3")


# ---------------------------------------------------------------------------
# Part 2: through mail-tls-proxy.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def message_a_via_smtp_starttls(proxy, tls_context, mail_servers) -> MailMessage:
    """Message A: plaintext EHLO, STARTTLS, EHLO again, then submit."""
    message = make_message("a-starttls", mail_servers.address)
    with smtplib.SMTP(proxy.hostname, proxy.port("smtp", "starttls"), timeout=CLIENT_TIMEOUT_SECONDS) as client:
        client.ehlo("client.e2e.test")
        client.starttls(context=tls_context)
        client.ehlo("client.e2e.test")
        refused = client.sendmail(SENDER_ADDRESS, [mail_servers.address], message.raw)
    assert refused == {}
    return message


@pytest.fixture(scope="module")
def message_b_via_smtp_implicit(proxy, tls_context, mail_servers) -> MailMessage:
    """Message B: TLS from the first byte (465-style)."""
    message = make_message("b-implicit", mail_servers.address)
    with smtplib.SMTP_SSL(proxy.hostname, proxy.port("smtp", "implicit"), context=tls_context,
                          timeout=CLIENT_TIMEOUT_SECONDS) as client:
        client.ehlo("client.e2e.test")
        refused = client.sendmail(SENDER_ADDRESS, [mail_servers.address], message.raw)
    assert refused == {}
    return message


@pytest.fixture(scope="module")
def messages_sent_through_proxy(mail_servers, message_a_via_smtp_starttls, message_b_via_smtp_implicit):
    messages = [message_a_via_smtp_starttls, message_b_via_smtp_implicit]
    for message in messages:
        wait_for_delivery(mail_servers, message)
    return messages


def test_smtp_starttls_listener_advertises_starttls_only_before_tls(proxy, tls_context):
    with smtplib.SMTP(proxy.hostname, proxy.port("smtp", "starttls"), timeout=CLIENT_TIMEOUT_SECONDS) as client:
        client.ehlo("client.e2e.test")
        assert client.has_extn("starttls"), client.esmtp_features
        code, _ = client.starttls(context=tls_context)
        assert code == 220
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo("client.e2e.test")
        assert not client.has_extn("starttls"), client.esmtp_features
        # The backend's own extensions still come through.
        assert client.has_extn("size")


def test_smtp_implicit_listener_does_not_advertise_starttls(proxy, tls_context):
    with smtplib.SMTP_SSL(proxy.hostname, proxy.port("smtp", "implicit"), context=tls_context,
                          timeout=CLIENT_TIMEOUT_SECONDS) as client:
        client.ehlo("client.e2e.test")
        assert not client.has_extn("starttls"), client.esmtp_features


def test_smtp_starttls_listener_delivers_message_a(mail_servers, message_a_via_smtp_starttls):
    delivered = wait_for_delivery(mail_servers, message_a_via_smtp_starttls)
    assert_message_intact(delivered, message_a_via_smtp_starttls, "backend copy of A")


def test_smtp_implicit_listener_delivers_message_b(mail_servers, message_b_via_smtp_implicit):
    delivered = wait_for_delivery(mail_servers, message_b_via_smtp_implicit)
    assert_message_intact(delivered, message_b_via_smtp_implicit, "backend copy of B")


def read_messages_over_imap(client: imaplib.IMAP4, servers: MailServerEndpoints, messages, where: str) -> None:
    client.login(servers.user, servers.password)
    status, _ = client.select("INBOX", readonly=True)
    assert status == "OK"
    for message in messages:
        fetched = imap_fetch_by_message_id(client, message.message_id)
        assert fetched is not None, f"{where}: {message.message_id} not found"
        assert_message_intact(fetched, message, where)


def test_imap_implicit_listener_reads_both_messages(proxy, tls_context, mail_servers, messages_sent_through_proxy):
    client = imaplib.IMAP4_SSL(proxy.hostname, proxy.port("imap", "implicit"), ssl_context=tls_context,
                               timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        assert "STARTTLS" not in client.capabilities
        read_messages_over_imap(client, mail_servers, messages_sent_through_proxy, "IMAP implicit TLS")
    finally:
        client.logout()


def test_imap_starttls_listener_reads_both_messages(proxy, tls_context, mail_servers, messages_sent_through_proxy):
    client = imaplib.IMAP4(proxy.hostname, proxy.port("imap", "starttls"), timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        assert "STARTTLS" in client.capabilities, client.capabilities
        status, _ = client.starttls(ssl_context=tls_context)
        assert status == "OK"
        # imaplib re-reads CAPABILITY after the upgrade.
        assert "STARTTLS" not in client.capabilities, client.capabilities
        read_messages_over_imap(client, mail_servers, messages_sent_through_proxy, "IMAP STARTTLS")
    finally:
        client.logout()


def read_messages_over_pop3(client: poplib.POP3, servers: MailServerEndpoints, messages, where: str) -> None:
    client.user(servers.user)
    client.pass_(servers.password)
    for message in messages:
        fetched = pop3_retrieve_by_message_id(client, message.message_id)
        assert fetched is not None, f"{where}: {message.message_id} not found"
        assert_message_intact(fetched, message, where)


def test_pop3_implicit_listener_reads_both_messages(proxy, tls_context, mail_servers, messages_sent_through_proxy):
    client = poplib.POP3_SSL(proxy.hostname, proxy.port("pop3", "implicit"), context=tls_context,
                             timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        assert "STLS" not in client.capa()
        read_messages_over_pop3(client, mail_servers, messages_sent_through_proxy, "POP3 implicit TLS")
    finally:
        client.quit()


def test_pop3_starttls_listener_reads_both_messages(proxy, tls_context, mail_servers, messages_sent_through_proxy):
    client = poplib.POP3(proxy.hostname, proxy.port("pop3", "starttls"), timeout=CLIENT_TIMEOUT_SECONDS)
    try:
        assert "STLS" in client.capa()
        client.stls(context=tls_context)
        assert "STLS" not in client.capa()
        read_messages_over_pop3(client, mail_servers, messages_sent_through_proxy, "POP3 STLS")
    finally:
        client.quit()


# -- curl --------------------------------------------------------------------

def run_curl(proxy: RunningProxy, url_scheme: str, port: int, path: str, *extra: str) -> subprocess.CompletedProcess:
    if shutil.which("curl") is None:
        unavailable("curl not installed; run tests/e2e/install-deps.sh")
    command = [
        "curl", "--silent", "--show-error", "--ssl-reqd",
        "--cacert", str(proxy.ca_file),
        # Pin "localhost" to the IPv4 address the proxy listens on.
        "--resolve", f"{proxy.hostname}:{port}:127.0.0.1",
        "--max-time", str(TOOL_TIMEOUT_SECONDS),
        f"{url_scheme}://{proxy.hostname}:{port}{path}",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, timeout=TOOL_TIMEOUT_SECONDS + 5)


def assert_curl_succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"curl exited {result.returncode}: {result.stderr.decode(errors='replace')}"


@pytest.mark.parametrize("url_scheme,tls", [("imap", "starttls"), ("imaps", "implicit")])
def test_curl_imap_lists_inbox_and_fetches_message(proxy, mail_servers, messages_sent_through_proxy, url_scheme, tls):
    port = proxy.port("imap", tls)
    credentials = f"{mail_servers.user}:{mail_servers.password}"

    listing = run_curl(proxy, url_scheme, port, "/", "--user", credentials)
    assert_curl_succeeded(listing)
    assert re.search(rb'^\* LIST .*INBOX\s*$', listing.stdout, re.M), listing.stdout

    message = messages_sent_through_proxy[0]
    uid = find_imap_uid_direct(mail_servers, message)
    fetched = run_curl(proxy, url_scheme, port, f"/INBOX;UID={uid}", "--user", credentials)
    assert_curl_succeeded(fetched)
    assert_message_intact(fetched.stdout, message, f"curl {url_scheme}")


@pytest.mark.parametrize("url_scheme,tls", [("pop3", "starttls"), ("pop3s", "implicit")])
def test_curl_pop3_lists_and_retrieves_message(proxy, mail_servers, messages_sent_through_proxy, url_scheme, tls):
    port = proxy.port("pop3", tls)
    credentials = f"{mail_servers.user}:{mail_servers.password}"

    listing = run_curl(proxy, url_scheme, port, "/", "--user", credentials)
    assert_curl_succeeded(listing)
    assert re.search(rb"^1 \d+\r?$", listing.stdout, re.M), listing.stdout

    message = messages_sent_through_proxy[1]
    number = find_pop3_number_direct(mail_servers, message)
    retrieved = run_curl(proxy, url_scheme, port, f"/{number}", "--user", credentials)
    assert_curl_succeeded(retrieved)
    assert_message_intact(retrieved.stdout, message, f"curl {url_scheme}")


@pytest.mark.parametrize("url_scheme,tls", [("smtp", "starttls"), ("smtps", "implicit")])
def test_curl_smtp_sends_message(proxy, mail_servers, scratch_dir, url_scheme, tls):
    message = make_message(f"curl-{url_scheme}", mail_servers.address)
    message_file = scratch_dir / f"curl-{url_scheme}.eml"
    message_file.write_bytes(message.raw)
    result = run_curl(proxy, url_scheme, proxy.port("smtp", tls), "/client.e2e.test",
                      "--mail-from", SENDER_ADDRESS, "--mail-rcpt", mail_servers.address,
                      "--upload-file", str(message_file))
    assert_curl_succeeded(result)
    assert_message_intact(wait_for_delivery(mail_servers, message), message, f"curl {url_scheme} delivery")


# -- openssl s_client ----------------------------------------------------------

# What to say once TLS is up, and what the backend must answer inside TLS.
S_CLIENT_SCRIPTS = {
    "smtp": (b"EHLO client.e2e.test\r\nNOOP\r\nQUIT\r\n", [rb"^250[ -]", rb"^221 "], b"STARTTLS"),
    "imap": (b"a1 CAPABILITY\r\na2 NOOP\r\na3 LOGOUT\r\n", [rb"^\* CAPABILITY ", rb"^a1 OK", rb"^a3 OK"], b"STARTTLS"),
    "pop3": (b"CAPA\r\nNOOP\r\nQUIT\r\n", [rb"^\+OK", rb"^USER\r?$"], b"STLS"),
}


def run_s_client(proxy: RunningProxy, protocol: str, tls: str) -> bytes:
    if shutil.which("openssl") is None:
        unavailable("openssl not installed; run tests/e2e/install-deps.sh")
    script, _, _ = S_CLIENT_SCRIPTS[protocol]
    command = [
        "openssl", "s_client",
        "-connect", f"127.0.0.1:{proxy.port(protocol, tls)}",
        "-servername", proxy.hostname,
        "-verify_hostname", proxy.hostname,
        "-CAfile", str(proxy.ca_file),
        "-verify_return_error",
        # Keep reading after stdin ends until the server closes (after QUIT
        # or LOGOUT); this also turns off s_client's Q/R/k command letters.
        "-ign_eof",
    ]
    if tls == "starttls":
        command += ["-starttls", protocol]
    result = subprocess.run(command, input=script, capture_output=True, timeout=TOOL_TIMEOUT_SECONDS)
    output = result.stdout
    assert result.returncode == 0, (
        f"s_client exited {result.returncode}\nstdout:\n{output.decode(errors='replace')}\n"
        f"stderr:\n{result.stderr.decode(errors='replace')}"
    )
    return output


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("protocol", ["smtp", "imap", "pop3"])
def test_openssl_s_client_handshake_and_protocol_inside_tls(proxy, protocol, tls):
    output = run_s_client(proxy, protocol, tls)
    assert b"Verify return code: 0 (ok)" in output, output.decode(errors="replace")
    # s_client consumes the plaintext STARTTLS exchange silently and prints
    # the handshake summary first, so everything after it came through TLS.
    inside_tls = output.split(b"Verify return code: 0 (ok)", 1)[1]
    _, expected_replies, upgrade_keyword = S_CLIENT_SCRIPTS[protocol]
    for pattern in expected_replies:
        assert re.search(pattern, inside_tls, re.M), (pattern, inside_tls.decode(errors="replace"))
    assert upgrade_keyword not in inside_tls, "capabilities inside TLS must not offer the upgrade again"


# -- swaks -----------------------------------------------------------------------

@pytest.mark.parametrize("tls_option,tls", [("--tls", "starttls"), ("--tls-on-connect", "implicit")])
def test_swaks_sends_message(proxy, mail_servers, tls_option, tls):
    if shutil.which("swaks") is None:
        unavailable("swaks not installed; run tests/e2e/install-deps.sh")
    message = make_message(f"swaks-{tls}", mail_servers.address)
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(proxy.port("smtp", tls)),
         tls_option, "--tls-verify", "--tls-ca-path", str(proxy.ca_file), "--tls-sni", proxy.hostname,
         "--ehlo", "client.e2e.test", "--from", SENDER_ADDRESS, "--to", mail_servers.address,
         # "-" reads the complete message (headers and body) from stdin.
         "--data", "-", "--timeout", str(TOOL_TIMEOUT_SECONDS)],
        # swaks always puts its own CRLF before the final ".", so drop ours.
        input=message.raw.removesuffix(b"\r\n"), capture_output=True, timeout=TOOL_TIMEOUT_SECONDS + 5,
    )
    transcript = result.stdout.decode(errors="replace")
    assert result.returncode == 0, f"swaks exited {result.returncode}\n{transcript}\n{result.stderr.decode(errors='replace')}"
    assert "TLS started" in transcript, transcript
    assert_message_intact(wait_for_delivery(mail_servers, message), message, f"swaks {tls_option} delivery")


# -- metrics -----------------------------------------------------------------------

def greet_through_listener(proxy: RunningProxy, spec, tls_context: ssl.SSLContext) -> bytes:
    """One complete connection: TLS handshake (implicit listeners) and the
    backend's greeting line, then a clean close."""
    with socket.create_connection(("127.0.0.1", proxy.ports[spec.name]), timeout=CLIENT_TIMEOUT_SECONDS) as raw:
        if spec.tls == "implicit":
            with tls_context.wrap_socket(raw, server_hostname=proxy.hostname) as tls:
                return tls.recv(4096)
        return raw.recv(4096)


def scrape_metrics(proxy: RunningProxy) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def connection_counts_by_listener(metrics_text: str) -> dict[str, float]:
    """Sum of mail_tls_proxy_connections_total per listener="NAME" label,
    whatever other labels the samples carry."""
    counts: dict[str, float] = {}
    for labels, value in re.findall(r"^mail_tls_proxy_connections_total\{([^}]*)\}\s+(\S+)", metrics_text, re.M):
        for spec in LISTENERS:
            if re.search(rf'(^|,)listener="{re.escape(spec.name)}"', labels):
                counts[spec.name] = counts.get(spec.name, 0.0) + float(value)
    return counts


def test_metrics_endpoint_counts_connections_per_listener(proxy, tls_context):
    for spec in LISTENERS:
        greeting = greet_through_listener(proxy, spec, tls_context)
        assert greeting[:1] in (b"2", b"*", b"+"), (spec.name, greeting)
    # Counters may be updated when a connection ends; allow a moment.
    deadline = time.monotonic() + 5
    while True:
        text = scrape_metrics(proxy)
        counts = connection_counts_by_listener(text)
        if all(counts.get(spec.name, 0) >= 1 for spec in LISTENERS) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for spec in LISTENERS:
        assert counts.get(spec.name, 0) >= 1, (
            f"no mail_tls_proxy_connections_total sample >= 1 labelled {spec.name!r} in:\n{text}"
        )


def test_healthz_returns_200(proxy):
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/healthz", timeout=10) as response:
        assert response.status == 200
