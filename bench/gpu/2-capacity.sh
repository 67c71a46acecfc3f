#!/usr/bin/env bash
# GPU call 2: capacity against --fit and the true maximum, with a ballast (6, 10, 24 GiB free).
source bench/gpu/env.sh
python3 -m bench.bench_capacity_gpu --server $BIN/llama-server --out $OUT "$@" 2>&1 | tee $OUT/capacity.txt
