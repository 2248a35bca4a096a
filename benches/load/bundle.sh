#!/usr/bin/env bash
# Carry the load tools to a machine that has none of them and cannot install any (a lent
# benchmark machine with no network): copies each program, every shared library it loads and
# this machine's dynamic loader into DIR, and writes DIR/bin/<name> wrappers that run the program
# through that loader, so they run there whatever its own libraries are. Put DIR/bin first in
# PATH there.
#
#   benches/load/bundle.sh DIR [program...]   # default: wrk nginx haproxy h2load taskset
#   SWITCHYARD_BIN=target/release/switchyard benches/load/bundle.sh DIR   # a stripped copy too
set -euo pipefail

DIR=${1:?usage: bundle.sh DIR [program...]}
shift
PROGRAMS=("$@")
((${#PROGRAMS[@]})) || PROGRAMS=(wrk nginx haproxy h2load taskset)

mkdir -p "$DIR/bin" "$DIR/real" "$DIR/lib"
LOADER=
add() { # name path
    local name=$1 path=$2 lib
    cp -L "$path" "$DIR/real/$name"
    while read -r lib; do
        case $lib in
        */ld-linux*) LOADER=$lib ;;
        /*) cp -L "$lib" "$DIR/lib/" ;;
        esac
    done < <(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
    [[ -n $LOADER ]] || {
        echo "bundle.sh: $path names no dynamic loader (static?): copied as is" >&2
        printf '#!/bin/sh\nd=$(cd "$(dirname "$0")/.." && pwd)\nexec "$d/real/%s" "$@"\n' "$name" >"$DIR/bin/$name"
        chmod +x "$DIR/bin/$name"
        return
    }
    cp -L "$LOADER" "$DIR/lib/ld-linux.so"
    # the loader runs the program: argv[0] stays the program's, /proc/self/exe is the loader
    printf '#!/bin/sh\nd=$(cd "$(dirname "$0")/.." && pwd)\nexec "$d/lib/ld-linux.so" --library-path "$d/lib" --argv0 %s "$d/real/%s" "$@"\n' \
        "$name" "$name" >"$DIR/bin/$name"
    chmod +x "$DIR/bin/$name"
}
for p in "${PROGRAMS[@]}"; do
    path=$(command -v "$p") || {
        echo "bundle.sh: $p is not installed here" >&2
        exit 1
    }
    add "$p" "$path"
done
if [[ -n ${SWITCHYARD_BIN:-} ]]; then
    strip -o "$DIR/switchyard.stripped" "$SWITCHYARD_BIN"
    add switchyard "$DIR/switchyard.stripped"
    rm "$DIR/switchyard.stripped"
fi
du -sh "$DIR" >&2
