#!/usr/bin/env bash
# The container image, exercised: builds deploy/Dockerfile's runtime stage
# (FROM scratch) around a static binary with podman, runs it in front of a
# real Dovecot, and checks what an operator relies on:
#   - an IMAPS login (imaplib, certificate verified) through the container,
#     with the backend named by host name (static glibc resolving in scratch);
#   - the image's HEALTHCHECK (the binary's own `healthcheck` against /readyz)
#     reports healthy, finding the admin endpoint (a port of its own) in the
#     configuration the container runs with;
#   - the process runs as uid 65532, configured only by the environment;
#   - logs are JSON lines with listener, peer and connection_id;
#   - a non-root process binds a port below 1024 with NET_BIND_SERVICE;
#   - `podman stop` (SIGTERM) drains and the container exits 0.
#
#   tests/e2e/container-test.sh STATIC_BINARY IMAP_PORT CERT_DIR WORK_DIR
#
# CERT_DIR holds fullchain.pem and privkey.pem for "localhost". No image is
# pulled: this machine reaches no container registry, and FROM scratch needs
# none. Needs root (podman with vfs storage, runc, cgroupfs, host network).
set -euo pipefail

if [ "$#" -ne 4 ]; then
    echo "usage: $0 STATIC_BINARY IMAP_PORT CERT_DIR WORK_DIR" >&2
    exit 2
fi
binary=$1 imap_port=$2 cert_dir=$3 work=$4
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
image=localhost/mail-tls-proxy:container-test
name=mail-tls-proxy-test-$$

log() { printf 'container-test: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

mkdir -p "$work"
work=$(cd "$work" && pwd)
# A private podman: its own storage under WORK, no registry, no systemd.
printf '[containers]\ndefault_ulimits = []\n' >"$work/containers.conf"
export CONTAINERS_CONF=$work/containers.conf
# podman refuses a run root path longer than 50 characters.
runroot=$(mktemp -d /tmp/mtp-podman.XXXXXX)
podman_cmd=(podman --root "$work/storage" --runroot "$runroot" --storage-driver vfs
            --runtime runc --cgroup-manager cgroupfs --events-backend file)
p() { "${podman_cmd[@]}" "$@"; }

cleanup() {
    p rm -f -t 0 "$name" "$name-low" >/dev/null 2>&1 || true
    p rmi -f "$image" >/dev/null 2>&1 || true
    rm -rf "$runroot"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

log "building the runtime stage of deploy/Dockerfile around $binary"
context=$work/context
mkdir -p "$context"
cp "$binary" "$context/mail-tls-proxy"
p build --quiet --format docker --target runtime --build-arg BINARY_FROM=prebuilt \
    -f "$repo_root/deploy/Dockerfile" -t "$image" "$context" >/dev/null

[ "$(p image inspect -f '{{.Config.User}}' "$image")" = 65532:65532 ] || fail "image user is not 65532:65532"
healthcheck=$(p image inspect -f '{{json .Config.Healthcheck}}' "$image")
case "$healthcheck" in
    *'"/usr/local/bin/mail-tls-proxy","healthcheck"'*) ;;
    *) fail "HEALTHCHECK is not the binary's own: $healthcheck" ;;
esac

imaps_port=$(free_port)
metrics_port=$(free_port)
config_dir=$work/etc
mkdir -p "$config_dir/tls"
cp "$cert_dir/fullchain.pem" "$cert_dir/privkey.pem" "$config_dir/tls/"
cat >"$config_dir/config.toml" <<EOF
shutdown_grace = 5

[[certificate]]
cert = "tls/fullchain.pem"
key  = "tls/privkey.pem"

[metrics]
listen = "127.0.0.1:$metrics_port"

[[listener]]
name     = "imaps"
protocol = "imap"
tls      = "implicit"
listen   = "127.0.0.1:$imaps_port"
backend  = "mail-backend:$imap_port"
EOF
# The image's user must be able to read the key (as a Secret volume or a
# bind mount owned by it would be).
chown -R 65532:65532 "$config_dir"
chmod 0600 "$config_dir/tls/privkey.pem"

log "running it (imaps on 127.0.0.1:$imaps_port -> mail-backend:$imap_port)"
p run -d --name "$name" --network host --health-interval disable --add-host mail-backend:127.0.0.1 \
    -v "$config_dir:/etc/mail-tls-proxy:ro" \
    -e MAIL_TLS_PROXY_LOG=debug \
    "$image" >/dev/null

healthy=no
for _ in $(seq 1 60); do
    if [ "$(p inspect -f '{{.State.Running}}' "$name")" != true ]; then
        p logs "$name" >&2 || true
        fail "the container exited"
    fi
    if p healthcheck run "$name" >/dev/null 2>&1; then
        healthy=yes
        break
    fi
    sleep 0.5
done
if [ "$healthy" != yes ]; then
    p logs "$name" >&2 || true
    fail "HEALTHCHECK never passed"
fi
log "HEALTHCHECK passed (mail-tls-proxy healthcheck -> /readyz 200)"

pid=$(p inspect -f '{{.State.Pid}}' "$name")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" = 65532 ] || fail "the proxy runs as uid $uid, not 65532"

log "IMAPS login through the container"
python3 - "$imaps_port" "$cert_dir/fullchain.pem" <<'PY'
import imaplib, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
context = ssl.create_default_context(cafile=ca)
client = imaplib.IMAP4_SSL("localhost", port, ssl_context=context, timeout=20)
assert client.sock.version() in ("TLSv1.3", "TLSv1.2"), client.sock.version()
typ, _ = client.login("alice", "secret")
assert typ == "OK", typ
typ, data = client.select("INBOX")
assert typ == "OK", (typ, data)
version = client.sock.version()
client.logout()
print(f"container-test: IMAPS login and SELECT INBOX OK ({version})", file=sys.stderr)
PY

log "logs are JSON lines with listener, peer and connection_id"
p logs "$name" >"$work/container.log" 2>&1
python3 - "$work/container.log" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]).read().splitlines() if l.strip()]
records = [json.loads(l) for l in lines]  # every line is one JSON object
assert all({"timestamp", "level", "message"} <= r.keys() for r in records), records[:3]
connection = [r for r in records if r.get("listener") == "imaps" and "connection_id" in r and "peer" in r]
assert connection, "no log line carries listener, peer and connection_id:\n" + "\n".join(lines[-20:])
print(f"container-test: {len(records)} JSON log lines, {len(connection)} with listener/peer/connection_id", file=sys.stderr)
PY

log "a non-root process binds a port below 1024 with NET_BIND_SERVICE"
low_port=""
for candidate in 993 465 995 587 143 110 25 992 991 990; do
    if python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1',$candidate))" 2>/dev/null; then
        low_port=$candidate
        break
    fi
done
if [ -z "$low_port" ]; then
    log "no free port below 1024 on 127.0.0.1; skipping that check"
else
    low_dir=$work/etc-low
    cp -a "$config_dir" "$low_dir"
    low_metrics=$(free_port)
    sed -i "s/127.0.0.1:$imaps_port/127.0.0.1:$low_port/; s/127.0.0.1:$metrics_port/127.0.0.1:$low_metrics/" "$low_dir/config.toml"
    p run -d --name "$name-low" --network host --health-interval disable --add-host mail-backend:127.0.0.1 \
        --cap-drop all --cap-add NET_BIND_SERVICE \
        -v "$low_dir:/etc/mail-tls-proxy:ro" \
        "$image" >/dev/null
    bound=no
    for _ in $(seq 1 40); do
        if p healthcheck run "$name-low" >/dev/null 2>&1; then bound=yes; break; fi
        [ "$(p inspect -f '{{.State.Running}}' "$name-low")" = true ] || break
        sleep 0.5
    done
    if [ "$bound" != yes ]; then
        p logs "$name-low" >&2 || true
        fail "uid 65532 with NET_BIND_SERVICE could not serve on port $low_port"
    fi
    python3 -c "
import socket, ssl
c = ssl.create_default_context(cafile='$cert_dir/fullchain.pem')
with socket.create_connection(('127.0.0.1', $low_port), timeout=10) as s, c.wrap_socket(s, server_hostname='localhost') as t:
    assert t.recv(1024).startswith(b'* OK')
"
    log "uid 65532 served IMAPS on port $low_port"
    p rm -f -t 0 "$name-low" >/dev/null
fi

log "podman stop (SIGTERM) drains and exits 0"
p stop -t 20 "$name" >/dev/null
code=$(p inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || { p logs "$name" | tail -5 >&2; fail "exit code $code after SIGTERM"; }
p logs "$name" 2>&1 | grep -q '"message":"all sessions closed"' || fail "no drain in the log"

log "passed"
