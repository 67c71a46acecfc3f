#!/usr/bin/env bash
# GPU call 1: build the CUDA toolchain with llamalaunch's own installer, then probe the real NVML.
set -x
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv
time $LL toolchain install --cuda --sdist /tmp/llama.cpp -j 16 2>&1 | grep -v "^\[" | tail -20
COLUMNS=160 $LL toolchain
COLUMNS=160 $LL devices
$LL devices --json > $OUT/devices.json
CUDA_VISIBLE_DEVICES=0 COLUMNS=160 $LL devices
CUDA_VISIBLE_DEVICES= COLUMNS=160 $LL devices
CUDA_VISIBLE_DEVICES=$(nvidia-smi --query-gpu=uuid --format=csv,noheader) COLUMNS=160 $LL devices
$BIN/llama-server --list-devices
python3 -m pytest -q -p no:cacheprovider tests/test_probe_nvml.py 2>&1 | tail -15
