#!/usr/bin/env python3
"""Summary of bench/heal.sh's rows: medians, paired ratios, targets.

usage: heal_summary.py RESULTS.tsv
"""
import csv
import statistics as st
import sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
g = defaultdict(dict)
for r in rows:
    g[(r["target"], r["metric"])][r["rep"]] = r


def cpo(r):
    return float(r["daemon_cpu_s"]) / max(1, float(r["ops"]))


def med(xs):
    xs = sorted(xs)
    return st.median(xs), xs[0], xs[-1]


label = {"seqwrite": "seq write 1 MiB QD4", "randwrite32": "4 KiB rand write QD32"}
write_targets = list(dict.fromkeys(r["target"] for r in rows if r["metric"] in label))
if write_targets:
    print(f"\n{'target':22} {'metric':22} {'n':>2} {'median':>9} {'min':>9} {'max':>9} unit   dCPU/op")
    for t in write_targets:
        for m in label:
            rs = g.get((t, m))
            if not rs:
                continue
            v = med(float(r["value"]) for r in rs.values())
            c = st.median(cpo(r) for r in rs.values())
            unit = next(iter(rs.values()))["unit"]
            cs = f"{c * 1e6:7.1f}us" if m.startswith("rand") else f"{c * 1e3:6.3f}ms"
            print(f"{t:22} {label[m]:22} {len(rs):2} {v[0]:9.0f} {v[1]:9.0f} {v[2]:9.0f} {unit:6} {cs}")

    pairs = [
        ("quorum-tracking", "quorum-no-tracking", {"seqwrite": 0.90, "randwrite32": 0.85}),
        ("quorum-tracking-disk", "quorum-no-tracking", {"seqwrite": 0.90, "randwrite32": 0.85}),
        ("quorum-tracking", "qemu-quorum-raw", {}),
        ("quorum-tracking-disk", "qemu-quorum-raw", {}),
        ("quorum-no-tracking", "qemu-quorum-raw", {}),
    ]
    print("\npaired ratios (same rep, adjacent runs): median [min..max]; thrpt >1 = faster, dCPU/op <1 = cheaper")
    for a, b, target in pairs:
        for m in label:
            x, y = g.get((a, m)), g.get((b, m))
            if not x or not y:
                continue
            reps = sorted(set(x) & set(y))
            tr = med(float(x[k]["value"]) / float(y[k]["value"]) for k in reps)
            cr = med(cpo(x[k]) / cpo(y[k]) for k in reps)
            verdict = ""
            if m in target:
                verdict = f"  target >= {target[m]:.2f}: {'met' if tr[0] >= target[m] else 'MISSED'}"
            print(f"{a + ' / ' + b:44} {label[m]:22} {tr[0]:5.2f} [{tr[1]:4.2f}..{tr[2]:4.2f}]"
                  f"  dCPU/op {cr[0]:5.2f} [{cr[1]:4.2f}..{cr[2]:4.2f}]{verdict}")

res = [t for t in dict.fromkeys(r["target"] for r in rows if r["metric"] == "resync")]
if res:
    print(f"\n{'resync':22} {'n':>2} {'MiB':>6} {'MiB/s median [min..max]':>26} {'seconds':>8} {'daemon CPU s':>12}")
    secs = {}
    for t in res:
        rs = g[(t, "resync")].values()
        mib = float(next(iter(rs))["ops"]) * 65536 / 1048576
        v = med(float(r["value"]) for r in rs)
        s = st.median(float(r["wall_s"]) for r in rs)
        c = st.median(float(r["daemon_cpu_s"]) for r in rs)
        secs[t] = (mib, s)
        print(f"{t:22} {len(rs):2} {mib:6.0f} {v[0]:9.0f} [{v[1]:6.0f}..{v[2]:6.0f}] {s:8.3f} {c:12.3f}")
    full = secs.get("quorum-resync-full")
    cp = secs.get("cp-full")
    for t, (mib, s) in secs.items():
        if t.startswith("quorum-resync-") and t != "quorum-resync-full":
            parts = [f"{t}: {s:.3f} s"]
            if full:
                parts.append(f"{s / full[1]:.3f}x the full rebuild ({mib / full[0]:.3f}x its bytes)")
            if cp:
                parts.append(f"{s / cp[1]:.3f}x a cp of the whole replica")
            rate = mib / s / 1024
            parts.append(f"{rate:.2f} GiB/s, target >= 1 GiB/s: {'met' if rate >= 1 else 'MISSED'}")
            print("; ".join(parts))
print(f"\nraw rows: {sys.argv[1]}")
