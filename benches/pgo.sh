#!/usr/bin/env bash
# A profile-guided (PGO) release build of Switchyard: an instrumented build, trained with the load
# benchmark's own workloads, then a build that LLVM lays out and inlines by that profile. The
# request path runs in less code, packed together: on h1 keep-alive 20% fewer instructions and a
# fifth of the instruction-cache misses per request (BENCHMARKS.md, "Profile-guided build").
#
#   benches/pgo.sh                    # prints the path of the optimized binary at its end
#   TRAIN_WORKLOADS="h1 h2c" benches/pgo.sh
#
# Environment:
#   TRAIN_WORKLOADS   the load benchmark's workloads run against the instrumented build
#                     (default: the HTTP/1.1, h2, TLS, many-connection and body workloads)
#   TRAIN_DURATION=3  seconds per workload (one round)
#   PGO_DIR           where the builds and profiles go (default: target/pgo)
#   BASE_PORT=28080   first of the load benchmark's 12 loopback ports
#
# Needs what benches/load/run.sh needs (wrk nginx haproxy nghttp2-client openssl), and the
# toolchain's llvm-profdata (`rustup component add llvm-tools`, which this script runs when it is
# missing): llvm-profdata must be the LLVM of the rustc that builds, so a distribution's own
# llvm-profdata will not do. The default `cargo build --release` stays as it is: a profile is tied
# to the code it was taken from, and a build from the registries alone cannot train one.
set -euo pipefail

log() { printf '[pgo] %s\n' "$*" >&2; }
die() { printf '[pgo] ERROR: %s\n' "$*" >&2; exit 1; }

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGO_DIR=${PGO_DIR:-$REPO_ROOT/target/pgo}
TRAIN_WORKLOADS=${TRAIN_WORKLOADS:-h1 h2c close tls tlsclose h2tls c1000 down1m upload64k chunked64k}
TRAIN_DURATION=${TRAIN_DURATION:-3}

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
    log "installing the toolchain's llvm-tools (for llvm-profdata)"
    rustup component add llvm-tools >&2 || die "rustup component add llvm-tools failed"
    [[ -x $PROFDATA ]] || die "no llvm-profdata at $PROFDATA after installing llvm-tools"
fi

raw=$PGO_DIR/profraw
rm -rf "$raw" "$PGO_DIR/merged.profdata"
mkdir -p "$raw"

log "1/4 instrumented build ($PGO_DIR/gen)"
(cd "$REPO_ROOT" && RUSTFLAGS="-Cprofile-generate=$raw" CARGO_TARGET_DIR=$PGO_DIR/gen \
    cargo build --release --locked --bin switchyard) >&2
# Build scripts and proc macros ran instrumented too: only the proxy's own runs are the profile.
find "$raw" -name '*.profraw' -delete

log "2/4 training: $TRAIN_WORKLOADS, ${TRAIN_DURATION}s each"
SWITCHYARD_BIN=$PGO_DIR/gen/release/switchyard WORKLOADS=$TRAIN_WORKLOADS ROUNDS=1 \
    DURATION=$TRAIN_DURATION "$REPO_ROOT/benches/load/run.sh" >"$PGO_DIR/training.txt"
compgen -G "$raw/*.profraw" >/dev/null || die "the training wrote no profile (see $PGO_DIR/training.txt)"

log "3/4 merging the profiles"
"$PROFDATA" merge -o "$PGO_DIR/merged.profdata" "$raw"

log "4/4 optimized build ($PGO_DIR/use)"
(cd "$REPO_ROOT" && RUSTFLAGS="-Cprofile-use=$PGO_DIR/merged.profdata" \
    CARGO_TARGET_DIR=$PGO_DIR/use cargo build --release --locked --bin switchyard) >&2

echo "$PGO_DIR/use/release/switchyard"
