"""The Debian package (packaging/build-deb.sh, [package.metadata.deb] in
Cargo.toml), checked as far as this machine allows without installing it
(systemd is not PID 1 here):

- lintian reports no error (its warnings are printed);
- the control data lists /etc/mail-tls-proxy/config.toml as a conffile, and
  the package holds the binary, the unit, a manual page per subcommand, the
  completions, copyright and changelog;
- unpacked with dpkg-deb -x: the packaged binary passes `check` on the
  packaged configuration with no network at all, the packaged unit passes
  systemd-analyze verify against the unpacked tree (so its /usr/bin path is
  the one checked) and is deploy/systemd's unit with that path, the manual
  pages render with man, the bash completion completes the subcommands.

The package is built from the dev-profile binary tests/e2e/run.sh has already
built (`build-deb.sh --profile dev --fast`: nothing is compiled again, where
a release build with LTO would cost minutes); `build-deb.sh` with no
arguments builds the release package the same way. Tools come from
tests/e2e/install-deps.sh; under CI=true a missing tool is a failure,
elsewhere a skip with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from proxy_process import REPO_ROOT, need, run, unavailable

UNIT = "usr/lib/systemd/system/mail-tls-proxy.service"
CONFIG = "etc/mail-tls-proxy/config.toml"
SUBCOMMAND_PAGES = ("run", "check", "healthcheck", "cert", "cert-self-signed", "tickets",
                    "tickets-rotate", "acme", "acme-renew", "tlsa")
VISIBLE_SUBCOMMANDS = ("run", "check", "healthcheck", "cert", "tickets", "acme", "tlsa")


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    need("cargo")
    need("dpkg-deb")
    if run(["cargo", "deb", "--version"]).returncode != 0:
        unavailable("cargo-deb is not installed (tests/e2e/install-deps.sh installs it)")
    output = tmp_path_factory.mktemp("deb")
    result = run(["bash", str(REPO_ROOT / "packaging" / "build-deb.sh"), "--profile", "dev", "--fast",
                  "--output", str(output)], cwd=REPO_ROOT, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    deb = Path(result.stdout.strip().splitlines()[-1])
    assert deb.parent == output and deb.is_file(), result.stdout
    return deb


@pytest.fixture(scope="module")
def unpacked(package, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    result = run(["dpkg-deb", "-x", str(package), str(root)])
    assert result.returncode == 0, result.stderr
    return root


def test_package_has_no_lintian_errors(package):
    lintian = need("lintian")
    # No tag is suppressed: the stripped dev-profile binary draws none that
    # the release binary would not. Warnings (e.g. initial-upload-closes-no-bugs,
    # for a package that closes no Debian bug) do not fail the test.
    result = run([lintian, "--fail-on", "error", "--display-info", str(package)])
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"^E: ", result.stdout, re.M), result.stdout


def test_package_declares_the_configuration_a_conffile(package):
    info = run(["dpkg-deb", "-I", str(package)])
    assert info.returncode == 0, info.stderr
    assert re.search(r"^\s+\d+ bytes,\s+\d+ lines\s+conffiles\b", info.stdout, re.M), info.stdout
    conffiles = run(["dpkg-deb", "-I", str(package), "conffiles"]).stdout.split()
    assert conffiles == [f"/{CONFIG}"], conffiles
    fields = {name: run(["dpkg-deb", "-f", str(package), name]).stdout.strip()
              for name in ("Package", "Version", "Depends", "Section")}
    version = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())["package"]["version"]
    assert fields["Package"] == "mail-tls-proxy" and fields["Version"] == f"{version}-1", fields
    assert "libc6" in fields["Depends"] and "init-system-helpers" in fields["Depends"], fields


def test_package_holds_binary_unit_manual_pages_completions_and_documentation(package):
    listing = run(["dpkg-deb", "-c", str(package)])
    assert listing.returncode == 0, listing.stderr
    entries = {line.split()[-1].removeprefix("./"): line.split()[0] for line in listing.stdout.splitlines()}
    assert entries.get("usr/bin/mail-tls-proxy") == "-rwxr-xr-x", entries
    expected = [UNIT, CONFIG, "usr/share/man/man1/mail-tls-proxy.1.gz",
                *(f"usr/share/man/man1/mail-tls-proxy-{page}.1.gz" for page in SUBCOMMAND_PAGES),
                "usr/share/bash-completion/completions/mail-tls-proxy",
                "usr/share/zsh/vendor-completions/_mail-tls-proxy",
                "usr/share/fish/vendor_completions.d/mail-tls-proxy.fish",
                "usr/share/doc/mail-tls-proxy/copyright", "usr/share/doc/mail-tls-proxy/changelog.Debian.gz"]
    assert [path for path in expected if entries.get(path) != "-rw-r--r--"] == [], entries
    assert not any("generate-assets" in path for path in entries), entries


def test_unpacked_binary_passes_check_on_the_packaged_configuration(unpacked):
    config = unpacked / CONFIG
    text = config.read_text()
    assert "self-signed" in text and "[[certificate]]" in text, "the comments say what the example lacks"
    # Every shipped SMTP listener tells the backend who the client is and
    # keeps the relay guard on (as test_deploy.py asks of the other examples).
    listeners = tomllib.loads(text)["listener"]
    smtp = [listener for listener in listeners if listener["protocol"] == "smtp"]
    assert smtp and all(listener.get("client_identity") in ("proxy-v2", "xclient") for listener in smtp), smtp
    assert all(listener.get("relay_check", "refuse") == "refuse" for listener in smtp), smtp
    assert all(listener["listen"].startswith("127.0.0.1:") for listener in listeners), listeners
    # With no network at all (a fresh network namespace where it can have
    # one), as on a machine whose mail server is not set up yet: the relay
    # guard cannot reach the SMTP backend, which is "unknown", not a failure.
    command = [str(unpacked / "usr/bin/mail-tls-proxy"), "check", "--config", str(config)]
    offline = shutil.which("unshare") and run(["unshare", "--net", "true"]).returncode == 0
    result = run(["unshare", "--net", *command] if offline else command,
                 env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"configuration {config}: OK" in output, output
    assert "a self-signed one for \"localhost\" is generated at start-up" in output, output
    for listener in smtp:
        assert re.search(rf"relay check: listener {listener['name']}: ", output), output
    if offline:
        assert output.count("the proxy starts anyway and asks again") == len(smtp), output


def host_unit_directory() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    unavailable("no systemd unit directory with multi-user.target on this machine")


def test_packaged_unit_passes_systemd_analyze_verify_against_the_unpacked_tree(unpacked, tmp_path):
    analyze = need("systemd-analyze")
    unit_text = (unpacked / UNIT).read_text()
    # deploy/systemd's unit from [Unit] on, with the packaged binary's path:
    # derived at build time, never a second copy.
    deploy_unit = (REPO_ROOT / "deploy" / "systemd" / "mail-tls-proxy.service").read_text()
    body = deploy_unit[deploy_unit.index("[Unit]"):]
    assert unit_text.endswith(body.replace("/usr/local/bin/mail-tls-proxy", "/usr/bin/mail-tls-proxy"))
    commands = re.findall(r"^Exec\w+=(\S+)", unit_text, re.M)
    assert "/usr/bin/mail-tls-proxy" in commands and all(
        command in ("/usr/bin/mail-tls-proxy", "/bin/kill") for command in commands), commands
    # --root resolves the unit's paths, /usr/bin/mail-tls-proxy among them,
    # in a copy of the unpacked tree; the host's own units are added beside
    # the package's so that the dependencies every service has
    # (sysinit.target, ...) are found there too.
    root = tmp_path / "root"
    shutil.copytree(unpacked, root, symlinks=True)
    units = root / "usr/lib/systemd/system"
    for host_unit in host_unit_directory().iterdir():
        if not (units / host_unit.name).exists() and not host_unit.is_dir():
            shutil.copy2(host_unit, units / host_unit.name, follow_symlinks=False)
    result = run([analyze, "verify", f"--root={root}", str(units / "mail-tls-proxy.service")])
    # verify only warns (exit 0) about unknown keys: any output is a finding.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    # And it does look inside the root: without the binary there, it fails.
    (root / "usr/bin/mail-tls-proxy").unlink()
    result = run([analyze, "verify", f"--root={root}", str(units / "mail-tls-proxy.service")])
    assert result.returncode != 0 and "/usr/bin/mail-tls-proxy" in result.stderr, result.stderr


def test_manual_pages_render_and_name_every_subcommand(unpacked):
    man = need("man")
    pages = unpacked / "usr/share/man/man1"
    rendered = {}
    for page in sorted(pages.glob("*.1.gz")):
        result = run([man, "--warnings", "-l", str(page)], env={**os.environ, "MANWIDTH": "100", "LANG": "C.UTF-8"})
        assert result.returncode == 0 and not result.stderr.strip(), (page.name, result.stderr)
        rendered[page.name.removesuffix(".1.gz")] = result.stdout
    assert sorted(rendered) == sorted(["mail-tls-proxy", *(f"mail-tls-proxy-{page}" for page in SUBCOMMAND_PAGES)])
    main = rendered["mail-tls-proxy"]
    assert re.search(r"^NAME\n\s+mail-tls-proxy\s+- TLS front door", main, re.M), main
    subcommands = main.split("SUBCOMMANDS", 1)[1]
    for name in VISIBLE_SUBCOMMANDS:
        assert f"mail-tls-proxy-{name}(1)" in subcommands, main
        page = rendered[f"mail-tls-proxy-{name}"]
        assert re.search(rf"^NAME\n\s+mail-tls-proxy-{name}\s+- ", page, re.M), page
        assert re.search(rf"^SYNOPSIS\n\s+mail-tls-proxy {name}\b", page, re.M), page
    assert "--config" in rendered["mail-tls-proxy-check"]
    assert "generate-assets" not in "".join(rendered.values())


def test_bash_completion_completes_the_subcommands(unpacked):
    completion = unpacked / "usr/share/bash-completion/completions/mail-tls-proxy"
    script = f"""
        source {completion}
        function=$(complete -p mail-tls-proxy | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')
        COMP_WORDS=(mail-tls-proxy ""); COMP_CWORD=1
        "$function" mail-tls-proxy "" mail-tls-proxy
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    result = run(["bash", "--norc", "-c", script])
    assert result.returncode == 0, result.stderr
    offered = result.stdout.split()
    assert all(name in offered for name in VISIBLE_SUBCOMMANDS) and "generate-assets" not in offered, offered
