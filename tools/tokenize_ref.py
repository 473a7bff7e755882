#!/usr/bin/env python3
"""tokenize_ref.py: write Hugging Face `tokenizers` reference ids for the tokenizer
fixtures, and time `tokenizers` encoding single-threaded on the corpus. It does
not test g3n; tests/test_tokenizer.c reads the files it writes.

    python3 tools/tokenize_ref.py --tokenizer PATH/tokenizer.json --out tests/fixtures/tokenizer/

Reads (from --fixtures, default: --out): hard_strings.txt, corpus.txt,
decode_cases.txt. Writes to --out (each file starts with a line "#g3n-ids 1 ..." or "#g3n-decode 1
...": magic word, format version, source):
    hf_ids_hard.txt          one line of ids per hard string (add_special_tokens=False;
                             invalid UTF-8 is first decoded with errors="replace")
    hf_ids_corpus.txt        one line of ids per corpus line
    hf_ids_corpus_whole.txt  the ids of the whole corpus file as one text
    hf_decode.txt            per decode case: hex(decode(ids)) TAB
                             hex(decode(ids, skip_special_tokens=True))
    hf_timing.txt            the timings printed at the end
Needs only the `tokenizers` package (pure stdlib otherwise); no network.
Single-threaded: RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false are set
before `tokenizers` is imported.
"""
import argparse
import os
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["RAYON_RS_NUM_CPUS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def die(msg):
    sys.exit(f"tokenize_ref.py: {msg}")


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        die(f"cannot read {path}: {e}")


def tabbed(path):
    """(label, rest) for each line that is neither blank nor a '#' comment."""
    out = []
    for line in read_bytes(path).decode("ascii").split("\n"):
        if not line or line.startswith("#"):
            continue
        label, _, rest = line.partition("\t") if "\t" in line else ("", "", line)
        out.append((label, rest))
    return out


def corpus_lines(raw):
    # split on "\n" only: str.splitlines() would also split on \r, \x0b, \x1c, \u2028...
    lines = raw.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def write_ids(path, rows, who):
    # first line: magic word, format version (checked by tests/test_tokenizer.c), source
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write(f"#g3n-ids 1 {who}\n")
        for ids in rows:
            f.write(" ".join(map(str, ids)) + "\n")


def best_of(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="path to tokenizer.json")
    ap.add_argument("--out", default="tests/fixtures/tokenizer/", help="output directory")
    ap.add_argument("--fixtures", default=None, help="input directory (default: --out)")
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions (best is kept)")
    ap.add_argument("--no-timing", action="store_true", help="only write the ids")
    args = ap.parse_args()
    fix = args.fixtures or args.out
    if not os.path.isfile(args.tokenizer):
        die(f"no tokenizer.json at {args.tokenizer}")
    if not os.path.isdir(args.out):
        die(f"output directory {args.out} does not exist")
    try:
        import tokenizers
        from tokenizers import Tokenizer
    except ImportError:
        die("the `tokenizers` package is not installed")

    t0 = time.perf_counter()
    tok = Tokenizer.from_file(args.tokenizer)
    load_s = time.perf_counter() - t0

    def enc(s):
        return tok.encode(s, add_special_tokens=False).ids

    hard = [bytes.fromhex(h.strip()).decode("utf-8", "replace")
            for _, h in tabbed(os.path.join(fix, "hard_strings.txt"))]
    raw = read_bytes(os.path.join(fix, "corpus.txt"))
    whole = raw.decode("utf-8")
    lines = corpus_lines(raw)
    cases = tabbed(os.path.join(fix, "decode_cases.txt"))

    who = f"hf tokenizers {tokenizers.__version__}"
    write_ids(os.path.join(args.out, "hf_ids_hard.txt"), [enc(s) for s in hard], who)
    write_ids(os.path.join(args.out, "hf_ids_corpus.txt"), [enc(s) for s in lines], who)
    write_ids(os.path.join(args.out, "hf_ids_corpus_whole.txt"), [enc(whole)], who)
    with open(os.path.join(args.out, "hf_decode.txt"), "w", encoding="ascii", newline="\n") as f:
        f.write(f"#g3n-decode 1 {who}\n")
        for _, idtext in cases:
            ids = [int(x) for x in idtext.split()]
            a = tok.decode(ids, skip_special_tokens=False)
            b = tok.decode(ids, skip_special_tokens=True)
            f.write(a.encode("utf-8").hex() + "\t" + b.encode("utf-8").hex() + "\n")
    print(f"wrote hf_ids_hard.txt ({len(hard)}), hf_ids_corpus.txt ({len(lines)}), "
          f"hf_ids_corpus_whole.txt, hf_decode.txt ({len(cases)}) to {args.out}")

    # bos: add_special_tokens=True must be <bos> + the same ids (what g3n's add_bos does)
    bos = tok.token_to_id("<bos>")
    mism = sum(tok.encode(s, add_special_tokens=True).ids != [bos] + enc(s) for s in hard)
    if mism:
        print(f"WARNING: {mism} hard strings: add_special_tokens=True is not <bos> + ids")

    if args.no_timing:
        return
    nbytes = len(raw)
    t_whole = best_of(lambda: tok.encode(whole, add_special_tokens=False), args.reps)
    t_lines = best_of(lambda: [tok.encode(s, add_special_tokens=False) for s in lines], args.reps)
    t_batch = best_of(lambda: tok.encode_batch(lines, add_special_tokens=False), args.reps)
    ids = enc(whole)
    t_dec = best_of(lambda: tok.decode(ids), args.reps)
    report = [
        f"tokenizers {tokenizers.__version__}, single-threaded (RAYON_NUM_THREADS=1), "
        f"best of {args.reps}",
        f"load tokenizer.json: {load_s:.3f} s",
        f"corpus: {nbytes} bytes, {len(lines)} lines, {len(ids)} ids",
        f"encode whole text:      {t_whole:.4f} s  {nbytes / t_whole / 1e6:.2f} MB/s",
        f"encode line by line:    {t_lines:.4f} s  {nbytes / t_lines / 1e6:.2f} MB/s",
        f"encode_batch of lines:  {t_batch:.4f} s  {nbytes / t_batch / 1e6:.2f} MB/s",
        f"decode:                 {t_dec:.4f} s  {nbytes / t_dec / 1e6:.2f} MB/s",
    ]
    print("\n".join(report))
    with open(os.path.join(args.out, "hf_timing.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
