#!/usr/bin/env bash
# GPU call 9 (issue 18's proof): estimated vs measured generation and prompt tok/s on six configurations
# (dense full offload at fills 1k and 7k, dense partial offload at 3 GiB free, Qwen3-30B-A3B expert spill at
# 10 GiB free at fills 1k and 12k, an RPC worker on the same GPU), before speed calibration, after it
# (in-sample) and leave-one-out. Goal: within ±25% after calibration, ±50% before.
# Builds or unpacks the CUDA toolchain (prepare.sh); about 3-5 minutes on a GPU after that.
# Args: bench_speed_gpu.py options (--configs dense-full moe-spill ...).
set -o pipefail
source bench/gpu/prepare.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv | tee $OUT/gpu.txt
python3 -m bench.bench_speed_gpu --server $BIN/llama-server --out $OUT --work /tmp/speed-bench "$@" 2>&1 \
    | tee $OUT/speed-run.txt
cat /tmp/speed-bench/homes/shared/*.json > $OUT/shared-home.txt 2>&1
for log in /tmp/speed-bench/*.log; do echo "== $log"; grep -E " E |error|offloaded|n_ctx " "$log" | tail -8; done \
    > $OUT/log-tails.txt 2>&1
