"""A private Postfix + Dovecot pair that learns the client's address from
the proxy (PROXY protocol, XCLIENT), for the tests that prove which address
the backend saw.  Each test module starts its own pair in its own directory
under the scratch directory, with the smtpd services it fronts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from proxy_process import unavailable
from servers import (
    DEFAULT_POSTFIX_MYNETWORKS,
    MailServers,
    ServerSetupError,
    missing_programs,
    stop_abandoned_instances,
)

# smtpd `-o` overrides.  Postfix trusts the PROXY header from anyone who can
# reach such a port; in production only the proxy must be able to.
SMTPD_PROXY_PROTOCOL = "smtpd_upstream_proxy_protocol=haproxy"
SMTPD_XCLIENT_FROM_PROXY = "smtpd_authorized_xclient_hosts=127.0.0.1"
# Dovecot's haproxy_trusted_networks: the proxy's address only.
DOVECOT_TRUSTS_PROXY = "127.0.0.1/32"


def require_mail_servers() -> None:
    """Skip (or fail in CI) when the backends cannot be started here."""
    if os.geteuid() != 0:
        unavailable("the end-to-end backends (Dovecot, Postfix) must be started as root")
    missing = missing_programs()
    if missing:
        unavailable(f"{', '.join(missing)} not installed; run tests/e2e/install-deps.sh")


def identity_backends(scratch_dir: Path, dir_name: str, extra_smtpd: dict[str, list[str]], *,
                      mynetworks: str = DEFAULT_POSTFIX_MYNETWORKS,
                      before_start: Callable[[], object] | None = None,
                      on_abandoned: Callable[[Path], object] | None = None) -> Iterator[MailServers]:
    """The body of a module fixture (`yield from`): Postfix with these extra
    smtpd services and Dovecot with IMAP and POP3 listeners trusting PROXY
    headers from the proxy's address, in scratch_dir/dir_name; stopped at
    teardown.  before_start runs once the backends are known to be
    available (a check for the module's own programs); on_abandoned gets the
    directory of each pair a killed run left behind, after it is stopped."""
    require_mail_servers()
    if before_start is not None:
        before_start()
    for abandoned in stop_abandoned_instances(f"/tmp/mail-e2e-*/{dir_name}"):
        if on_abandoned is not None:
            on_abandoned(abandoned)
    servers = MailServers(
        scratch_dir / dir_name,
        owner_pid=os.getpid(),
        mynetworks=mynetworks,
        extra_smtpd=extra_smtpd,
        dovecot_haproxy_trusted_networks=DOVECOT_TRUSTS_PROXY,
    )
    try:
        servers.start()
    except ServerSetupError as exc:
        pytest.fail(f"could not start the mail servers: {exc}", pytrace=False)
    try:
        yield servers
    finally:
        servers.stop()
