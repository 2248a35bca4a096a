#!/usr/bin/env bash
# Scaling run: Switchyard (`runtime = "shared"` and `runtime = "per_worker"`), nginx and HAProxy,
# each with the same number of workers pinned to as many CPUs, in front of one nginx upstream on
# CPUs of its own, loaded from CPUs of their own. It answers which runtime is faster for
# `workers > 1`, and how each proxy's throughput grows with its workers.
#
#   benches/load/scaling.sh                                   # needs 16 CPUs (8 + 4 + 4)
#   WORKERS="1 2 4" UP_WORKERS=2 LOAD_THREADS=2 benches/load/scaling.sh   # 8 CPUs
#   PIN=0 WORKERS="1 2" ROUNDS=1 DURATION=2 benches/load/scaling.sh      # a smoke run anywhere
#
# Environment:
#   WORKERS="1 2 4 8"   worker counts; every proxy gets the same count (Switchyard `workers`,
#                       nginx `worker_processes`, HAProxy `nbthread`) and CPUs 0..N-1 of the set
#   WORKLOADS="h1 h2c"  h1: HTTP/1.1 keep-alive, CONNS connections (wrk); h2c: prior knowledge,
#                       H2_CONNS connections x STREAMS streams (h2load); c1000: HTTP/1.1
#                       keep-alive, MANY_CONNS connections (wrk); tls: HTTPS keep-alive, ECDSA
#                       P-256, CONNS connections (wrk; the same certificate on every proxy)
#   ROUNDS=3 DURATION=5 interleaved rounds per worker count (medians reported), seconds each
#   CONNS=256 H2_CONNS=64 STREAMS=10 MANY_CONNS=1000
#   UP_WORKERS=4        upstream nginx workers, on the CPUs after the proxies'
#   LOAD_THREADS=4      wrk / h2load threads, on the CPUs after the upstream's
#   PIN=1               pin as above (needs max(WORKERS) + UP_WORKERS + LOAD_THREADS CPUs);
#                       PIN=0 shares every CPU (ratios only)
#   BASE_PORT=29080     first of 14 consecutive loopback ports
#   SWITCHYARD_BIN=     default target/release/switchyard
#   RESULTS=            a directory to copy raw.tsv, summary.md and logs.txt (each log's tail) into
#   PERF=               targets (sy-per_worker sy-shared nginx haproxy): at the largest worker
#                       count, `perf record` (cpu-clock, no call graphs) of each under one more h1
#                       run; RESULTS gets perf.<target>.<workers>.data and its top symbols (.txt)
#
# Like for like: no proxy adds a request id (Switchyard `[log] request_id = false`), none logs
# access, every one keeps upstream connections alive, nginx listens with `reuseport` (as a tuned
# nginx does; each worker its own socket, like `per_worker`), HAProxy runs its defaults.
# Needs wrk, nginx, haproxy, h2load, python3, and openssl for tls (benches/load/bundle.sh carries
# all but python3 to a machine without them).
set -euo pipefail

WORKERS=${WORKERS:-"1 2 4 8"}
WORKLOADS=${WORKLOADS:-"h1 h2c"}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
DURATION=${DURATION%s}
CONNS=${CONNS:-256}
H2_CONNS=${H2_CONNS:-64}
STREAMS=${STREAMS:-10}
MANY_CONNS=${MANY_CONNS:-1000}
UP_WORKERS=${UP_WORKERS:-4}
LOAD_THREADS=${LOAD_THREADS:-4}
PIN=${PIN:-1}
BASE_PORT=${BASE_PORT:-29080}
RESULTS=${RESULTS:-}
PERF=${PERF:-}

log() { printf '[scaling] %s\n' "$*" >&2; }
die() {
    printf '[scaling] ERROR: %s\n' "$*" >&2
    exit 1
}

for v in ROUNDS DURATION CONNS H2_CONNS STREAMS MANY_CONNS UP_WORKERS LOAD_THREADS BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer (got '${!v}')"
done
MAX_W=0
for w in $WORKERS; do
    [[ $w =~ ^[0-9]+$ && $w -gt 0 ]] || die "WORKERS holds '$w': positive integers only"
    ((w > MAX_W)) && MAX_W=$w
done
((MAX_W > 0)) || die "WORKERS is empty"
for wl in $WORKLOADS; do
    [[ $wl == h1 || $wl == h2c || $wl == c1000 || $wl == tls ]] || die "unknown workload '$wl' (h1, h2c, c1000, tls)"
done
for t in $PERF; do
    [[ " sy-shared sy-per_worker nginx haproxy " == *" $t "* ]] || die "PERF: unknown target '$t'"
    command -v perf >/dev/null 2>&1 || die "PERF needs perf (Debian: linux-perf)"
done
for tool in wrk nginx haproxy h2load python3; do
    command -v "$tool" >/dev/null 2>&1 || die "missing: $tool (Debian: wrk nginx haproxy nghttp2-client python3)"
done
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SY_BIN=${SWITCHYARD_BIN:-$REPO_ROOT/target/release/switchyard}
[[ -x $SY_BIN ]] || die "$SY_BIN is not executable (cargo build --release, or set SWITCHYARD_BIN)"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[[ $NOFILE == unlimited ]] && NOFILE=1048576
CLK_TCK=$(getconf CLK_TCK)
HA_MAXCONN=$((NOFILE / 2 - 100))
((HA_MAXCONN <= 20000)) || HA_MAXCONN=20000

mapfile -t CPUS < <(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)), sep="\n")')
cpu_list() { # first count -> "a,b,c" from CPUS
    local i out=()
    for ((i = $1; i < $1 + $2; i++)); do out+=("${CPUS[$i]}"); done
    (
        IFS=,
        echo "${out[*]}"
    )
}
if [[ $PIN == 1 ]]; then
    command -v taskset >/dev/null 2>&1 || die "PIN=1 needs taskset (util-linux), or PIN=0"
    need=$((MAX_W + UP_WORKERS + LOAD_THREADS))
    ((${#CPUS[@]} >= need)) || die "PIN=1 needs $need CPUs (max(WORKERS) + UP_WORKERS + LOAD_THREADS), this process may use ${#CPUS[@]}: lower them, or PIN=0"
    PIN_UP=(taskset -c "$(cpu_list "$MAX_W" "$UP_WORKERS")")
    PIN_LOAD=(taskset -c "$(cpu_list $((MAX_W + UP_WORKERS)) "$LOAD_THREADS")")
    pin_proxy() { PIN_PROXY=(taskset -c "$(cpu_list 0 "$1")"); }
    PIN_NOTE="pinned: proxies on CPUs ${CPUS[0]}.. (as many as workers), upstream on ${PIN_UP[2]}, load on ${PIN_LOAD[2]}"
else
    PIN_UP=() PIN_LOAD=()
    pin_proxy() { PIN_PROXY=(); }
    PIN_NOTE="not pinned: ${#CPUS[@]} CPUs shared by load, proxies and upstream (ratios only)"
fi

P_UP=$BASE_PORT P_UP_H2=$((BASE_PORT + 1))
P_SYS=$((BASE_PORT + 2)) P_SYS_ADMIN=$((BASE_PORT + 3))
P_SYP=$((BASE_PORT + 4)) P_SYP_ADMIN=$((BASE_PORT + 5))
P_NG=$((BASE_PORT + 6)) P_NG_H2=$((BASE_PORT + 7))
P_HA=$((BASE_PORT + 8)) P_HA_H2=$((BASE_PORT + 9))
P_SYS_TLS=$((BASE_PORT + 10)) P_SYP_TLS=$((BASE_PORT + 11)) P_NG_TLS=$((BASE_PORT + 12)) P_HA_TLS=$((BASE_PORT + 13))
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for ((p = BASE_PORT; p < BASE_PORT + 14; p++)); do
    if port_open "$p"; then die "port $p is in use; set BASE_PORT to a free range"; fi
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-scaling.XXXXXX")
mkdir -p "$TMP/up" "$TMP/ng"
chmod 755 "$TMP" "$TMP/up" "$TMP/ng"
RAW=$TMP/raw.tsv
# One ECDSA P-256 certificate (PKCS#8 key) for the three proxies' HTTPS listeners.
if [[ " $WORKLOADS " == *" tls "* ]]; then
    command -v openssl >/dev/null 2>&1 || die "the tls workload needs openssl (for its certificate)"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$TMP/key.pem" -out "$TMP/cert.pem" >"$TMP/openssl.log" 2>&1 ||
        die "openssl could not make the certificate: $(tail -3 "$TMP/openssl.log")"
    cat "$TMP/cert.pem" "$TMP/key.pem" >"$TMP/haproxy.pem"
fi
printf 'workload\tworkers\ttarget\tround\trps\trequests\terrors\tcpu_us_per_request\n' >"$RAW"

# Process ids, and the process whose CPU time is counted for each target.
ALL_PIDS=()
declare -A PID_OF
children_of() { # $PARENT -> its children's pids (from /proc: no procps needed)
    local f stat pid ppid
    for f in /proc/[0-9]*/stat; do
        { stat=$(<"$f"); } 2>/dev/null || continue
        pid=${stat%% *}
        stat=${stat##*) }
        read -r _ ppid _ <<<"$stat"
        if [[ $ppid == "$PARENT" ]]; then echo "$pid"; fi
    done
    return 0
}
kill_tree() { # pids...
    local pid kids=()
    for pid in "$@"; do
        PARENT=$pid
        mapfile -t -O "${#kids[@]}" kids < <(children_of)
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in $(seq 30); do
        local alive=0
        for pid in "$@" "${kids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "$@" "${kids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    ((${#ALL_PIDS[@]})) && kill_tree "${ALL_PIDS[@]}"
    wait 2>/dev/null || true
    if [[ -n $RESULTS ]]; then
        mkdir -p "$RESULTS"
        cp "$RAW" "$RESULTS/" 2>/dev/null || true
        [[ -f $TMP/summary.md ]] && cp "$TMP/summary.md" "$RESULTS/"
        cp "$TMP"/perf.*.data "$TMP"/perf.*.txt "$RESULTS/" 2>/dev/null || true
        for f in "$TMP"/*.log; do
            [[ -f $f ]] && { echo "== ${f##*/}"; tail -n 20 "$f"; }
        done >"$RESULTS/logs.txt"
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_port() { # port pid name
    local i
    for ((i = 0; i < 100; i++)); do
        port_open "$1" && return 0
        kill -0 "$2" 2>/dev/null || die "$3 exited during startup: $(tail -5 "$TMP/$3.log" 2>/dev/null)"
        sleep 0.1
    done
    die "$3 did not open port $1 within 10 s: $(tail -5 "$TMP/$3.log" 2>/dev/null)"
}
start() { # name port pin... -- cmd...
    local name=$1 port=$2
    shift 2
    "$@" >"$TMP/$name.log" 2>&1 &
    local pid=$!
    ALL_PIDS+=("$pid")
    PID_OF[$name]=$pid
    wait_port "$port" "$pid" "$name"
}

nginx_head() { # prefix workers
    if ((EUID == 0)); then echo "user root root;"; fi
    cat <<EOF
worker_processes $2;
worker_rlimit_nofile $NOFILE;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections $((NOFILE > 65535 ? 65535 : NOFILE - 100)); }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}

# ------------------------------------------------------------------ upstream (all the run)
nginx_head "$TMP/up" "$UP_WORKERS" >"$TMP/up/nginx.conf"
cat >>"$TMP/up/nginx.conf" <<EOF
    server {
        listen 127.0.0.1:$P_UP reuseport;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
    server {
        listen 127.0.0.1:$P_UP_H2 http2 reuseport;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
start upstream "$P_UP" "${PIN_UP[@]}" nginx -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log"

# ------------------------------------------------------------------ proxies (per worker count)
start_proxies() { # workers
    local w=$1 flavor port admin tport
    pin_proxy "$w"
    for flavor in shared per_worker; do
        if [[ $flavor == shared ]]; then port=$P_SYS admin=$P_SYS_ADMIN tport=$P_SYS_TLS; else port=$P_SYP admin=$P_SYP_ADMIN tport=$P_SYP_TLS; fi
        mkdir -p "$TMP/sy-$flavor"
        cat >"$TMP/sy-$flavor/switchyard.toml" <<EOF
[proxy]
listen = "127.0.0.1:$port"
workers = $w
runtime = "$flavor"
connect_timeout = "2s"
request_timeout = "30s"
shutdown_grace = "1s"
header_read_timeout = "300s"
$(if [[ -f $TMP/cert.pem ]]; then
            printf 'tls_listen = "127.0.0.1:%s"\ntls_cert = "%s"\ntls_key = "%s"\n' "$tport" "$TMP/cert.pem" "$TMP/key.pem"
        fi)

[admin]
listen = "127.0.0.1:$admin"
token_env = "SWITCHYARD_SCALING_TOKEN"

[state]
backend = "file"
path = "$TMP/sy-$flavor/state.json"

[log]
request_id = false

[[services]]
name = "bench"
active = "blue"
blue  = { upstreams = ["127.0.0.1:$P_UP"] }
green = { upstreams = ["127.0.0.1:$P_UP"] }
EOF
        SWITCHYARD_SCALING_TOKEN=scaling RUST_LOG=warn start "sy-$flavor" "$port" \
            "${PIN_PROXY[@]}" "$SY_BIN" serve --config "$TMP/sy-$flavor/switchyard.toml"
    done

    nginx_head "$TMP/ng" "$w" >"$TMP/ng/nginx.conf"
    cat >>"$TMP/ng/nginx.conf" <<EOF
    upstream backend {
        server 127.0.0.1:$P_UP;
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$P_NG reuseport;
        listen 127.0.0.1:$P_NG_H2 http2 reuseport;
$(if [[ -f $TMP/cert.pem ]]; then
        printf '        listen 127.0.0.1:%s ssl reuseport;\n' "$P_NG_TLS"
        printf '        ssl_certificate %s;\n        ssl_certificate_key %s;\n' "$TMP/cert.pem" "$TMP/key.pem"
        printf '        ssl_protocols TLSv1.2 TLSv1.3;\n'
    fi)
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    start nginx "$P_NG" "${PIN_PROXY[@]}" nginx -p "$TMP/ng" -c "$TMP/ng/nginx.conf" -e "$TMP/ng/error.log"

    mkdir -p "$TMP/ha"
    cat >"$TMP/ha/haproxy.cfg" <<EOF
global
    nbthread $w
    maxconn $HA_MAXCONN
    pidfile $TMP/ha/haproxy.pid

defaults
    mode http
    option http-keep-alive
    http-reuse always
    maxconn $HA_MAXCONN
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 300s

frontend bench
    bind 127.0.0.1:$P_HA
    bind 127.0.0.1:$P_HA_H2 proto h2
$(if [[ -f $TMP/cert.pem ]]; then printf '    bind 127.0.0.1:%s ssl crt %s alpn http/1.1\n' "$P_HA_TLS" "$TMP/haproxy.pem"; fi)
    default_backend upstream

backend upstream
    server up1 127.0.0.1:$P_UP
EOF
    start haproxy "$P_HA" "${PIN_PROXY[@]}" haproxy -db -f "$TMP/ha/haproxy.cfg"
}
stop_proxies() {
    local n pids=()
    for n in sy-shared sy-per_worker nginx haproxy; do
        [[ -n ${PID_OF[$n]:-} ]] && pids+=("${PID_OF[$n]}")
        unset "PID_OF[$n]"
    done
    ((${#pids[@]})) && kill_tree "${pids[@]}"
}

declare -A URL_H1=(
    [direct]=http://127.0.0.1:$P_UP/ [sy-shared]=http://127.0.0.1:$P_SYS/
    [sy-per_worker]=http://127.0.0.1:$P_SYP/ [nginx]=http://127.0.0.1:$P_NG/ [haproxy]=http://127.0.0.1:$P_HA/
)
declare -A URL_H2=(
    [direct]=http://127.0.0.1:$P_UP_H2/ [sy-shared]=http://127.0.0.1:$P_SYS/
    [sy-per_worker]=http://127.0.0.1:$P_SYP/ [nginx]=http://127.0.0.1:$P_NG_H2/ [haproxy]=http://127.0.0.1:$P_HA_H2/
)
declare -A URL_TLS=(
    [sy-shared]=https://127.0.0.1:$P_SYS_TLS/ [sy-per_worker]=https://127.0.0.1:$P_SYP_TLS/
    [nginx]=https://127.0.0.1:$P_NG_TLS/ [haproxy]=https://127.0.0.1:$P_HA_TLS/
)
PROXIES=(sy-shared sy-per_worker nginx haproxy)

smoke() { # target: one h1 GET answered "ok", four h2c streams answered
    python3 - "${URL_H1[$1]}" <<'EOF' || die "$1: an HTTP/1.1 GET was not answered 200 ok"
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    assert r.status == 200 and r.read() == b"ok\n"
EOF
    h2load -n4 -c1 "${URL_H2[$1]}" 2>&1 | grep -q '4 succeeded' || die "$1: h2c prior knowledge was not answered"
    if [[ -f $TMP/cert.pem && $1 != direct ]]; then
        python3 - "${URL_TLS[$1]}" "$TMP/cert.pem" <<'EOF' || die "$1: an HTTPS GET was not answered 200 ok"
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
with urllib.request.urlopen(sys.argv[1], timeout=5, context=ctx) as r:
    assert r.status == 200 and r.read() == b"ok\n"
EOF
    fi
}

cpu_ticks() { # pids... -> utime + stime of all of them, clock ticks
    local pid stat f total=0
    for pid in "$@"; do
        { stat=$(<"/proc/$pid/stat"); } 2>/dev/null || continue
        stat=${stat##*) }
        read -r -a f <<<"$stat"
        # after "pid (comm) ": state is field 3, utime and stime fields 14 and 15
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
counted_pids() { # target -> the processes doing its work (nginx: the workers)
    case $1 in
    nginx) PARENT=${PID_OF[nginx]} children_of ;;
    direct) PARENT=${PID_OF[upstream]} children_of ;;
    *) echo "${PID_OF[$1]}" ;;
    esac
}

measure() { # workload workers target round
    local wl=$1 w=$2 t=$3 r=$4 out=$TMP/out pids c0 c1 rps reqs errs cpu=nan
    mapfile -t pids < <(counted_pids "$t")
    c0=$(cpu_ticks "${pids[@]}")
    case $wl in
    h1 | c1000 | tls)
        local conns=$CONNS url=${URL_H1[$t]}
        [[ $wl == c1000 ]] && conns=$MANY_CONNS
        [[ $wl == tls ]] && url=${URL_TLS[$t]}
        "${PIN_LOAD[@]}" wrk -t"$LOAD_THREADS" -c"$conns" -d"${DURATION}s" "$url" >"$out" 2>&1 || true
        rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
        reqs=$(awk '/requests in/ { print $1 }' "$out")
        errs=$(awk '/Non-2xx or 3xx responses:/ { n += $NF }
                    /Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) n += $i }
                    END { print n + 0 }' "$out")
        ;;
    h2c)
        "${PIN_LOAD[@]}" h2load -t"$LOAD_THREADS" -c"$H2_CONNS" -m"$STREAMS" -D"$DURATION" "${URL_H2[$t]}" >"$out" 2>&1 || true
        rps=$(awk '/^finished in/ { print $4 }' "$out")
        reqs=$(awk '/^requests:/ { print $8 }' "$out")
        errs=$(awk '/^requests:/ { print $10 + $12 } /^status codes:/ { print $7 + $9 }' "$out" |
            awk '{ n += $1 } END { print n + 0 }')
        ;;
    esac
    c1=$(cpu_ticks "${pids[@]}")
    if [[ ${reqs:-} =~ ^[0-9]+$ ]] && ((reqs > 0)); then
        cpu=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d / hz / n * 1e6 }')
    else
        log "$t $wl: no result: $(tail -3 "$out" | tr '\n' ' ')"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$w" "$t" "$r" "${rps:-nan}" "${reqs:-0}" "${errs:-0}" "$cpu" >>"$RAW"
    log "$(printf 'workers %d round %d %-6s %-14s %12s req/s  %6s us CPU/req  errors %s' "$w" "$r" "$wl" "$t" "${rps:-nan}" "$cpu" "${errs:-0}")"
}

profile() { # target workers: a perf cpu-clock profile of the target under one more h1 run
    local pids
    mapfile -t pids < <(counted_pids "$1")
    local list
    list=$(
        IFS=,
        echo "${pids[*]}"
    )
    perf record -F 999 -o "$TMP/perf.$1.$2.data" -p "$list" -- sleep "$DURATION" >"$TMP/perf.log" 2>&1 &
    local rec=$!
    sleep 0.2
    "${PIN_LOAD[@]}" wrk -t"$LOAD_THREADS" -c"$CONNS" -d"${DURATION}s" "${URL_H1[$1]}" >"$TMP/perf-wrk.txt" 2>&1 || true
    wait "$rec" || log "perf record failed: $(tail -3 "$TMP/perf.log")"
    log "profile of $1 at $2 workers: $(awk '/^Requests\/sec:/ { print $2 }' "$TMP/perf-wrk.txt") req/s under perf"
    perf report -i "$TMP/perf.$1.$2.data" --stdio --sort dso,sym 2>/dev/null | grep -v '^#' | grep -v '^$' |
        head -60 >"$TMP/perf.$1.$2.txt" || true
}

log "$PIN_NOTE"
log "workers: $WORKERS; workloads: $WORKLOADS; rounds $ROUNDS x ${DURATION}s; $(nproc) CPUs online, ${#CPUS[@]} usable"
smoke direct
for w in $WORKERS; do
    start_proxies "$w"
    for t in "${PROXIES[@]}"; do
        smoke "$t"
        "${PIN_LOAD[@]}" wrk -t"$LOAD_THREADS" -c"$CONNS" -d1s "${URL_H1[$t]}" >/dev/null 2>&1 || true
    done
    for ((r = 1; r <= ROUNDS; r++)); do
        for wl in $WORKLOADS; do
            if [[ $w == "${WORKERS%% *}" && $wl != tls ]]; then measure "$wl" 0 direct "$r"; fi
            for t in "${PROXIES[@]}"; do measure "$wl" "$w" "$t" "$r"; done
        done
    done
    if [[ $w == "$MAX_W" ]]; then for t in $PERF; do profile "$t" "$w"; done; fi
    stop_proxies
done

python3 - "$RAW" "$PIN_NOTE" "$ROUNDS" "$DURATION" >"$TMP/summary.md" <<'EOF'
import collections, statistics, sys

raw, note, rounds, duration = sys.argv[1:5]
rows = collections.defaultdict(list)
with open(raw) as f:
    next(f)
    for line in f:
        wl, w, t, _r, rps, _n, errs, cpu = line.rstrip("\n").split("\t")
        rows[(wl, int(w), t)].append((float(rps) if rps != "nan" else None, int(errs), cpu))

def med(key, i=0):
    vals = [v[i] for v in rows.get(key, []) if v[i] is not None]
    if i == 2:
        vals = [float(v) for v in vals if v != "nan"]
    return statistics.median(vals) if vals else None

def fmt(v, d=0):
    return "n/a" if v is None else f"{v:,.{d}f}"

def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"

print(f"Medians of {rounds} interleaved rounds of {duration} s; {note}.\n")
for wl in dict.fromkeys(k[0] for k in rows):
    direct = med((wl, 0, "direct"))
    print(f"### {wl} (direct to the upstream: {fmt(direct)} req/s)\n")
    print("| workers | Switchyard shared | Switchyard per_worker | nginx | HAProxy | per_worker / shared "
          "| best Switchyard / nginx | best Switchyard / HAProxy | CPU µs per request (shared / per_worker / nginx / HAProxy) | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for w in sorted({k[1] for k in rows if k[0] == wl and k[1] > 0}):
        r = {t: med((wl, w, t)) for t in ("sy-shared", "sy-per_worker", "nginx", "haproxy")}
        c = {t: med((wl, w, t), 2) for t in r}
        errs = sum(e for t in r for (_, e, _) in rows.get((wl, w, t), []))
        best = max((v for v in (r["sy-shared"], r["sy-per_worker"]) if v is not None), default=None)
        print(f"| {w} | {fmt(r['sy-shared'])} | {fmt(r['sy-per_worker'])} | {fmt(r['nginx'])} | {fmt(r['haproxy'])} "
              f"| {ratio(r['sy-per_worker'], r['sy-shared'])} | {ratio(best, r['nginx'])} | {ratio(best, r['haproxy'])} "
              f"| {' / '.join(fmt(c[t], 1) for t in c)} | {errs} |")
    print()
EOF
cat "$TMP/summary.md"
