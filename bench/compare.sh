#!/usr/bin/env bash
# Side-by-side benchmark: mail-tls-proxy against HAProxy (mode tcp, ssl crt)
# and stunnel (server mode; protocol = imap|pop3|smtp for STARTTLS), all in
# front of the same fast plaintext backend, on this machine, over loopback.
# Figure 6 measures TLS 1.3 session resumption (mail-tls-proxy and HAProxy
# with one ticket-key file, stunnel with its session cache); figure 7 a fleet
# of mail-tls-proxy replicas behind a round-robin load balancer, with shared
# and with per-process ticket keys.
#
# Each proxy gets exactly one core (taskset: the proxy on CPU 0, the load
# generator and the backend on CPU 1), the same certificate (ECDSA P-256,
# then RSA-2048 for the handshake figures), TLS 1.3 only. Every figure runs
# for each proxy in turn, repeated and interleaved (A B C A B C ...); the
# report gives median [min–max] and our ratio to each peer.
#
#   bash bench/compare.sh                 # the full comparison (~32 minutes)
#   bash bench/compare.sh --quick         # 1 repetition, short windows (~3 minutes)
#   bash bench/compare.sh --update-docs   # also rewrite docs/benchmarks.md's tables
#
# Options:
#   --reps N            repetitions per figure (default 3)
#   --duration S        measured seconds per run (default 10; warm-up 1 s more)
#   --figures "1 2 3 4 5 6 7"   which figures (default all)
#   --proxies "ours haproxy stunnel"
#   --certs "ecdsa rsa" key types (default both; RSA runs figures --rsa-figures)
#   --rsa-figures "1 2" figures repeated with the RSA-2048 certificate
#   --concurrency N     sessions at once for figures 1 and 2 (default 32)
#   --idle-counts "1000 10000"  idle sessions for figure 5
#   --idle-states "login greeting"  where idle sessions wait: after LOGIN
#                       (every proxy copying), after the greeting (ours
#                       still reading lines)
#   --fleet-replicas N  mail-tls-proxy replicas in figure 7 (default 3)
#   --out DIR           results folder (default target/bench/<date>)
#   --wait-quiet MIN    first wait up to MIN minutes for load average < 0.5
#                       and no rustc running
#   --no-build          use the binaries already in target/release
#   --update-docs       write the report into docs/benchmarks.md and charts
#                       into docs/benchmarks/
#   --no-realtime       run the measured processes with normal scheduling
#                       (default: SCHED_RR when allowed, see below)
#   --perf              also record a CPU profile of the proxy under test
#                       (perf record -g, first repetition of each run) into
#                       OUT/perf/, with a text summary of the top symbols
#                       (PERF_CALLGRAPH=dwarf for call chains through code
#                       built without frame pointers)
#
# Needs: haproxy, stunnel4, openssl, taskset (installed with apt-get when
# missing and running as root), cargo. Every run is bounded in time and uses
# only 127.0.0.1. Results: OUT/results.tsv (one record per line), OUT/report.md,
# OUT/*.svg, OUT/machine.md, OUT/logs/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

REPS=3
DURATION=10
WARMUP=1
FIGURES="1 2 3 4 5 6 7"
PROXIES="ours haproxy stunnel"
CERTS="ecdsa rsa"
RSA_FIGURES="1 2"
CONCURRENCY=32
IDLE_COUNTS="1000 10000"
IDLE_STATES="login greeting"
FLEET_REPLICAS=3
OUT=""
WAIT_QUIET=0
BUILD=1
UPDATE_DOCS=0
PERF=0
REALTIME=1
LATENCY_SAMPLES=20000
PORT_BASE=${BENCH_PORT_BASE:-20000}

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) REPS=1; DURATION=3; LATENCY_SAMPLES=5000; IDLE_COUNTS="1000 5000"; shift ;;
        --reps) REPS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --figures) FIGURES=$2; shift 2 ;;
        --proxies) PROXIES=$2; shift 2 ;;
        --certs) CERTS=$2; shift 2 ;;
        --rsa-figures) RSA_FIGURES=$2; shift 2 ;;
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --idle-counts) IDLE_COUNTS=$2; shift 2 ;;
        --idle-states) IDLE_STATES=$2; shift 2 ;;
        --fleet-replicas) FLEET_REPLICAS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --wait-quiet) WAIT_QUIET=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --update-docs) UPDATE_DOCS=1; shift ;;
        --perf) PERF=1; shift ;;
        --no-realtime) REALTIME=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- tools
STUNNEL=$(command -v stunnel4 || command -v stunnel || true)
missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
[ -n "$STUNNEL" ] || missing+=(stunnel4)
command -v openssl >/dev/null || missing+=(openssl)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; }
        STUNNEL=$(command -v stunnel4 || command -v stunnel || true)
    else
        die "missing ${missing[*]}: apt-get install -y haproxy stunnel4 openssl util-linux"
    fi
fi
[ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs (one for the proxy, one for the load)"
PROXY_CPU=0
LOAD_CPU=1

# Other work on this machine (compilers, fuzzers) must not steal the measured
# cores. A niced process still delays each wake-up of ours by up to its time
# slice, which makes a latency-bound pipeline of sessions stall, so by default
# the proxies, the backend and the load generator run SCHED_RR (the kernel's
# RT throttling still leaves 5% of each second to everything else; round
# robin, not FIFO, so stunnel's thread per connection cannot starve a
# sibling); failing that, or with --no-realtime, at nice -10.
# The backend runs one step above the load generator it shares a core with:
# it stands in for a mail server that is never the bottleneck, so it drains
# what a proxy sends as soon as it arrives. At equal priority round robin let
# the load generator run on while the backend's socket filled up (4 MB queued
# towards it, the proxy idle at ~77% in the one-connection DATA figure).
NICE_NOTE="normal priority"
RT=()
BACKEND_RT=()
if [ "$REALTIME" = 1 ] && chrt -r 50 true 2>/dev/null; then
    RT=(chrt -r 50)
    BACKEND_RT=(chrt -r 51)
    NICE_NOTE="SCHED_RR priority 50 for every measured process, 51 for the backend (RT throttling: at most $(( $(cat /proc/sys/kernel/sched_rt_runtime_us 2>/dev/null || echo 950000) / 10000 ))% of each CPU)"
elif renice -n -10 -p $$ >/dev/null 2>&1; then
    NICE_NOTE="nice -10 (other work on the machine gets little CPU while it runs)"
fi

# ---------------------------------------------------------------- quiet machine
busy() {
    local load
    load=$(cut -d' ' -f1 /proc/loadavg)
    awk -v l="$load" 'BEGIN { exit !(l >= 0.5) }' && return 0
    pgrep -x rustc >/dev/null && return 0
    return 1
}
if [ "$WAIT_QUIET" != 0 ]; then
    deadline=$(( $(date +%s) + WAIT_QUIET * 60 ))
    while busy && [ "$(date +%s)" -lt "$deadline" ]; do
        log "waiting for a quiet machine (load $(cut -d' ' -f1-3 /proc/loadavg), rustc: $(pgrep -xc rustc || true))"
        sleep 30
    done
fi

# ---------------------------------------------------------------- build
if [ "$BUILD" = 1 ]; then
    log "building (release)"
    cargo build --release --locked --quiet >&2
    cargo build --release --locked --quiet -p mail-tls-bench >&2
fi
# MAIL_TLS_PROXY_BIN: measure another build of the proxy (e.g. an A/B test).
PROXY_BIN=${MAIL_TLS_PROXY_BIN:-$ROOT/target/release/mail-tls-proxy}
LOADGEN=$ROOT/target/release/bench-loadgen
BACKEND_BIN=$ROOT/target/release/bench-backend
for binary in "$PROXY_BIN" "$LOADGEN" "$BACKEND_BIN"; do
    [ -x "$binary" ] || die "$binary is missing (run without --no-build)"
done

# Busy from here on: the run is measured.
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
RUSTC_AT_START=$(pgrep -xc rustc || true)
if busy; then
    log "warning: the machine is busy (load $LOAD_AT_START, rustc processes: $RUSTC_AT_START); figures will be noisy"
fi

# ---------------------------------------------------------------- work folder
[ -n "$OUT" ] || OUT=$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/mail-tls-bench.XXXXXX)
RESULTS=$OUT/results.tsv
: >"$RESULTS"
log "results in $OUT"

# Descriptors: every idle session costs a proxy two (client and backend).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
# stunnel accepts at most limit x 125/256 clients; every proxy is measured at
# the same counts.
MAX_IDLE=$(( (FD_LIMIT - 200) / 2 ))
STUNNEL_MAX=$(( (FD_LIMIT * 125 / 256 - 15) / 100 * 100 ))
case " $PROXIES " in
    *" stunnel "*) [ "$STUNNEL_MAX" -ge "$MAX_IDLE" ] || MAX_IDLE=$STUNNEL_MAX ;;
esac
IDLE_LIST=""
for count in $IDLE_COUNTS; do
    if [ "$count" -gt "$MAX_IDLE" ]; then
        log "warning: the open-file limit here is $FD_LIMIT (hard limit; raising it needs CAP_SYS_RESOURCE): $count idle sessions need $((2 * count + 200)) descriptors per proxy (and stunnel takes at most $((FD_LIMIT * 125 / 256)) clients); measuring $MAX_IDLE instead"
        count=$MAX_IDLE
    fi
    IDLE_LIST="${IDLE_LIST:+$IDLE_LIST,}$count"
done
MAXCONN=$(( (FD_LIMIT - 100) / 2 )) # HAProxy refuses to start unless 2 x maxconn fits

declare -A PID=()
cleanup() {
    local pid
    for pid in "${PID[@]}"; do
        [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    done
    for pid in "${PID[@]}"; do
        [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- ports
B_IMAP=$((PORT_BASE + 143)); B_POP3=$((PORT_BASE + 110)); B_SMTP=$((PORT_BASE + 25)); B_ECHO=$((PORT_BASE + 7))
declare -A OFFSET=([ours]=1000 [haproxy]=2000 [stunnel]=3000)
port() { # port PROXY LISTENER
    local base=$((PORT_BASE + ${OFFSET[$1]}))
    case "$2" in
        imaps) echo $((base + 993)) ;;
        smtps) echo $((base + 465)) ;;
        echo) echo $((base + 7)) ;;
        imap) echo $((base + 143)) ;;
        pop3) echo $((base + 110)) ;;
        submission) echo $((base + 587)) ;;
    esac
}

wait_port() { # wait_port PORT PID
    local tries=0
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        kill -0 "$2" 2>/dev/null || return 1
        tries=$((tries + 1))
        [ "$tries" -lt 200 ] || return 1
        sleep 0.05
    done
}

# ---------------------------------------------------------------- certificates
make_certs() {
    local dir=$WORK/certs
    mkdir -p "$dir/ecdsa" "$dir/rsa"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost \
        -keyout "$dir/ecdsa/key.pem" -out "$dir/ecdsa/cert.pem" 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost \
        -keyout "$dir/rsa/key.pem" -out "$dir/rsa/cert.pem" 2>/dev/null
    for kind in ecdsa rsa; do
        cat "$dir/$kind/cert.pem" "$dir/$kind/key.pem" >"$dir/$kind/combined.pem"
    done
    # Session ticket keys, one base64 line of 80 random bytes each (a 16-byte
    # name, then the secret), the format mail-tls-proxy's [tls] ticket_keys
    # and HAProxy's tls-ticket-keys share. HAProxy wants at least three (it
    # seals with the second newest); ours seals with the newest.
    mkdir -p "$WORK/tickets"
    for _ in 1 2 3; do
        openssl rand 80 | openssl base64 -A
        echo
    done >"$WORK/tickets/keys"
    chmod 600 "$WORK/tickets/keys"
}

# ---------------------------------------------------------------- configurations
# The top of a mail-tls-proxy configuration: limits, the shared ticket keys
# (with "shared"), the certificate; one listener follows per ours_listener.
ours_config_head() { # ours_config_head CERT_DIR shared|own
    echo "hostname = \"localhost\""
    echo "max_connections = $MAXCONN"
    if [ "$2" = shared ]; then
        echo
        echo "[tls]"
        echo "ticket_keys = \"$WORK/tickets/keys\""
    fi
    echo
    echo "[[certificate]]"
    echo "cert = \"$1/cert.pem\""
    echo "key = \"$1/key.pem\""
}

ours_listener() { # ours_listener NAME PROTOCOL TLS PORT BACKEND_PORT
    echo
    echo "[[listener]]"
    echo "name = \"$1\""
    echo "protocol = \"$2\""
    echo "tls = \"$3\""
    echo "listen = \"127.0.0.1:$4\""
    echo "backend = \"127.0.0.1:$5\""
    echo "max_connections_per_ip = $MAXCONN"
    # The benchmark's SMTP backend is a sink that accepts every recipient:
    # the relay guard would rightly refuse to front it.
    if [ "$2" = smtp ]; then echo 'relay_check = "off"'; fi
}

write_configs() { # write_configs CERT
    local cert=$1 dir=$WORK/certs/$1
    local conf=$WORK/$1
    mkdir -p "$conf"
    {
        ours_config_head "$dir" shared
        local spec name protocol tls backend
        for spec in "imaps imap implicit $B_IMAP" "smtps smtp implicit $B_SMTP" "echo imap implicit $B_ECHO" \
                    "imap imap starttls $B_IMAP" "pop3 pop3 starttls $B_POP3" "submission smtp starttls $B_SMTP"; do
            read -r name protocol tls backend <<<"$spec"
            ours_listener "$name" "$protocol" "$tls" "$(port ours "$name")" "$backend"
        done
    } >"$conf/ours.toml"

    cat >"$conf/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $MAXCONN
    ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    maxconn $MAXCONN
    timeout connect 5s
    timeout client 30m
    timeout server 30m
listen imaps
    bind 127.0.0.1:$(port haproxy imaps) ssl crt $dir/combined.pem tls-ticket-keys $WORK/tickets/keys
    server backend 127.0.0.1:$B_IMAP
listen smtps
    bind 127.0.0.1:$(port haproxy smtps) ssl crt $dir/combined.pem tls-ticket-keys $WORK/tickets/keys
    server backend 127.0.0.1:$B_SMTP
listen echo
    bind 127.0.0.1:$(port haproxy echo) ssl crt $dir/combined.pem tls-ticket-keys $WORK/tickets/keys
    server backend 127.0.0.1:$B_ECHO
EOF

    cat >"$conf/stunnel.conf" <<EOF
foreground = yes
pid =
debug = 3
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
cert = $dir/combined.pem
sslVersionMin = TLSv1.3
; Resumption (figure 6): stunnel's session cache, sized and timed as an
; operator would. With TLS 1.3 stunnel 5.68 on OpenSSL 3 resumes from
; stateless tickets (OpenSSL's default; sessionCacheTimeout is their
; lifetime hint, the keys are the process's own). options = NO_TICKET
; (session IDs only) resumed no TLS 1.3 session in a check with s_client.
sessionCacheSize = 20000
sessionCacheTimeout = 43200

[imaps]
accept = 127.0.0.1:$(port stunnel imaps)
connect = 127.0.0.1:$B_IMAP

[smtps]
accept = 127.0.0.1:$(port stunnel smtps)
connect = 127.0.0.1:$B_SMTP

[echo]
accept = 127.0.0.1:$(port stunnel echo)
connect = 127.0.0.1:$B_ECHO

[imap]
accept = 127.0.0.1:$(port stunnel imap)
connect = 127.0.0.1:$B_IMAP
protocol = imap

[pop3]
accept = 127.0.0.1:$(port stunnel pop3)
connect = 127.0.0.1:$B_POP3
protocol = pop3

[submission]
accept = 127.0.0.1:$(port stunnel submission)
connect = 127.0.0.1:$B_SMTP
protocol = smtp
EOF
}

# ---------------------------------------------------------------- processes
start_backend() {
    taskset -c "$LOAD_CPU" "${BACKEND_RT[@]}" "$BACKEND_BIN" --imap "127.0.0.1:$B_IMAP" --pop3 "127.0.0.1:$B_POP3" \
        --smtp "127.0.0.1:$B_SMTP" --echo "127.0.0.1:$B_ECHO" 2>"$OUT/logs/backend.log" &
    PID[backend]=$!
    for p in $B_IMAP $B_POP3 $B_SMTP $B_ECHO; do
        wait_port "$p" "${PID[backend]}" || die "the backend did not start (see $OUT/logs/backend.log)"
    done
}

start_proxy() { # start_proxy NAME CERT
    local name=$1 conf=$WORK/$2 log=$OUT/logs/$1-$2.log
    case "$name" in
        ours) MAIL_TLS_PROXY_LOG=warn taskset -c "$PROXY_CPU" "${RT[@]}" "$PROXY_BIN" run --config "$conf/ours.toml" 2>>"$log" & ;;
        haproxy) taskset -c "$PROXY_CPU" "${RT[@]}" haproxy -db -f "$conf/haproxy.cfg" >>"$log" 2>&1 & ;;
        stunnel) taskset -c "$PROXY_CPU" "${RT[@]}" "$STUNNEL" "$conf/stunnel.conf" >>"$log" 2>&1 & ;;
    esac
    PID[$name]=$!
    wait_port "$(port "$name" imaps)" "${PID[$name]}" || die "$name did not start (see $log)"
    wait_port "$(port "$name" echo)" "${PID[$name]}" || die "$name did not start (see $log)"
}

stop_proxy() { # stop_proxy NAME
    local pid=${PID[$1]:-}
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    PID[$1]=""
}

# ---------------------------------------------------------------- fleet (figure 7)
# FLEET_REPLICAS mail-tls-proxy replicas (all on the proxy core) behind one
# HAProxy in plain TCP round robin (on the load core: it is not measured),
# for each key mode: "shared" replicas read the same ticket_keys file, "own"
# replicas keep keys of their own process (no [tls] ticket_keys).
FLEET_BASE=$((PORT_BASE + 5000))
fleet_port() { # fleet_port MODE REPLICA (0: the load balancer)
    local base=$FLEET_BASE
    [ "$1" = shared ] || base=$((FLEET_BASE + 100))
    echo $((base + $2))
}

start_fleet() { # start_fleet MODE CERT
    local mode=$1 cert=$2 dir=$WORK/certs/$2 conf=$WORK/fleet-$1 i
    mkdir -p "$conf"
    for i in $(seq "$FLEET_REPLICAS"); do
        {
            ours_config_head "$dir" "$mode"
            ours_listener imaps imap implicit "$(fleet_port "$mode" "$i")" "$B_IMAP"
        } >"$conf/replica-$i.toml"
        MAIL_TLS_PROXY_LOG=warn taskset -c "$PROXY_CPU" "${RT[@]}" "$PROXY_BIN" run \
            --config "$conf/replica-$i.toml" 2>>"$OUT/logs/fleet-$mode-$i.log" &
        PID[fleet-$mode-$i]=$!
    done
    {
        echo "global"
        echo "    nbthread 1"
        echo "    maxconn $MAXCONN"
        echo "defaults"
        echo "    mode tcp"
        echo "    maxconn $MAXCONN"
        echo "    timeout connect 5s"
        echo "    timeout client 30m"
        echo "    timeout server 30m"
        echo "listen fleet"
        echo "    bind 127.0.0.1:$(fleet_port "$mode" 0)"
        echo "    balance roundrobin"
        for i in $(seq "$FLEET_REPLICAS"); do
            echo "    server replica$i 127.0.0.1:$(fleet_port "$mode" "$i")"
        done
    } >"$conf/balancer.cfg"
    taskset -c "$LOAD_CPU" "${RT[@]}" haproxy -db -f "$conf/balancer.cfg" >>"$OUT/logs/fleet-$mode-balancer.log" 2>&1 &
    PID[fleet-$mode-balancer]=$!
    for i in $(seq "$FLEET_REPLICAS"); do
        wait_port "$(fleet_port "$mode" "$i")" "${PID[fleet-$mode-$i]}" \
            || die "fleet replica $i ($mode keys) did not start (see $OUT/logs/fleet-$mode-$i.log)"
    done
    wait_port "$(fleet_port "$mode" 0)" "${PID[fleet-$mode-balancer]}" \
        || die "the fleet's load balancer did not start (see $OUT/logs/fleet-$mode-balancer.log)"
}

stop_fleet() { # stop_fleet MODE
    local i
    for i in $(seq "$FLEET_REPLICAS") balancer; do stop_proxy "fleet-$1-$i"; done
}

# ---------------------------------------------------------------- runs
# loadgen SECONDS_LIMIT SUBCOMMAND ARGS...: one bounded run, records appended.
# With --perf, the proxy named by --proxy is profiled during its first
# repetition; PERF_TAG names the profile.
loadgen() {
    local limit=$1
    shift
    local status=0 perf_pid="" proxy="" rep=""
    local args=("$@") i
    for ((i = 0; i < ${#args[@]} - 1; i++)); do
        case "${args[$i]}" in
            --proxy) proxy=${args[$((i + 1))]} ;;
            --rep) rep=${args[$((i + 1))]} ;;
        esac
    done
    if [ "$PERF" = 1 ] && [ "$rep" = 1 ] && [ -n "${PID[$proxy]:-}" ] && [ "$proxy" != backend ] \
        && [ "${PERF_TAG:-}" = "${PERF_TAG#fleet}" ]; then
        mkdir -p "$OUT/perf"
        local data=$OUT/perf/${PERF_TAG:-run}-$proxy.data
        perf record -q -F 1999 --call-graph "${PERF_CALLGRAPH:-fp}" -p "${PID[$proxy]}" -o "$data" 2>>"$OUT/logs/perf.log" &
        perf_pid=$!
    fi
    taskset -c "$LOAD_CPU" "${RT[@]}" timeout --kill-after=10 "$limit" "$LOADGEN" "$@" \
        >>"$RESULTS" 2>>"$OUT/logs/loadgen.log" || status=$?
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        perf report -i "$data" --no-children --sort symbol --percent-limit 0.7 --stdio 2>/dev/null \
            | grep -v '^$' | grep -E '^ +[0-9]' | head -n 60 >"${data%.data}.txt" || true
    fi
    tail -n 12 "$OUT/logs/loadgen.log" | sed -n '/^  /p' | tail -n "${LINES_SHOWN:-1}" >&2 || true
    if [ "$status" != 0 ]; then
        log "  run failed (status $status): $* (see $OUT/logs/loadgen.log)"
        printf '# failed (status %s): %s\n' "$status" "$*" >>"$RESULTS"
    fi
}

common() { # common PROXY CERT REP LISTENER
    local pid=""
    [ "$1" = direct ] || pid="--proxy-pid ${PID[$1]}"
    # shellcheck disable=SC2086
    echo --target "127.0.0.1:$(port "$1" "$4")" $pid --backend-pid "${PID[backend]}" \
        --expect-cert "$WORK/certs/$2/cert.pem" --proxy "$1" --cert "$2" --rep "$3"
}

supports() { # supports PROXY FIGURE
    [ "$1" != haproxy ] || [ "$2" != 2 ] # HAProxy has no STARTTLS
}

run_figure() { # run_figure FIGURE CERT
    local figure=$1 cert=$2 rep proxy
    local session_limit=$((DURATION + WARMUP + 30))
    case "$figure" in
    1)
        log "figure 1 ($cert): implicit TLS sessions, $CONCURRENCY at once"
        PERF_TAG=implicit-$cert
        for rep in $(seq "$REPS"); do
            for proxy in $PROXIES; do
                # shellcheck disable=SC2046
                loadgen "$session_limit" sessions $(common "$proxy" "$cert" "$rep" imaps) \
                    --mode implicit --protocol imap --concurrency "$CONCURRENCY" \
                    --warmup "$WARMUP" --duration "$DURATION"
            done
        done ;;
    2)
        log "figure 2 ($cert): STARTTLS sessions, $CONCURRENCY at once"
        local spec protocol listener
        for spec in "imap imap" "pop3 pop3" "smtp submission"; do
            read -r protocol listener <<<"$spec"
            PERF_TAG=starttls-$protocol-$cert
            for rep in $(seq "$REPS"); do
                for proxy in $PROXIES; do
                    supports "$proxy" 2 || continue
                    # shellcheck disable=SC2046
                    loadgen "$session_limit" sessions $(common "$proxy" "$cert" "$rep" "$listener") \
                        --mode starttls --protocol "$protocol" --concurrency "$CONCURRENCY" \
                        --warmup "$WARMUP" --duration "$DURATION"
                done
            done
        done ;;
    3)
        log "figure 3 ($cert): IMAP NOOP round trip, direct and through each proxy"
        PERF_TAG=latency-$cert
        for rep in $(seq "$REPS"); do
            loadgen 60 latency --target "127.0.0.1:$B_IMAP" --backend-pid "${PID[backend]}" \
                --proxy direct --cert "$cert" --rep "$rep" --mode plain \
                --samples "$LATENCY_SAMPLES" --duration 20
            for proxy in $PROXIES; do
                # shellcheck disable=SC2046
                loadgen 60 latency $(common "$proxy" "$cert" "$rep" imaps) --mode implicit \
                    --samples "$LATENCY_SAMPLES" --duration 20
            done
        done ;;
    4)
        log "figure 4 ($cert): bulk throughput"
        local spec kind listener connections
        for spec in "echo echo 1" "echo echo 8" "data smtps 1" "data smtps 8"; do
            read -r kind listener connections <<<"$spec"
            PERF_TAG=bulk-$kind-$connections-$cert
            for rep in $(seq "$REPS"); do
                for proxy in $PROXIES; do
                    # shellcheck disable=SC2046
                    loadgen "$session_limit" bulk $(common "$proxy" "$cert" "$rep" "$listener") \
                        --kind "$kind" --connections "$connections" \
                        --warmup "$WARMUP" --duration "$DURATION"
                done
            done
        done ;;
    5)
        log "figure 5 ($cert): RSS at 0 and $IDLE_LIST idle TLS sessions (fresh process each time; after LOGIN, and waiting after the greeting)"
        local state
        for state in $IDLE_STATES; do
            PERF_TAG=memory-$state-$cert
            for rep in $(seq "$REPS"); do
                for proxy in $PROXIES; do
                    stop_proxy "$proxy"
                    start_proxy "$proxy" "$cert"
                    sleep 1
                    # shellcheck disable=SC2046
                    LINES_SHOWN=3 loadgen 300 idle $(common "$proxy" "$cert" "$rep" imaps) \
                        --counts "$IDLE_LIST" --state "$state" --duration 240
                    stop_proxy "$proxy"
                    start_proxy "$proxy" "$cert"
                done
            done
        done ;;
    6)
        log "figure 6 ($cert): TLS 1.3 sessions resumed from a ticket, and full, $CONCURRENCY at once (handshake, greeting, close)"
        local handshakes
        for rep in $(seq "$REPS"); do
            for proxy in $PROXIES; do
                for handshakes in resumed full; do
                    PERF_TAG=resumption-$handshakes-$cert
                    # shellcheck disable=SC2046
                    # A proxy that sends no ticket on a resumed session gets
                    # each slot's tickets collected first (up to 90 s).
                    loadgen $((session_limit + 100)) resumption $(common "$proxy" "$cert" "$rep" imaps) \
                        --handshakes "$handshakes" --protocol imap --concurrency "$CONCURRENCY" \
                        --warmup "$WARMUP" --duration "$DURATION"
                done
            done
        done ;;
    7)
        log "figure 7 ($cert): $FLEET_REPLICAS replicas of ours behind a round-robin balancer, clients offering their last ticket, shared and own ticket keys"
        local mode pids i
        case " $PROXIES " in *" ours "*) ;; *) log "  (figure 7 measures ours only: skipped)"; return 0 ;; esac
        for mode in shared own; do start_fleet "$mode" "$cert"; done
        for rep in $(seq "$REPS"); do
            for mode in shared own; do
                pids=""
                for i in $(seq 2 "$FLEET_REPLICAS"); do pids="${pids:+$pids,}${PID[fleet-$mode-$i]}"; done
                PERF_TAG=fleet-$mode-$cert
                loadgen $((session_limit + 100)) resumption --target "127.0.0.1:$(fleet_port "$mode" 0)" \
                    --proxy-pid "${PID[fleet-$mode-1]}" ${pids:+--replica-pids "$pids"} \
                    --backend-pid "${PID[backend]}" --expect-cert "$WORK/certs/$cert/cert.pem" \
                    --proxy ours --cert "$cert" --rep "$rep" \
                    --handshakes resumed --protocol imap --concurrency "$CONCURRENCY" \
                    --warmup "$WARMUP" --duration "$DURATION" \
                    --figure fleet --variant "$mode-keys-$FLEET_REPLICAS" --min-resumed-pct 0
            done
        done
        for mode in shared own; do stop_fleet "$mode"; done ;;
    esac
}

# ---------------------------------------------------------------- machine
describe_machine() {
    {
        echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores ($(lscpu | sed -n 's/^Hypervisor vendor: *//p' | head -1 | sed 's/^\(.\)/virtualised, \1/'))"
        echo "- memory: $(free -g | awk '/^Mem:/ {print $2}') GiB; kernel $(uname -r); $(. /etc/os-release && echo "$PRETTY_NAME")"
        echo "- mail-tls-proxy $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' (with uncommitted changes in src/)'), $(rustc --version 2>/dev/null), rustls with aws-lc-rs"
        echo "- $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3); $("$STUNNEL" -version 2>&1 | grep -m1 '^stunnel' | cut -d' ' -f1-2) on $("$STUNNEL" -version 2>&1 | grep -m1 -o 'OpenSSL [0-9.]*'); $(openssl version | cut -d' ' -f1-2) for certificates"
        echo "- proxy pinned to CPU $PROXY_CPU; load generator and backend pinned to CPU $LOAD_CPU; loopback only; $NICE_NOTE"
        echo "- TLS 1.3, TLS13_AES_256_GCM_SHA384, X25519, full handshakes (client resumption off) except the resumed runs of figures 6-7 (a ticket per connection slot, offered on its next connection), certificates: ECDSA P-256 and RSA-2048"
        echo "- figures 6-7: session tickets from one key file for ours and HAProxy (tls-ticket-keys), stunnel's own (sessionCacheSize/sessionCacheTimeout); figure 7: $FLEET_REPLICAS replicas of ours on CPU $PROXY_CPU behind HAProxy round robin (plain TCP) on CPU $LOAD_CPU"
        echo "- $REPS repetitions, interleaved; $DURATION s measured after $WARMUP s warm-up; $CONCURRENCY sessions at once for figures 1-2; $LATENCY_SAMPLES NOOPs per latency run"
        echo "- open-file limit $FD_LIMIT; idle session counts: $IDLE_LIST"
        echo "- at start: load average $LOAD_AT_START, rustc processes running: $RUSTC_AT_START; $(date -u '+%Y-%m-%d %H:%M UTC')"
    } >"$OUT/machine.md"
}

# ---------------------------------------------------------------- main
make_certs
describe_machine
start_backend
for cert in $CERTS; do
    write_configs "$cert"
    figures=$FIGURES
    if [ "$cert" = rsa ]; then
        figures=""
        for f in $FIGURES; do
            case " $RSA_FIGURES " in *" $f "*) figures="$figures $f" ;; esac
        done
    fi
    [ -n "${figures// /}" ] || continue
    for proxy in $PROXIES; do start_proxy "$proxy" "$cert"; done
    for figure in $figures; do
        run_figure "$figure" "$cert"
    done
    for proxy in $PROXIES; do stop_proxy "$proxy"; done
done
LOAD_AT_END=$(cut -d' ' -f1-3 /proc/loadavg)
echo "- at end: load average $LOAD_AT_END" >>"$OUT/machine.md"

log "report"
"$LOADGEN" report --results "$RESULTS" --out "$OUT" --chart-prefix "" >/dev/null
{
    echo "## Machine and conditions"
    echo
    cat "$OUT/machine.md"
    echo
    cat "$OUT/report.md"
} >"$OUT/report-full.md"
cat "$OUT/report-full.md"

if [ "$UPDATE_DOCS" = 1 ]; then
    DOC=$ROOT/docs/benchmarks.md
    mkdir -p "$ROOT/docs/benchmarks"
    "$LOADGEN" report --results "$RESULTS" --out "$WORK/docs" --chart-prefix "benchmarks/" >/dev/null
    cp "$WORK"/docs/*.svg "$ROOT/docs/benchmarks/"
    cp "$RESULTS" "$ROOT/docs/benchmarks/results.tsv"
    generated=$WORK/generated.md
    {
        echo "<!-- BEGIN GENERATED by bench/compare.sh: do not edit by hand -->"
        echo "## Machine and conditions"
        echo
        cat "$OUT/machine.md"
        echo
        cat "$WORK/docs/report.md"
        echo "<!-- END GENERATED -->"
    } >"$generated"
    if [ -f "$DOC" ] && grep -q '^<!-- BEGIN GENERATED' "$DOC"; then
        awk -v file="$generated" '
            /^<!-- BEGIN GENERATED/ { while ((getline line < file) > 0) print line; skip = 1; next }
            /^<!-- END GENERATED/ { skip = 0; next }
            !skip { print }' "$DOC" >"$WORK/doc.md"
        cp "$WORK/doc.md" "$DOC"
    else
        { echo "# Benchmarks"; echo; cat "$generated"; } >"$DOC"
    fi
    log "updated $DOC and docs/benchmarks/"
fi
log "done: $OUT/report-full.md"
