#!/bin/sh
# cli_server.sh: `g3n serve` on the tiny model, on the CPU: starts two servers on
# free ports, runs tests/server_test.mjs against them with the official `openai`
# npm package (fetched by tests/fetch_openai.sh), then stops them with SIGTERM
# and checks that they exit cleanly (under ASan: no leak, no error). Also the
# command's own errors. Run by tests/run.sh with G3N_BIN set.
set -u
M=tests/fixtures/tiny/conditional
. tests/lib_cli.sh

# start NAME ARGS...: a server on port 0; sets PORT_NAME from its first line
start() {
    name=$1; shift
    "$BIN" serve -q -m $M --device cpu -t 1 --port 0 "$@" 2>"$T/$name.log" &
    echo $! >"$T/$name.pid"
    i=0
    while [ $i -lt 200 ]; do
        port=$(sed -n 's/.*listening on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$T/$name.log" 2>/dev/null)
        [ -n "$port" ] && break
        sleep 0.05; i=$((i + 1))
    done
    eval "PORT_$name=\$port"
}

# stop NAME: SIGTERM, then exit status 0 and nothing alarming in the log
stop() {
    name=$1
    pid=$(cat "$T/$name.pid")
    kill -TERM "$pid" 2>/dev/null
    wait "$pid"; rc=$?
    if [ $rc -eq 0 ] && ! grep -qE "AddressSanitizer|LeakSanitizer|runtime error|g3n: " "$T/$name.log"; then
        ok "serve ($name): clean exit on SIGTERM"
    else
        bad "serve ($name): clean exit on SIGTERM" "rc $rc: $(tail -c 1500 "$T/$name.log")"
    fi
}

if ! sh tests/fetch_openai.sh >"$T/fetch.log" 2>&1; then
    bad "fetch the openai npm package" "$(cat "$T/fetch.log")"
    summary; exit 1
fi

start main --parallel 4 -c 256 -b 32 --api-key sk-test --max-body 1048576 --timeout 3
start slow --parallel 2 --queue 1 -c 256 --step-delay 20 --timeout 3
if [ -z "$PORT_main" ] || [ -z "$PORT_slow" ]; then
    bad "serve: start" "$(cat "$T/main.log" "$T/slow.log")"
else
    ok "serve: start on a free port"
    G3N_URL=http://127.0.0.1:$PORT_main G3N_URL_SLOW=http://127.0.0.1:$PORT_slow \
        node tests/server_test.mjs >"$T/node.out" 2>&1
    cat "$T/node.out" | grep -v '^[0-9]* passed, [0-9]* failed$'
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$T/node.out" | tail -n 1)
    if [ -n "$line" ]; then
        pass=$((pass + ${line%% passed*})); f=${line#*, }; fail=$((fail + ${f%% failed*}))
    else
        bad "server_test.mjs ran to its end" "$(tail -c 1500 "$T/node.out")"
    fi
fi
stop main
stop slow

# the command's own errors: one line, exit 1
start taken --parallel 1 -c 64
expect_error port-in-use "cannot listen" "$BIN" serve -q -m $M --device cpu --port "$PORT_taken"
stop taken
expect_error serve-no-model "no model" "$BIN" serve --port 0
expect_error serve-bad-host "--host" "$BIN" serve -q -m $M --device cpu --host no.such.host.invalid --port 0
expect_error serve-bad-parallel "--parallel" "$BIN" serve -m $M --parallel 0
expect_error serve-no-tokenizer "tokenizer.json" "$BIN" serve -m tests/fixtures/tiny/causal --port 0
expect_error serve-ctx-too-big "max_position" "$BIN" serve -q -m $M --device cpu -c 100000 --port 0

summary
