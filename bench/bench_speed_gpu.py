"""Estimated vs measured tok/s on six configurations, before and after speed calibration (issue 18's proof).

Per configuration (dense full offload at two fills, dense partial offload, MoE expert spill at two
fills, an RPC worker on the same GPU), with a ballast leaving the GPU the free memory it names:

  pass 1: plan in a home with NO speed calibration (only the memory calibration copied across, so the
          placement is the same everywhere) → "estimate before"; load llama-server with the plan's argv
          and measure its own timings (3 requests of F prompt tokens + 128 generated, ignore_eos,
          cache_prompt false; median of 3); fold the run into a SHARED home's speed calibration exactly as
          `serve` does (RunSpeedCalibration over llama-server's log lines, estimate at the run's fill).
  pass 2: for each configuration again (ballast and worker re-created: placement depends on free memory),
          plan in the shared home → "estimate after" (argv checked against pass 1's).

Honest reading: "after" is IN-SAMPLE: the shared calibration was fitted from these same six runs. The
leave-one-out "after" (configuration i planned in a home calibrated by the other five only, recorded
during pass 1 beside the shared home: no extra loads, one extra plan per configuration in pass 2) is
the out-of-sample figure. Goals (issue 18): within ±25% after calibration, ±50% before.

Estimates compared are the plan's for the requests measured (`PlanInputs.speed_at`: at their mean fill
while generating, F + 64, prompts in batches of their size), the figure serve calibrates against; it
equals `plan --json --fill F+64`'s "speed" when the prompt is at least an ubatch. The table's measured
figure is the median of the three requests' timings, and the calibration folds in those medians (one slow
request on a shared machine must not decide a factor); what serve itself would have read from the run's log
(tokens over seconds of all three, llamalaunch's own log parsing) is kept beside them as "served" in the
JSON. Zero-weight synthetic models. Results are written after every step, so a run cut short keeps what it
measured.

Usage (GPU machine): python -m bench.bench_speed_gpu --server BIN/llama-server --out DIR [--configs ...]
       (CPU smoke):  python -m bench.bench_speed_gpu --cpu --out DIR   (RPC workers on loopback, --budget
                     instead of a ballast, tiny shapes: every path but the GPU ones)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.bench_moe_gpu import QWEN3_30B_A3B, gpu_free_mib
from bench.llama_runs import Ballast, default_bin_dir, free_port, post, stop_process, timed_completions
from llamalaunch.api import (
    LaunchError,
    Plan,
    PlanInputs,
    RunSpeedCalibration,
    ServedTokens,
    SpeedArgs,
    build_request,
    cache_dir,
)
from tests.support import RpcWorker, start_rpc_worker, wait_for_port
from tests.synthetic import SHAPES, SyntheticShape, write_synthetic

GEN_TOKENS = 128
RUNS = 3
BEFORE_GOAL, AFTER_GOAL = 0.50, 0.25


@dataclass(frozen=True)
class Config:
    name: str
    model: str  # a key of the mode's models
    ctx: int
    prompt_tokens: int
    free_mib: int = 0  # GPU: a ballast leaves this free (0: none)
    budget: tuple[str, ...] = ()
    workers: int = 0  # RPC workers used (GPU: one ggml-rpc-server -d CUDA0 on the same GPU)
    cpu_spill: bool = False

    @property
    def fill_tokens(self) -> int:
        return self.prompt_tokens + GEN_TOKENS // 2  # the mean fill while generating: what serve compares at


DENSE_8B = ("llama", SHAPES["llama-8b"].shape, "Q4_K")
GPU_MODELS: dict[str, tuple[str, SyntheticShape, str]] = {
    "llama-8b-q4_k.gguf": DENSE_8B, "qwen3-30b-a3b-q4_k.gguf": ("qwen3moe", QWEN3_30B_A3B, "Q4_K")}
GPU_CONFIGS = [
    Config("dense-full", "llama-8b-q4_k.gguf", 8192, 1024),
    Config("dense-full-long", "llama-8b-q4_k.gguf", 8192, 7000),
    Config("dense-partial", "llama-8b-q4_k.gguf", 4096, 1024, free_mib=3 * 1024, cpu_spill=True),
    Config("moe-spill", "qwen3-30b-a3b-q4_k.gguf", 16384, 1024, free_mib=10 * 1024),
    # neither budget holds the whole model: both hold layers (the worker's own CUDA context is outside both)
    Config("rpc-same-gpu", "llama-8b-q4_k.gguf", 8192, 1024, budget=("CUDA0=3584MiB", "RPC0=3584MiB"), workers=1),
    Config("moe-spill-long", "qwen3-30b-a3b-q4_k.gguf", 16384, 12000, free_mib=10 * 1024),
]

# CPU smoke: RPC0 (and RPC1) are CPU workers on loopback standing in for the GPU; --budget for the ballast.
CPU_DENSE = SyntheticShape(n_layer=8, n_embd=512, n_ff=1536, n_head=8, n_head_kv=4, n_vocab=4096, n_ctx_train=8192)
CPU_MOE = replace(CPU_DENSE, head_dim=64, n_expert=8, n_expert_used=2, n_ff_exp=512)
CPU_MODELS = {"cpu-dense-q4_0.gguf": ("llama", CPU_DENSE, "Q4_0"),
              "cpu-moe-q4_0.gguf": ("qwen3moe", CPU_MOE, "Q4_0")}
CPU_CONFIGS = [
    Config("dense-full", "cpu-dense-q4_0.gguf", 2048, 256, workers=1),
    Config("dense-full-long", "cpu-dense-q4_0.gguf", 2048, 1536, workers=1),
    Config("dense-partial", "cpu-dense-q4_0.gguf", 1024, 256, budget=("RPC0=12MiB",), workers=1, cpu_spill=True),
    Config("moe-spill", "cpu-moe-q4_0.gguf", 2048, 256, budget=("RPC0=40MiB",), workers=1),
    Config("rpc-same-gpu", "cpu-dense-q4_0.gguf", 1024, 256, budget=("RPC0=40MiB", "RPC1=40MiB"), workers=2),
    Config("moe-spill-long", "cpu-moe-q4_0.gguf", 2048, 1536, budget=("RPC0=40MiB",), workers=1),
]


@dataclass
class Rig:
    """What a run needs besides the configurations: the binaries, where the homes and logs go, the workers."""

    server: Path
    work: Path  # homes, models, logs
    cpu: bool
    cpu_workers: list[RpcWorker] = field(default_factory=list)  # --cpu: started once, shared by all configs
    gpu_worker_ports: dict[str, int] = field(default_factory=dict)  # same port in both passes: same device identity

    def home(self, name: str) -> Path:
        return self.work / "homes" / name


# --- homes: LLAMALAUNCH_HOME points the planner's calibration stores at one folder -------------------


@contextmanager
def env_set(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def in_home(path: Path) -> AbstractContextManager[None]:
    return env_set("LLAMALAUNCH_HOME", str(path))


def make_homes(rig: Rig, names: Sequence[str], memory_calibration: Path | None) -> None:
    """Fresh homes holding only the memory calibration (the same placement everywhere), no speed factors."""
    for name in names:
        home = rig.home(name)
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        if memory_calibration is not None and memory_calibration.exists():
            shutil.copy(memory_calibration, home / "calibration.json")


# --- one configuration's setting: ballast and worker ----------------------------------------------


@contextmanager
def setting(rig: Rig, config: Config, record: dict) -> Iterator[list[str]]:
    """The ballast and RPC worker of `config` while planning and measuring; yields the --rpc endpoints."""
    with ExitStack() as stack:
        if rig.cpu:
            yield [w.endpoint for w in rig.cpu_workers[:config.workers]]
            return
        if config.free_mib:
            ballast = Ballast(config.free_mib)
            stack.callback(ballast.close)
            record["ballast_free_mib"] = ballast.free_mib
        endpoints = []
        if config.workers:
            port = rig.gpu_worker_ports.setdefault(config.name, free_port())
            log = stack.enter_context(open(rig.work / f"rpc-{config.name}.log", "ab"))
            worker = subprocess.Popen([str(rig.server.parent / "ggml-rpc-server"), "-H", "127.0.0.1", "-p",
                                       str(port), "-d", "CUDA0"], stdout=log, stderr=subprocess.STDOUT)
            stack.callback(stop_process, worker, 10)
            wait_for_port(port, 60)
            endpoints.append(f"127.0.0.1:{port}")
        record["gpu_free_mib"] = gpu_free_mib()
        yield endpoints


def plan_inputs(rig: Rig, model: Path, config: Config, rpc: list[str]) -> PlanInputs:
    request = build_request(ctx=str(config.ctx), budget=config.budget, cpu_spill=config.cpu_spill)
    return PlanInputs.gather(model=str(model), demo=False, llama_server=str(rig.server), rpc=rpc, assume=[],
                             overhead=[], request=request, speed_args=SpeedArgs.parse(fill=str(config.fill_tokens)))


def estimate_in(home: Path, inputs: PlanInputs, plan: Plan, config: Config) -> dict:
    """The plan's estimate for the requests measured, with `home`'s speed calibration (as serve compares)."""
    with in_home(home):
        speed = inputs.speed_at(plan, config.fill_tokens, config.prompt_tokens)
        figures = inputs.speed_args.figures(inputs.devices, inputs.host)
    # the parts and the figures behind them: what a wrong estimate is traced back to
    return {"gen_tps": speed.generation_tps if speed else None, "prompt_tps": speed.prompt_tps if speed else None,
            "unknown": list(speed.unknown) if speed else ["no speed figures"],
            "calibrated": list(speed.calibrated) if speed else [],
            "estimate": asdict(speed) if speed else None, "figures": asdict(figures) if figures else None}


def plan_in(home: Path, inputs: PlanInputs, config: Config) -> tuple[Plan | None, dict]:
    with in_home(home):
        try:
            plan = inputs.plan()
        except LaunchError as error:
            return None, {"error": str(error)}
    found = {"argv": list(plan.argv), "ctx": plan.ctx_tokens, "n_gpu_layers": plan.n_gpu_layers,
             "devices": {d.device.name: d.n_layers for d in plan.devices if not d.excluded},
             "host_expert_layers": len(plan.host_expert_layers),
             "plan_speed": {"gen_tps": plan.speed.generation_tps, "prompt_tps": plan.speed.prompt_tps,
                            "fill_tokens": plan.speed.fill_tokens} if plan.speed else None}
    return plan, found


# --- measuring: llama-server's own timings -----------------------------------------------------------


def measure(server: Path, argv: Sequence[str], prompt_tokens: int, log_path: Path) -> tuple[dict, list[str]]:
    """One load: ready, RUNS x (prompt_tokens + GEN_TOKENS generated); medians and the log lines (-lv 5, as serve)."""
    port = free_port()
    record: dict = {}
    started = time.monotonic()
    with open(log_path, "w+b") as log:
        process = subprocess.Popen([str(server), *argv, "--host", "127.0.0.1", "--port", str(port), "-lv", "5"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while time.monotonic() < started + 300 and process.poll() is None:
                if post(port, "/completion", {"prompt": "Hi", "n_predict": 1}, 30)[0] == 200:
                    record["load_s"] = round(time.monotonic() - started, 2)
                    break
                time.sleep(0.2)
            gen, prompt, failed = timed_completions(port, prompt_tokens, GEN_TOKENS, RUNS if "load_s" in record else 0)
            if failed:
                record["failed"] = failed
        finally:
            record["returncode"] = stop_process(process, 30)
            log.seek(0)
            lines = log.read().decode("utf-8", "replace").splitlines()
    record["gen_tps_all"], record["prompt_tps_all"] = gen, prompt
    record["gen_tps"] = statistics.median(gen) if gen else None
    record["prompt_tps"] = statistics.median(prompt) if prompt else None
    if "load_s" not in record:
        record["failed"] = "not ready: " + " | ".join([line[-160:] for line in lines if " E " in line][-3:])
    return record, lines


def served_tokens(lines: Sequence[str]) -> ServedTokens:
    """What serve reads from a run's log (launch/calibrate.py)."""
    served = ServedTokens()
    for line in lines:
        served.feed(line)
    return served


def median_served(measured: dict, config: Config) -> ServedTokens:
    """The medians as one served request of the measured size: what RunSpeedCalibration records from."""
    gen, prompt = measured.get("gen_tps"), measured.get("prompt_tps")
    return ServedTokens(prompt_tokens=config.prompt_tokens if prompt else 0,
                        prompt_s=config.prompt_tokens / prompt if prompt else 0.0, prompts=1 if prompt else 0,
                        generated_tokens=GEN_TOKENS if gen else 0, generation_s=GEN_TOKENS / gen if gen else 0.0,
                        fill_token_sum=config.fill_tokens * GEN_TOKENS if gen else 0.0)


# --- the two passes -----------------------------------------------------------------------------------


def pass_one(rig: Rig, models: Path, config: Config, names: Sequence[str], record: dict) -> None:
    """Plan uncalibrated, measure, fold the run into the shared home and every leave-one-out home but its own."""
    with setting(rig, config, record) as rpc:
        inputs = plan_inputs(rig, models / config.model, config, rpc)
        plan, record["before_plan"] = plan_in(rig.home(f"before-{config.name}"), inputs, config)
        if plan is None:
            return
        record["before"] = estimate_in(rig.home(f"before-{config.name}"), inputs, plan, config)
        measured, lines = measure(rig.server, plan.argv, config.prompt_tokens, rig.work / f"{config.name}.log")
        record["measured"] = measured
        served = served_tokens(lines)
        record["served"] = {"gen_tps": served.generation_tps(), "prompt_tps": served.prompt_tps(),
                            "mean_fill": served.mean_fill(), "mean_prompt": served.mean_prompt()}
        if "failed" in measured:
            return
        homes = ["shared", *(f"loo-{name}" for name in names if name != config.name)]
        record["recorded"] = {}
        for home_name in homes:  # each home's own estimate at the run's fill: serve's exact record
            home = rig.home(home_name)
            with in_home(home):
                calibration = RunSpeedCalibration(inputs.speed_at, home / "speed_calibration.json")
                factors = calibration.record(plan, median_served(measured, config))
            record["recorded"][home_name] = {key: asdict(value) for key, value in factors.items()}


def pass_two(rig: Rig, models: Path, config: Config, record: dict) -> None:
    """Plan again in the shared (calibrated) home and in this configuration's leave-one-out home."""
    before_argv = (record.get("before_plan") or {}).get("argv")
    after: dict = {}
    with setting(rig, config, after) as rpc:
        inputs = plan_inputs(rig, models / config.model, config, rpc)
        for label, home in (("after", rig.home("shared")), ("loo", rig.home(f"loo-{config.name}"))):
            plan, after[f"{label}_plan"] = plan_in(home, inputs, config)
            if plan is not None:
                after[label] = estimate_in(home, inputs, plan, config)
                after[f"{label}_same_argv"] = list(plan.argv) == before_argv
    record["pass2"] = after


# --- the table ----------------------------------------------------------------------------------------


def ratio(estimate: float | None, measured: float | None) -> float | None:
    return estimate / measured if estimate and measured else None


def cell(estimate: float | None, measured: float | None) -> str:
    r = ratio(estimate, measured)
    return f"{estimate:>9.1f} {r:>5.2f}" if estimate is not None and r is not None else f"{'-':>9} {'-':>5}"


def within(records: Sequence[dict], where: Callable[[dict], dict | None], kind: str, goal: float) -> str:
    ratios = [r for rec in records
              if (r := ratio((where(rec) or {}).get(kind), (rec.get("measured") or {}).get(kind))) is not None]
    inside = sum(1 for r in ratios if abs(r - 1) <= goal)
    worst = max((abs(r - 1) for r in ratios), default=float("nan"))
    return f"{inside}/{len(ratios)} within ±{goal:.0%} (worst {worst:.0%})"


def table(records: Sequence[dict]) -> list[str]:
    rows = [f"{'config':<16}{'kind':<7}{'measured':>9} {'before':>9} {'ratio':>5} {'after':>9} {'ratio':>5} "
            f"{'loo':>9} {'ratio':>5}  same argv"]
    for rec in records:
        measured, two = rec.get("measured") or {}, rec.get("pass2") or {}
        for kind, label in (("gen_tps", "gen"), ("prompt_tps", "prompt")):
            value = measured.get(kind)
            rows.append(f"{rec['config']:<16}{label:<7}{value if value is not None else float('nan'):>9.1f} "
                        f"{cell((rec.get('before') or {}).get(kind), value)} "
                        f"{cell((two.get('after') or {}).get(kind), value)} {cell((two.get('loo') or {}).get(kind), value)}"
                        f"  {two.get('after_same_argv', '-')}")
        for error in (rec.get("failed"), (rec.get("before_plan") or {}).get("error"), measured.get("failed"),
                      rec.get("failed_pass2"), (two.get("after_plan") or {}).get("error")):
            if error:
                rows.append(f"{rec['config']:<16}failed: {error}")
    for kind, label in (("gen_tps", "generation"), ("prompt_tps", "prompt")):
        rows.append(f"{label}: before {within(records, lambda r: r.get('before'), kind, BEFORE_GOAL)}; "
                    f"after (in-sample) {within(records, lambda r: (r.get('pass2') or {}).get('after'), kind, AFTER_GOAL)}; "
                    f"leave-one-out {within(records, lambda r: (r.get('pass2') or {}).get('loo'), kind, AFTER_GOAL)}")
    rows.append("goal (issue 18): within ±25% after calibration, ±50% before; 'after' is in-sample "
                "(fitted from these runs), leave-one-out is not")
    return rows


# --- main ---------------------------------------------------------------------------------------------


def write_models(folder: Path, models: dict[str, tuple[str, SyntheticShape, str]], wanted: set[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        if not (folder / name).exists():
            arch, shape, file_type = models[name]
            write_synthetic(folder / name, arch, shape, file_type, varied_routing=True)


def run(rig: Rig, configs: Sequence[Config], saved: Callable[[list[dict]], None],
        pass_one_budget_s: float = float("inf")) -> list[dict]:
    """Pass 1 over every configuration, then pass 2; a configuration not started in pass 1 within
    `pass_one_budget_s` is skipped, so that pass 2 (a few seconds per configuration) still runs."""
    started = time.monotonic()
    models = rig.work / "models-varied"  # tokens spread over the experts as in a real model
    write_models(models, CPU_MODELS if rig.cpu else GPU_MODELS, {c.model for c in configs})
    names = [c.name for c in configs]
    # the memory calibration store this machine's earlier runs wrote (plan/overheads.py's calibration_path)
    memory = Path(os.environ.get("LLAMALAUNCH_HOME") or cache_dir()) / "calibration.json"
    make_homes(rig, ["shared", *(f"before-{n}" for n in names), *(f"loo-{n}" for n in names)], memory)
    records: list[dict] = []
    for config in configs:
        record = {"config": config.name, "setting": asdict(config)}
        records.append(record)
        if time.monotonic() - started > pass_one_budget_s:
            record["failed"] = f"skipped: pass 1 ran past --pass-one-budget-s {pass_one_budget_s:.0f}"
            continue
        try:
            pass_one(rig, models, config, names, record)
        except (LaunchError, OSError, TimeoutError) as error:
            record["failed"] = f"pass 1: {error}"
        print(config.name, json.dumps({k: record.get(k) for k in ("before", "measured", "served")}), flush=True)
        saved(records)
    for config, record in zip(configs, records):
        if "measured" not in record:
            continue
        try:
            pass_two(rig, models, config, record)
        except (LaunchError, OSError, TimeoutError) as error:
            record["failed_pass2"] = str(error)
        saved(records)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", type=Path, help="llama-server (default: the CPU build's with --cpu)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/speed-bench"), help="homes, models, logs")
    parser.add_argument("--cpu", action="store_true", help="smoke run on CPU RPC workers, tiny shapes, no ballast")
    parser.add_argument("--configs", nargs="*", help="names (default: all six)")
    parser.add_argument("--pass-one-budget-s", type=float, default=240.0,
                        help="start no more pass-1 loads after this; pass 2 still runs (default 240)")
    args = parser.parse_args(argv)
    all_configs = CPU_CONFIGS if args.cpu else GPU_CONFIGS
    if unknown := set(args.configs or ()) - {c.name for c in all_configs}:
        parser.error(f"unknown --configs {', '.join(sorted(unknown))}; known: {', '.join(c.name for c in all_configs)}")
    configs = [c for c in all_configs if not args.configs or c.name in args.configs]
    server = args.server or default_bin_dir() / "llama-server"
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    rig = Rig(server, args.work, args.cpu)

    def saved(records: list[dict]) -> None:
        factors = rig.home("shared") / "speed_calibration.json"
        shared = json.loads(factors.read_text()) if factors.exists() else {}
        (args.out / "speed.json").write_text(json.dumps({"cpu": args.cpu, "configs": records,
                                                         "shared_factors": shared}, indent=2) + "\n")
        (args.out / "speed.txt").write_text("\n".join(table(records)) + "\n")

    with env_set("LLAMALAUNCH_CACHE", str(cache_dir())):  # every home shares one build and host speed probe
        try:
            if args.cpu:
                rig.cpu_workers = [start_rpc_worker(server.parent, args.work, threads=1)
                                   for _ in range(max(c.workers for c in configs))]
            records = run(rig, configs, saved, args.pass_one_budget_s)
        finally:
            for worker in rig.cpu_workers:
                worker.stop()
    print("\n".join(table(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
