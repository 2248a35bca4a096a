#!/usr/bin/env bash
# Switchyard load benchmark: Switchyard vs nginx vs HAProxy in front of one nginx upstream.
#
#   benches/load/run.sh                     # 3 interleaved rounds of 5s per target and workload
#   ROUNDS=5 DURATION=10 benches/load/run.sh
#   WORKLOADS="upload64k h2tls" benches/load/run.sh   # a subset
#
# Workloads (WORKLOADS, default all, in this order; see README.md):
#   h1          HTTP/1.1 keep-alive, CONNS connections, GET / (3-byte body)
#   h2c         h2c prior knowledge, CONNS connections x STREAMS streams
#   close       HTTP/1.1, a new connection per request (Connection: close)
#   tls         HTTPS keep-alive (ECDSA P-256, the same certificate on every proxy)
#   tlsclose    HTTPS, a new connection per request (wrk; every proxy resumes the TLS 1.3 session
#               as its defaults allow, as real clients do)
#   tlsfull     HTTPS, a full TLS 1.3 handshake per request, no resumption (openssl s_time -new,
#               TLSFULL_CLIENTS sequential clients in parallel)
#   h2tls       h2 over TLS (ALPN), H2TLS_CONNS connections x H2TLS_STREAMS streams
#   c1000       HTTP/1.1 keep-alive, MANY_CONNS (1000) connections
#   down1m      1 MiB responses, BODY_CONNS connections
#   upload64k   64 KiB POST bodies with Content-Length, BODY_CONNS connections
#   upload1m    1 MiB POST bodies with Content-Length
#   chunked64k  64 KiB POST bodies, Transfer-Encoding: chunked (16 KiB chunks)
#   chunked1m   1 MiB POST bodies, chunked
#   fixed       HTTP/1.1 at a fixed rate (p99 latency), after the rounds
#   idle        Switchyard's RSS holding IDLE_CONNS idle keep-alive connections, at the end
#
# Environment:
#   WORKLOADS=          space-separated subset of the workloads above (default: all)
#   ROUNDS=3            interleaved rounds (medians are reported)
#   DURATION=5          seconds per measurement ("5" or "5s")
#   CONNS=64            client connections for h1, h2c, close, tls, tlsclose, fixed
#   STREAMS=10          h2c streams per connection (h2load -m)
#   H2TLS_CONNS=16      h2tls connections;  H2TLS_STREAMS=16 streams per connection
#   MANY_CONNS=1000     c1000 connections
#   TLSFULL_CLIENTS=16  tlsfull clients (each one connection at a time)
#   BODY_CONNS=16       connections for down1m and the uploads
#   NGINX_REQUEST_BUFFERING=off   nginx proxy_request_buffering: off streams uploads as Switchyard
#                       and HAProxy do (the fair setting); "on" is nginx's default (store, then send)
#   NGINX_PROXY_BUFFERING=on      nginx proxy_buffering for responses (nginx's default)
#   REQUEST_ID=0        like for like: no proxy adds an X-Request-Id (Switchyard's `[log]
#                       request_id = false`); 1: each one does, both ways (Switchyard's default;
#                       nginx `$request_id`, HAProxy `unique-id`)
#   FIXED_RPS=          total rate of the fixed-rate run (default: half of nginx's HTTP/1.1 max)
#   IDLE_CONNS=10000    idle keep-alive connections held against Switchyard for the RSS measurement
#   BASE_PORT=28080     first of the 12 consecutive loopback ports used
#   SKIP_SWITCHYARD=1   benchmark only direct / nginx / haproxy
#   SWITCHYARD_BIN=     use this binary instead of target/release/switchyard
#   PIN=1               pin upstream / proxy / load generator to separate CPUs (needs >= 3 CPUs)
#   PIN=split           the proxy alone on one CPU, upstream and load generator on another (2 CPUs
#                       are enough): the proxy's latency without competing for its CPU
#   KEEP_TMP=1          keep the temp dir (configs, logs, raw tool output)
#
# Needs: wrk, nginx, haproxy, h2load (Debian: wrk nginx haproxy nghttp2-client), python3, curl,
# openssl (the test certificate).
# It installs nothing; the only thing it may build is Switchyard (cargo build --release).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
DURATION=${DURATION%s}
CONNS=${CONNS:-64}
STREAMS=${STREAMS:-10}
H2TLS_CONNS=${H2TLS_CONNS:-16}
H2TLS_STREAMS=${H2TLS_STREAMS:-16}
MANY_CONNS=${MANY_CONNS:-1000}
TLSFULL_CLIENTS=${TLSFULL_CLIENTS:-16}
BODY_CONNS=${BODY_CONNS:-16}
NGINX_REQUEST_BUFFERING=${NGINX_REQUEST_BUFFERING:-off}
NGINX_PROXY_BUFFERING=${NGINX_PROXY_BUFFERING:-on}
ALL_WORKLOADS=(h1 h2c close tls tlsclose tlsfull h2tls c1000 down1m upload64k upload1m chunked64k chunked1m fixed idle)
WORKLOADS=${WORKLOADS:-${ALL_WORKLOADS[*]}}
FIXED_RPS=${FIXED_RPS:-}
IDLE_CONNS=${IDLE_CONNS:-10000}
BASE_PORT=${BASE_PORT:-28080}
SKIP_SWITCHYARD=${SKIP_SWITCHYARD:-0}
PIN=${PIN:-1}
KEEP_TMP=${KEEP_TMP:-0}

log()  { printf '[bench] %s\n' "$*" >&2; }
warn() { printf '[bench] WARNING: %s\n' "$*" >&2; }
die()  { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

for v in ROUNDS DURATION CONNS STREAMS H2TLS_CONNS H2TLS_STREAMS MANY_CONNS TLSFULL_CLIENTS BODY_CONNS IDLE_CONNS BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer (got '${!v}')"
done
for v in NGINX_REQUEST_BUFFERING NGINX_PROXY_BUFFERING; do
    [[ ${!v} == on || ${!v} == off ]] || die "$v must be on or off (got '${!v}')"
done
declare -A WL_ON
RUN_WLS=() # the selected workloads measured in rounds, in the canonical order
for w in $WORKLOADS; do
    [[ " ${ALL_WORKLOADS[*]} " == *" $w "* ]] || die "unknown workload '$w' (known: ${ALL_WORKLOADS[*]})"
    WL_ON[$w]=1
done
for w in "${ALL_WORKLOADS[@]}"; do
    if [[ -n ${WL_ON[$w]:-} && $w != fixed && $w != idle ]]; then RUN_WLS+=("$w"); fi
done
((${#RUN_WLS[@]} + ${#WL_ON[@]} > 0)) || die "WORKLOADS selects nothing"
[[ -z $FIXED_RPS || $FIXED_RPS =~ ^[0-9]+$ ]] || die "FIXED_RPS must be an integer"

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

# ------------------------------------------------------------------ tools
missing=()
for pair in wrk:wrk nginx:nginx haproxy:haproxy h2load:nghttp2-client python3:python3 curl:curl openssl:openssl; do
    tool=${pair%%:*} pkg=${pair#*:}
    if ! command -v "$tool" >/dev/null 2>&1; then
        missing+=("$pkg")
        log "missing: $tool (Debian package: $pkg)"
    fi
done
if ((${#missing[@]})); then
    die "install the missing packages first, e.g.: apt-get install ${missing[*]}"
fi

# ------------------------------------------------------------------ switchyard binary
SY_BIN=${SWITCHYARD_BIN:-$REPO_ROOT/target/release/switchyard}
SY_ENABLED=1
if [[ $SKIP_SWITCHYARD == 1 ]]; then
    SY_ENABLED=0
    log "SKIP_SWITCHYARD=1: Switchyard is not measured"
elif [[ ! -x $SY_BIN ]]; then
    if [[ -n ${SWITCHYARD_BIN:-} ]]; then
        warn "SWITCHYARD_BIN=$SY_BIN is not executable; continuing without Switchyard"
        SY_ENABLED=0
    elif ! command -v cargo >/dev/null 2>&1; then
        warn "$SY_BIN is missing and cargo is not installed; continuing without Switchyard"
        SY_ENABLED=0
    else
        log "building Switchyard: cargo build --release"
        if ! (cd "$REPO_ROOT" && cargo build --release) >&2; then
            warn "cargo build --release failed; continuing without Switchyard (as SKIP_SWITCHYARD=1)"
            SY_ENABLED=0
        elif [[ ! -x $SY_BIN ]]; then
            warn "build succeeded but $SY_BIN is missing; continuing without Switchyard"
            SY_ENABLED=0
        fi
    fi
fi

# ------------------------------------------------------------------ limits, CPUs
want_nofile=$((IDLE_CONNS + 2048))
((want_nofile >= 16384)) || want_nofile=16384
hard_nofile=$(ulimit -Hn)
if [[ $hard_nofile != unlimited && $hard_nofile -lt $want_nofile ]]; then
    want_nofile=$hard_nofile
fi
ulimit -n "$want_nofile" 2>/dev/null || warn "could not raise ulimit -n to $want_nofile"
nofile=$(ulimit -n)
[[ $nofile == unlimited ]] && nofile=1048576
if ((IDLE_CONNS + 1024 > nofile)); then
    IDLE_CONNS=$((nofile - 1024))
    warn "open-file limit is $nofile: holding only $IDLE_CONNS idle connections"
fi

mapfile -t CPUS < <(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)), sep="\n")')
PIN_UP=() PIN_PROXY=() PIN_LOAD=()
if [[ $PIN == 1 ]] && command -v taskset >/dev/null 2>&1 && ((${#CPUS[@]} >= 3)); then
    PIN_UP=(taskset -c "${CPUS[0]}")
    PIN_PROXY=(taskset -c "${CPUS[1]}")
    PIN_LOAD=(taskset -c "${CPUS[2]}")
    PIN_NOTE="pinned: upstream cpu ${CPUS[0]}, proxy cpu ${CPUS[1]}, load generator cpu ${CPUS[2]}"
elif [[ $PIN == split ]] && command -v taskset >/dev/null 2>&1 && ((${#CPUS[@]} >= 2)); then
    PIN_UP=(taskset -c "${CPUS[0]}")
    PIN_PROXY=(taskset -c "${CPUS[1]}")
    PIN_LOAD=(taskset -c "${CPUS[0]}")
    PIN_NOTE="split: proxy alone on cpu ${CPUS[1]}, upstream and load generator on cpu ${CPUS[0]} (throughput is bounded by that cpu)"
else
    PIN_NOTE="not pinned (${#CPUS[@]} CPUs): load generator, proxy and upstream share CPUs; compare ratios, not absolute numbers"
fi
CLK_TCK=$(getconf CLK_TCK)
HA_MAXCONN=$((nofile / 2 - 100))
((HA_MAXCONN <= 4096)) || HA_MAXCONN=4096

# ------------------------------------------------------------------ ports, temp dir
P_UP=$BASE_PORT            # upstream nginx, HTTP/1.1
P_UP_H2=$((BASE_PORT + 1)) # upstream nginx, h2c
P_SY=$((BASE_PORT + 2))    # switchyard, HTTP/1.1 + h2c
P_SY_ADMIN=$((BASE_PORT + 3))
P_NG=$((BASE_PORT + 4))    # nginx proxy, HTTP/1.1
P_NG_H2=$((BASE_PORT + 5)) # nginx proxy, h2c
P_HA=$((BASE_PORT + 6))    # haproxy, HTTP/1.1
P_HA_H2=$((BASE_PORT + 7)) # haproxy, h2c (proto h2)
P_L4=$((BASE_PORT + 8))    # haproxy in mode tcp: a byte relay, the floor for any proxy (below)
P_SY_TLS=$((BASE_PORT + 9)) # switchyard, HTTPS (HTTP/1.1 and h2 by ALPN)
P_NG_TLS=$((BASE_PORT + 10)) # nginx proxy, HTTPS
P_HA_TLS=$((BASE_PORT + 11)) # haproxy, HTTPS

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$P_UP" "$P_UP_H2" "$P_SY" "$P_SY_ADMIN" "$P_NG" "$P_NG_H2" "$P_HA" "$P_HA_H2" "$P_L4" \
    "$P_SY_TLS" "$P_NG_TLS" "$P_HA_TLS"; do
    if port_open "$p"; then die "port $p is already in use; set BASE_PORT to a free range"; fi
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-bench.XXXXXX")
RES=$TMP/results
mkdir -p "$RES" "$TMP/state" "$TMP/nginx-up/www" "$TMP/nginx-proxy" "$TMP/haproxy" "$TMP/tls"
# Run as root, nginx's workers are another user: they must reach the files they serve (the
# 1 MiB download) and their temp dirs (nginx proxy_buffering spills large responses there).
chmod 755 "$TMP" "$TMP/nginx-up" "$TMP/nginx-up/www" "$TMP/nginx-proxy"

PIDS=()
cleanup() {
    local rc=$? pid kids=()
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        # remember children (nginx workers) before the parent goes away
        mapfile -t -O "${#kids[@]}" kids < <(pgrep -P "$pid" 2>/dev/null || true)
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local alive=0
        for pid in "${PIDS[@]}" "${kids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        ((alive)) || break
        sleep 0.3
    done
    for pid in "${PIDS[@]}" "${kids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ $KEEP_TMP == 1 ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ TLS certificate, bodies
# One ECDSA P-256 certificate (PKCS#8 key) for the three proxies' HTTPS listeners.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" >"$TMP/tls/openssl.log" 2>&1 ||
    die "openssl could not make the test certificate: $(tail -3 "$TMP/tls/openssl.log")"
cat "$TMP/tls/cert.pem" "$TMP/tls/key.pem" >"$TMP/tls/haproxy.pem"
# The 1 MiB download the upstream serves, and the upload bodies.
head -c 1048576 /dev/zero | tr '\0' 'd' >"$TMP/nginx-up/www/1m"
for size in 65536 1048576; do head -c "$size" /dev/zero | tr '\0' 'u' >"$TMP/body.$size"; done
# wrk sends one pre-built request per script (static: no Lua call per request). wrk.format is
# replaced because wrk's own adds Content-Length to any body, which a chunked request must not
# carry (Switchyard, like any careful proxy, refuses both headers together).
write_upload_lua() { # size chunked(0/1) -> lua on stdout
    cat <<EOF
local f = assert(io.open("$TMP/body.$1", "rb"))
local body = f:read("*a")
f:close()
local chunked = $2 == 1
function wrk.format()
    local payload, framing
    if chunked then
        local parts = {}
        for i = 1, #body, 16384 do
            local piece = body:sub(i, i + 16383)
            parts[#parts + 1] = string.format("%x\r\n", #piece) .. piece .. "\r\n"
        end
        parts[#parts + 1] = "0\r\n\r\n"
        payload, framing = table.concat(parts), "Transfer-Encoding: chunked"
    else
        payload, framing = body, "Content-Length: " .. #body
    end
    return "POST " .. wrk.path .. " HTTP/1.1\r\nHost: " .. wrk.headers["Host"] ..
        "\r\nContent-Type: application/octet-stream\r\n" .. framing .. "\r\n\r\n" .. payload
end
EOF
}
write_upload_lua 65536 0 >"$TMP/upload64k.lua"
write_upload_lua 1048576 0 >"$TMP/upload1m.lua"
write_upload_lua 65536 1 >"$TMP/chunked64k.lua"
write_upload_lua 1048576 1 >"$TMP/chunked1m.lua"

wait_port() { # port pid name
    local i
    for ((i = 0; i < 100; i++)); do
        port_open "$1" && return 0
        kill -0 "$2" 2>/dev/null || { warn "$3 exited during startup"; return 1; }
        sleep 0.1
    done
    warn "$3 did not open port $1 within 10s"
    return 1
}

# ------------------------------------------------------------------ upstream nginx
nginx_common() { # prefix
    cat <<EOF
worker_processes 1;
worker_rlimit_nofile $nofile;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections $((nofile > 65535 ? 65535 : nofile - 100)); multi_accept on; }
EOF
}
nginx_http_common() { # prefix
    cat <<EOF
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

write_nginx_up() { # with_h2 (1/0)
    nginx_common "$TMP/nginx-up"
    echo "http {"
    nginx_http_common "$TMP/nginx-up"
    cat <<EOF
    server {
        listen 127.0.0.1:$P_UP;
        client_max_body_size 2m;
        client_body_buffer_size 2m;
        location / { default_type text/plain; return 200 "ok\n"; }
        location = /1m {
            root $TMP/nginx-up/www;
            default_type application/octet-stream;
            sendfile on;
            tcp_nopush on;
        }
        # Uploads: the whole body is read (into memory) before the 200, as an application
        # reading its request would. 'return' alone answers before reading the body (it is
        # discarded afterwards), which would make each proxy's handling of an early response
        # the measurement. mirror_request_body reads the body before the content phase; the
        # mirror subrequest itself is an internal 204; empty_gif refuses POST with 405, turned
        # into the 200 "ok" by error_page.
        location = /upload {
            mirror /_drop;
            mirror_request_body on;
            empty_gif;
            error_page 405 =200 @ok;
        }
        location = /_drop { internal; return 204; }
        location @ok { default_type text/plain; return 200 "ok\n"; }
    }
EOF
    if [[ $1 == 1 ]]; then
        cat <<EOF
    server {
        listen 127.0.0.1:$P_UP_H2 http2;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
EOF
    fi
    echo "}"
}
nginx_ok() { # prefix
    nginx -t -p "$1" -c "$1/nginx.conf" -e "$1/error.log" >"$1/check.log" 2>&1
}
UP_H2=1
write_nginx_up 1 >"$TMP/nginx-up/nginx.conf"
if ! nginx_ok "$TMP/nginx-up"; then
    UP_H2=0
    write_nginx_up 0 >"$TMP/nginx-up/nginx.conf"
    nginx_ok "$TMP/nginx-up" || die "upstream nginx config invalid: $(tail -3 "$TMP/nginx-up/check.log")"
    warn "this nginx rejects 'listen ... http2' (no h2c): direct h2c is n/a"
fi
"${PIN_UP[@]}" nginx -p "$TMP/nginx-up" -c "$TMP/nginx-up/nginx.conf" -e "$TMP/nginx-up/error.log" \
    >"$TMP/nginx-up/stdout.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_port "$P_UP" "$UP_PID" "upstream nginx" || die "upstream nginx failed: $(tail -3 "$TMP/nginx-up/error.log" 2>/dev/null)"

# ------------------------------------------------------------------ switchyard
SY_PID=
if ((SY_ENABLED)); then
    cat >"$TMP/switchyard.toml" <<EOF
# generated by benches/load/run.sh
[proxy]
listen = "127.0.0.1:$P_SY"
connect_timeout = "2s"
request_timeout = "30s"
shutdown_grace = "1s"
workers = 1
# the idle measurement opens IDLE_CONNS keep-alive connections one batch at a time, which takes
# longer than the default 10 s a keep-alive connection may wait for its next request
header_read_timeout = "300s"
tls_listen = "127.0.0.1:$P_SY_TLS"
tls_cert = "$TMP/tls/cert.pem"
tls_key = "$TMP/tls/key.pem"

[admin]
listen = "127.0.0.1:$P_SY_ADMIN"
token_env = "SWITCHYARD_ADMIN_TOKEN"

[state]
backend = "file"
path = "$TMP/state/switchyard.json"

[[services]]
name = "bench"
active = "blue"
blue  = { upstreams = ["127.0.0.1:$P_UP"] }
green = { upstreams = ["127.0.0.1:$P_UP"] }
EOF
    if [[ ${REQUEST_ID:-0} != 1 ]]; then
        printf '\n[log]\nrequest_id = false\n' >>"$TMP/switchyard.toml"
    fi
    SY_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    if ! SWITCHYARD_ADMIN_TOKEN=$SY_TOKEN "$SY_BIN" check --config "$TMP/switchyard.toml" >"$TMP/switchyard-check.log" 2>&1; then
        warn "switchyard check rejected the bench config; continuing without Switchyard:"
        sed 's/^/    /' "$TMP/switchyard-check.log" >&2
        SY_ENABLED=0
    else
        SWITCHYARD_ADMIN_TOKEN=$SY_TOKEN RUST_LOG=${RUST_LOG:-warn} \
            "${PIN_PROXY[@]}" "$SY_BIN" serve --config "$TMP/switchyard.toml" >"$TMP/switchyard.log" 2>&1 &
        SY_PID=$!
        PIDS+=("$SY_PID")
        if ! wait_port "$P_SY" "$SY_PID" "switchyard"; then
            warn "Switchyard did not start; continuing without it. Log tail:"
            tail -5 "$TMP/switchyard.log" | sed 's/^/    /' >&2
            SY_ENABLED=0
        fi
    fi
fi

# ------------------------------------------------------------------ nginx proxy
write_nginx_proxy() { # with_h2 (1/0) with_tls (1/0)
    local h2=
    [[ $1 == 1 ]] && h2=" http2"
    nginx_common "$TMP/nginx-proxy"
    echo "http {"
    nginx_http_common "$TMP/nginx-proxy"
    if [[ $2 == 1 ]]; then
        echo "    ssl_certificate $TMP/tls/cert.pem;"
        echo "    ssl_certificate_key $TMP/tls/key.pem;"
        # nginx before 1.23.4 offers TLS 1.2 at most by default; Switchyard and HAProxy offer 1.3
        echo "    ssl_protocols TLSv1.2 TLSv1.3;"
    fi
    cat <<EOF
    upstream backend {
        server 127.0.0.1:$P_UP;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$P_NG;
EOF
    if [[ $1 == 1 ]]; then echo "        listen 127.0.0.1:$P_NG_H2 http2;"; fi
    if [[ $2 == 1 ]]; then echo "        listen 127.0.0.1:$P_NG_TLS ssl$h2;"; fi
    cat <<EOF
        client_max_body_size 2m;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering $NGINX_REQUEST_BUFFERING;
            proxy_buffering $NGINX_PROXY_BUFFERING;
EOF
    if [[ ${REQUEST_ID:-0} == 1 ]]; then
        echo '            proxy_set_header X-Request-Id $request_id;'
        echo '            add_header X-Request-Id $request_id always;'
    fi
    cat <<EOF
        }
    }
}
EOF
}
NG_H2=1 NG_TLS=1
write_nginx_proxy 1 1 >"$TMP/nginx-proxy/nginx.conf"
if ! nginx_ok "$TMP/nginx-proxy"; then
    NG_H2=0
    write_nginx_proxy 0 1 >"$TMP/nginx-proxy/nginx.conf"
    if ! nginx_ok "$TMP/nginx-proxy"; then
        NG_TLS=0
        write_nginx_proxy 0 0 >"$TMP/nginx-proxy/nginx.conf"
        nginx_ok "$TMP/nginx-proxy" || die "nginx proxy config invalid: $(tail -3 "$TMP/nginx-proxy/check.log")"
        warn "this nginx rejects 'listen ... ssl': nginx's TLS rows are n/a"
    fi
    warn "this nginx rejects 'listen ... http2' (no h2c, no h2 over TLS): nginx h2c and h2tls are n/a"
fi
"${PIN_PROXY[@]}" nginx -p "$TMP/nginx-proxy" -c "$TMP/nginx-proxy/nginx.conf" -e "$TMP/nginx-proxy/error.log" \
    >"$TMP/nginx-proxy/stdout.log" 2>&1 &
NG_PID=$!
PIDS+=("$NG_PID")
wait_port "$P_NG" "$NG_PID" "nginx proxy" || die "nginx proxy failed: $(tail -3 "$TMP/nginx-proxy/error.log" 2>/dev/null)"

# ------------------------------------------------------------------ haproxy
cat >"$TMP/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $HA_MAXCONN
    pidfile $TMP/haproxy/haproxy.pid

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
    bind 127.0.0.1:$P_HA_TLS ssl crt $TMP/tls/haproxy.pem alpn h2,http/1.1 # TLS
$(if [[ ${REQUEST_ID:-0} == 1 ]]; then printf '    unique-id-format %%[uuid()]\n    unique-id-header X-Request-Id\n    http-response set-header X-Request-Id %%[unique-id]\n'; fi)
    default_backend upstream

backend upstream
    server up1 127.0.0.1:$P_UP

# l4relay: the same bytes relayed without reading HTTP (one upstream connection per client
# connection, recv and send on each side): what any proxy pays in the kernel with nothing
# parsed, the ceiling an HTTP proxy with the same syscalls can approach.
frontend l4relay
    mode tcp
    no option http-keep-alive
    timeout client 300s
    bind 127.0.0.1:$P_L4
    default_backend upstream_tcp

backend upstream_tcp
    mode tcp
    no option http-keep-alive
    timeout server 300s
    server up1 127.0.0.1:$P_UP
EOF
HA_TLS=1
if ! haproxy -c -f "$TMP/haproxy/haproxy.cfg" >"$TMP/haproxy/check.log" 2>&1; then
    # a HAProxy built without OpenSSL: the rest of the benchmark still runs
    HA_TLS=0
    sed -i '/ # TLS$/d' "$TMP/haproxy/haproxy.cfg"
    haproxy -c -f "$TMP/haproxy/haproxy.cfg" >"$TMP/haproxy/check.log" 2>&1 ||
        die "haproxy config invalid: $(tail -5 "$TMP/haproxy/check.log")"
    warn "this haproxy rejects 'bind ... ssl': its TLS rows are n/a"
fi
"${PIN_PROXY[@]}" haproxy -db -f "$TMP/haproxy/haproxy.cfg" >"$TMP/haproxy/haproxy.log" 2>&1 &
HA_PID=$!
PIDS+=("$HA_PID")
wait_port "$P_HA" "$HA_PID" "haproxy" || die "haproxy failed: $(tail -3 "$TMP/haproxy/haproxy.log")"

# ------------------------------------------------------------------ targets
declare -A URL_H1 URL_H2 URL_TLS
URL_H1[direct]=http://127.0.0.1:$P_UP/
URL_H2[direct]=http://127.0.0.1:$P_UP_H2/
URL_H1[switchyard]=http://127.0.0.1:$P_SY/
URL_H2[switchyard]=http://127.0.0.1:$P_SY/
URL_TLS[switchyard]=https://127.0.0.1:$P_SY_TLS/
URL_H1[nginx]=http://127.0.0.1:$P_NG/
URL_H2[nginx]=http://127.0.0.1:$P_NG_H2/
((NG_TLS)) && URL_TLS[nginx]=https://127.0.0.1:$P_NG_TLS/
URL_H1[haproxy]=http://127.0.0.1:$P_HA/
URL_H2[haproxy]=http://127.0.0.1:$P_HA_H2/
((HA_TLS)) && URL_TLS[haproxy]=https://127.0.0.1:$P_HA_TLS/
URL_H1[l4relay]=http://127.0.0.1:$P_L4/
TARGETS=(direct)
((SY_ENABLED)) && TARGETS+=(switchyard)
TARGETS+=(nginx haproxy l4relay)
ALL_TARGETS=(direct switchyard nginx haproxy l4relay)
PROXIES=(switchyard nginx haproxy)
declare -A OK # "<feature>.<target>" = 1 where the smoke test passed

# What each workload needs from a target, its tool, its connections, its path, its request.
wl_feature() {
    case $1 in
    h1 | close | c1000 | fixed) echo h1 ;;
    h2c) echo h2c ;;
    tls | tlsclose | tlsfull) echo tls ;;
    h2tls) echo h2tls ;;
    down1m) echo down ;;
    upload64k | upload1m) echo upload ;;
    chunked64k | chunked1m) echo chunked ;;
    esac
}
wl_conns() {
    case $1 in
    h2tls) echo "$H2TLS_CONNS" ;;
    c1000) echo "$MANY_CONNS" ;;
    tlsfull) echo "$TLSFULL_CLIENTS" ;;
    down1m | upload* | chunked*) echo "$BODY_CONNS" ;;
    *) echo "$CONNS" ;;
    esac
}
wl_url() { # workload target
    local base
    case $(wl_feature "$1") in
    h2c) base=${URL_H2[$2]:-} ;;
    tls | h2tls) base=${URL_TLS[$2]:-} ;;
    *) base=${URL_H1[$2]:-} ;;
    esac
    case $1 in
    down1m) echo "${base}1m" ;;
    upload* | chunked*) echo "${base}upload" ;;
    *) echo "$base" ;;
    esac
}
wl_desc() {
    case $1 in
    h1) echo "HTTP/1.1 keep-alive, $CONNS conns, 3-byte body (wrk)" ;;
    h2c) echo "h2c, $CONNS conns x $STREAMS streams (h2load)" ;;
    close) echo "HTTP/1.1, a connection per request, $CONNS conns (wrk, Connection: close)" ;;
    tls) echo "HTTPS keep-alive, ECDSA P-256, $CONNS conns (wrk)" ;;
    tlsclose) echo "HTTPS, a connection per request, default resumption, $CONNS conns (wrk, Connection: close)" ;;
    tlsfull) echo "HTTPS, a full TLS 1.3 handshake per request, $TLSFULL_CLIENTS clients (openssl s_time -new)" ;;
    h2tls) echo "h2 over TLS, $H2TLS_CONNS conns x $H2TLS_STREAMS streams (h2load)" ;;
    c1000) echo "HTTP/1.1 keep-alive, $MANY_CONNS conns (wrk)" ;;
    down1m) echo "1 MiB responses, $BODY_CONNS conns (wrk)" ;;
    upload64k) echo "64 KiB POST, Content-Length, $BODY_CONNS conns (wrk -s)" ;;
    upload1m) echo "1 MiB POST, Content-Length, $BODY_CONNS conns (wrk -s)" ;;
    chunked64k) echo "64 KiB POST, chunked (16 KiB chunks), $BODY_CONNS conns (wrk -s)" ;;
    chunked1m) echo "1 MiB POST, chunked (16 KiB chunks), $BODY_CONNS conns (wrk -s)" ;;
    fixed) echo "HTTP/1.1 at a fixed rate, $CONNS conns (h2load --h1 --rps); ratios are p99 ratios" ;;
    esac
}

# Smoke tests, one per feature and target: a wrong answer makes that target's rows n/a.
smoke() { # feature target
    local f=$1 t=$2 body
    case $f in
    h1) body=$(curl -sS --max-time 5 "${URL_H1[$t]}" 2>"$TMP/curl.err") && [[ $body == ok ]] ;;
    h2c) h2load -n4 -c1 "${URL_H2[$t]}" 2>&1 | grep -q '4 succeeded' ;;
    tls)
        [[ -n ${URL_TLS[$t]:-} ]] || return 1
        body=$(curl -sS --max-time 5 --http1.1 --cacert "$TMP/tls/cert.pem" "${URL_TLS[$t]}" 2>"$TMP/curl.err") &&
            [[ $body == ok ]]
        ;;
    h2tls)
        [[ -n ${URL_TLS[$t]:-} ]] || return 1
        h2load -n4 -c1 "${URL_TLS[$t]}" 2>&1 | grep -q '4 succeeded'
        ;;
    down)
        body=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code} %{size_download}' "$(wl_url down1m "$t")" 2>"$TMP/curl.err") &&
            [[ $body == "200 1048576" ]]
        ;;
    upload | chunked)
        local te=()
        [[ $f == chunked ]] && te=(-H "Transfer-Encoding: chunked")
        body=$(curl -sS --max-time 10 "${te[@]}" -H "Content-Type: application/octet-stream" \
            --data-binary "@$TMP/body.1048576" "$(wl_url upload64k "$t")" 2>"$TMP/curl.err") && [[ $body == ok ]]
        ;;
    esac
}
declare -A NEED_FEATURE
for w in "${RUN_WLS[@]}"; do NEED_FEATURE[$(wl_feature "$w")]=1; done
[[ -n ${WL_ON[fixed]:-} ]] && NEED_FEATURE[h1]=1
for t in "${TARGETS[@]}"; do
    for f in h1 h2c tls h2tls down upload chunked; do
        [[ -n ${NEED_FEATURE[$f]:-} ]] || continue
        if [[ $f == tls || $f == h2tls ]] && [[ -z ${URL_TLS[$t]:-} ]]; then continue; fi
        if [[ $f == h2c && ($t == l4relay || ($t == nginx && $NG_H2 == 0) || ($t == direct && $UP_H2 == 0)) ]]; then
            continue
        fi
        : >"$TMP/curl.err"
        if smoke "$f" "$t"; then OK[$f.$t]=1; else
            warn "$t: the $f smoke test failed ($(head -c 200 "$TMP/curl.err")); its $f rows are n/a"
        fi
    done
done

# ------------------------------------------------------------------ helpers
cpu_ticks() { # pid -> "utime stime" in clock ticks
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    # after "pid (comm) ": field 3 is state; utime/stime are fields 14/15 -> index 11/12 here
    local f
    read -r -a f <<<"$stat"
    echo "${f[11]} ${f[12]}"
}
proxy_pid() { # target -> the process doing the proxying (nginx: its one worker), or nothing
    case $1 in
    switchyard) echo "$SY_PID" ;;
    nginx) pgrep -P "$NG_PID" 2>/dev/null | head -1 ;;
    haproxy | l4relay) echo "$HA_PID" ;;
    esac
}
status_kb() { # pid key -> kB
    awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"
}
to_ms() { # "123.45us" / "1.2ms" / "2.00s" / "1.00m" -> ms
    awk '{ v = $1
           if (v ~ /us$/)      { sub(/us$/, "", v); printf "%.3f\n", v / 1000 }
           else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f\n", v }
           else if (v ~ /m$/)  { sub(/m$/, "", v);  printf "%.3f\n", v * 60000 }
           else if (v ~ /s$/)  { sub(/s$/, "", v);  printf "%.3f\n", v * 1000 }
           else print "nan" }'
}
log_percentiles() { # h2load --log-file -> "p50_ms p99_ms"
    awk -F'\t' '{ print $3 }' "$1" | sort -n | awk '
        { a[NR] = $1 }
        END { if (NR == 0) { print "nan nan"; exit }
              i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
              i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
              printf "%.3f %.3f\n", a[i50] / 1000, a[i99] / 1000 }'
}
median() { # numbers on stdin (non-numeric ignored) -> median or n/a
    # `|| true`: no number at all (s_time gives no latencies) is "n/a", not a failed pipeline.
    { grep -E '^[0-9.]+$' || true; } | sort -g | awk '{ a[NR] = $1 }
        END { if (NR == 0) print "n/a"
              else if (NR % 2) print a[(NR + 1) / 2]
              else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# one measurement; appends "rps p50_ms p99_ms requests errors usr_us_per_req sys_us_per_req" to
# $RES/<workload>.<target> (CPU of the proxy process, user and kernel, per request)
measure() { # workload target round [rps_total]
    local wl=$1 t=$2 round=$3 out=$RES/raw.$1.$2.$3 line reqs rps p50 p99 errs usr=- sys=- pid u0 s0 u1 s1
    local conns url
    conns=$(wl_conns "$wl")
    url=$(wl_url "$wl" "$t")
    pid=$(proxy_pid "$t")
    [[ -n $pid ]] && read -r u0 s0 < <(cpu_ticks "$pid")
    case $wl in
    h2c | h2tls | fixed)
        local args=(-c"$conns" -D "$DURATION" --log-file="$out.log")
        case $wl in
        h2c) args+=(-m"$STREAMS") ;;
        h2tls) args+=(-m"$H2TLS_STREAMS") ;;
        fixed)
            local per_client
            per_client=$(awk -v r="$4" -v c="$conns" 'BEGIN { x = r / c; if (x < 1) x = 1; printf "%d", x + 0.5 }')
            args+=(--h1 -m1 --rps="$per_client")
            ;;
        esac
        "${PIN_LOAD[@]}" h2load "${args[@]}" "$url" >"$out" 2>&1 || true
        rps=$(awk '/^finished in/ { print $4 }' "$out")
        reqs=$(awk '/^requests:/ { print $8 }' "$out")
        # failed requests, plus 4xx and 5xx answers ("status codes: N 2xx, N 3xx, N 4xx, N 5xx")
        errs=$(awk '/^requests:/ { n += $10 } /^status codes:/ { n += $7 + $9 } END { print n + 0 }' "$out")
        read -r p50 p99 < <(log_percentiles "$out.log")
        rm -f "$out.log"
        ;;
    tlsfull)
        # s_time: one connection at a time per client, each a full handshake (-new) and one
        # "GET / HTTP/1.0" (no Host: every proxy here routes it to its one upstream)
        local hostport=${url#https://} i clients=() t0 t1
        hostport=${hostport%/}
        t0=$(date +%s.%N)
        for ((i = 0; i < conns; i++)); do
            "${PIN_LOAD[@]}" openssl s_time -connect "$hostport" -new -tls1_3 -www / \
                -time "$DURATION" >"$out.$i" 2>&1 &
            clients+=($!)
        done
        wait "${clients[@]}"
        t1=$(date +%s.%N)
        reqs=$(cat "$out".* | awk '/connections in [0-9]+ real seconds/ { n += $1 } END { print n + 0 }')
        rps=$(awk -v n="$reqs" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", n / (b - a) }')
        p50=nan p99=nan
        errs=$(cat "$out".* | grep -c -i -E 'error|fail' || true)
        cat "$out".* >"$out"
        rm -f "$out".*
        ;;
    *)
        local args=(-t1 -c"$conns" -d"${DURATION}s" --latency)
        case $wl in
        close | tlsclose) args+=(-H "Connection: close") ;;
        upload* | chunked*) args+=(-s "$TMP/$wl.lua") ;;
        esac
        "${PIN_LOAD[@]}" wrk "${args[@]}" "$url" >"$out" 2>&1 || true
        rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
        reqs=$(awk '/requests in/ { print $1 }' "$out")
        p50=$(awk '$1 == "50%" { print $2 }' "$out" | to_ms)
        p99=$(awk '$1 == "99%" { print $2 }' "$out" | to_ms)
        errs=$(awk '/Non-2xx or 3xx responses:/ { n += $NF }
                    /Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) n += $i }
                    END { print n + 0 }' "$out")
        ;;
    esac
    if [[ -n $pid ]] && read -r u1 s1 < <(cpu_ticks "$pid" 2>/dev/null) &&
        [[ ${reqs:-0} =~ ^[0-9]+$ ]] && ((reqs > 0)); then
        usr=$(awk -v d=$((u1 - u0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d / hz / n * 1e6 }')
        sys=$(awk -v d=$((s1 - s0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d / hz / n * 1e6 }')
    fi
    if [[ $t == switchyard ]] && ! kill -0 "$SY_PID" 2>/dev/null; then
        warn "Switchyard died during $wl round $round; log tail:"
        tail -5 "$TMP/switchyard.log" | sed 's/^/    /' >&2
        SY_ENABLED=0
    fi
    line="${rps:-nan} ${p50:-nan} ${p99:-nan} ${reqs:-0} ${errs:-0} $usr $sys"
    echo "$line" >>"$RES/$wl.$t"
    log "$(printf 'round %d %-10s %-10s %10s req/s  p50 %8s ms  p99 %8s ms  errors %s' \
        "$round" "$wl" "$t" "${rps:-nan}" "${p50:-nan}" "${p99:-nan}" "${errs:-0}")"
}

runnable() { # workload target
    local t=$2
    [[ $t == switchyard ]] && ! ((SY_ENABLED)) && return 1
    [[ -n ${OK[$(wl_feature "$1").$t]:-} ]]
}

# ------------------------------------------------------------------ run
log "temp dir $TMP; $PIN_NOTE"
log "workloads: ${RUN_WLS[*]}${WL_ON[fixed]:+ fixed}${WL_ON[idle]:+ idle}"
log "rounds=$ROUNDS duration=${DURATION}s conns=$CONNS h2c streams=$STREAMS"
log "warm-up (1s per target)"
for t in "${TARGETS[@]}"; do
    if runnable h1 "$t"; then "${PIN_LOAD[@]}" wrk -t1 -c"$CONNS" -d1s "${URL_H1[$t]}" >/dev/null 2>&1 || true; fi
    if runnable tls "$t"; then "${PIN_LOAD[@]}" wrk -t1 -c"$CONNS" -d1s "${URL_TLS[$t]}" >/dev/null 2>&1 || true; fi
done

for ((r = 1; r <= ROUNDS; r++)); do
    for wl in "${RUN_WLS[@]}"; do
        for t in "${TARGETS[@]}"; do
            if runnable "$wl" "$t"; then measure "$wl" "$t" "$r"; fi
        done
    done
done

if [[ -n ${WL_ON[fixed]:-} && -z $FIXED_RPS ]]; then
    ng_max=$(awk '{ print $1 }' "$RES/h1.nginx" 2>/dev/null | median)
    if [[ $ng_max == n/a ]]; then
        ng_max=$(awk '{ print $1 }' "$RES/h1.direct" 2>/dev/null | median)
        [[ $ng_max == n/a ]] || warn "no nginx HTTP/1.1 result: fixed rate based on direct instead"
    fi
    if [[ $ng_max == n/a ]]; then
        warn "fixed: no HTTP/1.1 maximum measured (select h1 too, or set FIXED_RPS); skipped"
        FIXED_RPS=0
    else
        FIXED_RPS=$(awk -v m="$ng_max" 'BEGIN { printf "%d", m / 2 }')
    fi
fi
if [[ -n ${WL_ON[fixed]:-} ]] && ((FIXED_RPS > 0)); then
    log "fixed-rate runs at $FIXED_RPS req/s total (h2load --h1 --rps per client, $CONNS clients)"
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in "${TARGETS[@]}"; do
            if runnable fixed "$t"; then measure fixed "$t" "$r" "$FIXED_RPS"; fi
        done
    done
fi

# ------------------------------------------------------------------ switchyard memory
SY_HWM=n/a SY_RSS0=n/a SY_IDLE_RSS=n/a SY_IDLE_HWM=n/a SY_IDLE_FDS=n/a SY_IDLE_OPEN=n/a SY_IDLE_EST=n/a
if ((SY_ENABLED)) && kill -0 "$SY_PID" 2>/dev/null; then
    SY_HWM=$(status_kb "$SY_PID" VmHWM)
    SY_RSS0=$(status_kb "$SY_PID" VmRSS)
fi
if [[ -n ${WL_ON[idle]:-} ]] && ((SY_ENABLED)) && kill -0 "$SY_PID" 2>/dev/null; then
    cat >"$TMP/idle_conns.py" <<'PYEOF'
import os, resource, socket, sys, time

host, port, n, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = n + 256
if soft != resource.RLIM_INFINITY and soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
REQ = b"GET / HTTP/1.1\r\nHost: bench.local\r\nConnection: keep-alive\r\n\r\n"


def read_response(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d:
            raise OSError("closed before headers")
        buf += d
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 200"):
        raise OSError("status: %r" % lines[0])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        hdrs[k.strip().lower()] = v.strip().lower()
    if hdrs.get(b"transfer-encoding", b"").endswith(b"chunked"):
        while not body.endswith(b"0\r\n\r\n"):
            d = s.recv(4096)
            if not d:
                raise OSError("closed in chunked body")
            body += d
    else:
        cl = int(hdrs.get(b"content-length", b"0"))
        while len(body) < cl:
            d = s.recv(4096)
            if not d:
                raise OSError("closed in body")
            body += d
    if b"connection" in hdrs and hdrs[b"connection"] == b"close":
        raise OSError("server closed the keep-alive connection")


socks, fails, err = [], 0, ""
BATCH = 256
for start in range(0, n, BATCH):
    batch = []
    for _ in range(start, min(n, start + BATCH)):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((host, port))
            s.sendall(REQ)
            batch.append(s)
        except OSError as e:
            fails, err = fails + 1, str(e)
            s.close()
    for s in batch:
        try:
            read_response(s)
            socks.append(s)
        except (OSError, ValueError) as e:
            fails, err = fails + 1, str(e)
            s.close()
with open(ready + ".tmp", "w") as f:
    f.write("%d %d %s\n" % (len(socks), fails, err.replace("\n", " ")[:200]))
os.rename(ready + ".tmp", ready)
time.sleep(600)
PYEOF
    log "opening $IDLE_CONNS idle keep-alive connections to Switchyard"
    python3 "$TMP/idle_conns.py" 127.0.0.1 "$P_SY" "$IDLE_CONNS" "$TMP/idle.ready" >"$TMP/idle.log" 2>&1 &
    IDLE_PID=$!
    PIDS+=("$IDLE_PID")
    for ((i = 0; i < 1200; i++)); do
        [[ -e $TMP/idle.ready ]] && break
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -e $TMP/idle.ready ]]; then
        read -r idle_ok idle_fail idle_err <"$TMP/idle.ready"
        ((idle_fail == 0)) || warn "$idle_fail of $IDLE_CONNS idle connections failed (last error: $idle_err)"
        sleep 2 # let the proxy settle
        SY_IDLE_RSS=$(status_kb "$SY_PID" VmRSS)
        SY_IDLE_HWM=$(status_kb "$SY_PID" VmHWM)
        SY_IDLE_FDS=$(find "/proc/$SY_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
        SY_IDLE_OPEN=$idle_ok
        if command -v ss >/dev/null 2>&1; then
            SY_IDLE_EST=$(ss -Htn state established "( sport = :$P_SY )" 2>/dev/null | wc -l)
        fi
    else
        warn "idle-connection client failed: $(tail -3 "$TMP/idle.log")"
    fi
    kill -TERM "$IDLE_PID" 2>/dev/null || true
    wait "$IDLE_PID" 2>/dev/null || true
fi

# ------------------------------------------------------------------ report
med() { # workload target column
    if [[ -s $RES/$1.$2 ]]; then awk -v c="$3" '{ print $c }' "$RES/$1.$2" | median; else echo n/a; fi
}
ratio() { # a b
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b + 0 == 0) print "n/a"; else printf "%.2f\n", a / b }'
}
fmt() { # number decimals
    awk -v v="$1" -v d="$2" 'BEGIN { if (v == "n/a") print v; else printf "%.*f\n", d, v }'
}
cpu_us() { # workload target -> user+sys CPU microseconds per request (median of each)
    local u s
    u=$(med "$1" "$2" 6) s=$(med "$1" "$2" 7)
    awk -v u="$u" -v s="$s" 'BEGIN { if (u == "n/a" || s == "n/a") print "n/a"; else printf "%.1f", u + s }'
}
sum_errs() { if [[ -s $RES/$1.$2 ]]; then awk '{ n += $5 } END { print n + 0 }' "$RES/$1.$2"; else echo -; fi; }
REPORT_WLS=("${RUN_WLS[@]}")
[[ -n ${WL_ON[fixed]:-} ]] && ((FIXED_RPS > 0)) && REPORT_WLS+=(fixed)

echo
echo "Switchyard load benchmark: $ROUNDS interleaved rounds x ${DURATION}s per workload and target, median of rounds"
printf 'upstream: nginx, 1 worker; proxies: 1 worker/thread each; %s\n' "$PIN_NOTE"
echo "TLS: one ECDSA P-256 certificate for all three proxies, each proxy's default TLS settings"
printf 'nginx proxy: proxy_request_buffering %s, proxy_buffering %s\n' "$NGINX_REQUEST_BUFFERING" "$NGINX_PROXY_BUFFERING"
echo
echo "workloads:"
for wl in "${REPORT_WLS[@]}"; do
    if [[ $wl == fixed ]]; then
        printf '  %-11s %s (%s req/s total)\n' "$wl" "$(wl_desc "$wl")" "$FIXED_RPS"
    else
        printf '  %-11s %s\n' "$wl" "$(wl_desc "$wl")"
    fi
done
echo
echo "Ratios = Switchyard's req/s over the other's in this run (fixed: Switchyard's p99 over the other's, lower is"
echo "better). CPU = the proxy process's user+sys time per request, µs (/proc/PID/stat; nginx: its one worker)."
echo
printf '%-11s %11s %11s %11s %9s %10s %8s %8s %8s %12s\n' workload "switchyard" "nginx" "haproxy" "vs nginx" "vs haproxy" "sy CPU" "ng CPU" "ha CPU" "errors s/n/h"
printf '%s\n' "---------------------------------------------------------------------------------------------------------------"
for wl in "${REPORT_WLS[@]}"; do
    sy=$(med "$wl" switchyard 1) ng=$(med "$wl" nginx 1) ha=$(med "$wl" haproxy 1)
    if [[ $wl == fixed ]]; then
        rn=$(ratio "$(med fixed switchyard 3)" "$(med fixed nginx 3)")
        rh=$(ratio "$(med fixed switchyard 3)" "$(med fixed haproxy 3)")
    else
        rn=$(ratio "$sy" "$ng") rh=$(ratio "$sy" "$ha")
    fi
    printf '%-11s %11s %11s %11s %9s %10s %8s %8s %8s %12s\n' "$wl" "$(fmt "$sy" 0)" "$(fmt "$ng" 0)" "$(fmt "$ha" 0)" \
        "$rn" "$rh" "$(cpu_us "$wl" switchyard)" "$(cpu_us "$wl" nginx)" "$(cpu_us "$wl" haproxy)" \
        "$(sum_errs "$wl" switchyard)/$(sum_errs "$wl" nginx)/$(sum_errs "$wl" haproxy)"
done
echo
echo "Every target (direct = the upstream itself; l4relay = HAProxy mode tcp, the floor of any proxy's kernel cost):"
echo
printf '%-11s %-11s %11s %9s %9s %9s %10s %7s %11s %11s %11s\n' workload target "req/s" "p50 ms" "p99 ms" "vs nginx" "vs haproxy" errors "usr us/req" "sys us/req" "cpu s/100k"
printf '%s\n' "-----------------------------------------------------------------------------------------------------------------------------"
for wl in "${REPORT_WLS[@]}"; do
    for t in "${ALL_TARGETS[@]}"; do
        # rows that cannot exist (TLS on direct/l4relay, a target not runnable) are left out
        [[ -s $RES/$wl.$t ]] || continue
        rps=$(med "$wl" "$t" 1) p50=$(med "$wl" "$t" 2) p99=$(med "$wl" "$t" 3)
        if [[ $wl == fixed ]]; then
            rn=$(ratio "$p99" "$(med fixed nginx 3)") rh=$(ratio "$p99" "$(med fixed haproxy 3)")
        else
            rn=$(ratio "$rps" "$(med "$wl" nginx 1)") rh=$(ratio "$rps" "$(med "$wl" haproxy 1)")
        fi
        usr=- sys=- cpu=-
        if [[ $t != direct ]]; then
            usr=$(med "$wl" "$t" 6) sys=$(med "$wl" "$t" 7)
            cpu=$(awk -v u="$usr" -v s="$sys" 'BEGIN { if (u == "n/a" || s == "n/a") print "n/a"; else printf "%.3f", (u + s) / 10 }')
        fi
        printf '%-11s %-11s %11s %9s %9s %9s %10s %7s %11s %11s %11s\n' "$wl" "$t" "$(fmt "$rps" 0)" "$(fmt "$p50" 2)" \
            "$(fmt "$p99" 2)" "$rn" "$rh" "$(sum_errs "$wl" "$t")" "$usr" "$sys" "$cpu"
    done
done
for wl in "${REPORT_WLS[@]}"; do
    for t in "${PROXIES[@]}"; do
        [[ $t == switchyard ]] && [[ -z $SY_PID ]] && continue
        [[ -s $RES/$wl.$t ]] || echo "note: $wl on $t: n/a (smoke test failed or target not running; see the warnings above)"
    done
done
kb_mb() { awk -v v="$1" 'BEGIN { if (v == "n/a" || v == "") print "n/a"; else printf "%.1f MiB\n", v / 1024 }'; }
echo
if [[ -n $SY_PID ]]; then
    echo "switchyard peak RSS under load (VmHWM):          $(kb_mb "$SY_HWM")"
    echo "switchyard RSS at the end of the load (VmRSS):   $(kb_mb "$SY_RSS0")"
    if [[ -n ${WL_ON[idle]:-} ]]; then
        echo "switchyard RSS holding $SY_IDLE_OPEN idle keep-alive conns: $(kb_mb "$SY_IDLE_RSS") (VmHWM $(kb_mb "$SY_IDLE_HWM"), open fds $SY_IDLE_FDS, established client conns $SY_IDLE_EST)"
    fi
else
    echo "switchyard: not measured (SKIP_SWITCHYARD=1, no binary, failed build or failed start)"
fi
if [[ $NG_H2 == 0 ]]; then echo "nginx h2c: n/a (this nginx cannot serve h2c prior knowledge)"; fi
