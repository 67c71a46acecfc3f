#!/usr/bin/env bash
# One GPU call, several benchmark scripts: `bench/gpu/steps.sh SECONDS SCRIPT [ARGS...] -- SECONDS SCRIPT ...`.
# Each step runs under its own time limit (cut short, it keeps what it saved) with its files in a folder of its
# own, all of them within STEPS_DEADLINE_S (585) of the call's start; everything comes back as one archive ($OUT/results.tgz: the call returns at most 8 files).
source bench/gpu/prepare.sh  # once, here: the build (if any) counts against no step's limit
RESULTS=/tmp/results
mkdir -p $RESULTS
step=0
while [ $# -gt 0 ]; do
    limit=$1; shift
    args=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    left=$(( ${STEPS_DEADLINE_S:-585} - SECONDS - 10 ))  # the archive must be written before the call's limit
    [ $limit -gt $left ] && limit=$left
    [ $limit -le 5 ] && { echo "== no time left for: ${args[*]}"; continue; }
    step=$((step + 1))
    mkdir -p $RESULTS/$step
    echo "== step $step (${limit} s): ${args[*]}"
    OUT=$RESULTS/$step timeout --kill-after=10 $limit bash "${args[@]}" > $RESULTS/$step/stdout.txt 2>&1
    echo "   rc=$? after ${SECONDS} s"; tail -12 $RESULTS/$step/stdout.txt
    # a step cut short leaves its children (a ballast holding GPU memory, servers): the next step starts clean
    pkill -f bench/ballast.py; pkill -f llama-server; pkill -f ggml-rpc-server; sleep 1
done
tar czf $OUT/results.tgz -C $RESULTS .
