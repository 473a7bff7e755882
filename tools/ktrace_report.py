#!/usr/bin/env python3
"""ktrace_report.py: where a decode step's time goes, from tools/ktrace.c's trace.

Splits the trace into steps at each k_qembed / k_embed launch that starts one,
keeps the steps of the most common shape (the fused decode steps), drops the
first and last few, and prints for each kernel, summed over its launches in a
step and averaged over the steps:
  inc  the time it adds to the step: its end minus the latest end before it
  dur  its own start-to-end (with PDL it starts before the previous one ends)
Kernels on the L2-prefetch side stream (k_l2_prefetch) are left out of the
steps and summarized on their own.
With --head N / --tail N: one middle step's first N kernels (after the previous
step's last three) / last N kernels and the side-stream kernels that ran during
it, with start and end in us from the step's start. Always: when the step's
second kernel starts after its first (a recorded step's start).
Usage: python3 tools/ktrace_report.py trace.txt [--demangle] [--layer [--at L]] [--head N] [--tail N]"""
import signal
import subprocess
import sys
from collections import OrderedDict, defaultdict


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) < 8:
                continue
            rows.append((int(p[0]), int(p[1]), (int(p[2]), int(p[3])), int(p[6]), p[7]))
    rows.sort()
    return rows


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
        return {n: o.split("(")[0].replace("void ", "") for n, o in zip(names, out)}
    except OSError:
        return {n: n for n in names}


def main():
    rows = load(sys.argv[1])
    names = demangle(sorted({r[4] for r in rows}))
    side = [r for r in rows if names[r[4]].startswith("k_l2_prefetch")]
    rows = [r for r in rows if not names[r[4]].startswith("k_l2_prefetch")]
    if side:
        d = sorted((r[1] - r[0]) / 1e3 for r in side)
        print(f"side stream: {len(side)} k_l2_prefetch, us each: median {d[len(d) // 2]:.2f}, "
              f"p90 {d[len(d) * 9 // 10]:.2f}, max {d[-1]:.2f}")
    steps, cur = [], []
    for r in rows:
        n = names[r[4]]
        if n in ("k_qembed", "k_embed") and cur and names[cur[-1][4]] not in ("k_qembed", "k_embed"):
            steps.append(cur)
            cur = []
        cur.append(r)
    steps.append(cur)
    shapes = defaultdict(list)
    for s in steps:
        shapes[tuple(names[r[4]] for r in s)].append(s)
    shape, sel = max(shapes.items(), key=lambda kv: len(kv[1]))
    sel = sel[3:-3] if len(sel) > 10 else sel
    n = len(sel)
    tot = sum(s[-1][1] - s[0][0] for s in sel) / n
    print(f"{n} steps of {len(shape)} kernels; step {tot / 1e3:.1f} us ({1e9 / tot:.1f} tok/s under tracing)")
    if len(shape) > 1:  # ~3 us without the L2 prefetch's side branch, ~12 with it (docs/SPEED.md, 22nd session)
        second = sorted(s[1][0] - s[0][0] for s in sel)[n // 2]
        print(f"the step's second kernel starts {second / 1e3:.2f} us after its first (median)")
    inc = OrderedDict()
    dur = defaultdict(float)
    cnt = defaultdict(int)
    per_pos = [0.0] * len(shape)
    for s in sel:
        last = s[0][0]
        for i, r in enumerate(s):
            key = (names[r[4]], r[2])
            d = max(0, r[1] - last)
            inc[key] = inc.get(key, 0) + d
            per_pos[i] += d
            dur[key] += r[1] - r[0]
            cnt[key] += 1
            last = max(last, r[1])
    print(f"{'kernel':40s} {'grid':>10s} {'per step':>8s} {'inc us':>9s} {'inc/launch':>10s} {'dur/launch':>10s}")
    for key, v in sorted(inc.items(), key=lambda kv: -kv[1]):
        c = cnt[key] / n
        print(f"{key[0][:40]:40s} {str(key[1][0])+'x'+str(key[1][1]):>10s} {c:8.0f} {v / n / 1e3:9.1f} "
              f"{v / n / c / 1e3:10.2f} {dur[key] / n / c / 1e3:10.2f}")
    if "--layer" in sys.argv:  # one middle layer, kernel by kernel
        idx = [i for i, nm in enumerate(shape) if nm.startswith("k_predict")]
        k = len(idx) // 2
        if "--at" in sys.argv:  # --at L: layer L instead (its predict launch is the L-th)
            k = min(int(sys.argv[sys.argv.index("--at") + 1]), len(idx) - 2)
        a, b = idx[k], idx[k + 1]
        print("\none layer (positions %d..%d), averaged over steps:" % (a, b - 1))
        for i in range(a, b):
            ds = sum(s[i][1] - s[i][0] for s in sel) / n / 1e3
            gap = sum(s[i][0] - s[i - 1][1] for s in sel) / n / 1e3
            print(f"  {shape[i][:40]:40s} {str(sel[0][i][2]):>12s} inc {per_pos[i] / n / 1e3:6.2f}  dur {ds:6.2f}  start-prev_end {gap:6.2f}")
    for opt in ("--head", "--tail"):  # the start or end of one middle step, with the side stream beside it
        if opt not in sys.argv:
            continue
        m = int(sys.argv[sys.argv.index(opt) + 1])
        s = sel[n // 2]
        t0, t1 = s[0][0], s[-1][1]
        which = "first" if opt == "--head" else "last"
        print(f"\nthe {which} {m} kernels of one step (us from its start; the step ends at {(t1 - t0) / 1e3:.1f}):")
        rows_ = s[:m] if opt == "--head" else s[-m:]
        if opt == "--head":  # the previous step's end, for the gap between steps
            i = next((j for j, st in enumerate(steps) if st is s), 0)
            rows_ = (steps[i - 1][-3:] if i > 0 else []) + rows_
        for r in rows_:
            print(f"  {names[r[4]][:40]:40s} {str(r[2]):>12s} start {(r[0] - t0) / 1e3:8.2f} end {(r[1] - t0) / 1e3:8.2f}")
        for r in side if opt == "--tail" else []:
            if r[1] > t0 and r[0] < t1:
                print(f"  side: {names[r[4]][:34]:34s} {str(r[2]):>12s} start {(r[0] - t0) / 1e3:8.2f} end {(r[1] - t0) / 1e3:8.2f}")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # piped into head: stop quietly
    main()
