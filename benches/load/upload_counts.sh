#!/usr/bin/env bash
# Syscalls and userland instructions per proxied upload: repeatable figures for the request-body
# path, whatever else the machine is doing (wall-clock figures on a shared machine are not).
#
#   benches/load/upload_counts.sh                 # strace -c and callgrind, 64 KiB Content-Length
#   CHUNKED=1 SIZE=1048576 benches/load/upload_counts.sh
#
# Environment: N=2000 uploads over C=16 HTTP/1.1 keep-alive connections, SIZE=65536 bytes each,
# CHUNKED=1 for chunked framing (16 KiB chunks, as run.sh's chunked workloads), MODES
# ("strace callgrind"), BASE_PORT=29180 (3 ports), SWITCHYARD_BIN (default
# target/release/switchyard). The upstream is nginx reading the whole body before its 200 (the
# same location as run.sh's uploads); the client is a small Python script (one thread per
# connection). Needs strace, valgrind, nginx, python3. Installs nothing.
set -euo pipefail
N=${N:-2000}
C=${C:-16}
SIZE=${SIZE:-65536}
CHUNKED=${CHUNKED:-0}
MODES=${MODES:-strace callgrind}
BASE_PORT=${BASE_PORT:-29180}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SY_BIN=${SWITCHYARD_BIN:-$REPO_ROOT/target/release/switchyard}
[[ -x $SY_BIN ]] || {
    echo "no $SY_BIN: cargo build --release first" >&2
    exit 1
}
P_UP=$BASE_PORT P_SY=$((BASE_PORT + 1)) P_ADMIN=$((BASE_PORT + 2))
TMP=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-upload.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
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

cat >"$TMP/client.py" <<'PY'
import socket, sys, threading
port, n, c, size, chunked = (int(a) for a in sys.argv[1:6])
body = b"u" * size
if chunked:
    parts = [b"%x\r\n" % len(body[i:i + 16384]) + body[i:i + 16384] + b"\r\n"
             for i in range(0, size, 16384)]
    framing, payload = b"Transfer-Encoding: chunked", b"".join(parts) + b"0\r\n\r\n"
else:
    framing, payload = b"Content-Length: %d" % size, body
req = (b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
       + framing + b"\r\n\r\n" + payload)
ok = [0]
lock = threading.Lock()
def run(k):
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    for _ in range(k):
        s.sendall(req)
        status, cl = f.readline(), 0
        while True:
            line = f.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                cl = int(line.split(b":")[1])
        if b" 200 " in status and f.read(cl) == b"ok\n":
            with lock:
                ok[0] += 1
    s.close()
ts = [threading.Thread(target=run, args=(n // c,)) for _ in range(c)]
for t in ts:
    t.start()
for t in ts:
    t.join()
if ok[0] != (n // c) * c:
    sys.exit(f"only {ok[0]} of {(n // c) * c} uploads succeeded")
PY

mkdir -p "$TMP/up"
cat >"$TMP/up/nginx.conf" <<NGINX
worker_processes 1;
master_process off;
daemon off;
pid $TMP/up/nginx.pid;
error_log $TMP/up/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 100000000;
    client_max_body_size 0;
    client_body_buffer_size 2m;
    client_body_temp_path $TMP/up/b; proxy_temp_path $TMP/up/p; fastcgi_temp_path $TMP/up/f;
    uwsgi_temp_path $TMP/up/u; scgi_temp_path $TMP/up/s;
    server {
        listen 127.0.0.1:$P_UP;
        location = /upload {
            mirror /_drop;
            mirror_request_body on;
            empty_gif;
            error_page 405 =200 @ok;
        }
        location = /_drop { internal; return 204; }
        location @ok { default_type text/plain; return 200 "ok\n"; }
    }
}
NGINX
nginx -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
PIDS+=($!)
wait_port "$P_UP"

cat >"$TMP/sy.toml" <<TOML
[proxy]
listen = "127.0.0.1:$P_SY"
workers = 1
shutdown_grace = "1s"
[admin]
listen = "127.0.0.1:$P_ADMIN"
[state]
path = "$TMP/state.json"
[[services]]
name = "bench"
active = "blue"
blue  = { upstreams = ["127.0.0.1:$P_UP"] }
green = { upstreams = ["127.0.0.1:$P_UP"] }
TOML
load() { python3 "$TMP/client.py" "$P_SY" "$1" "$C" "$SIZE" "$CHUNKED"; }
framing=$([[ $CHUNKED == 1 ]] && echo chunked || echo Content-Length)
label="$SIZE-byte uploads ($framing), $N over $C connections"

for mode in $MODES; do
    case $mode in
    strace)
        SWITCHYARD_ADMIN_TOKEN=t RUST_LOG=warn "$SY_BIN" serve --config "$TMP/sy.toml" >"$TMP/sy.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_port "$P_SY"
        load 64 # warm: pools, buffers
        strace -c -f -o "$TMP/strace.txt" -p "$pid" 2>/dev/null &
        spid=$!
        sleep 1 # attached to every thread
        load "$N"
        kill -INT "$spid"
        wait "$spid" 2>/dev/null || true
        kill -TERM "$pid"
        wait "$pid" 2>/dev/null || true
        echo "strace -c -f, $label: calls per upload"
        awk -v n="$N" '$1 ~ /^[0-9.]+$/ && NF >= 5 { printf "  %-16s %8.2f\n", $NF, $4 / n }' \
            "$TMP/strace.txt"
        ;;
    callgrind)
        SWITCHYARD_ADMIN_TOKEN=t RUST_LOG=warn valgrind --tool=callgrind \
            --callgrind-out-file="$TMP/cg.out" "$SY_BIN" serve --config "$TMP/sy.toml" >"$TMP/cg.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_port "$P_SY"
        load 64
        callgrind_control -z "$pid" >/dev/null
        load "$N"
        callgrind_control -d "$pid" >/dev/null
        kill -TERM "$pid"
        wait "$pid" 2>/dev/null || true
        total=$(awk '/^summary:/ { s = $2 } END { print s + 0 }' "$TMP/cg.out.1")
        if [[ -n ${KEEP_CG:-} ]]; then cp "$TMP/cg.out.1" "$KEEP_CG"; fi
        printf 'callgrind, %s: %d instructions per upload\n' "$label" "$((total / N))"
        ;;
    *) echo "unknown mode $mode" >&2 ;;
    esac
done
