#!/bin/sh
# gpu_ab.sh: decode speed of two or more builds or settings, alternated in one
# call on one card (docs/SPEED.md compares only such numbers). Each round runs
# every model under every variant in turn; the end prints each pair's tg and
# token checksums, and the mean per model and variant.
#
# usage: sh tools/gpu_ab.sh MODELS -- VARIANT...
#   MODELS   model names: g3n-e2b, g3n-e4b (random bf16 checkpoints made by
#            tools/make_random_checkpoint.py --fast in /tmp), e2b-q4, e4b-q8 ...
#            (g3n quantize copies of those, groups of 64), or a checkpoint's
#            directory
#   VARIANT  LABEL=BINARY[,VAR=VALUE...]: a g3n binary and the environment it
#            runs under, e.g. prev=/tmp/px/bin/g3n new=./g3n nopf=./g3n,G3N_PF=0
#            (a value cannot hold a comma, e.g. G3N_QFORCE=O,K,S,J: give a
#            two-line script that sets it and execs g3n as the BINARY)
# env: ROUNDS (2), PP (512), TG (128), REPS (2), PATH_ARG (--decode-path fused),
#      BENCH_ARGS (more bench options), OUT (logs; ./out)
# e.g. sh tools/gpu_ab.sh g3n-e2b e4b-q4 -- prev=/tmp/px/bin/g3n new=/tmp/cx/bin/g3n
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
models=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do models="$models $1"; shift; done
[ $# -gt 0 ] && shift
if [ -z "$models" ] || [ $# -lt 1 ]; then
    echo "usage: sh tools/gpu_ab.sh MODELS -- LABEL=BINARY[,VAR=VALUE...] ..." >&2
    exit 2
fi
for v in "$@"; do
    case "$v" in *=*) ;; *) echo "gpu_ab.sh: variant \"$v\" is not LABEL=BINARY[,VAR=VALUE...]" >&2; exit 2 ;; esac
    b=${v#*=}
    b=${b%%,*}
    [ -x "$b" ] || { echo "gpu_ab.sh: $b (variant ${v%%=*}) is not an executable" >&2; exit 2; }
done
first=${1#*=}
first=${first%%,*}

# The model's directory: as given, or made under /tmp from its name
model_dir() {
    case "$1" in */*) echo "$1" ;; *) echo "/tmp/$1" ;; esac
}
# Make what the models need: the bf16 shapes first (in parallel), then the quantized copies
shapes=""
for m in $models; do
    case "$m" in
    */*) [ -f "$m/config.json" ] || { echo "gpu_ab.sh: $m has no config.json" >&2; exit 2; } ;;
    g3n-e2b | e2b-q[2-8]) shapes="$shapes e2b" ;;
    g3n-e4b | e4b-q[2-8]) shapes="$shapes e4b" ;;
    *) echo "gpu_ab.sh: unknown model $m" >&2; exit 2 ;;
    esac
done
for s in e2b e4b; do
    case "$shapes" in *"$s"*)
        [ -f /tmp/g3n-$s/config.json ] ||
            python3 tools/make_random_checkpoint.py --shape $s --out /tmp/g3n-$s --fast >"$OUT/make-$s.log" 2>&1 &
        ;;
    esac
done
wait
for m in $models; do
    case "$m" in e2b-q* | e4b-q*)
        s=${m%-q*}
        bits=${m#*-q}
        [ -f /tmp/$m/config.json ] ||
            "$first" quantize -m /tmp/g3n-$s -o /tmp/$m --bits "$bits" --group-size 64 >"$OUT/quantize-$m.log" 2>&1 &
        ;;
    esac
done
wait

log="$OUT/ab.txt"
: >"$log"
r=1
while [ "$r" -le "${ROUNDS:-2}" ]; do
    for m in $models; do
        d=$(model_dir "$m")
        for v in "$@"; do
            label=${v%%=*}
            spec=${v#*=}
            bin=${spec%%,*}
            envs=""
            [ "$spec" != "$bin" ] && envs=$(echo "${spec#*,}" | tr ',' ' ')
            # shellcheck disable=SC2086
            res=$(env $envs "$bin" bench -m "$d" -p "${PP:-512}" -n "${TG:-128}" -r "${REPS:-2}" \
                ${PATH_ARG:---decode-path fused} --no-membw ${BENCH_ARGS:-} 2>&1)
            tg=$(echo "$res" | grep -F '| tg' | awk -F'|' '{gsub(/ /, "", $5); split($5, a, "±"); print a[1]}')
            ck=$(echo "$res" | awk '/token checksum/ {print $3}')
            [ -n "$tg" ] || { echo "$res" >"$OUT/fail-$m-$label.txt"; tg=FAIL; }
            echo "$r $m $label ${tg} ${ck:-none}" | tee -a "$log"
        done
    done
    r=$((r + 1))
done
echo "== mean tg tok/s (rounds: ${ROUNDS:-2}); checksums"
awk '{k = $2 " " $3; if ($4 != "FAIL") { s[k] += $4; n[k]++ } else f[k]++; c[k] = c[k] (c[k] == "" ? "" : ",") $5;
      if (!(k in o)) { o[k] = ++no; ord[no] = k } }
     END { for (i = 1; i <= no; i++) { k = ord[i]; split(c[k], cs, ","); same = 1;
           for (j in cs) if (cs[j] != cs[1]) same = 0;
           printf "%-36s %9.2f  %s%s\n", k, n[k] ? s[k] / n[k] : 0, same ? cs[1] : "checksums differ: " c[k],
                  f[k] ? "  (" f[k] " failed)" : "" } }' "$log" | tee "$OUT/ab-summary.txt"
