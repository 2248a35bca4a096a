#!/usr/bin/env python3
"""Where the instructions per request go: self cost per function, and who calls memcpy.

    VALGRIND_OPTS="--compress-strings=no --compress-pos=no" KEEP_TMP=1 \
        TARGETS=switchyard benches/load/instructions.sh
    benches/load/profile.py /tmp/switchyard-instr.XXXX/switchyard.out.1 [N=20000] [TOP=40]

`instructions.sh` zeroes the counters after its warm-up and dumps them after the measured
requests, so the `.out.1` part holds exactly the N measured requests. (callgrind_annotate cannot
read that part on its own: it credits everything to `__libc_start_main`.) Figures are printed per
request.

EVENT=I1mr (or Dw, D1mr...) ranks by another event when callgrind recorded it, e.g. the
simulated instruction-cache misses of `VALGRIND_OPTS="--cache-sim=yes ..."`.
"""
import collections
import os
import sys

path = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
top = int(sys.argv[3]) if len(sys.argv) > 3 else 40

self_cost = collections.Counter()
memcpy_by_caller = collections.Counter()
memcpy_calls = collections.Counter()
# memcpy by call site: (caller, source file of the inlined code, line)
memcpy_sites = collections.Counter()
memcpy_site_calls = collections.Counter()
fn = cfn = None
fl = fi = None
pending_call = 0  # the next cost line is a call's inclusive cost, not self cost
event = os.environ.get("EVENT", "Ir")
column = 1  # the cost line's column of `event`: after the position
with open(path, errors="replace") as f:
    for line in f:
        if line.startswith("events:"):
            names = line.split()[1:]
            if event not in names:
                sys.exit(f"no {event} in this profile's events: {' '.join(names)}")
            column = 1 + names.index(event)
        elif line.startswith("fn="):
            fn = line[3:].strip()
            fi = None
        elif line.startswith("fl="):
            fl = line[3:].strip()
            fi = None
        elif line.startswith(("fi=", "fe=")):
            fi = line[3:].strip()
        elif line.startswith("cfn="):
            cfn = line[4:].strip()
        elif line.startswith("calls="):
            pending_call = int(line[6:].split()[0]) or 1
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) < 2 or fn is None:
                continue
            # A trailing zero cost may be left out.
            cost = int(parts[column]) if len(parts) > column else 0
            if pending_call:
                if cfn and "memcpy" in cfn:
                    memcpy_by_caller[fn] += cost
                    memcpy_calls[fn] += pending_call
                    where = "/".join((fi or fl or "?").split("/")[-2:])
                    site = (fn, f"{where}:{parts[0]}")
                    memcpy_sites[site] += cost
                    memcpy_site_calls[site] += pending_call
                pending_call = 0
            else:
                self_cost[fn] += cost

total = sum(self_cost.values())
print(f"{total / n:,.0f} {event} per request ({n} requests)\n")
print("self cost per request:")
for name, c in self_cost.most_common(top):
    print(f"{c / n:8,.0f} {100 * c / total:5.1f}%  {name[:140]}")
print("\nmemcpy, by caller (instructions and calls per request):")
for name, c in memcpy_by_caller.most_common(12):
    print(f"{c / n:8,.0f} {memcpy_calls[name] / n:5.1f}  {name[:140]}")
print("\nmemcpy, by call site (source line, after inlining; instructions and calls per request):")
for (name, where), c in memcpy_sites.most_common(top):
    calls = memcpy_site_calls[(name, where)]
    print(f"{c / n:8,.0f} {calls / n:5.1f}  {where:32} {name[:100]}")
