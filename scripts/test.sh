#!/usr/bin/env bash
# Runs every test of mail-tls-proxy: formatting and lints (cargo fmt,
# clippy), unit, property and integration tests (cargo), then the
# end-to-end suite against real Dovecot and Postfix, which installs what it
# needs first (tests/e2e/install-deps.sh).
# With CI=true a missing server or tool fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== cargo fmt --check, cargo clippy -D warnings"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

echo "== cargo test (unit, property, integration, benchmark harness smoke run)"
cargo test --locked --workspace --all-targets

echo "== end-to-end against real Dovecot and Postfix"
bash tests/e2e/run.sh
