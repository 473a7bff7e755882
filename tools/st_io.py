"""st_io.py: a small safetensors writer/reader for numpy arrays (numpy only).

Used by the fixture and random-checkpoint tools so they also run where torch is
absent. bf16 arrays are carried as uint16 bit patterns with dtype name "BF16".
Not a general library: no streaming, no metadata beyond strings.
"""
import json
import struct

import numpy as np

_NP_TO_ST = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("uint32"): "U32",
             np.dtype("int64"): "I64", np.dtype("float64"): "F64", np.dtype("uint8"): "U8",
             np.dtype("int32"): "I32"}


class BF16:
    """Wraps a uint16 array holding bf16 bit patterns, so the writer labels it BF16."""

    def __init__(self, bits):
        self.bits = np.ascontiguousarray(bits, dtype=np.uint16)
        self.shape = self.bits.shape


def f32_to_bf16_bits(x):
    """Round float32 -> bf16 (round to nearest even), as uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def bf16_bits_to_f32(b):
    return (np.asarray(b, dtype=np.uint32) << 16).view(np.float32)


def round_bf16(x):
    """float32 values rounded to the nearest bf16 value (still float32)."""
    return bf16_bits_to_f32(f32_to_bf16_bits(x))


def write(path, tensors, metadata=None):
    """Write {name: np.ndarray | BF16} to path in safetensors format (sorted names,
    8-byte aligned header, tightly packed data)."""
    header = {}
    blobs = []
    off = 0
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, BF16):
            raw, dt, shape = t.bits.tobytes(), "BF16", list(t.shape)
        else:
            a = np.ascontiguousarray(t)
            raw, dt, shape = a.tobytes(), _NP_TO_ST[a.dtype], list(a.shape)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n
