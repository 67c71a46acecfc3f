"""Replay a recorded `bench_speed_gpu` run's calibration with today's fit: the "after" columns again, from the
run's own uncalibrated estimates (their parts) and llama-server's measured medians, no GPU.

A calibrated estimate is the uncalibrated one with each device's scaled parts divided by its factors (the
estimate is linear in 1/efficiency), so the replay is exact for the same placement and devices of distinct
calibration keys (it keys by device name: two workers of one kind, as in the CPU smoke run, share a factor in
serve's fit but not here); the run's pass 2 planned the
same argv for every configuration ("same argv"), which a change of factors could alter: the replay assumes it
does not. Records of the store-version-3 estimate hold a GPU's streamed host weights inside prompt_fixed_s
(the slot overheads are generation_fixed_s): they are split out as today's estimate reports them.

Usage: python -m bench.replay_speed_calibration RUN/speed.json [--out DIR]   (writes DIR/speed-replayed.*)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.bench_speed_gpu import table
from llamalaunch.api import HOST_KEY, DeviceTime, SpeedEstimate, SpeedFactor, SpeedRun, fit, run_sample


def device_time(part: Mapping) -> DeviceTime:
    overhead = part["generation_fixed_s"]
    if "prompt_streamed_s" in part:
        return DeviceTime(part["name"], part["generation_s"], part["prompt_s"], part["read_bytes"], overhead,
                          part["prompt_fixed_s"], part["prompt_streamed_s"])
    return DeviceTime(part["name"], part["generation_s"], part["prompt_s"], part["read_bytes"], overhead, overhead,
                      part["prompt_fixed_s"] - overhead)


def recorded_estimate(found: Mapping) -> SpeedEstimate:
    return SpeedEstimate(found["generation_tps"], found["prompt_tps"], found["fill_tokens"], found["ubatch_tokens"],
                         tuple(device_time(p) for p in found["parts"]), found["hop_generation_s"],
                         found["hop_prompt_s"])


def key(name: str) -> str:
    return HOST_KEY if name == "host" else name


def speed_run(estimate: SpeedEstimate, measured: Mapping) -> SpeedRun:
    keys = {p.name: key(p.name) for p in estimate.parts}
    return SpeedRun(run_sample(estimate, keys, {}, measured.get("gen_tps"), "generation"),
                    run_sample(estimate, keys, {}, measured.get("prompt_tps"), "prompt"))


def calibrated_tps(estimate: SpeedEstimate, factors: Mapping[str, SpeedFactor]) -> dict[str, float]:
    gen_s, prompt_s = estimate.hop_generation_s, estimate.hop_prompt_s
    for part in estimate.parts:
        factor = factors.get(key(part.name), SpeedFactor())
        gen_s += (part.generation_s - part.generation_fixed_s) / factor.generation + part.generation_fixed_s
        scaled = part.prompt_s - part.prompt_fixed_s - part.prompt_streamed_s
        prompt_s += scaled / factor.prompt + part.prompt_streamed_s / factor.stream + part.prompt_fixed_s
    return {"gen_tps": 1 / gen_s, "prompt_tps": estimate.ubatch_tokens / prompt_s}


def replay(records: Sequence[dict]) -> list[dict]:
    """The records with pass 2's after (fitted over every run) and leave-one-out (all but its own) replaced."""
    measured = [r for r in records if r.get("measured") and (r.get("before") or {}).get("estimate")]
    estimates = [recorded_estimate(r["before"]["estimate"]) for r in measured]
    runs = [speed_run(e, r["measured"]) for e, r in zip(estimates, measured)]
    shared = fit({}, runs)
    replayed = []
    for i, (record, estimate) in enumerate(zip(measured, estimates)):
        others = fit({}, runs[:i] + runs[i + 1:])
        same_argv = (record.get("pass2") or {}).get("after_same_argv")
        replayed.append({**record, "pass2": {"after": calibrated_tps(estimate, shared),
                                             "loo": calibrated_tps(estimate, others), "after_same_argv": same_argv}})
    return replayed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a bench_speed_gpu speed.json")
    parser.add_argument("--out", type=Path, help="folder for speed-replayed.json and .txt (default: the run's)")
    args = parser.parse_args()
    records = replay(json.loads(args.run.read_text())["configs"])
    out = args.out or args.run.parent
    (out / "speed-replayed.json").write_text(json.dumps(records, indent=2) + "\n")
    lines = table(records)
    (out / "speed-replayed.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
