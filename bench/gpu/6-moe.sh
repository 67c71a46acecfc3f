#!/usr/bin/env bash
# GPU call for issue 17: build the CUDA toolchain if this machine has none yet, then the MoE benchmark
# (ours vs --fit vs the best --n-cpu-moe N, with a ballast). Args: bench_moe_gpu.py options (--cases a d --parts ...).
set -x
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LLAMALAUNCH_CACHE=/tmp/llcache LLAMALAUNCH_HOME=/tmp/llhome
export NCCL_NVLS_ENABLE=0
BIN=$LLAMALAUNCH_CACHE/llama.cpp/llama-cpp-python-0.3.36-cuda/bin
[ -d /tmp/llama.cpp ] || tar xzf .gpucarry/llama-src.tar.gz -C /tmp
if [ ! -x $BIN/llama-server ]; then
    time python3 -m llamalaunch toolchain install --cuda --sdist /tmp/llama.cpp -j 16 2>&1 | grep -v "^\[" | tail -5
fi
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv
python3 -m bench.bench_moe_gpu --server $BIN/llama-server --out $OUT "$@"
