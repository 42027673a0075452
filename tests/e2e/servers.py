#!/usr/bin/env python3
"""Private, unmodified Debian Dovecot + Postfix instances for end-to-end tests.

Everything lives under one scratch directory: configs, queues, logs, pid files
and the maildir.  Nothing under /etc is read or changed, no systemd is needed,
and every port is picked at run time, so runs can be repeated side by side.

Mail flow:  SMTP -> Postfix smtpd (127.0.0.1:smtp_port) -> Postfix virtual(8)
delivery agent -> DIR/mail/alice/Maildir/  <- Dovecot IMAP/POP3 reads the same
maildir.  Both daemons touch the maildir as the same real, unprivileged uid.

Used by the pytest fixtures in conftest.py, and usable by hand:

    python3 tests/e2e/servers.py start /tmp/mail-e2e   # prints ports as JSON
    python3 tests/e2e/servers.py stop  /tmp/mail-e2e
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TEST_DOMAIN = "e2e.test"
TEST_USER = "alice"
TEST_PASSWORD = "secret"
TEST_ADDRESS = f"{TEST_USER}@{TEST_DOMAIN}"

# Debian's base-passwd always ships the "mail" user (uid 8).  Using it avoids
# creating accounts; Dovecot and Postfix only need *some* non-root uid.
DEFAULT_MAIL_STORAGE_USER = os.environ.get("E2E_MAIL_STORAGE_USER", "mail")

# Postfix's mynetworks: the clients it lets relay mail anywhere
# (permit_mynetworks).  None by default, as on a server behind the proxy:
# the proxy connects from this host, so a Postfix trusting 127.0.0.0/8 (the
# stock Debian setting) would relay for every client whose address the
# proxy does not pass on, and the proxy's relay guard refuses to front it.
# Mail for the test domain needs no relay permission.
DEFAULT_POSTFIX_MYNETWORKS = ""

REQUIRED_PROGRAMS = ("dovecot", "postfix", "postconf")
STATE_FILE_NAME = "servers.json"
STARTUP_TIMEOUT_SECONDS = 30
START_ATTEMPTS = 3


class ServerSetupError(RuntimeError):
    """A daemon failed to start; the message carries the tail of its log."""


def missing_programs() -> list[str]:
    # Debian puts the daemons in /usr/sbin, which a non-login PATH may lack.
    search_path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in REQUIRED_PROGRAMS if shutil.which(p, path=search_path) is None]


def find_program(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise ServerSetupError(f"{name} not found; run tests/e2e/install-deps.sh")
    return found


def pick_free_loopback_ports(count: int) -> list[int]:
    """Distinct ports that were free a moment ago.  All are held at once so
    no port is handed out twice; they are released for the daemons to bind,
    so callers retry when a daemon still finds one taken."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def write_config_file(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)
    # Postfix re-reads a config/table file in 300 ms pauses while it looks
    # freshly written (it may be half-written); back-date the mtime.
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))


def tail_of_file(path: Path, max_lines: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(lines[-max_lines:])


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; reap it if it is ours.
    try:
        finished_pid, _ = os.waitpid(pid, os.WNOHANG)
        if finished_pid == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return True


def terminate_pid(pid: int, grace_seconds: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: a stop must really stop."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if not process_is_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not process_is_alive(pid):
            return
        time.sleep(0.05)


def stop_child(process: subprocess.Popen | None, grace_seconds: float = 10.0) -> None:
    """SIGTERM a child of this process, SIGKILL it if it is still running
    after grace_seconds; reaps it either way."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def read_pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_greeting(host: str, port: int, timeout: float = 2.0) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def wait_for_greeting(name: str, port: int, is_ready, log_path: Path, alive) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    last_problem = "no attempt"
    while time.monotonic() < deadline:
        if not alive():
            raise ServerSetupError(f"{name} exited during start-up; log tail:\n{tail_of_file(log_path)}")
        try:
            greeting = read_greeting("127.0.0.1", port)
            if is_ready(greeting):
                return
            last_problem = f"greeting {greeting!r}"
        except OSError as exc:
            last_problem = repr(exc)
        time.sleep(0.1)
    raise ServerSetupError(
        f"{name} on port {port} not ready after {STARTUP_TIMEOUT_SECONDS}s ({last_problem}); "
        f"log tail:\n{tail_of_file(log_path)}"
    )


@dataclasses.dataclass
class MailServerEndpoints:
    """What tests need to know about the running servers."""

    base_dir: str
    smtp_port: int
    imap_port: int
    pop3_port: int
    user: str = TEST_USER
    password: str = TEST_PASSWORD
    address: str = TEST_ADDRESS
    domain: str = TEST_DOMAIN
    dovecot_pid: int | None = None
    postfix_master_pid: int | None = None
    # The test process that owns these servers; None for ones started by
    # hand with the CLI, which are never cleaned up automatically.
    owner_pid: int | None = None
    # Listeners asked for with MailServers(extra_smtpd=...,
    # dovecot_haproxy_trusted_networks=...): name -> port.
    extra_ports: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def maildir(self) -> Path:
        return Path(self.base_dir) / "mail" / self.user / "Maildir"


class MailServers:
    """Owns one Dovecot and one Postfix instance rooted at base_dir."""

    def __init__(self, base_dir: str | os.PathLike, mail_storage_user: str = DEFAULT_MAIL_STORAGE_USER,
                 owner_pid: int | None = None, extra_smtpd: dict[str, list[str]] | None = None,
                 dovecot_haproxy_trusted_networks: str | None = None,
                 mynetworks: str = DEFAULT_POSTFIX_MYNETWORKS):
        """extra_smtpd: more Postfix smtpd services, each on its own port
        (endpoints.extra_ports[name]), with its own `-o name=value` overrides
        and logging as postfix/NAME/smtpd.  dovecot_haproxy_trusted_networks:
        when set, Dovecot trusts PROXY headers from these networks and gets an
        IMAP and a POP3 listener with `haproxy = yes` (extra_ports
        "imap_haproxy" and "pop3_haproxy").  The defaults add nothing.
        mynetworks: Postfix's main.cf value (a service may override it with
        `-o mynetworks=...`); "127.0.0.0/8" makes a Postfix that relays for
        anything connecting from this host, as a stock Debian one does."""
        self.base_dir = Path(base_dir).resolve()
        self.owner_pid = owner_pid
        self.extra_smtpd = dict(extra_smtpd or {})
        self.mynetworks = mynetworks
        self.dovecot_haproxy_trusted_networks = dovecot_haproxy_trusted_networks
        storage_account = pwd.getpwnam(mail_storage_user)
        self.mail_uid = storage_account.pw_uid
        self.mail_gid = storage_account.pw_gid
        if self.mail_uid == 0:
            raise ServerSetupError("mail must be stored as a non-root uid (Dovecot refuses uid 0)")
        self.endpoints: MailServerEndpoints | None = None

    # -- paths -------------------------------------------------------------
    @property
    def dovecot_dir(self) -> Path:
        return self.base_dir / "dovecot"

    @property
    def dovecot_config(self) -> Path:
        return self.dovecot_dir / "dovecot.conf"

    @property
    def dovecot_run_dir(self) -> Path:
        # Dovecot's base_dir; holds its unix sockets, so keep the path short
        # (sun_path is limited to 108 bytes).
        return self.dovecot_dir / "run"

    @property
    def dovecot_log(self) -> Path:
        return self.dovecot_dir / "dovecot.log"

    @property
    def postfix_config_dir(self) -> Path:
        return self.base_dir / "postfix" / "conf"

    @property
    def postfix_queue_dir(self) -> Path:
        return self.base_dir / "postfix" / "queue"

    @property
    def postfix_data_dir(self) -> Path:
        return self.base_dir / "postfix" / "data"

    @property
    def postfix_log(self) -> Path:
        return self.base_dir / "postfix" / "maillog"

    @property
    def postfix_command_log(self) -> Path:
        return self.base_dir / "postfix" / "postfix-command.log"

    @property
    def mail_root(self) -> Path:
        return self.base_dir / "mail"

    @property
    def state_file(self) -> Path:
        return self.base_dir / STATE_FILE_NAME

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> MailServerEndpoints:
        if os.geteuid() != 0:
            raise ServerSetupError("Dovecot and Postfix must be started as root")
        missing = missing_programs()
        if missing:
            raise ServerSetupError(f"missing programs {missing}; run tests/e2e/install-deps.sh")
        if self.state_file.exists():
            # Left over from an earlier run in the same directory.
            self.stop()
        self._prepare_directories()
        for attempt in range(1, START_ATTEMPTS + 1):
            extra_names = list(self.extra_smtpd)
            if self.dovecot_haproxy_trusted_networks is not None:
                extra_names += ["imap_haproxy", "pop3_haproxy"]
            smtp_port, imap_port, pop3_port, *extra_ports = pick_free_loopback_ports(3 + len(extra_names))
            self.endpoints = MailServerEndpoints(
                base_dir=str(self.base_dir), smtp_port=smtp_port, imap_port=imap_port,
                pop3_port=pop3_port, owner_pid=self.owner_pid,
                extra_ports=dict(zip(extra_names, extra_ports)),
            )
            try:
                self._start_dovecot()
                self._start_postfix()
                break
            except ServerSetupError as exc:
                self.stop()
                # Another process may have taken a port between picking and
                # binding it: try again with fresh ports.
                if "address already in use" not in str(exc).lower() or attempt == START_ATTEMPTS:
                    raise
            except BaseException:
                self.stop()
                raise
        self._save_state()
        return self.endpoints

    def stop(self) -> None:
        """Stop both daemons using pid files; safe to call repeatedly."""
        state = self._load_state()
        self._stop_postfix(state)
        self._stop_dovecot(state)
        try:
            self.state_file.unlink()
        except FileNotFoundError:
            pass

    # -- shared setup --------------------------------------------------------
    def _prepare_directories(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # Daemons drop to the postfix, dovenull and mail uids and must be able
        # to walk down into here (mkdtemp makes 0700 directories).
        self.base_dir.chmod(0o755)
        for directory in (self.dovecot_dir, self.postfix_config_dir, self.postfix_queue_dir,
                          self.postfix_data_dir, self.mail_root):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        self.postfix_config_dir.parent.chmod(0o755)
        # Pre-create the maildir so neither daemon has to race creating it.
        maildir = self.mail_root / TEST_USER / "Maildir"
        for sub in ("", "cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        for path in (self.mail_root / TEST_USER, maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
            os.chown(path, self.mail_uid, self.mail_gid)
            path.chmod(0o700)
        os.chown(self.mail_root, self.mail_uid, self.mail_gid)

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps(dataclasses.asdict(self.endpoints), indent=2))

    def _load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    # -- Dovecot -------------------------------------------------------------
    def _dovecot_haproxy_listener(self, name: str) -> str:
        port = self.endpoints.extra_ports.get(name)
        if port is None:
            return ""
        return f"""\
  inet_listener {name} {{
    address = 127.0.0.1
    port = {port}
    haproxy = yes
  }}
"""

    def _dovecot_config_text(self) -> str:
        endpoints = self.endpoints
        users_file = self.dovecot_dir / "users"
        haproxy_networks = ""
        if self.dovecot_haproxy_trusted_networks is not None:
            haproxy_networks = f"haproxy_trusted_networks = {self.dovecot_haproxy_trusted_networks}\n"
        return f"""\
# Private Dovecot for mail-tls-proxy end-to-end tests.  Plaintext only: the
# proxy under test is what adds TLS.
base_dir = {self.dovecot_run_dir}
state_dir = {self.dovecot_dir / "state"}
# A unique instance name keeps "doveadm instance list" and process titles apart
# from any system Dovecot.
instance_name = e2e-{endpoints.imap_port}
log_path = {self.dovecot_log}
info_log_path = {self.dovecot_log}
auth_verbose = yes

protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# The default 2 s failure delay would slow any test that tries a bad
# password.  Anvil's per-IP auth penalty cannot be switched off, so tests
# should still avoid failed logins.
auth_failure_delay = 0

# Mail is stored as a real, unprivileged uid shared with Postfix's virtual(8).
first_valid_uid = {self.mail_uid}
first_valid_gid = {self.mail_gid}
mail_location = maildir:{self.mail_root}/%n/Maildir

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {users_file}
}}
userdb {{
  driver = static
  args = uid={self.mail_uid} gid={self.mail_gid} home={self.mail_root}/%n
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {endpoints.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
{self._dovecot_haproxy_listener("imap_haproxy")}}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {endpoints.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
{self._dovecot_haproxy_listener("pop3_haproxy")}}}
{haproxy_networks}"""

    def _start_dovecot(self) -> None:
        dovecot = find_program("dovecot")
        (self.dovecot_dir / "state").mkdir(exist_ok=True)
        users_file = self.dovecot_dir / "users"
        # The auth process runs as the "dovecot" user and must read this; the
        # password is a throwaway test secret.
        write_config_file(users_file, f"{TEST_USER}:{{PLAIN}}{TEST_PASSWORD}::::::\n")
        write_config_file(self.dovecot_config, self._dovecot_config_text())
        self.dovecot_log.touch()
        console_log = open(self.dovecot_dir / "console.log", "ab")
        # -F keeps the master in the foreground so we own its pid; its stdio
        # goes to a file so no caller pipe is held open by the daemon.
        process = subprocess.Popen(
            [dovecot, "-F", "-c", str(self.dovecot_config)],
            stdin=subprocess.DEVNULL, stdout=console_log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        console_log.close()
        self.endpoints.dovecot_pid = process.pid
        self._save_state()

        def alive() -> bool:
            return process.poll() is None

        # Until the auth process answers, imap-login may hold back its real
        # greeting and send "* OK Waiting for authentication process to
        # respond.." instead; only "ready" means logins will work.
        wait_for_greeting("Dovecot IMAP", self.endpoints.imap_port,
                          lambda g: g.startswith(b"* OK") and b"ready" in g.lower(),
                          self.dovecot_log, alive)
        wait_for_greeting("Dovecot POP3", self.endpoints.pop3_port,
                          lambda g: g.startswith(b"+OK") and b"ready" in g.lower(),
                          self.dovecot_log, alive)
        # A greeting only proves imap-login is up; prove that auth and mail
        # storage work too, so a broken setup fails here with Dovecot's log
        # instead of later inside some test.
        self._check_dovecot_login()

    def _check_dovecot_login(self) -> None:
        import imaplib

        try:
            client = imaplib.IMAP4("127.0.0.1", self.endpoints.imap_port, timeout=10)
            try:
                client.login(TEST_USER, TEST_PASSWORD)
                client.select("INBOX")
            finally:
                client.logout()
        except (imaplib.IMAP4.error, OSError) as exc:
            raise ServerSetupError(
                f"Dovecot test login failed: {exc}; log tail:\n{tail_of_file(self.dovecot_log)}"
            ) from exc

    def _stop_dovecot(self, state: dict) -> None:
        pids = {read_pid_file(self.dovecot_run_dir / "master.pid"), state.get("dovecot_pid")}
        if self.endpoints is not None:
            pids.add(self.endpoints.dovecot_pid)
        for pid in pids - {None}:
            if process_is_alive(pid) and self._pid_runs(pid, "dovecot"):
                # Dovecot's master takes its login/auth/imap children down with it.
                terminate_pid(pid)

    # -- Postfix -------------------------------------------------------------
    def _postfix_main_cf(self) -> str:
        return f"""\
# Private Postfix for mail-tls-proxy end-to-end tests.  Plaintext only.
compatibility_level = 3.6
queue_directory = {self.postfix_queue_dir}
data_directory = {self.postfix_data_dir}
mail_owner = postfix
setgid_group = postdrop

myhostname = mail.{TEST_DOMAIN}
mydomain = {TEST_DOMAIN}
myorigin = $myhostname
# Nothing is delivered locally: all test mail goes to the virtual domain.
mydestination = localhost
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# Who may relay: see DEFAULT_POSTFIX_MYNETWORKS in servers.py.
mynetworks = {self.mynetworks}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
append_dot_mydomain = no
biff = no
smtputf8_enable = no
smtpd_banner = $myhostname ESMTP e2e
# No DNS on the test machine, and the client is always 127.0.0.1.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
# Nothing leaves this machine: mail for any other domain is discarded on
# delivery, never queued.  (Not error:, which smtpd would already refuse at
# RCPT: a Postfix given trusted mynetworks must answer a relay recipient
# as a real open relay does, 250, for the relay guard's tests.)
default_transport = discard:outbound mail is disabled in e2e tests
relay_transport = discard:outbound mail is disabled in e2e tests
# TLS is the proxy's job, so the backend must not offer STARTTLS itself.
smtpd_tls_security_level = none
smtp_tls_security_level = none

# Deliver alice@{TEST_DOMAIN} straight into the maildir Dovecot serves (the
# trailing slash makes virtual(8) write maildir, not mbox).
virtual_mailbox_domains = {TEST_DOMAIN}
virtual_mailbox_base = {self.mail_root}
virtual_mailbox_maps = inline:{{ {TEST_ADDRESS}={TEST_USER}/Maildir/ }}
virtual_uid_maps = static:{self.mail_uid}
virtual_gid_maps = static:{self.mail_gid}
virtual_minimum_uid = {self.mail_uid}

# No syslog daemon here: log to a file through postlogd.
maillog_file = {self.postfix_log}
maillog_file_prefixes = {self.base_dir}
"""

    def _postfix_master_cf(self) -> str:
        # Stock Postfix 3.7 services, all without chroot (a chroot would need
        # copies of /etc files inside the queue directory).
        return f"""\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{self.endpoints.smtp_port} inet n - n - - smtpd
{self._extra_smtpd_services()}pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    def _extra_smtpd_services(self) -> str:
        lines = []
        for name, overrides in self.extra_smtpd.items():
            lines.append(f"127.0.0.1:{self.endpoints.extra_ports[name]} inet n - n - - smtpd")
            lines.append(f"  -o syslog_name=postfix/{name}")
            lines += [f"  -o {override}" for override in overrides]
        return "".join(line + "\n" for line in lines)

    def _postfix_command(self, *args: str, check: bool = True) -> int:
        # The master daemon inherits stdout/stderr: send them to a file, never
        # to a pipe, or the caller would wait for EOF forever.
        with open(self.postfix_command_log, "ab") as log:
            result = subprocess.run(
                [find_program("postfix"), "-c", str(self.postfix_config_dir), *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=120,
            )
        if check and result.returncode != 0:
            raise ServerSetupError(
                f"postfix {' '.join(args)} exited {result.returncode}; output:\n"
                f"{tail_of_file(self.postfix_command_log)}\nmaillog:\n{tail_of_file(self.postfix_log)}"
            )
        return result.returncode

    def _start_postfix(self) -> None:
        write_config_file(self.postfix_config_dir / "main.cf", self._postfix_main_cf())
        write_config_file(self.postfix_config_dir / "master.cf", self._postfix_master_cf())
        # data_directory must belong to mail_owner; queue subdirectories are
        # created (with the right owners) by "postfix start" via post-install
        # create-missing.
        postfix_account = pwd.getpwnam("postfix")
        os.chown(self.postfix_data_dir, postfix_account.pw_uid, postfix_account.pw_gid)
        self.postfix_log.touch()
        self._postfix_command("start")
        self.endpoints.postfix_master_pid = read_pid_file(self.postfix_queue_dir / "pid" / "master.pid")
        self._save_state()
        master_pid = self.endpoints.postfix_master_pid

        def alive() -> bool:
            return master_pid is not None and process_is_alive(master_pid)

        wait_for_greeting("Postfix SMTP", self.endpoints.smtp_port,
                          lambda g: g.startswith(b"220 "), self.postfix_log, alive)

    def _stop_postfix(self, state: dict) -> None:
        master_pid = read_pid_file(self.postfix_queue_dir / "pid" / "master.pid") or state.get("postfix_master_pid")
        if master_pid is None or not process_is_alive(master_pid):
            return
        if (self.postfix_config_dir / "main.cf").exists() and shutil.which("postfix", path=os.environ.get("PATH", "") + ":/usr/sbin"):
            # Graceful: the master stops its children.  It waits up to 5 s and
            # then kills the process group itself.
            self._postfix_command("stop", check=False)
        if process_is_alive(master_pid) and self._pid_runs(master_pid, "master"):
            terminate_pid(master_pid, grace_seconds=5)
            try:
                os.killpg(master_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    @staticmethod
    def _pid_runs(pid: int, program_name: str) -> bool:
        """Guard against killing an unrelated process that reused a stale pid."""
        try:
            return program_name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False


def stop_abandoned_instances(scratch_dir_pattern: str) -> list[Path]:
    """Stop servers left behind by test runs that died without cleaning up
    (e.g. killed by a timeout), found by their state files.  Instances whose
    owner is still alive, or that were started by hand, are left alone."""
    stopped = []
    for state_file in sorted(Path("/").glob(scratch_dir_pattern.lstrip("/") + "/" + STATE_FILE_NAME)):
        try:
            owner_pid = json.loads(state_file.read_text()).get("owner_pid")
        except (OSError, ValueError):
            continue
        if owner_pid is None or process_is_alive(owner_pid):
            continue
        MailServers(state_file.parent).stop()
        stopped.append(state_file.parent)
    return stopped


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(f"usage: {argv[0]} start|stop DIR", file=sys.stderr)
        return 2
    servers = MailServers(argv[2])
    if argv[1] == "start":
        try:
            endpoints = servers.start()
        except ServerSetupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(dataclasses.asdict(endpoints), indent=2))
    else:
        servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
