#!/usr/bin/env bash
# Installs the cargo-deb that packaging/build-deb.sh is written for, unless
# it is already there: `cargo install cargo-deb --version <pin> --locked`
# (a few minutes of compiling, once). The version is pinned because the
# test build packages a dev-profile binary (build-deb.sh --profile dev),
# which this version accepts with a warning; a newer cargo-deb may refuse it
# and is taken on deliberately, by changing the pin.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0

log() { printf 'install-cargo-deb: %s\n' "$*" >&2; }

installed_version() {
    cargo deb --version 2>/dev/null | awk '$1 == "cargo-deb" { print $2 }'
}

if ! command -v cargo >/dev/null 2>&1; then
    log "error: cargo not found"
    exit 1
fi
if [ "$(installed_version)" = "$CARGO_DEB_VERSION" ]; then
    exit 0
fi
log "installing cargo-deb $CARGO_DEB_VERSION (cargo install --locked)"
cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION"
found=$(installed_version)
if [ "$found" != "$CARGO_DEB_VERSION" ]; then
    log "error: after installing, \`cargo deb --version\` reports '${found:-nothing}' (is ~/.cargo/bin on PATH?)"
    exit 1
fi
