#!/usr/bin/env bash
# h2c at the benchmark's shape (64 connections x 10 streams in flight, one worker each), where
# the upstream pool's behaviour shows: per request, each proxy's CPU time (user + kernel, and
# user alone, from /proc/PID/stat) and the upstream connections it opened (TcpActiveOpens from
# `nstat`, less the client's own). Two Switchyard binaries (or one with two `upstream_max_idle`
# values) and HAProxy, interleaved rounds, in front of one nginx upstream.
#
#   benches/load/h2c_pool.sh
#   SY=old/switchyard SY2=target/release/switchyard benches/load/h2c_pool.sh   # before/after
#   IDLE1=256 IDLE2=1024 benches/load/h2c_pool.sh                            # one binary, two caps
#
# Environment: SY, SY2 (default target/release/switchyard), IDLE1, IDLE2 (upstream_max_idle of
# each, default 256), C=64 connections, M=10 streams each, N=150000 requests per measurement,
# ROUNDS=3, BASE_PORT=29480 (6 ports), PERF=sy|sy2|ha (record a `perf` cpu-clock profile of
# that target, `perf.NAME.ROUND.data` in the current directory). The machine's other traffic
# counts in TcpActiveOpens: run it on a quiet one. Needs nginx, haproxy, h2load, nstat (iproute2),
# bc. Installs nothing.
set -u
B=${BASE_PORT:-29480}; C=${C:-64}; M=${M:-10}; N=${N:-150000}; ROUNDS=${ROUNDS:-3}
SY=${SY:-target/release/switchyard}; SY2=${SY2:-$SY}
T=$(mktemp -d /tmp/h2c-pool.XXXX)
P_UP=$B; P_SY=$((B+1)); P_HA=$((B+2)); P_AD=$((B+3)); P_SY2=$((B+4)); P_AD2=$((B+5))
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$T"' EXIT
mkdir -p "$T/up"
cat >"$T/up/nginx.conf" <<E2
worker_processes 1; master_process off; daemon off; pid $T/up/nginx.pid; error_log $T/up/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000000;
client_body_temp_path $T/up/b; proxy_temp_path $T/up/p; fastcgi_temp_path $T/up/f; uwsgi_temp_path $T/up/u; scgi_temp_path $T/up/s;
server { listen 127.0.0.1:$P_UP; location / { default_type text/plain; return 200 "ok\n"; } } }
E2
nginx -p "$T/up" -c "$T/up/nginx.conf" -e "$T/up/error.log" &
PIDS+=($!)
syconf() { # listen admin max_idle
    cat <<E2
[proxy]
listen = "127.0.0.1:$1"
workers = 1
upstream_max_idle = $3
[admin]
listen = "127.0.0.1:$2"
[state]
path = "$T/state$1.json"
[[services]]
name = "bench"
active = "blue"
blue  = { upstreams = ["127.0.0.1:$P_UP"] }
green = { upstreams = ["127.0.0.1:$P_UP"] }
E2
}
syconf "$P_SY" "$P_AD" "${IDLE1:-256}" >"$T/sy.toml"
syconf "$P_SY2" "$P_AD2" "${IDLE2:-256}" >"$T/sy2.toml"
SWITCHYARD_ADMIN_TOKEN=t RUST_LOG=warn "$SY" serve --config "$T/sy.toml" >"$T/sy.log" 2>&1 &
SYP=$!
PIDS+=($SYP)
SWITCHYARD_ADMIN_TOKEN=t RUST_LOG=warn "$SY2" serve --config "$T/sy2.toml" >"$T/sy2.log" 2>&1 &
SYP2=$!
PIDS+=($SYP2)
cat >"$T/ha.cfg" <<E2
global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend f
    bind 127.0.0.1:$P_HA proto h2
    default_backend b
backend b
    server up 127.0.0.1:$P_UP
E2
haproxy -db -f "$T/ha.cfg" >"$T/ha.log" 2>&1 &
HAP=$!
PIDS+=($HAP)
sleep 1.5
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
usr() { awk '{print $14}' "/proc/$1/stat"; }
opens() { nstat -az TcpActiveOpens | awk '/TcpActiveOpens/ {print $2}'; }
tck=$(getconf CLK_TCK)
echo "h2c, $C connections x $M streams, $N requests per measurement; sy=$SY (max_idle ${IDLE1:-256}), sy2=$SY2 (max_idle ${IDLE2:-256})"
for r in $(seq "$ROUNDS"); do
    for t in "sy:$P_SY:$SYP" "sy2:$P_SY2:$SYP2" "ha:$P_HA:$HAP"; do
        IFS=: read -r name port pid <<<"$t"
        h2load -n 5000 -c "$C" -m "$M" "http://127.0.0.1:$port/" >/dev/null
        c0=$(cpu "$pid"); u0=$(usr "$pid"); o0=$(opens)
        if [[ ${PERF:-} == "$name" ]]; then
            perf record -e cpu-clock -F 4000 -g -o "perf.$name.$r.data" -p "$pid" >/dev/null 2>&1 &
            PP=$!
            sleep 0.3
        fi
        out=$(h2load -n "$N" -c "$C" -m "$M" "http://127.0.0.1:$port/")
        if [[ ${PERF:-} == "$name" ]]; then kill -INT "$PP"; wait "$PP"; fi
        c1=$(cpu "$pid"); u1=$(usr "$pid"); o1=$(opens)
        rps=$(awk '/finished in/ {print $4}' <<<"$out")
        ok=$(awk '/succeeded/ {print $8}' <<<"$out")
        printf 'round %d %-4s %10s req/s  cpu/req %6.1f us (user %5.1f)  upstream connects/req %.4f  ok %s\n' \
            "$r" "$name" "$rps" \
            "$(bc -l <<<"($c1-$c0)*1000000/$tck/$N")" "$(bc -l <<<"($u1-$u0)*1000000/$tck/$N")" \
            "$(bc -l <<<"($o1-$o0-$C)/$N")" "$ok"
    done
done
