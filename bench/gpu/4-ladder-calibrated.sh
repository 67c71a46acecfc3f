#!/usr/bin/env bash
# GPU call 4: the OOM ladder (3 GiB taken as llama-server starts), then a serve that fills its
# context and records the calibrated overhead, then capacity again with the calibration in place.
source bench/gpu/env.sh
M=/tmp/seed-models
[ -f $M/llama-8b.gguf ] || python3 -m bench.gpu.seed_models $M

echo "=== OOM ladder: 10 GiB free, then 3 GiB more taken as llama-server starts"
python3 bench/ballast.py 10240 > /tmp/b1.log 2>&1 & B1=$!
wait_for /tmp/b1.log "ballast ready" 60; cat /tmp/b1.log
python3 bench/ballast.py 3072 --grow-when "llama-server -m $M/llama-8b.gguf" > /tmp/b2.log 2>&1 & B2=$!
sleep 5
$LL serve $M/llama-8b.gguf --ctx max --no-tui --name ladder > $OUT/ladder.txt 2>&1 & S=$!
wait_for $OUT/ladder.txt "^[0-9T:-]+ (ready|failed):" 240
cat /tmp/b2.log
COLUMNS=150 $LL status --once --name ladder > $OUT/status.txt 2>&1; cat $OUT/status.txt
kill -TERM $S; wait $S; echo "serve exit $?"; cat $OUT/ladder.txt
kill $B1 $B2; wait $B1 $B2 2>/dev/null; sleep 2

echo "=== calibration: serve at 10 GiB free, fill the context, stop"
python3 bench/ballast.py 10240 > /tmp/b1.log 2>&1 & B1=$!
wait_for /tmp/b1.log "ballast ready" 60
$LL serve $M/llama-8b.gguf --ctx max --no-tui --name cal > /tmp/cal.txt 2>&1 & S=$!
wait_for /tmp/cal.txt "^[0-9T:-]+ (ready|failed):" 120; cat /tmp/cal.txt
python3 - <<'PY'
import json
from bench.llama_runs import post
state = json.load(open("/tmp/llhome/state/cal.json"))
port = int(state["url"].rsplit(":", 1)[1])
print("fill", post(port, "/completion", {"prompt": [100] * (state["plan"]["ctx"] - 32), "n_predict": 1}, 600)[0])
PY
kill -TERM $S; wait $S; kill $B1; wait $B1 2>/dev/null; sleep 2
cat $LLAMALAUNCH_HOME/calibration.json  # under LLAMALAUNCH_HOME when set
echo "=== capacity with the calibration"
python3 -m bench.bench_capacity_gpu --server $BIN/llama-server --out $OUT --free-gib 6 10 --skip-70b 2>&1 | tail -4
