#!/usr/bin/env bash
# Builds the Debian package of mail-tls-proxy:
#
#   packaging/build-deb.sh [--profile PROFILE] [--output DIR] [--fast]
#
# 1. cargo build --locked --profile PROFILE --bin mail-tls-proxy
#    (PROFILE: release by default; nothing is rebuilt when it is current);
# 2. that binary's hidden `generate-assets` subcommand writes the manual
#    pages and the bash, zsh and fish completions, made from its own command
#    line, into target/packaging/;
# 3. the packaged systemd unit is derived from
#    deploy/systemd/mail-tls-proxy.service (the binary at /usr/bin instead of
#    /usr/local/bin), and /etc/mail-tls-proxy/config.toml from
#    examples/quickstart.toml (with a header for the package);
# 4. cargo deb --no-build packages exactly the binary of step 1, with the
#    metadata of [package.metadata.deb] in Cargo.toml.
#
# The last line printed is the path of the .deb (default directory:
# target/debian/). --fast compresses less (a quicker build of a larger file).
# cargo-deb is installed first if missing (packaging/install-cargo-deb.sh).
# The package's version is Cargo.toml's with revision 1; the top entry of
# packaging/debian/changelog must name that version.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

profile=release
output_dir=target/debian
compression=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=${2:?--profile needs a value}; shift 2 ;;
        --output) output_dir=${2:?--output needs a value}; shift 2 ;;
        --fast) compression=(--fast); shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) printf 'build-deb: unknown argument %s (see --help)\n' "$1" >&2; exit 2 ;;
    esac
done

log() { printf 'build-deb: %s\n' "$*" >&2; }
fail() { log "error: $*"; exit 1; }

# Where the assets of steps 2 and 3 go: the paths [package.metadata.deb]
# names, always under this repository's target/ (build outputs, never
# committed). Two builds at once would share it: run one at a time.
staging=target/packaging
unit_source=deploy/systemd/mail-tls-proxy.service
config_source=examples/quickstart.toml
changelog=packaging/debian/changelog

bash packaging/install-cargo-deb.sh

read -r crate_version target_dir < <(cargo metadata --locked --no-deps --format-version 1 | python3 -c '
import json, sys
metadata = json.load(sys.stdin)
version = next(p["version"] for p in metadata["packages"] if p["name"] == "mail-tls-proxy")
print(version, metadata["target_directory"])')
deb_version="$crate_version-1"
changelog_version=$(sed -n '1s/^mail-tls-proxy (\([^)]*\)).*/\1/p' "$changelog")
[ "$changelog_version" = "$deb_version" ] ||
    fail "$changelog names ${changelog_version:-no version} at the top, the package is $deb_version: add a changelog entry"

log "cargo build --locked --profile $profile --bin mail-tls-proxy"
cargo build --locked --profile "$profile" --bin mail-tls-proxy
case "$profile" in
    dev | test) profile_dir=debug ;;
    bench) profile_dir=release ;;
    *) profile_dir=$profile ;;
esac
binary="$target_dir/$profile_dir/mail-tls-proxy"
[ -x "$binary" ] || fail "$binary was not built"

rm -rf "$staging"
mkdir -p "$staging/systemd"
"$binary" generate-assets --out "$staging" >&2

# The unit as deploy/ has it from [Unit] on, with the packaged binary's path,
# under a header of the package's own (the hand-install steps above [Unit]
# are what the package does).
{
    cat <<'HEADER'
# mail-tls-proxy as a systemd service, installed by the mail-tls-proxy
# Debian package (upgrades replace this file).
#
#   mail-tls-proxy check --config /etc/mail-tls-proxy/config.toml
#   systemctl enable --now mail-tls-proxy
#
# The package neither enables nor starts the service: edit
# /etc/mail-tls-proxy/config.toml first. An upgrade restarts it if it runs.
# Change settings with `systemctl edit mail-tls-proxy` (a drop-in that
# upgrades keep), e.g. SupplementaryGroups=ssl-cert when the certificate
# keys are mode 0640, group ssl-cert: the service runs as a dynamic user.

HEADER
    sed -n '/^\[Unit\]/,$p' "$unit_source" |
        sed 's#/usr/local/bin/mail-tls-proxy#/usr/bin/mail-tls-proxy#g'
} >"$staging/systemd/mail-tls-proxy.service"
grep -q '^ExecStart=/usr/bin/mail-tls-proxy ' "$staging/systemd/mail-tls-proxy.service" ||
    fail "no ExecStart=/usr/bin/mail-tls-proxy in the unit derived from $unit_source"
if grep -n '^[^#]*/usr/local' "$staging/systemd/mail-tls-proxy.service" >&2; then
    fail "the unit derived from $unit_source still names /usr/local (above)"
fi

{
    cat <<'HEADER'
# /etc/mail-tls-proxy/config.toml: the configuration of the mail-tls-proxy
# service. dpkg keeps your edits on upgrades (a conffile).
#
# As installed this is the quick start below: every listener on loopback, on
# unprivileged ports, so nothing is reachable from the network until you
# change it. It names no [[certificate]], so the proxy generates a
# self-signed certificate for `hostname` at each start, which no client
# trusts: fine to try the proxy, not for production. Add a [[certificate]]
# with your real chain and key (the service's dynamic user must be able to
# read them: see /usr/lib/systemd/system/mail-tls-proxy.service), then set
# the listeners' addresses and ports. Every setting:
# /usr/share/doc/mail-tls-proxy/README.md; backends: backends.md there.
#
# After each change:
#   mail-tls-proxy check --config /etc/mail-tls-proxy/config.toml
#   systemctl restart mail-tls-proxy

HEADER
    cat "$config_source"
} >"$staging/config.toml"

mkdir -p "$output_dir"
log "cargo deb --no-build --profile $profile --output $output_dir"
cargo deb --locked --no-build --profile "$profile" --deb-version "$deb_version" \
    --output "$output_dir" "${compression[@]}" >"$staging/cargo-deb.out"
deb=$(tail -n 1 "$staging/cargo-deb.out")
[ -f "$deb" ] || fail "cargo deb did not report a package file (it printed: $(cat "$staging/cargo-deb.out"))"
log "built $deb"
printf '%s\n' "$deb"
