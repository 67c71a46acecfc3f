#!/usr/bin/env bash
source bench/gpu/env.sh
ls /tmp/site | head -3; ls -d /tmp/llama.cpp
[ -x $BIN/llama-server ] || $LL toolchain install --cuda --sdist /tmp/llama.cpp -j 16 2>&1 | grep -v "^\[" | tail -5
ls -la $BIN
