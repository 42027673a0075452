#!/bin/sh
# Builds a fully static mail-tls-proxy (glibc, crt-static: no shared library
# at all, so it runs in a FROM scratch image) and copies it to OUT_DIR
# (default target/static). Used by deploy/Dockerfile's build stage and by the
# container test (tests/e2e/container-test.sh), so both build it the same way.
#
#   sh deploy/build-static.sh [OUT_DIR]
#
# glibc's getaddrinfo works statically for /etc/hosts and DNS (both are built
# into libc since glibc 2.34), which is all a backend host name needs.
set -eu
cd "$(dirname "$0")/.."
out_dir=${1:-target/static}
target=$(uname -m)-unknown-linux-gnu

RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" --bin mail-tls-proxy

binary=${CARGO_TARGET_DIR:-target}/$target/release/mail-tls-proxy
if command -v readelf >/dev/null 2>&1 && readelf -d "$binary" | grep -q NEEDED; then
    echo "build-static: $binary needs shared libraries:" >&2
    readelf -d "$binary" | grep NEEDED >&2
    exit 1
fi
mkdir -p "$out_dir"
cp "$binary" "$out_dir/mail-tls-proxy"
echo "build-static: wrote $out_dir/mail-tls-proxy"
