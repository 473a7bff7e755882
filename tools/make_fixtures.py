#!/usr/bin/env python3
"""make_fixtures.py: tiny random Gemma 3n checkpoints + transformers reference logits.

Run where torch and transformers 5.x are installed (the GPU machine; it runs on
the CPU there, in float32, eager attention, cache on):

    python3 tools/make_fixtures.py --out tests/fixtures/tiny

It writes one tiny model (every parameter random with an O(1) effect: norm
weights, AltUp scales, router and coefficients included) in three layouts:

  conditional/  model.language_model.* names, nested config (transformers-5
                rope_parameters, per-layer intermediate_size), bf16, two shards
                with an index, stand-in vision/audio tensors, and the unused
                k_proj/v_proj/k_norm of the KV-shared layers as Google's files have
  causal/       written by transformers' own save_pretrained (Gemma3nForCausalLM):
                model.* names, flat config, float32, no k/v for shared layers
  mlx/          language_model.model.* names (mlx-vlm), nested config with legacy
                rope_theta / rope_local_base_freq keys, float16

All three hold the same values (weights are rounded to bf16 and values below
2^-14 zeroed, so bf16, f16 and f32 are all exact). reference.bin holds, per
prompt, transformers' float32 logits at every prompt position, its greedy
continuation, the logits of each incremental (cached) decode step and the
top-1/top-2 margins. Format (little-endian), checked by tests/test_model.c:

  "G3NREF01"  u32 version (1)  u32 n_vocab  u32 n_prompts
  per prompt: u32 n_prompt  u32 n_gen
              i32 prompt[n_prompt]  f32 logits[n_prompt][n_vocab]
              i32 gen[n_gen]        f32 margin[n_gen]
              f32 dec_logits[n_gen - 1][n_vocab]  (row i: after feeding gen[i])

Without torch (--no-reference) it writes the checkpoints only, with this
script's own writer for causal/ too: for development, never for committing.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

# The tiny model. Chosen to exercise everything: per-layer intermediate sizes
# (not multiples of 16), three sparsity values, both layer types among the KV
# producers and the consumers, a window shorter than the prompts, non-default
# rope bases, q width != hidden size, a vocab larger than the PLE table.
TEXT = dict(
    vocab_size=400,
    vocab_size_per_layer_input=384,
    hidden_size=64,
    hidden_size_per_layer_input=16,
    intermediate_size=[392, 520, 456, 120, 128, 72, 64, 160],
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    laurel_rank=8,
    altup_num_inputs=4,
    altup_active_idx=0,
    altup_coef_clip=120.0,
    altup_correct_scale=True,
    num_kv_shared_layers=3,
    sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                 "sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    activation_sparsity_pattern=[0.95, 0.8, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0],
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    hidden_activation="gelu_pytorch_tanh",
    bos_token_id=2, eos_token_id=1, pad_token_id=0,
)
ROPE_FULL, ROPE_SLIDING = 200000.0, 5000.0
PROMPTS = [  # (length, seed): one longer than the window several times, one short
    (37, 11), (5, 12),
]
N_GEN = 12


def expected_names(c):
    """The parameter names of Gemma3nForCausalLM (model.* layout) for config c."""
    n = ["model.embed_tokens.weight", "model.embed_tokens_per_layer.weight",
         "model.per_layer_model_projection.weight", "model.per_layer_projection_norm.weight",
         "model.norm.weight"]
    for k in range(c["altup_num_inputs"] - 1):
        n += [f"model.altup_projections.{k}.weight", f"model.altup_unembed_projections.{k}.weight"]
    first_shared = c["num_hidden_layers"] - c["num_kv_shared_layers"]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        n += [p + s for s in [
            "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.o_proj.weight",
            "self_attn.q_norm.weight", "post_attention_layernorm.weight",
            "pre_feedforward_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight", "post_feedforward_layernorm.weight",
            "altup.correct_output_scale", "altup.correction_coefs.weight",
            "altup.prediction_coefs.weight", "altup.modality_router.weight",
            "altup.router_norm.weight", "laurel.linear_left.weight", "laurel.linear_right.weight",
            "laurel.post_laurel_norm.weight", "per_layer_input_gate.weight",
            "per_layer_projection.weight", "post_per_layer_input_norm.weight"]]
        if l < first_shared:
            n += [p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight",
                  p + "self_attn.k_norm.weight"]
    return n


def shapes(c):
    D, L, P = c["hidden_size"], c["num_hidden_layers"], c["hidden_size_per_layer_input"]
    A, R = c["altup_num_inputs"], c["laurel_rank"]
    qd, kvd = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    s = {"model.embed_tokens.weight": (c["vocab_size"], D),
         "model.embed_tokens_per_layer.weight": (c["vocab_size_per_layer_input"], L * P),
         "model.per_layer_model_projection.weight": (L * P, D),
         "model.per_layer_projection_norm.weight": (P,), "model.norm.weight": (D,)}
    for k in range(A - 1):
        s[f"model.altup_projections.{k}.weight"] = (D, D)
        s[f"model.altup_unembed_projections.{k}.weight"] = (D, D)
    for l in range(L):
        I = c["intermediate_size"][l]
        p = f"model.layers.{l}."
        s.update({p + "input_layernorm.weight": (D,), p + "self_attn.q_proj.weight": (qd, D),
                  p + "self_attn.k_proj.weight": (kvd, D), p + "self_attn.v_proj.weight": (kvd, D),
                  p + "self_attn.o_proj.weight": (D, qd), p + "self_attn.q_norm.weight": (c["head_dim"],),
                  p + "self_attn.k_norm.weight": (c["head_dim"],),
                  p + "post_attention_layernorm.weight": (D,), p + "pre_feedforward_layernorm.weight": (D,),
                  p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                  p + "mlp.down_proj.weight": (D, I), p + "post_feedforward_layernorm.weight": (D,),
                  p + "altup.correct_output_scale": (D,), p + "altup.correction_coefs.weight": (A, A),
                  p + "altup.prediction_coefs.weight": (A * A, A),
                  p + "altup.modality_router.weight": (A, D), p + "altup.router_norm.weight": (D,),
                  p + "laurel.linear_left.weight": (R, D), p + "laurel.linear_right.weight": (D, R),
                  p + "laurel.post_laurel_norm.weight": (D,), p + "per_layer_input_gate.weight": (P, D),
                  p + "per_layer_projection.weight": (D, P), p + "post_per_layer_input_norm.weight": (D,)})
    return s


def random_value(name, shape, c, rng):
    """A random tensor for parameter `name`, scaled so it matters (O(1) effect)."""
    D, P = c["hidden_size"], c["hidden_size_per_layer_input"]
    if name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
        # attention has scale 1: keep scores O(several), as large scores make the
        # softmax amplify float32 rounding (and the test would measure noise)
        v = rng.uniform(0.25, 0.75, shape)
    elif name.endswith("norm.weight") or name.endswith("correct_output_scale"):
        v = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("prediction_coefs.weight") or name.endswith("correction_coefs.weight"):
        v = rng.normal(0, 0.2, shape)
    elif name.endswith("modality_router.weight"):
        v = rng.normal(0, np.sqrt(D), shape)  # its input is rmsnorm(x) / D
    elif name.endswith("embed_tokens.weight"):
        v = rng.normal(0, 1 / np.sqrt(D), shape)
        v[c["vocab_size_per_layer_input"]:] *= 0.1  # non-text ids: rarely the argmax
    elif name.endswith("embed_tokens_per_layer.weight"):
        v = rng.normal(0, 1 / np.sqrt(P), shape)
    else:
        assert len(shape) == 2, name
        v = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
    v = st_io.round_bf16(v.astype(np.float32))
    v[np.abs(v) < 2.0 ** -14] = 0  # exact in f16 as well
    return v


def make_weights(c, seed):
    rng = np.random.default_rng(seed)
    sh = shapes(c)
    return {n: random_value(n, sh[n], c, rng) for n in expected_names(c)}


def text_config(legacy_rope):
    t = dict(TEXT, model_type="gemma3n_text")
    if legacy_rope:
        t["rope_theta"], t["rope_local_base_freq"] = ROPE_FULL, ROPE_SLIDING
    else:
        t["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": ROPE_FULL},
                                "sliding_attention": {"rope_type": "default", "rope_theta": ROPE_SLIDING}}
    return t


def nested_config(legacy_rope):
    return {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
            "text_config": text_config(legacy_rope),
            "vision_config": {"model_type": "gemma3n_vision", "hidden_size": 32},
            "audio_config": {"model_type": "gemma3n_audio", "hidden_size": 24},
            "torch_dtype": "bfloat16"}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_conditional(out, w, rng):
    os.makedirs(out, exist_ok=True)
    t = {}
    for n, v in w.items():
        t["model.language_model." + n[len("model."):]] = st_io.BF16(st_io.f32_to_bf16_bits(v))
    first_shared = TEXT["num_hidden_layers"] - TEXT["num_kv_shared_layers"]
    kvd, D = TEXT["num_key_value_heads"] * TEXT["head_dim"], TEXT["hidden_size"]
    for l in range(first_shared, TEXT["num_hidden_layers"]):  # present in Google's files, unused
        p = f"model.language_model.layers.{l}.self_attn."
        for s, shp in [("k_proj.weight", (kvd, D)), ("v_proj.weight", (kvd, D)), ("k_norm.weight", (TEXT["head_dim"],))]:
            t[p + s] = st_io.BF16(st_io.f32_to_bf16_bits(rng.normal(0, 1, shp).astype(np.float32)))
    # stand-ins for the towers a text engine must skip (one in a dtype it cannot use)
    t["model.vision_tower.timm_model.conv_stem.conv.weight"] = st_io.BF16(
        st_io.f32_to_bf16_bits(rng.normal(0, 1, (8, 3, 3, 3)).astype(np.float32)))
    t["model.vision_tower.timm_model.blocks.0.0.bn1.num_batches_tracked"] = np.array([7], np.int64)
    t["model.audio_tower.subsample_conv_projection.conv_0.conv.weight"] = st_io.BF16(
        st_io.f32_to_bf16_bits(rng.normal(0, 1, (16, 1, 3, 3)).astype(np.float32)))
    t["model.embed_vision.embedding.weight"] = st_io.BF16(
        st_io.f32_to_bf16_bits(rng.normal(0, 1, (128, 32)).astype(np.float32)))
    t["model.embed_audio.embedding_projection.weight"] = st_io.BF16(
        st_io.f32_to_bf16_bits(rng.normal(0, 1, (D, 24)).astype(np.float32)))
    names = sorted(t)
    half = len(names) // 2
    shards = [("model-00001-of-00002.safetensors", names[:half]),
              ("model-00002-of-00002.safetensors", names[half:])]
    wmap, total = {}, 0
    for fname, ns in shards:
        st_io.write(os.path.join(out, fname), {n: t[n] for n in ns}, {"format": "pt"})
        for n in ns:
            wmap[n] = fname
            total += 2 * int(np.prod(t[n].shape)) if isinstance(t[n], st_io.BF16) else t[n].nbytes
    write_json(os.path.join(out, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))})
    write_json(os.path.join(out, "config.json"), nested_config(legacy_rope=False))


def write_mlx(out, w):
    os.makedirs(out, exist_ok=True)
    t = {"language_model.model." + n[len("model."):]: v.astype(np.float16) for n, v in w.items()}
    for n, v in t.items():
        assert np.array_equal(v.astype(np.float32), w["model." + n[len("language_model.model."):]]), n
    st_io.write(os.path.join(out, "model.safetensors"), t, {"format": "mlx"})
    write_json(os.path.join(out, "config.json"), nested_config(legacy_rope=True))


def write_causal_numpy(out, w):
    os.makedirs(out, exist_ok=True)
    st_io.write(os.path.join(out, "model.safetensors"), w, {"format": "pt"})
    write_json(os.path.join(out, "config.json"), text_config(legacy_rope=False))


def torch_reference(w, out_causal):
    """Build Gemma3nForCausalLM with weights w, save it (causal layout), and return
    the reference records. Runs on the CPU in float32 with eager attention."""
    import torch
    import transformers
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    kw = {k: v for k, v in TEXT.items()}
    kw["rope_parameters"] = text_config(False)["rope_parameters"]
    cfg = Gemma3nTextConfig(**kw)
    cfg._attn_implementation = "eager"
    model = Gemma3nForCausalLM(cfg).to(torch.float32).eval()
    try:
        model.set_attn_implementation("eager")
    except Exception as e:  # older API
        print("set_attn_implementation:", e)
    params = dict(model.named_parameters())
    want = set(w)
    have = set(params)
    if want != have:
        print("parameter names differ from this script's list:")
        print("  only in transformers:", sorted(have - want)[:20])
        print("  only in script:", sorted(want - have)[:20])
        raise SystemExit(1)
    with torch.no_grad():
        for n, p in params.items():
            assert tuple(p.shape) == w[n].shape, (n, p.shape, w[n].shape)
            p.copy_(torch.from_numpy(w[n]))
    print("layer types:", cfg.layer_types)
    print("kv sharing:", getattr(cfg, "kv_sharing_roles", "n/a"))
    model.save_pretrained(out_causal, safe_serialization=True)
    # the saved file must reload to the same model
    re = Gemma3nForCausalLM.from_pretrained(out_causal, dtype=torch.float32, attn_implementation="eager").eval()

    def run(m, ids):
        with torch.no_grad():
            return m(input_ids=torch.tensor([ids]), use_cache=True)

    records = []
    for n_prompt, seed in PROMPTS:
        rng = np.random.default_rng(seed)
        ids = [TEXT["bos_token_id"]] + [int(x) for x in rng.integers(3, TEXT["vocab_size_per_layer_input"], n_prompt - 1)]
        out = run(model, ids)
        logits = out.logits[0].float().numpy()
        assert np.array_equal(logits, run(re, ids).logits[0].float().numpy()), "reload differs"
        # float64 run: how far float32 itself is from exact
        try:
            m64 = Gemma3nForCausalLM.from_pretrained(out_causal, dtype=torch.float64, attn_implementation="eager").eval()
            l64 = run(m64, ids).logits[0].double().numpy()
            rel = np.linalg.norm(logits - l64, axis=1) / np.linalg.norm(l64, axis=1)
            print(f"prompt {n_prompt}: float32 vs float64 rel L2 max {rel.max():.3g}")
        except Exception as e:
            print("float64 check skipped:", e)
        # greedy continuation with the cache, one token at a time
        cache = out.past_key_values
        gen, margins, dec = [], [], []
        last = out.logits[0, -1].float().numpy()
        for i in range(N_GEN):
            order = np.argsort(-last, kind="stable")
            tok = int(order[0])
            gen.append(tok)
            margins.append(float(last[order[0]] - last[order[1]]))
            if i == N_GEN - 1:
                break
            if tok >= TEXT["vocab_size_per_layer_input"]:
                print(f"prompt {n_prompt}: greedy reached non-text id {tok}; stopping there")
                break
            with torch.no_grad():
                o = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            last = o.logits[0, -1].float().numpy()
            dec.append(last.copy())
        # decode logits must agree with a full prefill of prompt + generated
        full = run(model, ids + gen[:-1]).logits[0].float().numpy()
        if dec:
            d = np.abs(full[len(ids):] - np.stack(dec)).max()
            print(f"prompt {n_prompt}: cached decode vs full prefill max |d| {d:.3g}")
        print(f"prompt {n_prompt}: greedy {gen}, min margin {min(margins):.4g}")
        records.append((ids, logits, gen, margins, dec))
    return records


def write_reference(path, records, n_vocab):
    with open(path, "wb") as f:
        f.write(b"G3NREF01")
        f.write(struct.pack("<III", 1, n_vocab, len(records)))
        for ids, logits, gen, margins, dec in records:
            f.write(struct.pack("<II", len(ids), len(gen)))
            f.write(np.asarray(ids, np.int32).tobytes())
            f.write(np.asarray(logits, np.float32).tobytes())
            f.write(np.asarray(gen, np.int32).tobytes())
            f.write(np.asarray(margins, np.float32).tobytes())
            assert len(dec) == len(gen) - 1
            for row in dec:
                f.write(np.asarray(row, np.float32).tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/tiny")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-reference", action="store_true", help="checkpoints only (no torch)")
    a = ap.parse_args()
    w = make_weights(TEXT, a.seed)
    rng = np.random.default_rng(a.seed + 1)
    write_conditional(os.path.join(a.out, "conditional"), w, rng)
    write_mlx(os.path.join(a.out, "mlx"), w)
    if a.no_reference:
        write_causal_numpy(os.path.join(a.out, "causal"), w)
        print("wrote checkpoints without a reference (development only)")
        return
    records = torch_reference(w, os.path.join(a.out, "causal"))
    for f in os.listdir(os.path.join(a.out, "causal")):  # keep only what the engine reads
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(a.out, "causal", f))
    write_reference(os.path.join(a.out, "reference.bin"), records, TEXT["vocab_size"])
    print("wrote", a.out)


if __name__ == "__main__":
    main()
