#!/usr/bin/env python3
"""trace_align.py: tools/ktrace.c's kernel trace and G3N_QTRACE's block trace of
the same run, matched launch by launch, so that the two tracers' times can be
read together (docs/SPEED.md, twenty-ninth session: they agree).

Run both in one command:
  G3N_QTRACE=/tmp/qt.bin G3N_KTRACE=/tmp/kt.txt CUDA_INJECTION64_PATH=libktrace.so \\
      g3n bench -m DIR -p 0 -n 48 -r 1 --decode-path fused --no-membw
  python3 tools/trace_align.py /tmp/kt.txt /tmp/qt.bin

The last k_qgemv_s launches of the ktrace are paired with the qtrace's complete
launches (in start order; their grids must agree). The clocks are aligned by
the median offset of the launches' starts. Printed per product shape (O x K,
blocks, and the next main-stream kernel, which tells a sparse layer's gate
from a dense layer's gate/up): CUPTI's duration against the blocks' span, and
the medians over launches of each block event (release, staged, last items,
end: p50 and p100 over the launch's blocks) and CUPTI's end, in us after the
previous main-stream kernel's CUPTI end. k_l2_prefetch (the side stream) is
left out of the main stream."""
import bisect
import statistics
import sys

import qtrace_report  # tools/, beside this script


def ktrace(path):
    kt, main = [], []
    for line in open(path):
        p = line.split()
        if len(p) < 8:
            continue
        s, e, name = int(p[0]), int(p[1]), p[7]
        if "l2_prefetch" not in name:
            main.append((e, s, name))
        if "qgemv_s" in name:
            kt.append((s, e, int(p[2]) * int(p[3]) * int(p[4])))
    kt.sort()
    main.sort()
    return kt, main


def qtrace(path):
    """qtrace_report's launches, complete ones only, in start order"""
    out = [l for l in qtrace_report.launches(path) if len(l[1]) == l[0][2] * l[0][3]]
    out.sort(key=lambda l: min(b[0] for b in l[1]))
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: trace_align.py KTRACE.txt QTRACE.bin")
    kt, main_k = ktrace(sys.argv[1])
    ql = qtrace(sys.argv[2])
    ends = [m[0] for m in main_k]
    m = min(len(ql), len(kt))
    if m == 0:
        sys.exit("trace_align.py: no k_qgemv_s launch in one of the traces")
    kt, ql = kt[-m:], ql[-m:]
    bad = sum(1 for k, l in zip(kt, ql) if k[2] != len(l[1]))
    offs = sorted(k[0] - min(b[0] for b in l[1]) for k, l in zip(kt, ql))
    off = statistics.median(offs)
    print("matched %d launches, %d grid mismatches; start offset spread (p10..p90) %.0f..%.0f ns"
          % (m, bad, offs[m // 10] - off, offs[m * 9 // 10] - off))
    agg = {}
    for k, l in zip(kt, ql):
        i = bisect.bisect_left(ends, k[1])
        prev = ends[i - 1] - off if i > 0 else k[0] - off
        nxt = main_k[i + 1][2][:24] if i + 1 < len(main_k) else "-"
        key = "%dx%d (%d) then %s" % (l[0][0], l[0][1], len(l[1]), nxt)
        ev = [sorted(b[j] for b in l[1]) for j in range(5)]
        n = len(l[1])
        row = [(k[1] - k[0]) / 1e3, (ev[4][-1] - ev[0][0]) / 1e3]
        for j in (1, 2, 3, 4):
            row += [(ev[j][n // 2] - prev) / 1e3, (ev[j][-1] - prev) / 1e3]
        row.append((k[1] - off - prev) / 1e3)
        agg.setdefault(key, []).append(row)
    heads = ("kt dur", "qt span", "rel50", "rel100", "stg50", "stg100", "itm50", "itm100", "end50", "end100", "kt end")
    print("%-44s %5s %s" % ("O x K (blocks) then", "n", " ".join("%7s" % h for h in heads)))
    for key, rows in agg.items():
        med = [statistics.median(r[j] for r in rows) for j in range(len(heads))]
        print("%-44s %5d %s" % (key[:44], len(rows), " ".join("%7.2f" % v for v in med)))


if __name__ == "__main__":
    main()
