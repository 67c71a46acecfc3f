#!/usr/bin/env bash
# Build llama-server for CUDA from the carried llama.cpp tree, then check the 2026 families on CUDA0.
set -e
[ -d /tmp/llama.cpp ] || tar xzf .gpucarry/llama-src.tar.gz -C /tmp
BIN=/tmp/llama.cpp/build/bin
if [ ! -x $BIN/llama-server ]; then
    cmake -S /tmp/llama.cpp -B /tmp/llama.cpp/build -DGGML_CUDA=ON -DGGML_RPC=ON -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release > /tmp/cmake.log 2>&1
    cmake --build /tmp/llama.cpp/build -j 16 --target llama-server > /tmp/build.log 2>&1 || tail -30 /tmp/build.log
fi
mkdir -p "$OUT"
PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 -m bench.gpu.families_cuda $BIN /tmp/families "$@" | tee "$OUT/families-cuda.txt"
