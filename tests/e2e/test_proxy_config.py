"""The configuration builder the end-to-end tests write their proxy configs
with (proxy_config.py): the exact TOML it writes for every kind of value,
that TOML parsers read back what it meant, and that the proxy's own
`mail-tls-proxy check --config` accepts it."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from proxy_config import CertificateConfig, ListenerConfig, ProxyConfig, toml_string, toml_value
from proxy_process import proxy_binary_path, run_check, unavailable

# Quote, backslash, control characters and non-ASCII in one string.
AWKWARD = 'a "quoted" C:\\dir\\ tab\tnew\nline\r bell\x07 del\x7f é ✓'
AWKWARD_TOML = r'"a \"quoted\" C:\\dir\\ tab\tnew\nline\r bell\u0007 del\u007F é ✓"'


def every_kind_of_value() -> ProxyConfig:
    return ProxyConfig(
        hostname="proxy.e2e.test",
        certificates=[CertificateConfig("fullchain.pem", "privkey.pem"),
                      CertificateConfig(PurePosixPath("/etc/tls/other.pem"), PurePosixPath("/etc/tls/other.key"))],
        metrics_port=9464,
        max_connections=500,
        shutdown_grace=5,
        certificate_poll_interval=60,
        readiness_interval=10,
        relay_check_interval=3600,
        extra={"future_option": AWKWARD},
        listeners=[
            ListenerConfig("submission", "smtp", "starttls", listen_port=587, backend=2525,
                           client_identity="xclient", require_tls="none",
                           accept_proxy_from=["127.0.0.1/32", "::1"], relay_check="warn",
                           proxy_header_timeout=3, max_connections_per_ip=2, handshake_timeout=10,
                           backend_connect_timeout=5, idle_timeout=300, min_tls_version="1.3",
                           max_inspected_commands=20, sni_strict=True),
            ListenerConfig("imaps", "imap", "implicit", listen_port=993, backend="mail.internal:143",
                           listen_host="::", accept_proxy_from=[], sni_strict=False,
                           extra={"ints": [1, 2], "flags": (True, False), "odd key": "x"}),
        ],
    )


EXPECTED_TOML = f'''\
hostname = "proxy.e2e.test"
max_connections = 500
shutdown_grace = 5
certificate_poll_interval = 60
readiness_interval = 10
relay_check_interval = 3600
future_option = {AWKWARD_TOML}

[[certificate]]
cert = "fullchain.pem"
key = "privkey.pem"

[[certificate]]
cert = "/etc/tls/other.pem"
key = "/etc/tls/other.key"

[metrics]
listen = "127.0.0.1:9464"

[[listener]]
name = "submission"
protocol = "smtp"
tls = "starttls"
listen = "127.0.0.1:587"
backend = "127.0.0.1:2525"
client_identity = "xclient"
require_tls = "none"
accept_proxy_from = ["127.0.0.1/32", "::1"]
relay_check = "warn"
proxy_header_timeout = 3
max_connections_per_ip = 2
handshake_timeout = 10
backend_connect_timeout = 5
idle_timeout = 300
min_tls_version = "1.3"
max_inspected_commands = 20
sni_strict = true

[[listener]]
name = "imaps"
protocol = "imap"
tls = "implicit"
listen = "[::]:993"
backend = "mail.internal:143"
accept_proxy_from = []
sni_strict = false
ints = [1, 2]
flags = [true, false]
"odd key" = "x"
'''


def test_writes_exact_toml_for_every_kind_of_value():
    assert every_kind_of_value().to_toml() == EXPECTED_TOML


def test_a_toml_parser_reads_back_what_was_meant():
    parsed = tomllib.loads(every_kind_of_value().to_toml())
    assert parsed["future_option"] == AWKWARD
    assert parsed["certificate"] == [{"cert": "fullchain.pem", "key": "privkey.pem"},
                                     {"cert": "/etc/tls/other.pem", "key": "/etc/tls/other.key"}]
    assert parsed["metrics"] == {"listen": "127.0.0.1:9464"}
    first, second = parsed["listener"]
    assert first["sni_strict"] is True and first["max_connections_per_ip"] == 2
    assert first["accept_proxy_from"] == ["127.0.0.1/32", "::1"]
    assert second == {"name": "imaps", "protocol": "imap", "tls": "implicit", "listen": "[::]:993",
                      "backend": "mail.internal:143", "accept_proxy_from": [], "sni_strict": False,
                      "ints": [1, 2], "flags": [True, False], "odd key": "x"}


def test_unset_options_are_left_out_so_the_proxy_default_applies():
    config = ProxyConfig(listeners=[ListenerConfig("pop3", "pop3", "starttls", listen_port=110, backend=10110)])
    assert config.to_toml() == ('[[listener]]\nname = "pop3"\nprotocol = "pop3"\ntls = "starttls"\n'
                                'listen = "127.0.0.1:110"\nbackend = "127.0.0.1:10110"\n')


@pytest.mark.parametrize("text", ["", "plain", '"', "\\", '\\"', "\\n", "\x00\x1f", "\u2028", "'''", '"""'])
def test_every_string_round_trips(text):
    assert tomllib.loads(f"value = {toml_string(text)}")["value"] == text


def test_values_toml_cannot_hold_here_are_refused():
    for value in (None, 1.5, {"table": 1}, object(), [1, None]):
        with pytest.raises(TypeError):
            toml_value(value)
    with pytest.raises(ValueError, match="sni_strict"):
        ProxyConfig(listeners=[ListenerConfig("x", "imap", "implicit", 1, 2, sni_strict=True,
                                              extra={"sni_strict": False})]).to_toml()


# -- the proxy itself reads it -----------------------------------------------------------

@pytest.fixture(scope="module")
def binary() -> Path:
    found = proxy_binary_path()
    if not (found.is_file() and os.access(found, os.X_OK)):
        unavailable(f"proxy binary {found} not built (cargo build, or set MAIL_TLS_PROXY_BIN)")
    return found


def checkable(cert: str | Path, key: str | Path) -> ProxyConfig:
    """Every option the proxy knows, with values `check` accepts without
    connecting anywhere (only SMTP listeners are probed, and this one has
    relay_check = "off")."""
    return ProxyConfig(
        hostname="proxy.e2e.test",
        certificates=[CertificateConfig(cert, key)],
        metrics_port=9464,
        max_connections=500,
        shutdown_grace=5,
        certificate_poll_interval=60,
        readiness_interval=10,
        relay_check_interval=3600,
        listeners=[
            ListenerConfig("submission", "smtp", "starttls", listen_port=587, backend=2525,
                           client_identity="xclient", require_tls="none",
                           accept_proxy_from=["127.0.0.1/32", "::1"], relay_check="off",
                           proxy_header_timeout=3, max_connections_per_ip=2, handshake_timeout=10,
                           backend_connect_timeout=5, idle_timeout=300, min_tls_version="1.3",
                           max_inspected_commands=20, sni_strict=True),
            ListenerConfig("imaps", "imap", "implicit", listen_port=993, backend="mail.internal:143",
                           listen_host="::1", client_identity="proxy-v2", accept_proxy_from=[],
                           sni_strict=False),
            ListenerConfig("pop3", "pop3", "starttls", listen_port=110, backend=10110),
        ],
    )


CHECKED_LISTENERS = {  # name -> (listen, backend) as `check` prints them
    "submission": ("127.0.0.1:587", "127.0.0.1:2525"),
    "imaps": ("[::1]:993", "mail.internal:143"),
    "pop3": ("127.0.0.1:110", "127.0.0.1:10110"),
}


def assert_check_accepts(binary: Path, config_file: Path, certificate: Path) -> None:
    """`check` passes, read the certificate from where the test meant, and
    names each listener with its address and backend."""
    result = run_check(binary, config_file, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{config_file}:\n{config_file.read_text()}\n{output}"
    assert f"configuration {config_file}: OK" in result.stdout, output
    assert str(certificate) in result.stdout, output
    for name, (listen, backend) in CHECKED_LISTENERS.items():
        assert any(line.startswith(f"listener {name}:") and f" {listen} " in line and line.endswith(f" {backend}")
                   for line in result.stdout.splitlines()), output
    assert "127.0.0.1:9464" in result.stdout, output
    assert 'relay check: listener submission: off' in result.stdout, output


def test_check_accepts_what_the_builder_writes(binary, test_certificate, tmp_path):
    """Relative certificate paths, next to the files, as most tests write them."""
    directory = tmp_path / "relative"
    directory.mkdir()
    shutil.copy(test_certificate.chain, directory / "fullchain.pem")
    shutil.copy(test_certificate.key, directory / "privkey.pem")
    config_file = checkable("fullchain.pem", "privkey.pem").write(directory / "config.toml")
    assert_check_accepts(binary, config_file, directory / "fullchain.pem")


def test_check_reads_paths_with_quotes_and_backslashes(binary, test_certificate, tmp_path):
    """The certificate really is read from a directory whose name needs
    escaping, so the proxy got back exactly the path the test meant."""
    directory = tmp_path / 'we"ird\\dir \tname'
    directory.mkdir()
    chain, key = directory / "fullchain.pem", directory / "privkey.pem"
    shutil.copy(test_certificate.chain, chain)
    shutil.copy(test_certificate.key, key)
    config_file = checkable(chain, key).write(tmp_path / "config.toml")
    assert '\\"ird\\\\dir \\tname' in config_file.read_text()
    assert_check_accepts(binary, config_file, chain)
    # And a path that does not exist is reported as such (it was not
    # mangled into some other existing path).
    missing = checkable(directory / "absent.pem", key).write(tmp_path / "missing.toml")
    result = run_check(binary, missing, timeout=60)
    assert result.returncode != 0
    assert "absent.pem" in result.stdout + result.stderr
