"""Speed on CPU: the speed-aware split against the even-spare split, and estimated against measured tok/s.

Two real ggml-rpc-server workers on loopback with unequal speed, the demo model (SmolLM2-135M Q4_1) or
another. Both run one thread; RPC1 runs under a CPU quota (a cgroup v1 `cpu.cfs_quota_us`, `--quota`
of one core) where the cgroup can be written, else the workers differ by thread count (`-t 2`, `-t 1`).
llama-server itself runs one thread. Steps, all in one run:

1. calibrate: each worker alone holds the whole model (`-dev RPCi`); llama-server's own timings of
   the requests it served are folded into the speed calibration of that worker (plan/speed_calibration).
2. compare: with --budget on both workers (neither holds the whole model), the planner's even-spare split
   and the speed-aware split (fastest of the placements that fit, calibrated figures) are started in
   turn, `--rounds` times alternating; generation and prompt tok/s from llama-server's timings, median.
3. estimated vs measured for every configuration run: host only, each worker alone, both splits;
   the estimate with the default efficiencies (before calibration) and with the calibrated ones.

Usage: python -m bench.bench_speed_cpu [--model M.gguf] [--rounds 3] [--out bench/results/cpu-DATE]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.llama_runs import (
    default_bin_dir,
    free_port,
    llama_build,
    machine,
    post,
    stop_process,
    write_results,
)
from llamalaunch.api import Plan, PlanInputs, SpeedArgs, build_request, estimate_plan, record_speed

PROMPT_TOKENS = 512
GEN_TOKENS = 64
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


@contextmanager
def quota_group(share: float) -> Iterator[Path | None]:
    """A cgroup v1 CPU group limited to `share` of one core; None where cgroups cannot be written."""
    group = CGROUP_CPU / f"llamalaunch-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(100000 * share)))
    except OSError:
        yield None
        return
    try:
        yield group
    finally:
        try:
            group.rmdir()
        except OSError:
            pass


@contextmanager
def workers(bin_dir: Path, log_dir: Path, quota: float) -> Iterator[tuple[list[str], str]]:
    """RPC0 fast and RPC1 slow; yields the endpoints and how RPC1 was slowed."""
    started: list[subprocess.Popen] = []
    endpoints = []
    with quota_group(quota) as group:
        threads = (1, 1) if group is not None else (2, 1)
        how = f"RPC1 under a CPU quota of {quota:.0%} of a core, both -t 1" if group is not None else \
            "no writable cgroup: RPC0 -t 2, RPC1 -t 1"
        try:
            for index, count in enumerate(threads):
                port = free_port()
                log = open(log_dir / f"rpc-{port}.log", "wb")  # noqa: SIM115 (the worker keeps it)
                process = subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                            "-t", str(count)], stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
                started.append(process)
                if index == 1 and group is not None:
                    (group / "cgroup.procs").write_text(str(process.pid))
                endpoints.append(f"127.0.0.1:{port}")
            time.sleep(1.0)
            yield endpoints, how
        finally:
            for process in started:
                stop_process(process)


def plan_for(model: Path, server: Path, endpoints: list[str], ctx: int, device: str | None, budget: list[str],
             speed: bool, threads: int) -> Plan:
    request = build_request(ctx=str(ctx), parallel=1, devices=device, budget=budget)
    inputs = PlanInputs.gather(model=str(model), demo=False, llama_server=str(server), rpc=endpoints, assume=[],
                               overhead=[], request=request, speed_args=SpeedArgs(enabled=speed))
    plan = inputs.plan()
    return dataclasses.replace(plan, argv=(*plan.argv, "-t", str(threads)))


def measure(server: Path, argv: tuple[str, ...], log_path: Path) -> dict:
    """Start llama-server, warm up, then one request: PROMPT_TOKENS in, GEN_TOKENS out; its own timings."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(server), *argv, "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and process.poll() is None:
                if post(port, "/completion", {"prompt": "Hi", "n_predict": 4}, 30)[0] == 200:
                    break
                time.sleep(0.3)
            payload = {"prompt": [100 + i % 500 for i in range(PROMPT_TOKENS)], "n_predict": GEN_TOKENS,
                       "cache_prompt": False, "ignore_eos": True, "temperature": 0}
            status, reply = post(port, "/completion", payload, 600)
        finally:
            stop_process(process)
    if status != 200 or not isinstance(reply, dict):
        return {"ok": False, "error": str(reply)[:200]}
    timings = reply["timings"]
    return {"ok": True, "generation_tps": timings["predicted_per_second"], "prompt_tps": timings["prompt_per_second"]}


def split_of(plan: Plan) -> str:
    return "+".join(f"{d.device.name}:{d.n_layers}" for d in plan.devices if not d.excluded and d.n_layers) or "host"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--budget-mib", type=int, default=200, help="per worker in the split comparison")
    parser.add_argument("--quota", type=float, default=0.25, help="RPC1's share of one core")
    parser.add_argument("--out", type=Path, default=Path("bench/results") / f"cpu-{time.strftime('%Y-%m-%d')}")
    args = parser.parse_args(argv)
    bin_dir = default_bin_dir()
    server = bin_dir / "llama-server"
    if args.model is None:
        from llamalaunch.api import cache_dir, demo_model_path

        args.model = demo_model_path(cache_dir())
    home = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    os.environ["LLAMALAUNCH_HOME"] = str(home)  # calibration and host probe of this run only
    os.environ.pop("LLAMALAUNCH_CACHE", None)
    rows: list[dict] = []
    with workers(bin_dir, home, args.quota) as (endpoints, slowed):
        def plan(device: str | None, budget: list[str], speed: bool, threads: int = 1) -> Plan:
            return plan_for(args.model, server, endpoints if device != "host" else [], args.ctx,
                            device if device != "host" else None, budget, speed, threads)

        # 1. host only and each worker alone; the workers' runs calibrate them
        alone = {"host (-t 1)": plan("host", [], False), "RPC0 alone (fast)": plan("RPC0", [], False),
                 "RPC1 alone (slow)": plan("RPC1", [], False)}
        before = {name: estimate_plan(p, default_figures(p, endpoints, args, server)) for name, p in alone.items()}
        for name, p in alone.items():
            result = measure(server, p.argv, home / f"{name.split()[0]}.log")
            rows.append(row(name, p, before[name], None, [result]))
            if result["ok"] and name.startswith("RPC"):
                device = [d.device for d in p.devices if not d.excluded]
                record_speed(device, False, before[name], result["generation_tps"], result["prompt_tps"])
        # 2. the two splits, side by side
        budget = [f"RPC0={args.budget_mib}MiB", f"RPC1={args.budget_mib}MiB"]
        even = plan(None, budget, False)
        fast = plan(None, budget, True)
        runs: dict[str, list[dict]] = {"even": [], "speed": []}
        for round_ in range(args.rounds):
            for name, p in (("even", even), ("speed", fast)) if round_ % 2 == 0 else (("speed", fast), ("even", even)):
                runs[name].append(measure(server, p.argv, home / f"{name}-{round_}.log"))
        for name, p in (("even-spare split", even), ("speed-aware split", fast)):
            key = "even" if name.startswith("even") else "speed"
            figures = default_figures(p, endpoints, args, server)
            after = estimate_plan(p, calibrated_figures(p, endpoints, args, server))
            rows.append(row(name, p, estimate_plan(p, figures), after, runs[key]))
    data = {"machine": machine(), "llama_build": llama_build(bin_dir), "model": str(args.model), "ctx": args.ctx,
            "workers": slowed, "budget_mib": args.budget_mib,
            "prompt_tokens": PROMPT_TOKENS, "gen_tokens": GEN_TOKENS, "rounds": args.rounds, "rows": rows}
    table = format_table(rows)
    print("\n".join(table))
    write_results(args.out, "speed_cpu", data, table)
    return 0


def default_figures(plan: Plan, endpoints: list[str], args: argparse.Namespace, server: Path):
    return _figures(plan, endpoints, args, server, calibrated=False)


def calibrated_figures(plan: Plan, endpoints: list[str], args: argparse.Namespace, server: Path):
    return _figures(plan, endpoints, args, server, calibrated=True)


def _figures(plan: Plan, endpoints: list[str], args: argparse.Namespace, server: Path, calibrated: bool):
    from llamalaunch.api import calibrated as scale
    from llamalaunch.api import host_speed, load_speed_factors, probe_devices, probe_host, speed_figures

    devices = probe_devices(rpc=endpoints).devices
    figures = speed_figures(devices, host_speed(probe_host()))
    return scale(figures, devices, load_speed_factors()) if calibrated else figures


def row(name: str, plan: Plan, before, after, results: list[dict]) -> dict:
    ok = [r for r in results if r["ok"]]
    median = (lambda key: statistics.median(r[key] for r in ok) if ok else None)
    return {"config": name, "split": split_of(plan), "ctx": plan.ctx_tokens,
            "est_generation_tps": before.generation_tps, "est_prompt_tps": before.prompt_tps,
            "est_calibrated_generation_tps": after.generation_tps if after else None,
            "est_calibrated_prompt_tps": after.prompt_tps if after else None,
            "generation_tps": median("generation_tps"), "prompt_tps": median("prompt_tps"),
            "runs": results}


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: list[dict]) -> list[str]:
    lines = ["| config | split | gen tok/s measured | est. (default) | est. (calibrated) | prompt tok/s measured | "
             "est. (default) | est. (calibrated) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['split']} | {_f(r['generation_tps'])} | {_f(r['est_generation_tps'])} | "
                     f"{_f(r['est_calibrated_generation_tps'])} | {_f(r['prompt_tps'])} | {_f(r['est_prompt_tps'])} | "
                     f"{_f(r['est_calibrated_prompt_tps'])} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
