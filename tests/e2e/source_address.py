"""Clients that connect from a chosen loopback address (Linux routes all of
127/8 to lo), so the client's address differs from the proxy's own
127.0.0.1 and a test can prove which of the two a backend saw."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl

CLIENT_TIMEOUT_SECONDS = 15


def connect_from(source_ip: str, host: str, port: int,
                 timeout: float | None = CLIENT_TIMEOUT_SECONDS) -> socket.socket:
    sock = socket.create_connection((host, port), timeout, source_address=(source_ip, 0))
    assert sock.getsockname()[0] == source_ip
    return sock


class Imap(imaplib.IMAP4):
    def __init__(self, host: str, port: int, source_ip: str):
        self.source_ip = source_ip
        super().__init__(host, port, timeout=CLIENT_TIMEOUT_SECONDS)

    def _create_socket(self, timeout):
        return connect_from(self.source_ip, self.host, self.port, timeout)


class Imaps(imaplib.IMAP4_SSL):
    def __init__(self, host: str, port: int, source_ip: str, context: ssl.SSLContext):
        self.source_ip = source_ip
        super().__init__(host, port, ssl_context=context, timeout=CLIENT_TIMEOUT_SECONDS)

    def _create_socket(self, timeout):
        return self.ssl_context.wrap_socket(connect_from(self.source_ip, self.host, self.port, timeout),
                                            server_hostname=self.host)


class Pop3(poplib.POP3):
    def __init__(self, host: str, port: int, source_ip: str):
        self.source_ip = source_ip
        super().__init__(host, port, timeout=CLIENT_TIMEOUT_SECONDS)

    def _create_socket(self, timeout):
        return connect_from(self.source_ip, self.host, self.port, timeout)


class Pop3s(poplib.POP3_SSL):
    def __init__(self, host: str, port: int, source_ip: str, context: ssl.SSLContext):
        self.source_ip = source_ip
        super().__init__(host, port, context=context, timeout=CLIENT_TIMEOUT_SECONDS)

    def _create_socket(self, timeout):
        return self.context.wrap_socket(connect_from(self.source_ip, self.host, self.port, timeout),
                                        server_hostname=self.host)


def smtp_from(host: str, port: int, tls: str, source_ip: str, context: ssl.SSLContext) -> smtplib.SMTP:
    """An SMTP session from source_ip, EHLO done inside TLS (implicit, or
    after STARTTLS); host is the name the certificate is checked for."""
    if tls == "implicit":
        client = smtplib.SMTP_SSL(host, port, context=context, timeout=CLIENT_TIMEOUT_SECONDS,
                                  source_address=(source_ip, 0))
    else:
        client = smtplib.SMTP(host, port, timeout=CLIENT_TIMEOUT_SECONDS, source_address=(source_ip, 0))
        client.ehlo("client.e2e.test")
        client.starttls(context=context)
    client.ehlo("client.e2e.test")
    assert client.sock.getsockname()[0] == source_ip
    return client


def imap_login_from(host: str, port: int, tls: str, source_ip: str, context: ssl.SSLContext,
                    user: str, password: str) -> tuple[str, int]:
    """LOGIN, SELECT INBOX (read-only), LOGOUT from source_ip, inside TLS
    (implicit, or after STARTTLS); returns the client's address and port."""
    if tls == "implicit":
        client = Imaps(host, port, source_ip, context)
    else:
        client = Imap(host, port, source_ip)
        client.starttls(ssl_context=context)
    try:
        client_address = client.sock.getsockname()
        assert client.login(user, password)[0] == "OK"
        status, _ = client.select("INBOX", readonly=True)
        assert status == "OK"
    finally:
        client.logout()
    return client_address


def pop3_login_from(host: str, port: int, tls: str, source_ip: str, context: ssl.SSLContext,
                    user: str, password: str) -> tuple[str, int]:
    """USER, PASS, STAT, QUIT from source_ip, inside TLS (implicit, or after
    STLS); returns the client's address and port."""
    if tls == "implicit":
        client = Pop3s(host, port, source_ip, context)
    else:
        client = Pop3(host, port, source_ip)
        client.stls(context=context)
    try:
        client_address = client.sock.getsockname()
        client.user(user)
        client.pass_(password)
        client.stat()
    finally:
        client.quit()
    return client_address


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything until the peer closes; a reset (a peer closing with unread
    bytes in its buffer) or a TLS error counts as closed."""
    received = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        received += chunk
    return received
