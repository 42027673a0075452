#!/usr/bin/env bash
# One entry point for the end-to-end suite against real Dovecot and Postfix:
#   tests/e2e/run.sh [extra pytest arguments]
#
# 1. installs the Debian packages (tests/e2e/install-deps.sh),
# 2. makes sure python3 has pytest,
# 3. builds target/debug/mail-tls-proxy unless MAIL_TLS_PROXY_BIN points
#    elsewhere or E2E_SKIP_BUILD=1,
# 4. runs python3 -m pytest -q tests/e2e from the repository root.
# With CI=true anything missing fails the run instead of skipping tests.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo_root"

log() { printf 'e2e: %s\n' "$*" >&2; }
in_ci() { [ "${CI:-}" = true ]; }

bash tests/e2e/install-deps.sh

if ! python3 -c 'import pytest' >/dev/null 2>&1; then
    log "pytest missing for $(command -v python3); trying pip"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pytest || true
fi
if ! python3 -c 'import pytest' >/dev/null 2>&1; then
    log "error: pytest is not available for $(command -v python3)"
    exit 1
fi

if [ -z "${MAIL_TLS_PROXY_BIN:-}" ] && [ "${E2E_SKIP_BUILD:-}" != 1 ]; then
    if command -v cargo >/dev/null 2>&1; then
        log "building mail-tls-proxy (cargo build --locked --bin mail-tls-proxy)"
        if ! cargo build --quiet --locked --bin mail-tls-proxy; then
            if in_ci; then
                log "error: cargo build failed"
                exit 1
            fi
            log "warning: cargo build failed; tests through the proxy will be skipped if no binary exists"
        fi
    elif in_ci; then
        log "error: cargo not found and MAIL_TLS_PROXY_BIN not set"
        exit 1
    fi
fi

exec python3 -m pytest -q tests/e2e "$@"
