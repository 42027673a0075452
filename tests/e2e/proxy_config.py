"""The proxy's TOML configuration, built from typed values instead of text.

Every end-to-end test that writes a configuration of its own describes it
with these dataclasses and writes `ProxyConfig.to_toml()`; strings are TOML
basic strings with backslash, double quote and control characters escaped,
so a path or name can hold any character.  Configurations that are broken on
purpose, and the shipped files (examples/, deploy/, the documentation's TOML
blocks) rewritten for a test machine, are text and stay text.

    ProxyConfig(
        hostname="proxy.e2e.test",
        certificates=[CertificateConfig("fullchain.pem", "privkey.pem")],
        metrics_port=9464,
        listeners=[ListenerConfig("imaps", "imap", "implicit", listen_port=993, backend=143)],
    ).write(path)

Fields left at None are not written, so the proxy's own default applies.
`extra` (on both classes) holds keys the dataclasses do not name; they are
written after the named ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path, PurePath
from typing import Mapping, Sequence, Union

LOOPBACK = "127.0.0.1"

# What a configuration value may be: TOML string (a path is written as its
# string), integer, boolean, or an array of those.
TomlScalar = Union[str, PurePath, int, bool]
TomlValue = Union[TomlScalar, Sequence[TomlScalar]]


@dataclasses.dataclass(frozen=True)
class CertificateConfig:
    """One [[certificate]]: chain and key files.  Relative paths resolve
    against the configuration file's directory."""
    cert: str | PurePath
    key: str | PurePath


@dataclasses.dataclass(frozen=True)
class AcmeCertificateConfig:
    """One [[certificate]] the proxy obtains itself over ACME for `names`
    (the first names its directory under the [acme] state_dir)."""
    names: Sequence[str]
    key_type: str | None = None             # ecdsa-p256 | rsa-2048
    reuse_key: bool | None = None
    extra: Mapping[str, TomlValue] = dataclasses.field(default_factory=dict)

    def items(self) -> list[tuple[str, TomlValue | None]]:
        return [("acme", list(self.names)), ("key_type", self.key_type), ("reuse_key", self.reuse_key),
                *self.extra.items()]


@dataclasses.dataclass
class AcmeConfig:
    """The [acme] table: the ACME server, the account and where the
    certificates are kept, and how challenges are answered."""
    directory: str
    state_dir: str | PurePath
    contact: str | None = None
    challenge: str | None = None            # http-01 | tls-alpn-01
    http_listen: str | None = None          # "host:port" of the http-01 responder
    tls_alpn_listen: str | None = None      # "host:port" of the tls-alpn-01 responder
    ca_bundle: str | PurePath | None = None
    renew_before_days: int | None = None
    extra: Mapping[str, TomlValue] = dataclasses.field(default_factory=dict)

    def items(self) -> list[tuple[str, TomlValue | None]]:
        return [
            ("directory", self.directory),
            ("contact", self.contact),
            ("state_dir", self.state_dir),
            ("challenge", self.challenge),
            ("http_listen", self.http_listen),
            ("tls_alpn_listen", self.tls_alpn_listen),
            ("ca_bundle", self.ca_bundle),
            ("renew_before_days", self.renew_before_days),
            *self.extra.items(),
        ]


@dataclasses.dataclass
class ListenerConfig:
    """One [[listener]].  `listen_port` is on `listen_host`; `backend` is a
    port on 127.0.0.1 (int) or a "host:port" string."""
    name: str
    protocol: str   # smtp | imap | pop3
    tls: str        # implicit | starttls
    listen_port: int
    backend: int | str
    client_identity: str | None = None      # none | proxy-v1 | proxy-v2 | xclient
    require_tls: str | None = None          # auth | all | none (starttls listeners only)
    accept_proxy_from: Sequence[str] | None = None
    relay_check: str | None = None          # refuse | warn | off
    proxy_header_timeout: int | None = None
    max_connections_per_ip: int | None = None
    handshake_timeout: int | None = None
    backend_connect_timeout: int | None = None
    idle_timeout: int | None = None
    min_tls_version: str | None = None      # "1.2" | "1.3"
    max_inspected_commands: int | None = None
    sni_strict: bool | None = None
    listen_host: str = LOOPBACK
    extra: Mapping[str, TomlValue] = dataclasses.field(default_factory=dict)

    @property
    def listen(self) -> str:
        return host_and_port(self.listen_host, self.listen_port)

    @property
    def backend_address(self) -> str:
        return host_and_port(LOOPBACK, self.backend) if isinstance(self.backend, int) else self.backend

    def items(self) -> list[tuple[str, TomlValue | None]]:
        return [
            ("name", self.name),
            ("protocol", self.protocol),
            ("tls", self.tls),
            ("listen", self.listen),
            ("backend", self.backend_address),
            ("client_identity", self.client_identity),
            ("require_tls", self.require_tls),
            ("accept_proxy_from", self.accept_proxy_from),
            ("relay_check", self.relay_check),
            ("proxy_header_timeout", self.proxy_header_timeout),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("handshake_timeout", self.handshake_timeout),
            ("backend_connect_timeout", self.backend_connect_timeout),
            ("idle_timeout", self.idle_timeout),
            ("min_tls_version", self.min_tls_version),
            ("max_inspected_commands", self.max_inspected_commands),
            ("sni_strict", self.sni_strict),
            *self.extra.items(),
        ]


@dataclasses.dataclass
class ProxyConfig:
    """The whole file: top-level options, then [acme], [[certificate]]
    (files, or obtained over ACME), [metrics] (on 127.0.0.1:metrics_port)
    and [[listener]] tables."""
    listeners: Sequence[ListenerConfig]
    hostname: str | None = None
    certificates: Sequence[CertificateConfig | AcmeCertificateConfig] = ()
    acme: AcmeConfig | None = None
    metrics_port: int | None = None
    max_connections: int | None = None
    shutdown_grace: int | None = None
    certificate_poll_interval: int | None = None
    readiness_interval: int | None = None
    relay_check_interval: int | None = None
    extra: Mapping[str, TomlValue] = dataclasses.field(default_factory=dict)

    def top_level_items(self) -> list[tuple[str, TomlValue | None]]:
        return [
            ("hostname", self.hostname),
            ("max_connections", self.max_connections),
            ("shutdown_grace", self.shutdown_grace),
            ("certificate_poll_interval", self.certificate_poll_interval),
            ("readiness_interval", self.readiness_interval),
            ("relay_check_interval", self.relay_check_interval),
            *self.extra.items(),
        ]

    def to_toml(self) -> str:
        blocks = [key_values(self.top_level_items())]
        if self.acme is not None:
            blocks.append("[acme]\n" + key_values(self.acme.items()))
        blocks += ["[[certificate]]\n" + key_values(cert.items() if isinstance(cert, AcmeCertificateConfig)
                                                     else [("cert", cert.cert), ("key", cert.key)])
                   for cert in self.certificates]
        if self.metrics_port is not None:
            blocks.append("[metrics]\n" + key_values([("listen", host_and_port(LOOPBACK, self.metrics_port))]))
        blocks += ["[[listener]]\n" + key_values(listener.items()) for listener in self.listeners]
        return "\n".join(block for block in blocks if block)

    def write(self, path: Path) -> Path:
        path.write_text(self.to_toml())
        return path


def host_and_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def key_values(items: Sequence[tuple[str, TomlValue | None]]) -> str:
    """`key = value` lines (each ending in a newline) for the items that are
    not None; a key given twice (a named field again in `extra`) is an error."""
    keys = [key for key, _ in items]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"keys given twice: {', '.join(repeated)}")
    return "".join(f"{toml_key(key)} = {toml_value(value)}\n" for key, value in items if value is not None)


def toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key):
        return key
    return toml_string(key)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped."""
    escaped = "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                      for c in text)
    return f'"{escaped}"'


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, PurePath):
        return toml_string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML value for {value!r} ({type(value).__name__})")
