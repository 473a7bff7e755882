#!/usr/bin/env python3
"""check_quant_torch.py: the quantized fixtures against torch arithmetic, one call.

    python3 tools/check_quant_torch.py            # needs torch and numpy (the GPU machine)

For tests/fixtures/tiny/mlx-q4, mlx-q8, mlx-q3 (made by tools/mlx_quantize.py
from tests/fixtures/tiny/mlx) and every quantized tensor in them:
  1. unpacks the U32 words with torch integer ops and dequantizes in float32
     (s * q, then + b) and requires bitwise equality with the numpy dequantization
     (tools/mlx_quantize.dequantize, which is what g3n computes);
  2. quantizes the source f16 weights again with mlx's formula written in torch
     (float32; round half away from zero) and requires the same packed words,
     scales and biases as the fixture.
Prints one line per fixture and exits 1 on any difference.
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlx_quantize as mq  # noqa: E402

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tiny")


def t_round(x):  # half away from zero (x - trunc(x) is exact)
    t = torch.trunc(x)
    return torch.where((x - t).abs() >= 0.5, t + torch.sign(x), t)


def t_unpack(packed, bits):
    rows, nw = packed.shape
    cols = nw * 32 // bits
    w = torch.cat([packed.to(torch.int64) & 0xFFFFFFFF, torch.zeros(rows, 1, dtype=torch.int64)], 1)
    pos = torch.arange(cols, dtype=torch.int64) * bits
    both = w[:, pos >> 5] | (w[:, (pos >> 5) + 1] << 32)
    return (both >> (pos & 31)) & ((1 << bits) - 1)


def t_quantize(w, bits, group):
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    n_bins = float((1 << bits) - 1)
    w_min = g.amin(2)
    w_max = torch.clamp(g.amax(2), min=0.0)
    scale = torch.clamp((w_max - w_min) / n_bins, min=1e-7)
    side = w_min.abs() > w_max.abs()
    scale = torch.where(side, scale, -scale)
    edge = torch.where(side, w_min, w_max)
    q0 = t_round(edge / scale)
    nz = q0 != 0
    scale = torch.where(nz, edge / torch.where(nz, q0, torch.ones_like(q0)), scale)
    bias = torch.where(nz, edge, torch.zeros_like(edge))
    q = torch.clamp(t_round((g - bias[..., None]) / scale[..., None]), 0, n_bins).to(torch.int64).reshape(rows, cols)
    pos = torch.arange(cols, dtype=torch.int64) * bits
    nw = cols * bits // 32
    packed = torch.zeros(rows, nw + 1, dtype=torch.int64)
    v = q << (pos & 31)
    for c in range(cols):
        packed[:, pos[c] >> 5] |= v[:, c] & 0xFFFFFFFF
        packed[:, (pos[c] >> 5) + 1] |= v[:, c] >> 32
    return packed[:, :nw], scale, bias


def main():
    src = mq.read_tensors(os.path.join(FIX, "mlx"))
    bad = 0
    for name in ("mlx-q4", "mlx-q8", "mlx-q3"):
        d = os.path.join(FIX, name)
        cfg = json.load(open(os.path.join(d, "config.json")))["quantization"]
        ts = mq.read_tensors(d)
        n = 0
        for tn, (dt, arr) in ts.items():
            if dt != "U32":
                continue
            mod = tn[:-len(".weight")]
            o = cfg.get(mod)
            bits, group = (o["bits"], o["group_size"]) if isinstance(o, dict) else (cfg["bits"], cfg["group_size"])
            s = ts[mod + ".scales"][1].astype(np.float32)
            b = ts[mod + ".biases"][1].astype(np.float32)
            q = t_unpack(torch.from_numpy(arr.astype(np.int64)), bits).to(torch.float32)
            deq_t = torch.from_numpy(np.repeat(s, group, 1)) * q + torch.from_numpy(np.repeat(b, group, 1))
            deq_n = mq.dequantize(arr, s, b, bits, group)
            if not np.array_equal(deq_t.numpy().view(np.uint32), deq_n.view(np.uint32)):
                print(f"  {name} {tn}: torch and numpy dequantization differ")
                bad += 1
            w = torch.from_numpy(src[tn][1].astype(np.float32))
            pk, sc, bi = t_quantize(w, bits, group)
            sdt = ts[mod + ".scales"][1].dtype
            if not (np.array_equal(pk.numpy().astype(np.uint32), arr) and
                    np.array_equal(sc.numpy().astype(sdt), ts[mod + ".scales"][1]) and
                    np.array_equal(bi.numpy().astype(sdt), ts[mod + ".biases"][1])):
                print(f"  {name} {tn}: torch quantization differs from the fixture")
                bad += 1
            n += 1
        print(f"{name}: {n} quantized tensors checked against torch")
    print("OK" if bad == 0 else f"{bad} differences")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
