# lib_cli.sh: what the command-line test scripts (tests/cli_*.sh) share; sourced,
# not run. Sets BIN and a temporary directory T (removed on exit), counts
# results, and checks that a command fails the way g3n promises: exit status 1
# and exactly one line on stderr containing the expected text.
BIN=${G3N_BIN:-./g3n}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; [ -n "${2:-}" ] && printf '     %s\n' "$2"; }

# expect_error NAME TEXT COMMAND...   (stdin from /dev/null)
expect_error() {
    name=$1; want=$2; shift 2
    "$@" >"$T/err.out" 2>"$T/err.txt" </dev/null
    rc=$?
    lines=$(wc -l <"$T/err.txt")
    if [ "$rc" -eq 1 ] && [ "$lines" -eq 1 ] && grep -q -- "$want" "$T/err.txt"; then ok "error: $name"
    else bad "error: $name" "rc $rc, $lines lines: $(head -c 300 "$T/err.txt")"; fi
}

# summary: the line tests/run.sh reads, and the exit status
summary() {
    echo "$pass passed, $fail failed"
    [ "$fail" -eq 0 ]
}
