#!/usr/bin/env python3
"""mlx_quantize.py: mlx affine quantization in numpy, for fixtures.

    /usr/bin/python3 tools/mlx_quantize.py --src tests/fixtures/tiny/mlx \
        --out tests/fixtures/tiny/mlx-q4 --bits 4 --group-size 32 \
        [--override MODULE=BITS/GROUP ...] [--skip MODULE ...]

Writes OUT/model.safetensors and OUT/config.json (SRC's config plus a
"quantization" block, and "quantization_config", as mlx-lm writes both).
Which tensors: those mlx.nn.quantize's default predicate picks, i.e. the
weights of Linear and Embedding modules (here: every 2-D "*.weight") whose last
dimension is a multiple of the group size; scales and biases take the weight's
dtype. --override gives one module its own bits/group (an entry
{"bits": B, "group_size": G} in the block); --skip keeps one unquantized (an
entry false), as mixed-precision mlx-lm conversions record them.

The arithmetic is mlx's GPU quantize kernel (the default device when
mlx-community converts), in float32, the same as src/core/quant.c, which
tests/test_load.c checks bytewise against these files:
    w_min = min(w), w_max = max(0, max(w))            (mlx starts the max at 0)
    scale = max((w_max - w_min) / (2^bits - 1), 1e-7), negated unless |w_min| > |w_max|
    edge = w_min or w_max (the larger magnitude),  q0 = round(edge / scale)
    q0 != 0: scale = edge / q0, bias = edge   else bias = 0
    q = min(round((w - bias) / scale), 2^bits - 1), then max(q, 0)
round is half away from zero (Metal's round); packing is one little-endian bit
stream per row (element c at bits [c*bits, (c+1)*bits)), in uint32 words.
Needs numpy only (Debian: apt-get install python3-numpy).
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

_ST_TO_NP = {"F32": np.float32, "F16": np.float16, "U32": np.uint32, "I64": np.int64,
             "F64": np.float64, "U8": np.uint8, "I32": np.int32}


def read_tensors(d):
    """{name: (dtype name, float32 or raw array)} from model.safetensors or its shards."""
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) \
        else ["model.safetensors"]
    out = {}
    for fn in files:
        path = os.path.join(d, fn)
        h, base = st_io.read_header(path)
        raw = open(path, "rb").read()
        for name, e in h.items():
            if name == "__metadata__":
                continue
            a, b = e["data_offsets"]
            buf = raw[base + a:base + b]
            if e["dtype"] == "BF16":
                arr = st_io.bf16_bits_to_f32(np.frombuffer(buf, np.uint16)).reshape(e["shape"])
            else:
                arr = np.frombuffer(buf, _ST_TO_NP[e["dtype"]]).reshape(e["shape"])
            out[name] = (e["dtype"], arr)
    return out


def mlx_round(x):
    """Round half away from zero, exactly (x - trunc(x) is exact in float32)."""
    t = np.trunc(x)
    f = x - t
    return (t + np.where(np.abs(f) >= np.float32(0.5), np.sign(x), 0)).astype(np.float32)


def quantize(w, bits, group):
    """w: float32 [rows, cols] -> (packed uint32 [rows, cols*bits/32], scales, biases float32)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group).astype(np.float32)
    n_bins = np.float32((1 << bits) - 1)
    w_min = g.min(axis=2)
    w_max = np.maximum(g.max(axis=2), np.float32(0))
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7)).astype(np.float32)
    side = np.abs(w_min) > np.abs(w_max)
    scale = np.where(side, scale, -scale).astype(np.float32)
    edge = np.where(side, w_min, w_max).astype(np.float32)
    q0 = mlx_round(edge / scale)
    nz = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(nz, edge / np.where(nz, q0, 1), scale).astype(np.float32)
    bias = np.where(nz, edge, np.float32(0)).astype(np.float32)
    q = mlx_round((g - bias[:, :, None]) / scale[:, :, None])
    q = np.maximum(np.minimum(q, n_bins), 0).astype(np.uint64).reshape(rows, cols)
    # pack: element c at stream bits [c*bits, (c+1)*bits)
    nwords = cols * bits // 32
    packed = np.zeros((rows, nwords + 1), np.uint64)
    pos = np.arange(cols, dtype=np.uint64) * np.uint64(bits)
    word, off = (pos >> np.uint64(5)).astype(np.int64), pos & np.uint64(31)
    v = q << off[None, :]
    for c in range(cols):  # small fixtures: clarity over speed
        packed[:, word[c]] |= v[:, c] & np.uint64(0xFFFFFFFF)
        packed[:, word[c] + 1] |= v[:, c] >> np.uint64(32)
    return packed[:, :nwords].astype(np.uint32), scale, bias


def dequantize(packed, scales, biases, bits, group):
    """float32 s * q + b, the product rounded before the sum (as g3n computes it)."""
    rows = packed.shape[0]
    cols = packed.shape[1] * 32 // bits
    words = packed.astype(np.uint64)
    words = np.concatenate([words, np.zeros((rows, 1), np.uint64)], axis=1)
    pos = np.arange(cols, dtype=np.uint64) * np.uint64(bits)
    word, off = (pos >> np.uint64(5)).astype(np.int64), pos & np.uint64(31)
    both = words[:, word] | (words[:, word + 1] << np.uint64(32))
    q = ((both >> off[None, :]) & np.uint64((1 << bits) - 1)).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), group, axis=1)
    b = np.repeat(biases.astype(np.float32), group, axis=1)
    return (s * q).astype(np.float32) + b


def as_dtype(x, dt):
    if dt == "BF16":
        return st_io.BF16(st_io.f32_to_bf16_bits(x))
    return np.ascontiguousarray(x, dtype=_ST_TO_NP[dt])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--override", action="append", default=[], help="MODULE=BITS/GROUP")
    ap.add_argument("--skip", action="append", default=[], help="MODULE kept unquantized")
    a = ap.parse_args()
    over = {}
    for o in a.override:
        mod, bg = o.split("=")
        b, g = bg.split("/")
        over[mod] = (int(b), int(g))
    tensors = read_tensors(a.src)
    out = {}
    block = {"group_size": a.group_size, "bits": a.bits}
    nq = 0
    for name, (dt, arr) in sorted(tensors.items()):
        mod = name[:-len(".weight")] if name.endswith(".weight") else None
        bits, group = over.get(mod, (a.bits, a.group_size))
        if mod and arr.ndim == 2 and dt in ("F32", "F16", "BF16") and mod not in a.skip \
                and arr.shape[1] % group == 0:
            packed, s, b = quantize(arr.astype(np.float32), bits, group)
            out[name] = packed
            out[mod + ".scales"] = as_dtype(s, dt)
            out[mod + ".biases"] = as_dtype(b, dt)
            if mod in over:
                block[mod] = {"group_size": group, "bits": bits}
            nq += 1
        else:
            if mod in a.skip:
                block[mod] = False
            out[name] = as_dtype(arr, dt) if dt in ("F32", "F16", "BF16") else arr
    os.makedirs(a.out, exist_ok=True)
    st_io.write(os.path.join(a.out, "model.safetensors"), out, {"format": "mlx"})
    cfg = json.load(open(os.path.join(a.src, "config.json")))
    cfg["quantization"] = block
    cfg["quantization_config"] = block
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(a.src, extra)):
            shutil.copy(os.path.join(a.src, extra), a.out)
    print(f"{a.out}: {nq} matrices quantized ({a.bits} bits, group {a.group_size}, "
          f"{len(over)} overrides, {len(a.skip)} kept)")


if __name__ == "__main__":
    main()
