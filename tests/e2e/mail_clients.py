"""Client-side helpers shared by the end-to-end tests: building test messages,
finding them again over IMAP/POP3, and comparing what came back."""

from __future__ import annotations

import dataclasses
import email.utils
import imaplib
import poplib
import time
import uuid

from servers import MailServerEndpoints

SENDER_ADDRESS = "bob@example.org"
DELIVERY_TIMEOUT_SECONDS = 20


@dataclasses.dataclass(frozen=True)
class MailMessage:
    message_id: str
    subject: str
    raw: bytes  # exactly what the client submits, CRLF line ends

    @property
    def message_id_line(self) -> bytes:
        return f"Message-ID: {self.message_id}".encode()

    @property
    def subject_line(self) -> bytes:
        return f"Subject: {self.subject}".encode()


def make_message(label: str, recipient: str) -> MailMessage:
    """A message whose every byte we control, so the copy read back can be
    compared exactly.  The body has a line starting with "." (SMTP and POP3
    dot-stuffing must undo each other) and a long-ish line."""
    unique = uuid.uuid4().hex
    message_id = f"<{label}-{unique}@e2e.test>"
    subject = f"e2e {label} {unique[:8]}"
    headers = [
        f"From: Bob <{SENDER_ADDRESS}>",
        f"To: Alice <{recipient}>",
        f"Subject: {subject}",
        f"Message-ID: {message_id}",
        f"Date: {email.utils.formatdate(localtime=False)}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
    ]
    body = [
        f"Hello Alice, this is message {label}.",
        ".a line that starts with a dot",
        "..and one that starts with two",
        "x" * 200,
        "",
        "-- ",
        "Bob",
    ]
    raw = ("\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(body) + "\r\n").encode("ascii")
    return MailMessage(message_id=message_id, subject=subject, raw=raw)


def assert_message_intact(fetched: bytes, message: MailMessage, where: str) -> None:
    """The delivered copy = headers Postfix prepends (Return-Path, Received,
    ...) + exactly the bytes we sent."""
    normalized = fetched.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert message.message_id_line + b"\r\n" in normalized, f"{where}: Message-ID line missing"
    assert message.subject_line + b"\r\n" in normalized, f"{where}: Subject line missing"
    assert normalized.endswith(message.raw), (
        f"{where}: delivered message does not end with the submitted bytes\n"
        f"--- submitted ---\n{message.raw!r}\n--- fetched ---\n{normalized!r}"
    )


def imap_uid_for_message_id(client: imaplib.IMAP4, message_id: str) -> str | None:
    status, data = client.uid("SEARCH", "HEADER", "Message-ID", f'"{message_id}"')
    assert status == "OK", (status, data)
    uids = data[0].split()
    return uids[-1].decode() if uids else None


def imap_fetch_by_message_id(client: imaplib.IMAP4, message_id: str) -> bytes | None:
    """Caller has selected INBOX.  BODY.PEEK keeps the \\Seen flag untouched."""
    uid = imap_uid_for_message_id(client, message_id)
    if uid is None:
        return None
    status, data = client.uid("FETCH", uid, "(BODY.PEEK[])")
    assert status == "OK", (status, data)
    literal_parts = [part[1] for part in data if isinstance(part, tuple)]
    assert len(literal_parts) == 1, data
    return literal_parts[0]


def pop3_number_for_message_id(client: poplib.POP3, message_id: str) -> int | None:
    wanted = f"message-id: {message_id}".lower().encode()
    count, _size = client.stat()
    for number in range(1, count + 1):
        _response, header_lines, _octets = client.top(number, 0)
        if any(line.lower() == wanted for line in header_lines):
            return number
    return None


def pop3_retrieve_by_message_id(client: poplib.POP3, message_id: str) -> bytes | None:
    number = pop3_number_for_message_id(client, message_id)
    if number is None:
        return None
    _response, lines, _octets = client.retr(number)
    return b"\r\n".join(lines) + b"\r\n"


def imap_login_direct(servers: MailServerEndpoints) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", servers.imap_port, timeout=15)
    client.login(servers.user, servers.password)
    return client


def pop3_login_direct(servers: MailServerEndpoints) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", servers.pop3_port, timeout=15)
    client.user(servers.user)
    client.pass_(servers.password)
    return client


def wait_for_delivery(servers: MailServerEndpoints, message: MailMessage,
                      timeout: float = DELIVERY_TIMEOUT_SECONDS) -> bytes:
    """Postfix delivers asynchronously; poll the backend IMAP until the
    message is in the INBOX, and return its bytes."""
    deadline = time.monotonic() + timeout
    client = imap_login_direct(servers)
    try:
        while True:
            client.select("INBOX", readonly=True)
            fetched = imap_fetch_by_message_id(client, message.message_id)
            if fetched is not None:
                return fetched
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{message.message_id} not delivered to {servers.address} within {timeout}s "
                    f"(see {servers.base_dir}/postfix/maillog)"
                )
            time.sleep(0.1)
    finally:
        client.logout()


def find_imap_uid_direct(servers: MailServerEndpoints, message: MailMessage) -> str:
    client = imap_login_direct(servers)
    try:
        client.select("INBOX", readonly=True)
        uid = imap_uid_for_message_id(client, message.message_id)
    finally:
        client.logout()
    assert uid is not None, f"{message.message_id} not in INBOX"
    return uid


def find_pop3_number_direct(servers: MailServerEndpoints, message: MailMessage) -> int:
    client = pop3_login_direct(servers)
    try:
        number = pop3_number_for_message_id(client, message.message_id)
    finally:
        client.quit()
    assert number is not None, f"{message.message_id} not in the POP3 maildrop"
    return number
