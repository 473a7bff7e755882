#!/usr/bin/env python3
"""hf_bench.py: g3n against transformers on the same full-size random weights, one call.

Run on the GPU machine from the repository root (g3n built with `make CUDA=1`):

    python3 tools/hf_bench.py --shape e4b --out $OUT      # or e2b; both: --shape e4b,e2b

For each shape it
  1. builds Gemma3nForCausalLM with the published E2B/E4B text config, random
     weights (transformers' initialisation; every tensor then scaled so norms
     and AltUp scales are not the trivial init), in bf16 on the GPU;
  2. writes it in the published layout (model.language_model.*, nested config,
     sharded safetensors with an index) with transformers' safetensors writer;
  3. times transformers' greedy `generate` (bf16, default attention, cache on)
     on that model: prompt 16 tokens, --tokens new ones, after a warm-up;
  4. frees it and runs `g3n bench -p 512 -n 128` on the written directory
     (both decode paths; the read-bandwidth probe runs in the same process).
Results go to OUT/hf-SHAPE.json and the console. Speed only: parity is tested
on tests/fixtures.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch


def text_config(shape):
    L, I, shared = (30, 8192, 10) if shape == "e2b" else (35, 16384, 15)
    return dict(
        vocab_size=262400, vocab_size_per_layer_input=262144, hidden_size=2048,
        hidden_size_per_layer_input=256, intermediate_size=[I] * L, num_hidden_layers=L,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, laurel_rank=64,
        altup_num_inputs=4, altup_active_idx=0, altup_coef_clip=120.0, altup_correct_scale=True,
        num_kv_shared_layers=shared, sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(L)],
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * (L - 10),
        final_logit_softcapping=30.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
        hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )


def build(shape):
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
    cfg = Gemma3nTextConfig(**text_config(shape))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma3nForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():  # non-trivial norms and scales; linear weights keep their init
        for n, p in model.named_parameters():
            if p.dim() == 1 or "coefs" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5)).add_(torch.empty_like(p).normal_(0, 0.05))
    return cfg, model


def save_published(model, cfg, out):
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    sd = {("model.language_model." + k[len("model."):]): v.contiguous()
          for k, v in model.state_dict().items() if k.startswith("model.")}
    names = list(sd)
    shards, cur, size = [], [], 0
    for k in names:
        nb = sd[k].numel() * sd[k].element_size()
        if cur and size + nb > 4e9:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    shards.append(cur)
    wmap, total = {}, 0
    for i, group in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k] for k in group}, os.path.join(out, fn), metadata={"format": "pt"})
        for k in group:
            wmap[k] = fn
            total += sd[k].numel() * sd[k].element_size()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f)
    tc = cfg.to_dict()
    tc["model_type"] = "gemma3n_text"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
                   "text_config": tc}, f, indent=1, default=str)
    return total


def hf_generate(model, n_new, reps=2):
    ids = torch.randint(3, 262144, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    best = 0
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.time()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
        dt = time.time() - t0
        best = max(best, (out.shape[1] - ids.shape[1]) / dt)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="e4b,e2b")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--dir", default="/tmp", help="where the checkpoints are written")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens for transformers generate")
    ap.add_argument("--g3n", default="./g3n")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}",
          flush=True)
    for shape in a.shape.split(","):
        res = {"shape": shape}
        ckpt = os.path.join(a.dir, f"hf-{shape}")
        t0 = time.time()
        cfg, model = build(shape)
        res["bytes_written"] = save_published(model, cfg, ckpt)
        print(f"{shape}: built and wrote {res['bytes_written'] / 1e9:.2f} GB in {time.time() - t0:.1f} s", flush=True)
        try:
            res["hf_tok_s"] = hf_generate(model, a.tokens)
            res["hf_attn"] = model.config._attn_implementation
            print(f"{shape}: transformers generate ({res['hf_attn']}) {res['hf_tok_s']:.2f} tok/s", flush=True)
        except Exception as e:  # keep going: g3n's numbers still count
            res["hf_error"] = repr(e)
            print(f"{shape}: transformers generate failed: {e!r}", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        cmd = [a.g3n, "bench", "-m", ckpt, "-p", "512", "-n", "128", "-r", "3", "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(p.stderr)
        print(p.stdout, flush=True)
        try:
            res["g3n"] = json.loads(p.stdout.strip().splitlines()[-1])
        except Exception:
            res["g3n_error"] = p.stdout[-2000:] + p.stderr[-2000:]
        peak = subprocess.run([a.g3n, "bench", "-m", ckpt, "-p", "0", "-n", "8", "-r", "1", "--no-membw"],
                              capture_output=True, text=True)
        res["g3n_stderr_tail"] = peak.stderr[-1500:]
        with open(os.path.join(a.out, f"hf-{shape}.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps({k: v for k, v in res.items() if k != "g3n_stderr_tail"}), flush=True)


if __name__ == "__main__":
    main()
