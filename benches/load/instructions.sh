#!/usr/bin/env bash
# Userland instructions per proxied request, counted by callgrind: repeatable to <1% for the
# same binary and inputs, whatever else the machine is doing (wall-clock figures are not).
#
#   benches/load/instructions.sh                    # Switchyard, then nginx as a proxy
#   TARGETS=switchyard benches/load/instructions.sh
#   PROTO=h2c TARGETS="switchyard haproxy" benches/load/instructions.sh   # h2c, STREAMS per conn
#
# Environment: N=20000 requests over C=16 HTTP/1.1 keep-alive connections (h2load --h1),
# BASE_PORT=29080 (4 ports), SWITCHYARD_BIN (default target/release/switchyard), TARGETS
# ("switchyard nginx"; also haproxy), PROTO=h1|h2c (h2c: prior knowledge, STREAMS=10 concurrent
# streams per connection; the upstream stays HTTP/1.1; close: HTTP/1.1 with a new connection per
# request, wrk for CLOSE_SECONDS=10 under callgrind, its request count as N), KEEP_TMP=1 keeps the callgrind output (callgrind_annotate reads it),
# SY_ACCESS=json|combined turns Switchyard's access log on (to a file in the temp dir; the
# writer thread's instructions are counted too). REQUEST_ID=0 (default): like for like, no proxy
# adds an `X-Request-Id` (Switchyard's `[log] request_id = false`); REQUEST_ID=1: each one does
# (Switchyard's default; nginx `$request_id`, HAProxy `unique-id`), both ways.
# COUNTER=syscalls: no callgrind; each proxy runs natively and the same load is measured by the
# kernel instead: system calls, context switches and CPU migrations per request (`perf stat`),
# user and system CPU time per request (/proc), then which system calls, per request (`strace -c
# -f`, a second load of N requests: strace slows the proxy, the counts stay exact). For a gap
# in system time that instruction counts cannot see. `perf stat -p` counts the threads there at
# its start (the proxies' workers are); its tracepoint adds a little system time to every
# proxy alike.
# COUNTER=cachesim: callgrind with its cache and branch simulation (`--cache-sim=yes
# --branch-sim=yes`: a model of this machine's L1 and last-level caches, not the hardware's
# counters, which this kind of VM does not expose): per request, instructions, L1 instruction
# and data misses, last-level misses and mispredicted branches, and cachegrind's own rough cycle
# estimate (Ir + 10 x L1 misses + 100 x LL misses + 15 x mispredicts). For time that instruction
# counts cannot see (stalls), compared between proxies in the same run.
# Needs valgrind, nginx, h2load (Debian: valgrind nginx nghttp2-client); COUNTER=syscalls needs
# perf (Debian: linux-perf) and strace instead of valgrind. Installs nothing.
set -euo pipefail
N=${N:-20000}
C=${C:-16}
BASE_PORT=${BASE_PORT:-29080}
TARGETS=${TARGETS:-switchyard nginx}
PROTO=${PROTO:-h1}
REQUEST_ID=${REQUEST_ID:-0}
STREAMS=${STREAMS:-10}
CLOSE_SECONDS=${CLOSE_SECONDS:-10}
case $PROTO in
h1) LOAD=(--h1) ;;
h2c) LOAD=(-m "$STREAMS") ;;
close) LOAD=() ;;
*)
    echo "PROTO is h1, h2c or close, not $PROTO" >&2
    exit 1
    ;;
esac
KEEP_TMP=${KEEP_TMP:-0}
COUNTER=${COUNTER:-callgrind}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SY_BIN=${SWITCHYARD_BIN:-$REPO_ROOT/target/release/switchyard}

case $COUNTER in
callgrind | cachesim) NEEDS=(valgrind:valgrind) ;;
syscalls)
    NEEDS=(perf:linux-perf strace:strace)
    [[ $PROTO != close ]] || {
        echo "COUNTER=syscalls loads with h2load: PROTO is h1 or h2c there" >&2
        exit 1
    }
    ;;
*)
    echo "COUNTER is callgrind, cachesim or syscalls, not $COUNTER" >&2
    exit 1
    ;;
esac
for pair in "${NEEDS[@]}" nginx:nginx h2load:nghttp2-client; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || {
        echo "missing: ${pair%%:*} (Debian package: ${pair#*:})" >&2
        exit 1
    }
done
[[ $TARGETS != *switchyard* || -x $SY_BIN ]] || {
    echo "no $SY_BIN: cargo build --release first" >&2
    exit 1
}

P_UP=$BASE_PORT P_SY=$((BASE_PORT + 1)) P_NG=$((BASE_PORT + 2)) P_HA=$((BASE_PORT + 4))
TMP=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-instr.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $KEEP_TMP == 1 ]]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}

nginx_conf() { # dir, server block
    mkdir -p "$1"
    cat >"$1/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path $1/b; proxy_temp_path $1/p; fastcgi_temp_path $1/f;
    uwsgi_temp_path $1/u; scgi_temp_path $1/s;
$2
}
EOF
}

nginx_conf "$TMP/up" "    server { listen 127.0.0.1:$P_UP; location / { default_type text/plain; return 200 \"ok\\n\"; } }"
nginx -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
PIDS+=($!)
wait_port "$P_UP"

# CPU ticks (user, system) of process PID and its threads so far.
ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

# Runs "$@" natively on PORT, loads it twice with N requests (once under `perf stat`, once under
# `strace -c -f`), prints the kernel's side of one request.
count_syscalls() { # name port cmd...
    local name=$1 port=$2
    shift 2
    "$@" >"$TMP/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    load() { # out-file
        h2load "${LOAD[@]}" -n "$N" -c "$C" "http://127.0.0.1:$port/" >"$1" 2>&1
        grep -q "$N succeeded" "$1" || {
            echo "$name: not every request succeeded:" >&2
            grep -E 'succeeded|failed' "$1" >&2
        }
    }
    h2load "${LOAD[@]}" -n 2000 -c "$C" "http://127.0.0.1:$port/" >/dev/null # warm
    local hz before after
    hz=$(getconf CLK_TCK)
    before=$(ticks "$pid")
    perf stat -x, -e raw_syscalls:sys_enter,context-switches,cpu-migrations -p "$pid" \
        -o "$TMP/$name.perf" &
    local perf=$!
    sleep 0.5 # attached before the load starts
    load "$TMP/$name.h2load"
    kill -INT "$perf" 2>/dev/null || true
    wait "$perf" 2>/dev/null || true
    grep -q "raw_syscalls:sys_enter" "$TMP/$name.perf" || {
        echo "$name: perf stat counted nothing (perf_event_paranoid, or no raw_syscalls tracepoint):" >&2
        cat "$TMP/$name.perf" >&2
        exit 1
    }
    after=$(ticks "$pid")
    strace -c -f -o "$TMP/$name.strace" -p "$pid" 2>"$TMP/$name.strace.err" &
    local st=$!
    sleep 0.5
    load "$TMP/$name.strace-h2load"
    kill -INT "$st" 2>/dev/null || true
    wait "$st" 2>/dev/null || true
    [[ -s $TMP/$name.strace ]] || {
        echo "$name: strace counted nothing:" >&2
        cat "$TMP/$name.strace.err" >&2
    }
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    awk -F, -v n="$N" -v name="$name" -v hz="$hz" -v b="$before" -v a="$after" -v proto="$PROTO" '
        $3 == "raw_syscalls:sys_enter" { sc = $1 }
        $3 == "context-switches" { cs = $1 }
        $3 == "cpu-migrations" { mig = $1 }
        END {
            split(b, x, " "); split(a, y, " ")
            printf "%-12s %6.2f syscalls  %5.3f context switches  %5.3f migrations  %5.1f us user  %5.1f us system  per request (%d requests, %s)\n", \
                name, sc / n, cs / n, mig / n, (y[1] - x[1]) / hz * 1e6 / n, (y[2] - x[2]) / hz * 1e6 / n, n, proto
        }' "$TMP/$name.perf"
    # strace -c: "% time, seconds, usecs/call, calls, errors, syscall"; errors may be empty.
    awk -v n="$N" '
        /^ *[0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+/ && $NF != "total" {
            line = sprintf("%s %.3f", $NF, $4 / n)
            if (NF == 6) line = line sprintf(" (%.3f failing)", $5 / n)
            print line
        }' "$TMP/$name.strace" | sort -k2 -rn | head -8 | sed 's/^/             /'
}

# Runs "$@" under callgrind on PORT, loads it, prints total instructions / N.
count() { # name port cmd...
    local name=$1 port=$2
    shift 2
    if [[ $COUNTER == syscalls ]]; then
        count_syscalls "$name" "$port" "$@"
        return
    fi
    local sim=()
    [[ $COUNTER == cachesim ]] && sim=(--cache-sim=yes --branch-sim=yes)
    valgrind --tool=callgrind "${sim[@]}" --callgrind-out-file="$TMP/$name.out" "$@" >"$TMP/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    local n=$N
    if [[ $PROTO == close ]]; then
        # h2load cannot open a connection per request: wrk for a fixed time, its count of requests
        command -v wrk >/dev/null 2>&1 || {
            echo "missing: wrk (Debian package: wrk)" >&2
            exit 1
        }
        wrk -t1 -c4 -d2s -H "Connection: close" "http://127.0.0.1:$port/" >/dev/null 2>&1
        valgrind_zero "$pid"
        wrk -t1 -c"$C" -d"${CLOSE_SECONDS}s" -H "Connection: close" "http://127.0.0.1:$port/" \
            >"$TMP/$name.wrk" 2>&1
        n=$(awk '/requests in/ { print $1 }' "$TMP/$name.wrk")
        if grep -q -E 'Non-2xx|Socket errors' "$TMP/$name.wrk" || [[ -z $n ]]; then
            echo "$name: not every request succeeded:" >&2
            grep -E 'requests in|Non-2xx|Socket errors' "$TMP/$name.wrk" >&2
        fi
    else
        h2load "${LOAD[@]}" -n 200 -c 4 "http://127.0.0.1:$port/" >/dev/null # warm: pools, caches
        valgrind_zero "$pid"
        h2load "${LOAD[@]}" -n "$N" -c "$C" "http://127.0.0.1:$port/" >"$TMP/$name.h2load" 2>&1
        grep -q "$N succeeded" "$TMP/$name.h2load" || {
            echo "$name: not every request succeeded:" >&2
            grep -E 'succeeded|failed' "$TMP/$name.h2load" >&2
        }
    fi
    callgrind_control -d "$pid" >/dev/null
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    if [[ $COUNTER == cachesim ]]; then
        # "events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim", "summary:" the same order.
        awk -v n="$n" -v name="$name" -v c="$C" -v proto="$PROTO" '
            /^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
            /^summary:/ { for (i = 2; i <= NF; i++) v[i] = $i }
            END {
                ir = v[col["Ir"]]; i1 = v[col["I1mr"]]; d1 = v[col["D1mr"]] + v[col["D1mw"]]
                ll = v[col["ILmr"]] + v[col["DLmr"]] + v[col["DLmw"]]; bm = v[col["Bcm"]] + v[col["Bim"]]
                if (ir == 0) { print name ": callgrind simulated nothing" > "/dev/stderr"; exit 1 }
                printf "%-12s %8.0f instructions  %6.1f I1 misses  %6.1f D1 misses  %5.1f LL misses  %6.1f mispredicts  %8.0f est. cycles  per request (%d requests, %d connections, %s)\n", \
                    name, ir / n, i1 / n, d1 / n, ll / n, bm / n, (ir + 10 * (i1 + d1) + 100 * ll + 15 * bm) / n, n, c, proto
            }' "$TMP/$name.out.1"
        return
    fi
    local total
    # The dump after the warm-up load holds only the measured requests.
    total=$(awk '/^summary:/ { s = $2 } END { print s + 0 }' "$TMP/$name.out.1")
    printf '%-12s %8d instructions per request (%d requests, %d connections, %s)\n' \
        "$name" "$((total / n))" "$n" "$C" "$PROTO"
}
valgrind_zero() { callgrind_control -z "$1" >/dev/null; }

for t in $TARGETS; do
    case $t in
    switchyard)
        cat >"$TMP/sy.toml" <<EOF
[proxy]
listen = "127.0.0.1:$P_SY"
workers = 1
shutdown_grace = "1s"
[admin]
listen = "127.0.0.1:$((BASE_PORT + 3))"
[state]
path = "$TMP/state.json"
[[services]]
name = "bench"
active = "blue"
blue  = { upstreams = ["127.0.0.1:$P_UP"] }
green = { upstreams = ["127.0.0.1:$P_UP"] }
EOF
        if [[ $REQUEST_ID != 1 ]]; then
            printf '[log]\nrequest_id = false\n' >>"$TMP/sy.toml"
        fi
        if [[ -n ${SY_ACCESS:-} && ${SY_ACCESS:-} != off ]]; then
            [[ $REQUEST_ID == 1 ]] && printf '[log]\n' >>"$TMP/sy.toml"
            printf 'access = "%s"\naccess_format = "%s"\n' "$TMP/access.log" "$SY_ACCESS" >>"$TMP/sy.toml"
        fi
        SWITCHYARD_ADMIN_TOKEN=t RUST_LOG=warn count switchyard "$P_SY" "$SY_BIN" serve --config "$TMP/sy.toml"
        ;;
    nginx)
        ng_h2= ng_id=
        [[ $PROTO == h2c ]] && ng_h2=" http2"
        [[ $REQUEST_ID == 1 ]] && ng_id=" proxy_set_header X-Request-Id \$request_id; add_header X-Request-Id \$request_id always;"
        nginx_conf "$TMP/ng" "    upstream b { server 127.0.0.1:$P_UP; keepalive 64; }
    server { listen 127.0.0.1:$P_NG$ng_h2; location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\";$ng_id } }"
        count nginx "$P_NG" nginx -p "$TMP/ng" -c "$TMP/ng/nginx.conf" -e "$TMP/ng/error.log"
        ;;
    haproxy)
        command -v haproxy >/dev/null 2>&1 || {
            echo "missing: haproxy (Debian package: haproxy)" >&2
            exit 1
        }
        ha_proto= ha_id=
        [[ $PROTO == h2c ]] && ha_proto=" proto h2"
        [[ $REQUEST_ID == 1 ]] && ha_id="    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
    http-response set-header X-Request-Id %[unique-id]"
        cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend f
    bind 127.0.0.1:$P_HA$ha_proto
$ha_id
    default_backend b
backend b
    server up 127.0.0.1:$P_UP
EOF
        count haproxy "$P_HA" haproxy -db -f "$TMP/haproxy.cfg"
        ;;
    *) echo "unknown target $t" >&2 ;;
    esac
done
