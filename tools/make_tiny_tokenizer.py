#!/usr/bin/env python3
"""make_tiny_tokenizer.py: a tokenizer.json in the Gemma 3 format for the tiny test model.

    python3 tools/make_tiny_tokenizer.py > tests/fixtures/tiny/conditional/tokenizer.json

Same normalizer, pre-tokenizer, decoder, byte fallback and special tokens as the
real file (tokens 0-6 are <pad> <eos> <bos> <unk> <mask> <start_of_turn>
<end_of_turn>; the real file has the turn markers at 105/106), but a vocabulary
of 384 entries so every id fits the tiny model's text vocabulary: the 256 byte
tokens, single characters and a few merges. For the command-line chat tests
only; tokenizer exactness is tested on the real file.
"""
import json
import sys

special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
vocab = {t: i for i, t in enumerate(special)}
for b in range(256):
    vocab[f"<0x{b:02X}>"] = len(vocab)
chars = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\n:-"
for ch in chars:
    vocab.setdefault(ch, len(vocab))
merges = []
for word in ["user", "model", "▁the", "▁is", "he", "lo", "ne", "in", "▁a", "el", "ll", "hello", "Hello", "▁there", "line", "▁one", "▁two"]:
    cur = word[0]
    for ch in word[1:]:
        new = cur + ch
        if new not in vocab:
            merges.append([cur, ch])
            vocab[new] = len(vocab)
        cur = new
assert len(vocab) <= 384, len(vocab)
added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": True} for i, t in enumerate(special)]
tok = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
    "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
    "post_processor": None,
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
    "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
              "vocab": vocab, "merges": merges},
}
json.dump(tok, sys.stdout, ensure_ascii=False, indent=1)
sys.stdout.write("\n")
