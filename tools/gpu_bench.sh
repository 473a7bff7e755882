#!/bin/sh
# gpu_bench.sh: on the GPU machine, make E2B- and E4B-shaped random checkpoints
# (tools/make_random_checkpoint.py --fast) and time g3n on them: bench (pp/tg),
# graphs off for comparison, and a per-op profile. Logs go to $OUT (or ./out).
# usage: sh tools/gpu_bench.sh [e2b] [e4b]   (default: both)
# (DEPTH=N adds pp/tg after an N-token context with f32 and f16 K/V caches)
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
BIN=${G3N_BIN:-./g3n}
shapes=${*:-e2b e4b}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for s in $shapes; do
    d=/tmp/g3n-$s
    [ -f $d/config.json ] || python3 tools/make_random_checkpoint.py --shape $s --out $d --fast >"$OUT/make-$s.log" 2>&1
    echo "== $s bench" | tee -a "$OUT/bench.txt"
    $BIN bench -m $d -p ${PP:-512} -n ${TG:-128} -r ${REPS:-3} 2>&1 | tee -a "$OUT/bench.txt"
    if [ -n "${PDL_COMPARE:-}" ]; then
        echo "== $s bench, PDL off" | tee -a "$OUT/bench.txt"
        G3N_CUDA_PDL=0 $BIN bench -m $d -p 0 -n 128 -r 2 --no-membw 2>&1 | tee -a "$OUT/bench.txt"
    fi
    if [ -n "${DEPTH:-}" ]; then # DEPTH=32000: pp and tg after a long context, f32 and f16 K/V caches
        for kv in f32 f16; do
            echo "== $s bench after $DEPTH tokens, $kv K/V cache" | tee -a "$OUT/bench.txt"
            $BIN bench -m $d -p ${PP:-512} -n 64 -r 1 -d $DEPTH --kv-type $kv 2>&1 | tee -a "$OUT/bench.txt"
        done
    fi
    if [ -n "${NOGRAPH:-}" ]; then
        echo "== $s bench --no-graph" | tee -a "$OUT/bench.txt"
        $BIN bench -m $d -p 0 -n 64 -r 2 --no-graph 2>&1 | tee -a "$OUT/bench.txt"
    fi
    echo "== $s profile (decode)" | tee -a "$OUT/profile-$s.txt"
    G3N_CUDA_PROFILE=1 $BIN bench -m $d -p 0 -n 16 -r 1 --no-membw --decode-path ${PROFILE_PATH:-fused} >>"$OUT/profile-$s.txt" 2>&1
    head -40 "$OUT/profile-$s.txt"
    if [ -n "${PROFILE_PP:-}" ]; then
        echo "== $s profile (prefill $PROFILE_PP)" >"$OUT/profile-pp-$s.txt"
        G3N_CUDA_PROFILE=1 $BIN bench -m $d -p $PROFILE_PP -n 0 -r 1 --no-membw >>"$OUT/profile-pp-$s.txt" 2>&1
        head -30 "$OUT/profile-pp-$s.txt"
    fi
done
# NCU=1: per-kernel durations of decode steps (graphs on, fused path) for the first shape
if [ -n "${NCU:-}" ]; then
    s=$(echo $shapes | cut -d' ' -f1)
    ncu --metrics gpu__time_duration.sum --csv --print-units base --launch-skip ${NCU_SKIP:-1500} \
        --launch-count ${NCU_COUNT:-450} $BIN bench -m /tmp/g3n-$s -p 0 -n 8 -r 1 --no-membw \
        --decode-path fused >"$OUT/ncu-$s.csv" 2>"$OUT/ncu-$s.err"
    echo "ncu: $(grep -c gpu__time_duration "$OUT/ncu-$s.csv") kernels profiled"
fi
