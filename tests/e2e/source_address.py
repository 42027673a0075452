"""Clients that connect from a chosen loopback address (Linux routes all of
127/8 to lo), so the client's address differs from the proxy's own
127.0.0.1 and a test can prove which of the two a backend saw."""

from __future__ import annotations

import imaplib
import poplib
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
