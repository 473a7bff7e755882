#!/usr/bin/env python3
"""qtrace_report.py: the per-block timeline of the 4-bit decode products, from
the file that G3N_QTRACE=FILE makes g3n write at exit (src/backend/cuda/cuda.cu).

Each record is one block of k_qgemv_s: its product (O rows, K inputs), grid,
SM, and %globaltimer at its start, PDL release, activations staged, last item
consumed, and end. Records are grouped into launches in the order blocks
ended; a step starts after the LM head (the product with the most rows). For one step a quarter of
the way in, every launch is printed with quantiles (0, 10, 25, 50, 75, 90,
100%) of its blocks' start, release, activations staged, last item and end, relative to the end of the
launch before it. A launch is named by its first product's shape, so each line
also names the next launch's: a dense layer's gate/up is followed by its down
product, a sparse layer's gate by the next layer's q/k/v (its up and down rows
are k_mlp_sparse's, which this trace does not see). Usage:
  G3N_QTRACE=/tmp/qt.bin g3n bench -m DIR -p 0 -n 16 -r 1 --decode-path fused
  python3 tools/qtrace_report.py /tmp/qt.bin [STEP]
STEP: which step to print (default: one a quarter of the way in); the
launches per step are printed first, so that steps of other decode paths
(bench times every path) can be told apart."""
import array
import sys


def launches(path):
    a = array.array("Q")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    out, cur = [], None
    for i in range(min(a[0], (len(a) - 8) // 8)):
        r = a[8 + i * 8 : 16 + i * 8]
        sig = (r[0] >> 32, r[0] & 0xFFFFFFFF, r[1] >> 48, (r[1] >> 32) & 0xFFFF)  # O, K, slices, blocks
        blk = (r[3], r[4], r[5], r[6], r[7], r[2])  # start, release, staged, items, end, SM
        if cur and cur[0] == sig and len(cur[1]) < sig[2] * sig[3]:
            cur[1].append(blk)
        else:
            cur = (sig, [blk])
            out.append(cur)
    return out


def q(v):
    v = sorted(v)
    return " ".join("%6.2f" % v[int(f * (len(v) - 1))] for f in (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1))


def main():
    L = launches(sys.argv[1])
    top = max(sig[0] for sig, _ in L)  # the LM head ends every step that makes logits
    starts = [i + 1 for i, (sig, _) in enumerate(L) if sig[0] == top and i + 1 < len(L)] or [0]
    k = int(sys.argv[2]) if len(sys.argv) > 2 else len(starts) // 4  # which step
    print("launches per step:", [y - x for x, y in zip(starts, starts[1:])])
    a = starts[k]
    b = starts[k + 1] if k + 1 < len(starts) else len(L)
    print("%d launches, %d steps; step %d..%d (us from the previous launch's end)" % (len(L), len(starts), a, b))
    prev = None
    for i, (sig, blocks) in enumerate(L[a:b]):
        end = max(x[4] for x in blocks)
        if prev is None:
            prev = min(x[1] for x in blocks)
        sms = len(set(x[5] for x in blocks))
        # a launch is named by its first product: a sparse layer's gate and a
        # dense layer's gate/up look alike; the next launch tells them apart
        nxt = L[a + i + 1][0] if a + i + 1 < len(L) else None
        print("O%-6d K%-6d slices %d x %-4d blocks on %d SMs%s" % (sig[0], sig[1], sig[2], sig[3], sms,
              "  (next: O%d K%d)" % nxt[:2] if nxt else ""))
        for name, k in (("start", 0), ("release", 1), ("staged", 2), ("items", 3), ("end", 4)):
            print("   %-8s %s" % (name, q([(x[k] - prev) / 1e3 for x in blocks])))
        prev = end


if __name__ == "__main__":
    main()
