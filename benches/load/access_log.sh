#!/usr/bin/env bash
# The access log's cost: Switchyard (workers = 1) in front of one nginx upstream, with
# [log] access = "off", JSON to a file and combined to a file, interleaved rounds of wrk.
#
#   benches/load/access_log.sh
#   ROUNDS=5 DURATION=10 CONNS=64 SWITCHYARD_BIN=target/release/switchyard benches/load/access_log.sh
#
# Prints per mode the median req/s, p50 and p99 (ms), the proxy's CPU time per request (user +
# system, from /proc/PID/stat), the log lines written and dropped. Needs wrk, nginx, curl.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
BASE_PORT=${BASE_PORT:-29080}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
BIN=${SWITCHYARD_BIN:-$REPO_ROOT/target/release/switchyard}
[[ -x $BIN ]] || { echo "no binary at $BIN (cargo build --release)" >&2; exit 1; }
for t in wrk nginx curl python3; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

P_UP=$BASE_PORT
P_SY=$((BASE_PORT + 1))
P_ADMIN=$((BASE_PORT + 2))
TICKS=$(getconf CLK_TCK)

mkdir -p "$TMP/up"
cat >"$TMP/up/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/up/nginx.pid;
error_log $TMP/up/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path $TMP/up/cb; proxy_temp_path $TMP/up/p;
    fastcgi_temp_path $TMP/up/f; uwsgi_temp_path $TMP/up/u; scgi_temp_path $TMP/up/s;
    server { listen 127.0.0.1:$P_UP; location / { default_type text/plain; return 200 "ok\n"; } }
}
EOF
nginx -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
PIDS+=($!)

wait_port() {
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "http://127.0.0.1:$1$2" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not answer" >&2
    return 1
}
wait_port "$P_UP" /

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run_mode() { # mode -> prints "rps p50 p99 cpu_us_per_req lines dropped"
    local mode=$1 log_section
    case $mode in
        off) log_section='access = "off"' ;;
        json) log_section="access = \"$TMP/access.log\"
access_format = \"json\"" ;;
        combined) log_section="access = \"$TMP/access.log\"
access_format = \"combined\"" ;;
    esac
    rm -f "$TMP/access.log"
    cat >"$TMP/sy.toml" <<EOF
[proxy]
listen = "127.0.0.1:$P_SY"
workers = 1
shutdown_grace = "1s"
[admin]
listen = "127.0.0.1:$P_ADMIN"
[state]
path = "$TMP/state.json"
[log]
$log_section
[[services]]
name = "bench"
blue = { upstreams = ["127.0.0.1:$P_UP"] }
green = { upstreams = ["127.0.0.1:$P_UP"] }
EOF
    RUST_LOG=warn "$BIN" serve --config "$TMP/sy.toml" 2>"$TMP/sy.err" &
    local pid=$!
    wait_port "$P_SY" /warmup >/dev/null
    wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$P_SY/" >/dev/null 2>&1
    local t0 n0
    t0=$(cpu_ticks "$pid")
    wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$P_SY/api/users?page=2" >"$TMP/wrk.out" 2>&1
    local t1
    t1=$(cpu_ticks "$pid")
    local dropped
    dropped=$(curl -fsS "http://127.0.0.1:$P_ADMIN/metrics" | awk '/^switchyard_access_log_dropped_total /{print $2}')
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    local lines=0
    [[ -f $TMP/access.log ]] && lines=$(wc -l <"$TMP/access.log")
    python3 - "$TMP/wrk.out" "$t0" "$t1" "$TICKS" "$lines" "${dropped:-0}" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
t0, t1, ticks = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        return float("nan")
    n, u = float(m.group(1)), m.group(2)
    return {"us": n / 1000, "ms": n, "s": n * 1000, "m": n * 60000}[u]
reqs = int(re.search(r"(\d+) requests in", text).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(re.search(r"50%\s+(\S+)", text).group(1))
p99 = ms(re.search(r"99%\s+(\S+)", text).group(1))
cpu_us = (t1 - t0) / ticks * 1e6 / max(reqs, 1)
print(f"{rps:.0f} {p50:.2f} {p99:.2f} {cpu_us:.2f} {sys.argv[5]} {float(sys.argv[6]):.0f}")
PY
}

declare -A RESULTS
for r in $(seq "$ROUNDS"); do
    for mode in off json combined; do
        line=$(run_mode "$mode")
        echo "round $r $mode: $line" >&2
        RESULTS[$mode]+="$line"$'\n'
    done
done

printf '%-9s %9s %8s %8s %12s %10s %9s\n' mode req/s p50_ms p99_ms cpu_us/req lines dropped
for mode in off json combined; do
    printf '%s' "${RESULTS[$mode]}" | python3 -c '
import sys, statistics
rows = [l.split() for l in sys.stdin if l.strip()]
def col(i):
    vals = [float(r[i]) for r in rows if r[i] != "nan"]
    return statistics.median(vals) if vals else float("nan")
print(f"%-9s {col(0):9.0f} {col(1):8.2f} {col(2):8.2f} {col(3):12.2f} {col(4):10.0f} {col(5):9.0f}" % sys.argv[1])
' "$mode"
done
