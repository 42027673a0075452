"""A private Pebble (Let's Encrypt's test ACME server, Debian's `pebble`
package) for the end-to-end tests of the proxy's built-in ACME client.

Everything lives under one directory of the caller's:

- `https/`: a throwaway CA and a leaf for 127.0.0.1 and localhost, made with
  openssl, that Pebble serves its ACME and management API with (Debian's
  package ships no test certificates); `https_ca` is what an ACME client must
  trust to talk to it (the proxy's `ca_bundle`);
- `pebble.json` and `pebble.log`: Pebble's configuration and output;
- `dns.log`: `pebble-challtestsrv`, run as a DNS server only, answering
  127.0.0.1 for every name, so that Pebble's validation of a name such as
  mail.example.test reaches the proxy's challenge responders on loopback
  (Pebble is started with `-dnsserver` pointing at it; nothing under /etc is
  touched);
- `issuing-root-N.pem`: the root Pebble issues under, fetched from its
  management API (`/roots/0`) after each start; Pebble makes a new one at
  every start, so clients verify against the one of the Pebble that issued.

Pebble validates at full speed (`PEBBLE_VA_NOSLEEP=1`); each start may
change the validation mode (`PEBBLE_VA_ALWAYS_VALID`), the share of good
nonces it rejects as bad (`PEBBLE_WFE_NONCEREJECT`, 0 unless asked) and the
ports it validates on (`httpPort` for http-01, `tlsPort` for tls-alpn-01).

    pebble = Pebble(directory, http_port=5002, tls_port=5001)
    pebble.start()
    ... pebble.directory_url, pebble.https_ca, pebble.issuing_root ...
    pebble.stop()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from servers import pick_free_loopback_ports, stop_child, tail_of_file

PEBBLE_PROGRAMS = ("pebble", "pebble-challtestsrv")
STARTUP_TIMEOUT_SECONDS = 20
START_ATTEMPTS = 3


class PebbleError(RuntimeError):
    """Pebble or its DNS server did not start; the message has their logs."""


def missing_pebble_programs() -> list[str]:
    return [program for program in PEBBLE_PROGRAMS if shutil.which(program) is None]


def make_https_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf for 127.0.0.1 and localhost signed by it (P-256, valid
    two days): (CA certificate, leaf chain, leaf key).  Made once per
    directory."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = directory / "ca.pem", directory / "ca.key"
    leaf_cert, leaf_key = directory / "cert.pem", directory / "key.pem"
    if ca_cert.exists() and leaf_cert.exists() and leaf_key.exists():
        return ca_cert, leaf_cert, leaf_key

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=e2e Pebble HTTPS CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            "-keyout", str(ca_key), "-out", str(ca_cert))
    request = directory / "cert.csr"
    openssl("req", "-new", *ec, "-subj", "/CN=localhost", "-keyout", str(leaf_key), "-out", str(request))
    extensions = directory / "cert.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                          "extendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n")
    openssl("x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(leaf_cert))
    return ca_cert, leaf_cert, leaf_key


class Pebble:
    """Pebble plus its DNS server, on loopback ports of their own."""

    def __init__(self, base_dir: Path, http_port: int, tls_port: int):
        self.base_dir = Path(base_dir)
        self.http_port = http_port
        self.tls_port = tls_port
        self.log_file = self.base_dir / "pebble.log"
        self.dns_log_file = self.base_dir / "dns.log"
        self.config_file = self.base_dir / "pebble.json"
        self.https_ca, self._https_cert, self._https_key = make_https_certificates(self.base_dir / "https")
        self.listen_port: int | None = None
        self.management_port: int | None = None
        self.dns_port: int | None = None
        self.issuing_root: Path | None = None
        self._starts = 0
        self._log_offset = 0
        self._settings: tuple = (False, 0, None)
        self._pebble: subprocess.Popen | None = None
        self._dns: subprocess.Popen | None = None

    # -- addresses ---------------------------------------------------------

    @property
    def directory_url(self) -> str:
        if self.listen_port is None:
            # Ports are chosen before the first start so a client can be
            # configured while Pebble is still down.
            self.choose_ports()
        return f"https://127.0.0.1:{self.listen_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    def choose_ports(self) -> None:
        self.listen_port, self.management_port, self.dns_port = pick_free_loopback_ports(3)

    # -- life cycle --------------------------------------------------------

    def start(self, always_valid: bool = False, nonce_reject_percent: int = 0,
              authz_reuse_percent: int | None = None) -> None:
        """Starts the DNS server (once) and Pebble, and waits until Pebble's
        directory answers and its issuing root has been fetched.  The ACME
        port stays the same across restarts (the client's configuration
        names it); the management port too.  authz_reuse_percent None keeps
        Pebble's default (valid authorizations reused in half the orders)."""
        if self.running:
            raise PebbleError("Pebble is already running")
        if self.listen_port is None:
            self.choose_ports()
        self._settings = (always_valid, nonce_reject_percent, authz_reuse_percent)
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                if self._dns is None or self._dns.poll() is not None:
                    self._start_dns()
                self._start_pebble(always_valid, nonce_reject_percent, authz_reuse_percent)
                return
            except PebbleError as error:
                logs = tail_of_file(self.log_file) + tail_of_file(self.dns_log_file)
                self.stop()
                if "address already in use" not in logs or attempt == START_ATTEMPTS:
                    raise error
                # Another process took a port between picking and binding.
                self.choose_ports()

    def _start_dns(self) -> None:
        """pebble-challtestsrv as a DNS server only: A 127.0.0.1 for every
        name, no AAAA (the proxy's responders listen on IPv4 loopback)."""
        with open(self.dns_log_file, "ab") as log:
            self._dns = subprocess.Popen(
                ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                 "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
                 "-management", f"127.0.0.1:{pick_free_loopback_ports(1)[0]}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while "Creating TCP and UDP DNS-01 challenge server" not in self.dns_log_file.read_text(errors="replace"):
            if self._dns.poll() is not None:
                raise PebbleError(f"pebble-challtestsrv exited with {self._dns.returncode}:\n"
                                  f"{tail_of_file(self.dns_log_file)}")
            if time.monotonic() > deadline:
                raise PebbleError(f"pebble-challtestsrv did not start:\n{tail_of_file(self.dns_log_file)}")
            time.sleep(0.05)

    def move_validation_ports(self, http_port: int, tls_port: int) -> None:
        """Points Pebble's validation at other ports; a running Pebble is
        restarted with the settings of its start (losing its state)."""
        self.http_port, self.tls_port = http_port, tls_port
        if self.running:
            self.stop_pebble()
            self.start(*self._settings)

    def _start_pebble(self, always_valid: bool, nonce_reject_percent: int,
                      authz_reuse_percent: int | None) -> None:
        self.config_file.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.listen_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self._https_cert),
            "privateKey": str(self._https_key),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }}, indent=2) + "\n")
        environment = dict(
            os.environ,
            PEBBLE_VA_NOSLEEP="1",
            PEBBLE_VA_ALWAYS_VALID="1" if always_valid else "0",
            PEBBLE_WFE_NONCEREJECT=str(nonce_reject_percent),
        )
        environment.pop("PEBBLE_AUTHZREUSE", None)
        if authz_reuse_percent is not None:
            environment["PEBBLE_AUTHZREUSE"] = str(authz_reuse_percent)
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            self._pebble = subprocess.Popen(
                ["pebble", "-config", str(self.config_file), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                cwd=self.base_dir, env=environment, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._starts += 1
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while True:
            if self._pebble.poll() is not None:
                raise PebbleError(f"pebble exited with {self._pebble.returncode}:\n{tail_of_file(self.log_file)}")
            try:
                directory = json.loads(self._get(self.directory_url))
                if "newOrder" in directory:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise PebbleError(f"Pebble's directory did not answer:\n{tail_of_file(self.log_file)}")
            time.sleep(0.05)
        self.issuing_root = self.base_dir / f"issuing-root-{self._starts}.pem"
        self.issuing_root.write_bytes(self._get(f"{self.management_url}/roots/0"))

    def _get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.https_ca))
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.read()

    @property
    def running(self) -> bool:
        return self._pebble is not None and self._pebble.poll() is None

    def stop_pebble(self) -> None:
        """Stops Pebble (its state, orders and roots are gone); the DNS
        server stays."""
        stop_child(self._pebble)
        self._pebble = None

    def stop(self) -> None:
        self.stop_pebble()
        stop_child(self._dns)
        self._dns = None

    # -- what Pebble saw ---------------------------------------------------

    def log_since_start(self) -> str:
        """Pebble's output since its latest start."""
        with open(self.log_file, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def order_count(self) -> int:
        """Orders the running Pebble has received (it logs the total after
        each new order)."""
        counts = re.findall(r"There are now (\d+) orders in the db", self.log_since_start())
        return int(counts[-1]) if counts else 0

    def issued_serials(self) -> list[int]:
        """Serial numbers of the certificates the running Pebble issued."""
        return [int(serial, 16)
                for serial in re.findall(r"Issued certificate serial ([0-9a-f]+) for order", self.log_since_start())]
