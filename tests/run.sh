#!/bin/sh
# run.sh: run every test binary in $TEST_DIR, then every tests/cli_*.sh script
# against $G3N_BIN. Prints each suite's summary and a total; exits 1 if any failed.
set -u
: "${TEST_DIR:?}" "${G3N_BIN:?}"
failed=0
total_pass=0
total_fail=0
for t in "$TEST_DIR"/test_*; do
    [ -x "$t" ] || continue
    echo "== $(basename "$t")"
    out=$("$t" 2>&1); rc=$?
    printf '%s\n' "$out" | grep -v '^ok ' || true
    line=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
    if [ -z "$line" ]; then
        echo "   (no summary line: the test crashed, exit $rc)"
        failed=1; total_fail=$((total_fail + 1)); continue
    fi
    p=${line%% passed*}; f=${line#*, }; f=${f%% failed*}
    total_pass=$((total_pass + p)); total_fail=$((total_fail + f))
    [ "$rc" -eq 0 ] || failed=1
done
for s in tests/cli_*.sh; do
    [ -f "$s" ] || continue
    echo "== $(basename "$s")"
    out=$(G3N_BIN="$G3N_BIN" sh "$s" 2>&1); rc=$?
    printf '%s\n' "$out" | grep -v '^ok ' || true
    line=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
    if [ -z "$line" ]; then
        echo "   (no summary line, exit $rc)"; failed=1; total_fail=$((total_fail + 1)); continue
    fi
    p=${line%% passed*}; f=${line#*, }; f=${f%% failed*}
    total_pass=$((total_pass + p)); total_fail=$((total_fail + f))
    [ "$rc" -eq 0 ] || failed=1
done
echo "TOTAL ($G3N_BIN): $total_pass passed, $total_fail failed"
exit $failed
