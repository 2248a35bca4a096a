#!/usr/bin/env bash
# Does a flip add latency? Fixed-rate HTTP/1.1 load against a running Switchyard, interleaved:
# steady; with an admin call that changes nothing every 100 ms (`curl` and the admin listener
# cost the same CPU as a flip: the control); and flipping SERVICE between blue and green every
# 100 ms.
#
#   benches/load/flip_latency.sh http://127.0.0.1:8080/ http://127.0.0.1:9090 TOKEN SERVICE
#
# Needs h2load (nghttp2-client), curl and python3. ROUNDS (2), RPS per connection (300),
# CONNS (64), DURATION seconds (5).
set -euo pipefail
URL=${1:?proxy URL}; ADMIN=${2:?admin URL}; TOKEN=${3:?admin token}; SERVICE=${4:?service}
ROUNDS=${ROUNDS:-2}; RPS=${RPS:-300}; CONNS=${CONNS:-64}; DURATION=${DURATION:-5}
for t in h2load curl python3; do command -v $t >/dev/null || { echo "missing: $t" >&2; exit 1; }; done
LOG=$(mktemp); trap 'rm -f "$LOG"; kill $(jobs -p) 2>/dev/null || true' EXIT
pct() { python3 - "$LOG" <<'PY'
import sys
v = sorted(int(l.split()[2]) for l in open(sys.argv[1]) if l.strip())
n = len(v)
print("n=%d p50=%.3fms p99=%.3fms p99.9=%.3fms" % (n, v[n//2]/1e3, v[int(n*.99)]/1e3, v[int(n*.999)]/1e3))
PY
}
flip_loop() {
  local c=blue end=$((SECONDS + DURATION)) mode=$1
  while [ $SECONDS -lt $end ]; do
    if [ "$mode" = flipping ]; then c=$([ $c = blue ] && echo green || echo blue); fi
    curl -s -o /dev/null -X POST -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
      -d "{\"to\":\"$c\",\"force\":true}" "$ADMIN/api/services/$SERVICE/flip"
    sleep 0.1
  done
}
echo "fixed rate: $((RPS * CONNS)) req/s over $CONNS connections, ${DURATION}s per run"
for r in $(seq "$ROUNDS"); do
  for mode in steady control flipping; do
    FL=""
    if [ $mode != steady ]; then flip_loop $mode & FL=$!; fi
    rm -f "$LOG"
    h2load --h1 -c "$CONNS" --rps "$RPS" -D "$DURATION" --log-file="$LOG" "$URL" >/dev/null 2>&1
    if [ -n "$FL" ]; then wait "$FL"; fi
    echo "round $r $mode: $(pct)"
  done
done
