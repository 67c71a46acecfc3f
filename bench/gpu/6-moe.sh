#!/usr/bin/env bash
# GPU call for issue 17: the MoE benchmark (ours vs --fit vs the best --n-cpu-moe N, with a ballast), after
# building or unpacking the CUDA toolchain. Args: bench_moe_gpu.py options (--cases a d --parts ... --tag NAME).
source bench/gpu/prepare.sh
python3 -m bench.bench_moe_gpu --server $BIN/llama-server --out $OUT "$@"
