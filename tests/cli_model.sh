#!/bin/sh
# cli_model.sh: the g3n command line on the tiny fixtures: `logits` writes what
# transformers computed, `generate --temp 0 --print-ids` reproduces its greedy
# continuation, `bench` runs, and every error is one line on stderr with exit 1.
# Run by tests/run.sh with G3N_BIN set; prints "N passed, N failed".
set -u
FIX=tests/fixtures/tiny
. tests/lib_cli.sh

# reference.bin: "G3NREF01" u32 ver u32 V u32 n | u32 n_prompt u32 n_gen | i32 prompt[n_prompt] ...
i32s() { od -An -v -t d4 -j "$2" -N $((4 * $3)) "$1" | tr -s ' \n' ' ' | sed 's/^ //; s/ $//'; }
V=$(i32s $FIX/reference.bin 12 1)
NP=$(i32s $FIX/reference.bin 20 1)
NG=$(i32s $FIX/reference.bin 24 1)
PROMPT=$(i32s $FIX/reference.bin 28 "$NP" | tr ' ' ',')
LOFF=$((28 + 4 * NP))
GOFF=$((LOFF + 4 * NP * V))
GEN=$(i32s $FIX/reference.bin $GOFF "$NG" | tr ' ' ',')

# 1. logits of every position, against transformers (relative L2 per row <= 1e-4)
if "$BIN" logits -q -m $FIX/causal --ids "$PROMPT" --out "$T/l.bin" 2>"$T/err"; then
    size=$(wc -c <"$T/l.bin")
    if [ "$size" -ne $((4 * NP * V)) ]; then
        bad logits_size "got $size bytes, want $((4 * NP * V))"
    else
        od -An -v -t f4 -w4 "$T/l.bin" | tr -d ' ' >"$T/got"
        od -An -v -t f4 -w4 -j $LOFF -N $((4 * NP * V)) $FIX/reference.bin | tr -d ' ' >"$T/want"
        worst=$(paste "$T/got" "$T/want" | awk -v V="$V" '
            { d = $1 - $2; num += d * d; den += $2 * $2 }
            NR % V == 0 { r = sqrt(num / den); if (r > w) w = r; num = 0; den = 0 }
            END { printf "%.3g", w }')
        if awk -v w="$worst" 'BEGIN { exit !(w <= 1e-4) }'; then ok "logits (worst row rel L2 $worst)"
        else bad logits "worst row rel L2 $worst"; fi
    fi
else
    bad logits "$(cat "$T/err")"
fi

# 2. greedy generation reproduces transformers' continuation
out=$("$BIN" generate -q -m $FIX/conditional --ids "$PROMPT" -n "$NG" --temp 0 --print-ids 2>"$T/err")
last=$(printf '%s\n' "$out" | tail -n 1)
if [ "$last" = "$GEN" ]; then ok "generate greedy ($NG tokens)"
else bad generate_greedy "got [$last] want [$GEN] $(cat "$T/err")"; fi

# an f16 K/V cache: the same greedy continuation on the fixture (its margins
# are far above f16's rounding), and bench reports the halved K/V bytes
out16=$("$BIN" generate -q -m $FIX/conditional --ids "$PROMPT" -n "$NG" --temp 0 --print-ids --kv-type f16 2>"$T/err")
if [ "$(printf '%s\n' "$out16" | tail -n 1)" = "$GEN" ]; then ok "generate greedy, --kv-type f16"
else bad generate_greedy_f16 "got [$(printf '%s\n' "$out16" | tail -n 1)] want [$GEN] $(cat "$T/err")"; fi
if "$BIN" bench -q -m $FIX/causal -p 0 -n 4 -r 1 -d 40 --json --no-membw --kv-type f16 >"$T/b16" 2>"$T/err" &&
    "$BIN" bench -q -m $FIX/causal -p 0 -n 4 -r 1 -d 40 --json --no-membw >"$T/b32" 2>>"$T/err" &&
    grep -q '"kv_type": "f16"' "$T/b16" && grep -q '"kv_type": "f32"' "$T/b32" &&
    k16=$(grep -o '"kv_bytes_per_token": [0-9]*' "$T/b16" | grep -o '[0-9]*$') &&
    k32=$(grep -o '"kv_bytes_per_token": [0-9]*' "$T/b32" | grep -o '[0-9]*$') &&
    [ "$k16" -gt 0 ] && [ $((2 * k16)) -eq "$k32" ]; then ok "bench --kv-type f16 (K/V bytes halved)"
else bad "bench --kv-type f16" "$(cat "$T/b16" "$T/b32" "$T/err")"; fi

# same seed, same sampled output; -n respected
a=$("$BIN" generate -q -m $FIX/mlx --ids 2,5,9 -n 6 --temp 1.0 --seed 42 --print-ids 2>/dev/null | tail -n 1)
b=$("$BIN" generate -q -m $FIX/mlx --ids 2,5,9 -n 6 --temp 1.0 --seed 42 --print-ids 2>/dev/null | tail -n 1)
n=$(printf '%s' "$a" | tr ',' '\n' | grep -c .)
if [ -n "$a" ] && [ "$a" = "$b" ] && [ "$n" -le 6 ]; then ok "generate seeded"; else bad generate_seeded "[$a] vs [$b]"; fi

# 3. bench runs and reports
if "$BIN" bench -q -m $FIX/causal -p 16 -n 4 -r 2 --json --no-membw >"$T/bench" 2>"$T/err" &&
    grep -q '"tg_tok_s"' "$T/bench" && grep -q '"pp_tok_s"' "$T/bench"; then ok bench
else bad bench "$(cat "$T/bench" "$T/err")"; fi
# after a context (-d): the same tokens with or without a pp prompt timed after
# the context (the session is cut back to it), and the K/V bytes counted
if "$BIN" bench -q -m $FIX/causal -p 0 -n 4 -r 2 -d 40 --json --no-membw >"$T/bd0" 2>"$T/err" &&
    "$BIN" bench -q -m $FIX/causal -p 16 -n 4 -r 1 -d 40 --json --no-membw >"$T/bd1" 2>>"$T/err" &&
    grep -q '"n_depth": 40' "$T/bd0" && ! grep -q '"kv_bytes_per_token": 0,' "$T/bd0" &&
    [ "$(grep -o '"checksum.*' "$T/bd0")" = "$(grep -o '"checksum.*' "$T/bd1")" ]; then ok "bench -d"
else bad "bench -d" "$(cat "$T/bd0" "$T/bd1" "$T/err")"; fi
# batched decode: one row per stream count, the same tokens for stream 1 as plain bench's argmax
if "$BIN" bench -q -m $FIX/causal -p 8 -n 4 -r 1 --parallel 1,3 --json >"$T/bp" 2>"$T/err" &&
    [ "$(grep -c '"tg_aggregate_tok_s"' "$T/bp")" -eq 2 ] && grep -q '"streams": 3' "$T/bp"; then ok "bench --parallel"
else bad "bench --parallel" "$(cat "$T/bp" "$T/err")"; fi
expect_error bench-parallel-list "--parallel" "$BIN" bench -q -m $FIX/causal --parallel 1,x

# 4. errors: one line on stderr, exit status 1, never a crash
expect_error decode-path-hints 'decode path "split-nol2"' "$BIN" logits -m $FIX/causal --decode-path split-nol2 --ids 1 --out "$T/x"
expect_error no-model-dir "no such model directory" "$BIN" logits -m "$T/nope" --ids 1 --out "$T/x"
expect_error no-model-flag "no model" "$BIN" logits --ids 1 --out "$T/x"
expect_error bad-ids "not a comma-separated list" "$BIN" logits -m $FIX/causal --ids 1,x,3 --out "$T/x"
expect_error trailing-comma "trailing comma" "$BIN" logits -m $FIX/causal --ids 1,2, --out "$T/x"
expect_error no-out "out FILE" "$BIN" logits -m $FIX/causal --ids 1
expect_error non-text-id "outside the text vocabulary" "$BIN" logits -q -m $FIX/causal --ids 2,390 --out "$T/x"
expect_error context "do not fit" "$BIN" logits -q -m $FIX/causal -c 4 --ids 2,3,4,5,6 --out "$T/x"
expect_error unwritable-out "$T/no/dir/x" "$BIN" logits -q -m $FIX/causal --ids 2 --out "$T/no/dir/x"
expect_error unknown-option "unknown or incomplete option" "$BIN" generate -m $FIX/causal --ids 2 --bogus
expect_error bad-number "not a number" "$BIN" generate -m $FIX/causal --ids 2 --temp hot
expect_error unknown-command "unknown command" "$BIN" frobnicate
expect_error bad-kv-type "K/V cache type \"bf16\"" "$BIN" logits -m $FIX/causal --kv-type bf16 --ids 2 --out "$T/x"
expect_error bad-device "unknown device" "$BIN" logits -m $FIX/causal --device tpu --ids 2 --out "$T/x"
mkdir -p "$T/m"; cp $FIX/causal/model.safetensors "$T/m/"
expect_error missing-config "config.json" "$BIN" logits -m "$T/m" --ids 2 --out "$T/x"
printf '{"model_type": "gemma3n_text", "hidden_size": 6' >"$T/m/config.json"
expect_error truncated-config "not valid JSON" "$BIN" logits -m "$T/m" --ids 2 --out "$T/x"
head -c 100000 $FIX/causal/model.safetensors >"$T/m/model.safetensors"
cp $FIX/causal/config.json "$T/m/"
expect_error truncated-weights "past the end of the file" "$BIN" logits -m "$T/m" --ids 2 --out "$T/x"
head -c 5000 $FIX/causal/model.safetensors >"$T/m/model.safetensors"
expect_error truncated-header "truncated: header length" "$BIN" logits -m "$T/m" --ids 2 --out "$T/x"
expect_error generate-no-tokenizer "tokenizer.json" "$BIN" generate -q -m $FIX/causal -p "hello"

summary
