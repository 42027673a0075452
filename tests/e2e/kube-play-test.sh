#!/usr/bin/env bash
# The Kubernetes sidecar, run: `podman kube play` of deploy/kubernetes's
# ConfigMap and Deployment as written (security context, sysctl, fsGroup,
# volumes, env, probes), plus the Secret cert-manager would write, with two
# substitutions only: the images (the proxy's runtime image built from
# deploy/Dockerfile, and a stand-in for the legacy server: the benchmark's
# plaintext backend, FROM scratch, on the loopback ports the ConfigMap
# names), host ports for IMAPS and metrics so the test can reach them, and
# two stand-ins for what podman 4.3 lacks: NET_BIND_SERVICE for the pod
# sysctl it ignores, and the directory kubelet makes for a Secret volume
# (bind-mounted; podman crashes on secret volumes), which the test then
# renews the way kubelet does.
# Then: /readyz 200 (every backend greeted across the pod's loopback), the
# relay guard's result for each SMTP listener, an IMAPS handshake with the
# Secret's certificate, the proxy running as uid 65532 with ports below 1024
# bound, and `podman kube down` draining it.
#
# The stand-in greets but speaks no PROXY protocol, which the ConfigMap's
# SMTP listeners send (client_identity = "proxy-v2", for a legacy server
# configured as its comments say): SMTP sessions through this pod are not
# exercised, and the relay guard cannot get an answer from the stand-in
# (result "unknown", which never stops the proxy). Real Postfix behind the
# ConfigMap's configuration: test_deploy.py and test_relay_guard.py.
#
#   tests/e2e/kube-play-test.sh PROXY_STATIC_BINARY BACKEND_STATIC_BINARY WORK_DIR
#
# Needs root, podman with runc and the CNI bridge network (Debian's podman).
set -euo pipefail

if [ "$#" -ne 3 ]; then
    echo "usage: $0 PROXY_STATIC_BINARY BACKEND_STATIC_BINARY WORK_DIR" >&2
    exit 2
fi
proxy_binary=$1 backend_binary=$2 work=$3
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
proxy_image=localhost/mail-tls-proxy:kube-test
mail_image=localhost/legacy-mail:kube-test

log() { printf 'kube-play-test: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

mkdir -p "$work"
work=$(cd "$work" && pwd)
printf '[containers]\ndefault_ulimits = []\n' >"$work/containers.conf"
export CONTAINERS_CONF=$work/containers.conf
runroot=$(mktemp -d /tmp/mtp-kube.XXXXXX)
podman_cmd=(podman --root "$work/storage" --runroot "$runroot" --storage-driver vfs
            --runtime runc --cgroup-manager cgroupfs --events-backend file)
p() { "${podman_cmd[@]}" "$@"; }

cleanup() {
    p kube down "$work/play.yaml" >/dev/null 2>&1 || true
    p pod rm -f -a >/dev/null 2>&1 || true
    [ -n "${KEEP:-}" ] || p rmi -f "$proxy_image" "$mail_image" >/dev/null 2>&1 || true
    rm -rf "$runroot"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

log "building the proxy image (deploy/Dockerfile, runtime stage) and a legacy-server stand-in"
mkdir -p "$work/proxy-context" "$work/mail-context"
cp "$proxy_binary" "$work/proxy-context/mail-tls-proxy"
p build --quiet --format docker --target runtime --build-arg BINARY_FROM=prebuilt \
    -f "$repo_root/deploy/Dockerfile" -t "$proxy_image" "$work/proxy-context" >/dev/null
cp "$backend_binary" "$work/mail-context/bench-backend"
cat >"$work/mail-context/Containerfile" <<'EOF'
FROM scratch
COPY bench-backend /bench-backend
USER 8:8
ENTRYPOINT ["/bench-backend"]
EOF
p build --quiet -t "$mail_image" "$work/mail-context" >/dev/null

# What kubelet does when a Secret changes: a new timestamped folder, then one
# rename of the ..data symlink; the files are symlinks through ..data.
publish_secret() {  # GENERATION CERT KEY
    python3 - "$work/volume.json" "$@" <<'PY'
import json, os, sys
from pathlib import Path
volume = json.loads(Path(sys.argv[1]).read_text())
generation, chain, key = int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
secret_dir = Path(volume["dir"])
version = secret_dir / f"..2025_01_0{generation}_00_00_00.{generation}"
version.mkdir()
for name, source in (("tls.crt", chain), ("tls.key", key)):
    (version / name).write_bytes(source.read_bytes())
    os.chown(version / name, 0, volume["group"])
    os.chmod(version / name, volume["mode"])
os.chmod(version, 0o755)
link = secret_dir / "..data_tmp"
link.symlink_to(version.name)
os.replace(link, secret_dir / "..data")
for name in ("tls.crt", "tls.key"):
    if not (secret_dir / name).is_symlink():
        (secret_dir / name).symlink_to(f"..data/{name}")
PY
}

served_certificate_is() {  # PORT CERT: the IMAPS handshake presents CERT
    python3 - "$@" <<'PY'
import socket, ssl, sys
from pathlib import Path
context = ssl.create_default_context(cafile=sys.argv[2])
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as sock:
    with context.wrap_socket(sock, server_hostname="mail.example.org") as tls:
        served = tls.getpeercert(binary_form=True)
        greeting = tls.recv(200)
assert greeting.startswith(b"* OK"), greeting
sys.exit(0 if served == ssl.PEM_cert_to_DER_cert(Path(sys.argv[2]).read_text()) else 1)
PY
}

log "the Secret cert-manager would write (kubernetes.io/tls)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=mail.example.org -addext "subjectAltName=DNS:mail.example.org" \
    -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null

imaps_port=$(free_port)
metrics_port=$(free_port)
python3 - "$repo_root/deploy/kubernetes" "$work" "$proxy_image" "$mail_image" "$imaps_port" "$metrics_port" <<'PY'
import base64, json, os, sys
from pathlib import Path
import yaml
k8s, work, proxy_image, mail_image = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
imaps_port, metrics_port = int(sys.argv[5]), int(sys.argv[6])
configmap = yaml.safe_load((k8s / "configmap.yaml").read_text())
deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
          "metadata": {"name": "mail-tls"},
          "data": {name: base64.b64encode((work / name).read_bytes()).decode() for name in ("tls.crt", "tls.key")}}
pod = deployment["spec"]["template"]["spec"]
mail, proxy = pod["containers"]
# The legacy server's stand-in: the loopback ports the ConfigMap names.
mail["image"] = mail_image
mail["args"] = ["--smtp", "127.0.0.1:2525", "--imap", "127.0.0.1:1143", "--pop3", "127.0.0.1:1110"]
mail.pop("lifecycle")  # no sleep in a scratch image
submission = {"name": "mail-submission", "image": mail_image, "args": ["--smtp", "127.0.0.1:2587"]}
pod["containers"] = [mail, submission, proxy]
proxy["image"] = proxy_image
# podman 4.3's kube play ignores pod sysctls (its man page lists
# securityContext.sysctls as unsupported), so ip_unprivileged_port_start
# cannot open the low ports here; grant NET_BIND_SERVICE instead, which
# podman (unlike Kubernetes) hands to a non-root user. Everything else in
# the container's securityContext stays as written.
proxy["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
for port in proxy["ports"]:
    if port["name"] == "imaps":
        port["hostPort"] = imaps_port
    if port["name"] == "metrics":
        port["hostPort"] = metrics_port
# The Secret volume: podman 4.3's kube play cannot mount one (it crashes),
# so the same directory kubelet would make is bind-mounted in its place:
# files behind a ..data symlink, group fsGroup, mode defaultMode. That also
# lets the test renew it the way kubelet does.
tls = next(v for v in pod["volumes"] if v["name"] == "tls")
secret_dir = work / "secret-volume"
group = pod["securityContext"]["fsGroup"]
mode = tls["secret"]["defaultMode"]
secret_dir.mkdir()
os.chmod(secret_dir, 0o755)
tls.pop("secret")
tls["hostPath"] = {"path": str(secret_dir), "type": "Directory"}
(work / "play.yaml").write_text(yaml.safe_dump_all([configmap, deployment]))
(work / "volume.json").write_text(json.dumps({"dir": str(secret_dir), "group": group, "mode": mode}))
PY

publish_secret 1 "$work/tls.crt" "$work/tls.key"

log "podman kube play (ConfigMap, Deployment)"
p kube play "$work/play.yaml" >"$work/play.out" 2>&1 || { cat "$work/play.out" >&2; fail "kube play"; }
proxy_ctr=$(p ps -a --format '{{.Names}}' | grep -- '-mail-tls-proxy$' | head -1 || true)
[ -n "$proxy_ctr" ] || { p ps -a >&2; fail "no proxy container"; }

ready=no
for _ in $(seq 1 60); do
    if [ "$(p inspect -f '{{.State.Running}}' "$proxy_ctr")" != true ]; then
        p logs "$proxy_ctr" >&2 || true
        fail "the proxy container exited"
    fi
    if python3 - "$metrics_port" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=5) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    then ready=yes; break; fi
    sleep 0.5
done
if [ "$ready" != yes ]; then
    python3 -c "import urllib.request,sys
try: urllib.request.urlopen('http://127.0.0.1:$metrics_port/readyz', timeout=5)
except Exception as e: print(getattr(e, 'read', lambda: str(e).encode())().decode(), file=sys.stderr)" || true
    p logs "$proxy_ctr" 2>&1 | tail -20 >&2
    fail "/readyz never answered 200"
fi
log "/readyz 200: all seven listeners bound, the Secret's certificate loaded, every backend greeted over the pod's loopback"

python3 - "$metrics_port" <<'PY' || fail "the relay guard's metric is missing or open"
import re, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5) as response:
    text = response.read().decode()
for listener in ("smtp", "submissions", "submission"):
    values = {result: float(value) for result, value in re.findall(
        rf'^mail_tls_proxy_relay_check\{{listener="{listener}",result="(\w+)"\}} (\S+)$', text, re.M)}
    assert set(values) == {"closed", "open", "unknown"} and sum(values.values()) == 1, (listener, values)
    assert values["open"] == 0, (listener, values)
PY
log "relay guard checked the three SMTP listeners' backend, none open"
[ "$(p inspect -f '{{.RestartCount}}' "$proxy_ctr")" = 0 ] || fail "the proxy container restarted"

served_certificate_is "$imaps_port" "$work/tls.crt" || fail "IMAPS did not present the Secret's certificate"
log "IMAPS on container port 993: handshake with the Secret's certificate, greeting relayed"

log "renewal: a new certificate in the Secret volume, ..data swapped as kubelet does"
mkdir -p "$work/renewed"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 \
    -subj /CN=mail.example.org -addext "subjectAltName=DNS:mail.example.org" \
    -keyout "$work/renewed/tls.key" -out "$work/renewed/tls.crt" 2>/dev/null
publish_secret 2 "$work/renewed/tls.crt" "$work/renewed/tls.key"
renewed=no
for _ in $(seq 1 50); do
    if served_certificate_is "$imaps_port" "$work/renewed/tls.crt" 2>/dev/null; then renewed=yes; break; fi
    sleep 0.2
done
[ "$renewed" = yes ] || { p logs "$proxy_ctr" 2>&1 | tail -5 >&2; fail "the renewed certificate was not served"; }
[ "$(p inspect -f '{{.RestartCount}}' "$proxy_ctr")" = 0 ] || fail "the proxy container restarted"
log "the renewed certificate is served, no restart"

pid=$(p inspect -f '{{.State.Pid}}' "$proxy_ctr")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" = 65532 ] || fail "the proxy runs as uid $uid"
p logs "$proxy_ctr" >"$work/proxy.log" 2>&1
grep -q '"message":"listening".*"listener":"smtp".*"address":"0.0.0.0:25"' "$work/proxy.log" \
    || { tail -20 "$work/proxy.log" >&2; fail "no JSON log line for the port-25 listener"; }
log "the proxy runs as uid 65532 and listens on 25"

log "pod stop (SIGTERM, terminationGracePeriodSeconds): drains, exit 0"
grace=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['spec']['template']['spec']['terminationGracePeriodSeconds'])" "$repo_root/deploy/kubernetes/deployment.yaml")
pod=$(p pod ps --format '{{.Name}}' | head -1)
p pod stop -t "$grace" "$pod" >/dev/null
code=$(p inspect -f '{{.State.ExitCode}}' "$proxy_ctr")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
p logs "$proxy_ctr" 2>&1 | grep -q '"message":"all sessions closed"' || fail "no drain in the log"
p kube down "$work/play.yaml" >/dev/null
log "passed"
