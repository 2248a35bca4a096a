#!/usr/bin/env python3
"""The code a request runs through, from a kept callgrind file: distinct 64-byte lines of code
executed, per object and per function, beside the simulated instruction-cache misses.

    VALGRIND_OPTS="--dump-instr=yes --compress-strings=no --compress-pos=no" KEEP_TMP=1 \\
        COUNTER=cachesim benches/load/instructions.sh
    benches/load/footprint.py /tmp/switchyard-instr.XXXX/switchyard.out.1 [N=20000] [TOP=25]

The lines of the functions with at least one I1 miss per request are the request path's code
footprint: past the L1i's size (32 KiB here) every one of them is fetched again per request.
Figures are per request where they say so; lines are counted over the whole dump.
"""
import collections
import sys

path = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
top = int(sys.argv[3]) if len(sys.argv) > 3 else 25

ob = fn = None
call_cost_next = False  # the cost line after `calls=` is the call's inclusive cost
lines = collections.defaultdict(set)  # (object, function) -> 64-byte lines executed
instrs = collections.defaultdict(set)  # (object, function) -> instructions executed
i1 = collections.Counter()
col = None
with open(path, errors="replace") as f:
    for line in f:
        if line.startswith("events:"):
            names = line.split()[1:]
            if "I1mr" not in names:
                sys.exit("no I1mr in this profile: record it with COUNTER=cachesim")
            col = names.index("I1mr")
        elif line.startswith("positions:") and "instr" not in line:
            sys.exit("no instruction positions: record with VALGRIND_OPTS=--dump-instr=yes")
        elif line.startswith("ob="):
            ob = line[3:].strip()
        elif line.startswith("fn="):
            fn = line[3:].strip()
        elif line.startswith("calls="):
            call_cost_next = True
        elif line.startswith("0x"):
            if call_cost_next:
                call_cost_next = False
                continue
            parts = line.split()
            costs = parts[2:]  # after the instruction and the source line
            if not costs or int(costs[0]) == 0:
                continue
            addr = int(parts[0], 16)
            key = (ob, fn)
            lines[key].add(addr >> 6)
            instrs[key].add(addr)
            i1[key] += int(costs[col]) if len(costs) > col else 0  # trailing zeros are left out

hot = [k for k in lines if i1[k] / n >= 1]
print(f"I1 misses per request: {sum(i1.values()) / n:.0f}")
print(f"code executed: {sum(len(v) for v in lines.values())} lines of 64 bytes")
hot_lines = sum(len(lines[k]) for k in hot)
print(f"request path (functions with >= 1 I1 miss per request): {len(hot)} functions, "
      f"{hot_lines} lines ({hot_lines * 64 / 1024:.0f} KiB)")
by_object = collections.Counter()
by_object_i1 = collections.Counter()
for k in hot:
    by_object[k[0]] += len(lines[k])
    by_object_i1[k[0]] += i1[k]
for o, c in by_object.most_common(6):
    print(f"  {c:6d} lines  {by_object_i1[o] / n:7.1f} I1 misses/request  {o}")
print("functions by lines: lines, instructions executed, I1 misses/request, instructions/line")
for k in sorted(hot, key=lambda k: -len(lines[k]))[:top]:
    v = lines[k]
    print(f"  {len(v):5d} {len(instrs[k]):6d} {i1[k] / n:7.1f} {len(instrs[k]) / len(v):5.2f}  {k[1][:110]}")
