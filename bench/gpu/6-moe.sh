#!/usr/bin/env bash
# GPU call for issue 17: the MoE benchmark (ours vs --fit vs the best --n-cpu-moe N, with a ballast), after
# building or unpacking the CUDA toolchain. Args: bench_moe_gpu.py options (--cases a d --parts ... --tag NAME).
source bench/gpu/prepare.sh
# the host's memory layout: NUMA nodes and transparent huge pages (the CPU reads host experts every token)
lscpu | grep -i -E "model name|numa|socket"; cat /sys/kernel/mm/transparent_hugepage/enabled
# and whether it reads memory in 4 KiB pages (pinned host experts) slower than in 2 MiB pages (the mapping's)
python3 -m bench.host_pages --gib 16 --out $OUT/host_pages.json
python3 -m bench.bench_moe_gpu --server $BIN/llama-server --out $OUT "$@"
