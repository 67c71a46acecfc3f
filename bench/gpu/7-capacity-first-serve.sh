#!/usr/bin/env bash
# GPU call 7 (issue 19): capacity on a machine's first serve, side by side in one run. Per shape (dense,
# GQA, SWA, KV q8_0, one slot, four slots with ubatch 2048, MoE), in a fresh LLAMALAUNCH_HOME (a new
# machine): --ctx max with the default overhead assumed (--no-calibrate), --ctx max calibrating the GPU on
# first sight, each loaded and its context filled, against the true maximum of the same configuration.
# Goal: worst first serve >= 98% of the true maximum, median >= 99%, 0 failed loads or fills.
# One call may not hold all seven (10 minutes): pass --cases, e.g.
#   bench/gpu/7-capacity-first-serve.sh --cases dense gqa swa    then    --cases qkv np1 np4-ub2048 moe
set -o pipefail
source bench/gpu/prepare.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv | tee $OUT/gpu.txt
python3 -m bench.bench_capacity_gpu --first-serve --server $BIN/llama-server --out $OUT --logs /tmp/first-serve \
    "$@" 2>&1 | tee $OUT/first-serve-run.txt
for home in /tmp/first-serve-*; do [ -f $home/calibration.json ] && { echo "== $home"; cat $home/calibration.json; }; done \
    | tee $OUT/calibrations.txt
