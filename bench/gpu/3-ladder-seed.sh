#!/usr/bin/env bash
# GPU call 3: the seed's scenario: CUDA0 plus a ggml-rpc-server on the same GPU as RPC0, budgets 24 GiB / 6 GiB.
source bench/gpu/env.sh
M=/tmp/seed-models
python3 -m bench.gpu.seed_models $M

echo "=== seed scenario: CUDA0 (budget 24 GiB) + RPC0 on the same GPU (budget 6 GiB)"
$BIN/ggml-rpc-server -H 127.0.0.1 -p 50052 -d CUDA0 > /tmp/rpc.log 2>&1 & W=$!
sleep 3; cat /tmp/rpc.log
SEED="--rpc 127.0.0.1:50052 --budget CUDA0=24GiB --budget RPC0=6GiB"
for spec in "devstral-24b-q5_k.gguf --ctx 32k" "devstral-24b-q5_k.gguf --ctx max" "gemma3-27b-q4_0.gguf --ctx 16k" \
            "r1-distill-70b-q4_k.gguf --ctx 8k --cpu-spill"; do
    set -- $spec
    echo "--- $spec"
    COLUMNS=150 $LL plan $M/$1 "${@:2}" $SEED
    $LL plan $M/$1 "${@:2}" $SEED --json > /tmp/plan.json
    $LL serve $M/$1 "${@:2}" $SEED --no-tui --name seed --max-attempts 1 > /tmp/seed.log 2>&1 & S=$!
    wait_for /tmp/seed.log "^[0-9T:-]+ (ready|failed):" 300
    cat /tmp/seed.log
    grep -E "assigned to device|model buffer size|KV buffer size|compute buffer size|memory_breakdown" \
        $LLAMALAUNCH_HOME/state/seed.log | grep -v "layer  *[0-9]*: dev" | tail -14
    kill -TERM $S; wait $S
done
kill $W
