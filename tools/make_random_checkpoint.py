#!/usr/bin/env python3
"""make_random_checkpoint.py: a full-size random Gemma 3n text checkpoint (numpy only).

    python3 tools/make_random_checkpoint.py --shape e2b --out /tmp/e2b
    python3 tools/make_random_checkpoint.py --shape e4b --out /tmp/e4b

Writes the published layout (google/gemma-3n-E*B-it): config.json nested under
text_config with the published keys, model.language_model.* tensors in bf16,
sharded at about 4 GB with model.safetensors.index.json, the unused k/v weights
of the KV-shared layers included as in Google's files. No vision or audio
tensors. Values are random with the scales of the tiny fixtures (norm weights
near 1, linear weights ~ 1/sqrt(fan_in)), so timings run on realistic data, not
zeros. For speed measurements only: parity is tested on tests/fixtures.
Tensors are streamed to disk a block at a time (memory stays small).
"""
import argparse
import json
import os
import struct

import numpy as np

SHAPES = {
    "e2b": dict(num_hidden_layers=30, intermediate_size=8192, num_kv_shared_layers=10),
    "e4b": dict(num_hidden_layers=35, intermediate_size=16384, num_kv_shared_layers=15),
}


def text_config(shape):
    s = SHAPES[shape]
    L = s["num_hidden_layers"]
    return {
        "model_type": "gemma3n_text", "vocab_size": 262400, "vocab_size_per_layer_input": 262144,
        "hidden_size": 2048, "hidden_size_per_layer_input": 256,
        "intermediate_size": [s["intermediate_size"]] * L, "num_hidden_layers": L,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "laurel_rank": 64,
        "altup_num_inputs": 4, "altup_active_idx": 0, "altup_coef_clip": 120.0,
        "altup_correct_scale": True, "altup_lr_multiplier": 1.0,
        "num_kv_shared_layers": s["num_kv_shared_layers"], "sliding_window": 512,
        "layer_types": ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(L)],
        "activation_sparsity_pattern": [0.95] * 10 + [0.0] * (L - 10),
        "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attention_dropout": 0.0,
        "query_pre_attn_scalar": 256, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "initializer_range": 0.02, "torch_dtype": "bfloat16", "use_cache": True,
    }


def tensors(c):
    """(name, shape, kind) for every text tensor, in the published names."""
    D, L, P = c["hidden_size"], c["num_hidden_layers"], c["hidden_size_per_layer_input"]
    qd, kvd, hd, R = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"], c["head_dim"], c["laurel_rank"]
    T = "model.language_model."
    out = [(T + "embed_tokens.weight", (c["vocab_size"], D), "embed"),
           (T + "embed_tokens_per_layer.weight", (c["vocab_size_per_layer_input"], L * P), "ple"),
           (T + "per_layer_model_projection.weight", (L * P, D), "lin"),
           (T + "per_layer_projection_norm.weight", (P,), "norm"), (T + "norm.weight", (D,), "norm")]
    for k in range(3):
        out += [(T + f"altup_projections.{k}.weight", (D, D), "lin"),
                (T + f"altup_unembed_projections.{k}.weight", (D, D), "lin")]
    for l in range(L):
        I, p = c["intermediate_size"][l], T + f"layers.{l}."
        out += [(p + "input_layernorm.weight", (D,), "norm"), (p + "self_attn.q_proj.weight", (qd, D), "lin"),
                (p + "self_attn.k_proj.weight", (kvd, D), "lin"), (p + "self_attn.v_proj.weight", (kvd, D), "lin"),
                (p + "self_attn.o_proj.weight", (D, qd), "lin"), (p + "self_attn.q_norm.weight", (hd,), "qknorm"),
                (p + "self_attn.k_norm.weight", (hd,), "qknorm"), (p + "post_attention_layernorm.weight", (D,), "norm"),
                (p + "pre_feedforward_layernorm.weight", (D,), "norm"), (p + "mlp.gate_proj.weight", (I, D), "lin"),
                (p + "mlp.up_proj.weight", (I, D), "lin"), (p + "mlp.down_proj.weight", (D, I), "lin"),
                (p + "post_feedforward_layernorm.weight", (D,), "norm"), (p + "altup.correct_output_scale", (D,), "norm"),
                (p + "altup.correction_coefs.weight", (4, 4), "coef"), (p + "altup.prediction_coefs.weight", (16, 4), "coef"),
                (p + "altup.modality_router.weight", (4, D), "router"), (p + "altup.router_norm.weight", (D,), "norm"),
                (p + "laurel.linear_left.weight", (R, D), "lin"), (p + "laurel.linear_right.weight", (D, R), "lin"),
                (p + "laurel.post_laurel_norm.weight", (D,), "norm"), (p + "per_layer_input_gate.weight", (P, D), "lin"),
                (p + "per_layer_projection.weight", (D, P), "lin"), (p + "post_per_layer_input_norm.weight", (D,), "norm")]
    return out


def bf16_bits(x):
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


_POOLS = {}


def pooled(kind, fan_in, n, rng, D):
    """n bf16 values cut at a random offset from a 2^24-value pool drawn once per
    (kind, fan_in): statistically the same as fresh draws for timing, and fast."""
    key = (kind, fan_in)
    if key not in _POOLS:
        _POOLS[key] = bf16_bits(np.asarray(draw(kind, fan_in, (1 << 24) + (1 << 20), rng, D), np.float32))
    pool = _POOLS[key]
    total = int(np.prod(n))
    out = np.empty(total, np.uint16)
    k = 0
    while k < total:
        off = int(rng.integers(0, 1 << 20))
        m = min(total - k, (1 << 24))
        out[k:k + m] = pool[off:off + m]
        k += m
    return out


def draw(kind, fan_in, n, rng, D):
    if kind == "norm":
        return rng.uniform(0.5, 1.5, n)
    if kind == "qknorm":
        return rng.uniform(0.25, 0.75, n)
    if kind == "coef":
        return rng.normal(0, 0.2, n)
    if kind == "router":
        return rng.normal(0, np.sqrt(D), n)
    return rng.standard_normal(n, dtype=np.float32) * np.float32(1 / np.sqrt(fan_in))


def blocks(shape, kind, rng, D, fast=False):
    """Yield the tensor's bf16 bytes in row blocks of about 16M values."""
    rows = shape[0]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    step = max(1, (1 << 24) // cols)
    fan_in = cols if kind == "lin" else D if kind == "embed" else 256
    for r0 in range(0, rows, step):
        n = (min(rows, r0 + step) - r0, cols) if len(shape) > 1 else (rows,)
        if fast and kind in ("lin", "embed", "ple"):
            yield pooled(kind, fan_in, n, rng, D).tobytes()
            continue
        if kind == "norm":
            v = rng.uniform(0.5, 1.5, n)
        elif kind == "qknorm":
            v = rng.uniform(0.25, 0.75, n)
        elif kind == "coef":
            v = rng.normal(0, 0.2, n)
        elif kind == "router":
            v = rng.normal(0, np.sqrt(D), n)
        else:
            fan_in = cols if kind in ("lin",) else D if kind == "embed" else 256
            v = rng.standard_normal(n, dtype=np.float32) * np.float32(1 / np.sqrt(fan_in))
        yield bf16_bits(np.asarray(v, np.float32)).tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--fast", action="store_true",
                    help="cut large tensors from a pool of random values (quick; for timing only)")
    a = ap.parse_args()
    c = text_config(a.shape)
    os.makedirs(a.out, exist_ok=True)
    ts = tensors(c)
    # group into shards by size, keeping order
    shards, cur, size = [], [], 0
    for t in ts:
        nb = 2 * int(np.prod(t[1]))
        if cur and size + nb > a.shard_gb * 1e9:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nb
    shards.append(cur)
    rng = np.random.default_rng(a.seed)
    wmap, total = {}, 0
    for si, group in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape, _ in group:
            nb = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            wmap[name] = fname
        header["__metadata__"] = {"format": "pt"}
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * ((8 - len(h) % 8) % 8)
        with open(os.path.join(a.out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(h)))
            f.write(h)
            for name, shape, kind in group:
                for b in blocks(shape, kind, rng, c["hidden_size"], a.fast):
                    f.write(b)
        total += off
        print(f"wrote {fname}: {len(group)} tensors, {off / 1e9:.2f} GB", flush=True)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=2)
    cfg = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
           "text_config": c, "torch_dtype": "bfloat16",
           "vision_config": {"model_type": "gemma3n_vision"}, "audio_config": {"model_type": "gemma3n_audio"}}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"{a.shape}: {total / 1e9:.2f} GB of bf16 text weights in {a.out}")


if __name__ == "__main__":
    main()
