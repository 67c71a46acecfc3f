"""Plan speed: `llamalaunch plan` (in-process, CLI) against `llama-fit-params` for the same model and devices.

The devices are real: CPU ggml-rpc-server workers on loopback (llama-fit-params needs devices it can
dry-load on). Each worker reports host RAM as free, so both sides get the same per-device limit:
ours through `--budget RPCi=B`, llama-fit-params through `-fitt FREE_i - B` (the free memory it must
leave, so it uses at most B). One what-if case (8 assumed GPUs, 70B, --ctx max) has no llama.cpp
counterpart and is timed for ours only.

Timed, median of --runs after one warm-up each:
  in-process   PlanInputs.gather(...).plan(): GGUF header, toolchain lookup, worker probe, plan (no imports)
  planner      make_plan(...) alone on the probed devices and a freshly read profile (the pure search,
               its compute-buffer cache cold as in a real `plan` call)
  CLI          `python -m llamalaunch plan MODEL ... --json` (interpreter start-up and imports included)
  fit-params   `llama-fit-params -m MODEL --rpc ... -fitt ...` (process start-up and its dry loads)

    python -m bench.bench_plan_speed --out bench/results/cpu-2026-11-25
    python -m bench.bench_plan_speed --runs 1 --quick --out /tmp/x      # the smoke test's settings
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.llama_runs import (
    FitParamsRun,
    default_bin_dir,
    llama_build,
    machine,
    median_s,
    run_fit_params,
    write_results,
)
from llamalaunch.plan.pipeline import PlanInputs
from llamalaunch.model.load import load_profile
from llamalaunch.model.synthetic import write_preset
from llamalaunch.plan.argv import ArgvOptions
from llamalaunch.plan.parse import build_request
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.types import Plan
from llamalaunch.probe.rpc import probe_worker
from llamalaunch.units import MIB

REPO_ROOT = Path(__file__).resolve().parent.parent
WHAT_IF_GPUS = ("CUDA0=24GiB", "CUDA1=24GiB", "CUDA2=16GiB", "CUDA3=12GiB", "CUDA4=11GiB", "CUDA5=8GiB",
                "CUDA6=8GiB", "CUDA7=6GiB")


@dataclass(frozen=True)
class Case:
    """One planning problem. `budget_mib` per worker (real workers) or `assume` (what-if, ours only)."""

    name: str
    preset: str
    ctx: str  # "max" or tokens
    budget_mib: int = 0
    cpu_spill: bool = False
    assume: tuple[str, ...] = ()

    def request_kwargs(self, n_workers: int) -> dict:
        budget = [self.budget_option(n_workers)] if self.budget_mib else []
        return {"ctx": self.ctx, "budget": budget, "cpu_spill": self.cpu_spill}

    def budget_option(self, n_workers: int) -> str:
        return ",".join(f"RPC{i}={self.budget_mib}MiB" for i in range(n_workers))

    def cli_args(self, endpoints: list[str]) -> list[str]:
        args = ["--ctx", self.ctx]
        if self.assume:
            return [*args, "--assume", ",".join(self.assume)]
        args += ["--rpc", ",".join(endpoints)]
        if self.budget_mib:
            args += ["--budget", self.budget_option(len(endpoints))]
        return [*args, "--cpu-spill"] if self.cpu_spill else args

    def fit_params_args(self, endpoints: list[str], free_mib: list[int]) -> list[str] | None:
        if self.assume:
            return None
        targets = ",".join(str(max(free - self.budget_mib, 0)) for free in free_mib)
        args = ["--rpc", ",".join(endpoints), "-fitt", targets]
        return args if self.ctx == "max" else [*args, "-c", self.ctx]


CASES = (
    Case("8B, 2 workers x 6 GiB, ctx max", "llama-8b", "max", budget_mib=6 * 1024),
    Case("70B, 2 workers x 22 GiB, ctx max", "llama-70b", "max", budget_mib=22 * 1024),
    Case("70B, 2 workers x 12 GiB, ctx 8192, partial", "llama-70b", "8192", budget_mib=12 * 1024,
         cpu_spill=True),
    Case("70B, 8 what-if GPUs, ctx max", "llama-70b", "max", assume=WHAT_IF_GPUS),
)
QUICK_CASES = (Case("tiny, 2 workers x 128 MiB, ctx max", "tiny-llama", "max", budget_mib=128),
               Case("tiny, 8 what-if GPUs, ctx max", "tiny-llama", "max", assume=WHAT_IF_GPUS))


TIMED = ("in_process_s", "planner_s", "cli_s", "fit_params_s")


@dataclass
class CaseResult:
    case: Case
    in_process_s: list[float] = field(default_factory=list)
    planner_s: list[float] = field(default_factory=list)
    cli_s: list[float] = field(default_factory=list)
    fit_params_s: list[float] = field(default_factory=list)
    ours: dict = field(default_factory=dict)  # ctx, n_gpu_layers, per-device layers of our plan
    fit_params: dict = field(default_factory=dict)  # what llama-fit-params printed, its own fit time

    def medians(self) -> dict[str, float]:
        return {key: median_s(getattr(self, key)) for key in TIMED}


def gather_and_plan(case: Case, model: Path, server: Path, endpoints: list[str]) -> tuple[PlanInputs, Plan]:
    request = build_request(**case.request_kwargs(len(endpoints)))
    inputs = PlanInputs.gather(model=str(model), demo=False, llama_server=str(server),
                               rpc=[] if case.assume else [",".join(endpoints)], assume=list(case.assume),
                               overhead=[], request=request)
    return inputs, inputs.plan()


def time_in_process(case: Case, model: Path, server: Path, endpoints: list[str], runs: int,
                    result: CaseResult) -> None:
    inputs, plan = gather_and_plan(case, model, server, endpoints)  # warm-up (and the figures to report)
    result.ours = summarize_plan(plan)
    capabilities = inputs.toolchain.server.capabilities if inputs.toolchain else None
    options = ArgvOptions(inputs.model_path, capabilities)
    overheads = inputs.overheads(inputs.devices)
    for _ in range(runs):
        started = time.perf_counter()
        gather_and_plan(case, model, server, endpoints)
        result.in_process_s.append(time.perf_counter() - started)
        profile = load_profile(str(model))  # a fresh profile: the compute-buffer cache is per profile, cold
        started = time.perf_counter()
        make_plan(profile, inputs.devices, inputs.request, options, overheads)
        result.planner_s.append(time.perf_counter() - started)


def summarize_plan(plan: Plan) -> dict:
    layers = {d.device.name: d.n_layers for d in plan.devices if not d.excluded}
    return {"ctx": plan.ctx_tokens, "n_gpu_layers": plan.n_gpu_layers, "layers": layers}


def time_cli(case: Case, model: Path, server: Path, endpoints: list[str], runs: int,
             result: CaseResult) -> None:
    argv = [sys.executable, "-m", "llamalaunch", "plan", str(model), "--json", "--llama-server", str(server),
            *case.cli_args(endpoints)]
    for index in range(runs + 1):
        started = time.perf_counter()
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"llamalaunch plan failed: {done.stderr.strip()}")
        if index == 0:
            cli_plan = json.loads(done.stdout)
            if cli_plan["ctx"] != result.ours["ctx"]:
                raise RuntimeError(f"CLI planned ctx {cli_plan['ctx']}, in-process {result.ours['ctx']}")
        else:
            result.cli_s.append(elapsed)


def time_fit_params(case: Case, model: Path, bin_dir: Path, endpoints: list[str], runs: int,
                    result: CaseResult) -> None:
    free_mib = [probe_worker(endpoint).devices[0].free_bytes // MIB for endpoint in endpoints]
    args = case.fit_params_args(endpoints, free_mib)
    if args is None:
        return
    verbose = run_fit_params(bin_dir, model, [*args, "-lv", "4"])  # warm-up; its own timing line needs -lv 4
    runs_done: list[FitParamsRun] = [run_fit_params(bin_dir, model, args) for _ in range(runs)]
    result.fit_params_s = [run.seconds for run in runs_done]
    last = runs_done[-1] if runs_done else verbose
    result.fit_params = {"args": args, "printed": last.stdout, "returncode": last.returncode,
                         "ctx": last.ctx, "n_gpu_layers": last.n_gpu_layers,
                         "own_fit_seconds": verbose.fit_seconds}


def run_case(case: Case, models: Path, bin_dir: Path, endpoints: list[str], runs: int) -> CaseResult:
    model = models / f"{case.preset}.gguf"
    if not model.exists():
        write_preset(model, case.preset)
    server = bin_dir / "llama-server"
    result = CaseResult(case)
    time_in_process(case, model, server, endpoints, runs, result)
    time_cli(case, model, server, endpoints, runs, result)
    time_fit_params(case, model, bin_dir, endpoints, runs, result)
    return result


def ratio(numerator: float, denominator: float) -> float | None:
    if math.isnan(numerator) or math.isnan(denominator) or not denominator:  # NaN: not measured
        return None
    return numerator / denominator


def to_json(results: list[CaseResult], runs: int, bin_dir: Path) -> dict:
    cases = []
    for r in results:
        m = r.medians()
        cases.append({**asdict(r.case), "median_s": m, "samples_s": {k: getattr(r, k) for k in m},
                      "ratio_fit_params_over_in_process": ratio(m["fit_params_s"], m["in_process_s"]),
                      "ratio_fit_params_over_cli": ratio(m["fit_params_s"], m["cli_s"]),
                      "ours": r.ours, "fit_params": r.fit_params})
    return {"benchmark": "plan_speed", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs,
            "machine": machine(), "llama_cpp": llama_build(bin_dir), "cases": cases}


def format_table(data: dict) -> list[str]:
    lines = [f"plan speed, median of {data['runs']} runs (seconds); ratio = llama-fit-params / ours",
             (f"{'case':44} {'in-proc':>8} {'planner':>8} {'CLI':>7} {'fit-par':>8} {'x in-proc':>9} "
              f"{'x CLI':>6}  ours ctx/ngl  fit-params printed")]
    for c in data["cases"]:
        m = c["median_s"]
        fit = "-" if math.isnan(m["fit_params_s"]) else f"{m['fit_params_s']:8.3f}"
        x_in = times(c["ratio_fit_params_over_in_process"])
        x_cli = times(c["ratio_fit_params_over_cli"])
        ours = f"{c['ours']['ctx']}/{c['ours']['n_gpu_layers']}"
        printed = c["fit_params"].get("printed", "(no llama.cpp counterpart)")
        lines.append(f"{c['name']:44} {m['in_process_s']:8.3f} {m['planner_s']:8.4f} {m['cli_s']:7.3f} "
                     f"{fit:>8} {x_in:>9} {x_cli:>6}  {ours:13} {printed}")
    return lines


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def start_workers(bin_dir: Path, count: int, log_dir: Path) -> list:
    from tests.support import start_rpc_worker

    return [start_rpc_worker(bin_dir, log_dir) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    parser.add_argument("--bin-dir", type=Path, default=None, help="llama.cpp binaries (default: as tests)")
    parser.add_argument("--out", type=Path, default=None, help="folder for plan_speed.json and .txt")
    parser.add_argument("--quick", action="store_true", help="a tiny model only (the smoke test)")
    args = parser.parse_args(argv)
    bin_dir = args.bin_dir or default_bin_dir()
    with tempfile.TemporaryDirectory(prefix="bench-plan-speed-") as scratch:
        work = Path(scratch)
        workers = start_workers(bin_dir, 2, work)
        try:
            endpoints = [worker.endpoint for worker in workers]
            results = [run_case(case, work, bin_dir, endpoints, args.runs)
                       for case in (QUICK_CASES if args.quick else CASES)]
        finally:
            for worker in workers:
                worker.stop()
    data = to_json(results, args.runs, bin_dir)
    table = format_table(data)
    print("\n".join(table))
    if args.out:
        write_results(args.out, "plan_speed", data, table)
        print(f"wrote {args.out}/plan_speed.json and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
