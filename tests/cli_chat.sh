#!/bin/sh
# cli_chat.sh: the text side of the command line on the tiny model with its tiny
# tokenizer (tests/fixtures/tiny/conditional/tokenizer.json): the chat REPL driven
# through stdin (/clear really clears, both multi-line forms give one message,
# /bye and end of input end it), one-shot run, streaming generate, tokenize, and
# the text-side errors. Run by tests/run.sh with G3N_BIN set.
set -u
M=tests/fixtures/tiny/conditional
. tests/lib_cli.sh
chat() { "$BIN" run -q -m $M --temp 0 -n 8 "$@"; }

# 1. /clear: the same first message gives the same answer before and after it
printf 'Hello there\n/clear\nHello there\n/bye\nnever read\n' | chat >"$T/out" 2>"$T/err"
rc=$?
n=$(wc -l <"$T/out")
a=$(sed -n 1p "$T/out")
b=$(sed -n 2p "$T/out")
if [ $rc -eq 0 ] && [ "$n" -eq 2 ] && [ -n "$a" ] && [ "$a" = "$b" ]; then ok "run: /clear and /bye"
else bad "run: /clear and /bye" "rc $rc, $n lines: [$a] [$b] $(cat "$T/err")"; fi

# 2. a second turn sees the first: its answer differs from the same message alone
printf 'Hello there\nline one\n/bye\n' | chat >"$T/two" 2>/dev/null
printf 'line one\n' | chat >"$T/alone" 2>/dev/null
if [ "$(sed -n 2p "$T/two")" != "$(sed -n 1p "$T/alone")" ]; then ok "run: turns share the conversation"
else bad "run: turns share the conversation" "second turn answered as if alone"; fi

# 3. multi-line input: a trailing backslash and a """ block give the same message
printf 'line one\\\nline two\n' | chat >"$T/m1" 2>/dev/null
printf '"""\nline one\nline two\n"""\n' | chat >"$T/m2" 2>/dev/null
printf 'line one\n' | chat >"$T/m3" 2>/dev/null
if cmp -s "$T/m1" "$T/m2" && ! cmp -s "$T/m1" "$T/m3" && [ -s "$T/m1" ]; then ok "run: multi-line input"
else bad "run: multi-line input" "[$(cat "$T/m1")] [$(cat "$T/m2")] [$(cat "$T/m3")]"; fi

# 4. one-shot -p equals the first REPL answer; end of input ends the REPL
chat -p "Hello there" >"$T/one" 2>"$T/err"
rc=$?
if [ $rc -eq 0 ] && [ "$(cat "$T/one")" = "$a" ]; then ok "run -p one-shot"
else bad "run -p one-shot" "rc $rc [$(cat "$T/one")] vs [$a] $(cat "$T/err")"; fi

# 5. raw text without the template differs from the chat form
chat -p "Hello there" --no-chat-template >"$T/raw" 2>/dev/null
if [ -s "$T/raw" ] && ! cmp -s "$T/raw" "$T/one"; then ok "run --no-chat-template"
else bad "run --no-chat-template" "[$(cat "$T/raw")]"; fi

# 6. generate streams text and can print the ids; speed goes to stderr only
"$BIN" generate -m $M -p "Hello there" -n 6 --temp 0 --print-ids >"$T/gen" 2>"$T/err"
ids=$(tail -n 1 "$T/gen")
if printf '%s' "$ids" | grep -Eq '^[0-9]+(,[0-9]+){0,5}$' && grep -q "tok/s" "$T/err" && ! grep -q "tok/s" "$T/gen"
then ok "generate -p --print-ids"; else bad "generate -p --print-ids" "$(cat "$T/gen" "$T/err")"; fi

# 7. tokenize
out=$("$BIN" tokenize -q -m $M "Hello there")
if [ "$out" = "$("$BIN" tokenize -q --tokenizer $M/tokenizer.json -p "Hello there")" ] && printf '%s' "$out" | grep -Eq '^2(,[0-9]+)+$'
then ok "tokenize"; else bad "tokenize" "[$out]"; fi
printf 'Hello there' >"$T/f.txt"
if [ "$("$BIN" tokenize -q -m $M --file "$T/f.txt")" = "$out" ]; then ok "tokenize --file"; else bad "tokenize --file"; fi

# 8. errors: one line, exit 1
expect_error no-tokenizer "tokenizer.json" "$BIN" run -m tests/fixtures/tiny/causal -p hi
expect_error bad-tokenizer-file "nope.json" "$BIN" tokenize --tokenizer "$T/nope.json" "hi"
expect_error prompt-too-long "longer than the context" "$BIN" run -q -m $M -c 8 -p "Hello there, this is a long prompt for a tiny context"
expect_error generate-too-long "longer than the context" "$BIN" generate -q -m $M -c 4 -p "Hello there, long"
expect_error no-dir "no such model directory" "$BIN" run -m "$T/none" -p hi
expect_error no-text "give the text" "$BIN" tokenize -m $M

summary
