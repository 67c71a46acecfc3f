"""Capacity on CPU: RPC workers under `prlimit --as`, llamalaunch vs llama-server's --fit vs the true maximum.

A CPU ggml-rpc-server reports host RAM as its free memory; only its address-space limit stops it. Each
worker gets `prlimit --as = idle worker's VSZ + ROOM`, and llamalaunch gets the matching `--budget
RPCi=ROOM`. In one run, for 1 and 2 workers:
  ours          `llamalaunch plan --ctx max --budget ...` (default margin), loaded with its argv
  ours m0       the same with `--margin 0`: is the accounting itself exact?
  fit           llama-server's default --fit: it sees only the worker's reported free memory (host RAM)
  fit -fitt     --fit told the same limit: `-fitt FREE_i - ROOM` (the free memory it must leave)
  true          the largest ctx that loads AND completes a prompt filling the context (bisection with
                real loads, `--fit off`, our plan's split with -c changed; step 256 = llama.cpp's rounding)
Every load runs on fresh workers (a worker keeps freed memory mapped between clients), and every
load that gets ready is sent a prompt of ctx - 32 tokens. A failed load counts as a failure.

The model is synthetic and shaped for this: 64 KiB of KV per token and few weights, so the budget is
mostly KV and a filling prompt of a few thousand tokens takes seconds on one core.

    python -m bench.bench_capacity_cpu --out bench/results/cpu-2026-11-25
    python -m bench.bench_capacity_cpu --quick                # the smoke test's settings
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.llama_runs import (
    default_bin_dir,
    largest_passing,
    llama_build,
    machine,
    run_trial,
    worker_baseline_vsz,
    write_results,
)
from llamalaunch.api import MIB

REPO_ROOT = Path(__file__).resolve().parent.parent
FILL_MARGIN = 32  # tokens left for the generated token
CTX_STEP = 256
# 16 blocks, 8 K/V heads of 128: 64 KiB of f16 KV per token; ~11 MiB of Q4_0 weights.
MODEL_SHAPE = {"n_layer": 16, "n_embd": 256, "n_ff": 256, "n_head": 8, "n_head_kv": 8, "head_dim": 128,
               "n_vocab": 512, "n_ctx_train": 131072}
ROOMS_MIB = {1: 300, 2: 170}  # per worker; true maximum about 3-4k tokens
QUICK_ROOMS_MIB = {1: 90}


@dataclass
class Load:
    """One real load: the ctx llama.cpp used, whether it served the filling prompt, why not."""

    label: str
    ctx: int | None
    ok: bool
    seconds: float
    argv: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)


@dataclass
class Config:
    n_workers: int
    room_mib: int
    limit_bytes: int
    loads: list[Load] = field(default_factory=list)
    checks: list[tuple[int, bool]] = field(default_factory=list)  # bisection: (ctx, loaded and filled)
    true_ctx: int | None = None



ArgvFor = Callable[[list[str]], "list[str] | None"]  # worker endpoints -> llama-server argv (None: no plan)


@contextlib.contextmanager
def workers(bin_dir: Path, count: int, limit_bytes: int, log_dir: Path) -> Iterator[list[str]]:
    from tests.support import start_rpc_worker

    started = []
    try:
        for _ in range(count):
            started.append(start_rpc_worker(bin_dir, log_dir, address_space_bytes=limit_bytes))
        yield [worker.endpoint for worker in started]
    finally:
        for worker in started:
            worker.stop()


def plan_argv(model: Path, server: Path, endpoints: list[str], room_mib: int, extra: list[str]) -> dict:
    budget = ",".join(f"RPC{i}={room_mib}MiB" for i in range(len(endpoints)))
    argv = [sys.executable, "-m", "llamalaunch", "plan", str(model), "--json", "--llama-server", str(server),
            "--rpc", ",".join(endpoints), "--ctx", "max", "--budget", budget, *extra]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        return {"error": done.stderr.strip()}
    return dict(json.loads(done.stdout))


def with_ctx(argv: list[str], ctx: int) -> list[str]:
    changed = list(argv)
    changed[changed.index("-c") + 1] = str(ctx)
    return changed


class Runner:
    """Real loads on fresh workers under the config's limit; logs kept under `log_dir`."""

    def __init__(self, bin_dir: Path, model: Path, config: Config, log_dir: Path) -> None:
        self.bin_dir, self.model, self.config, self.log_dir = bin_dir, model, config, log_dir
        self.server = bin_dir / "llama-server"
        self.count = 0

    def workers(self) -> contextlib.AbstractContextManager[list[str]]:
        return workers(self.bin_dir, self.config.n_workers, self.config.limit_bytes, self.log_dir)

    def load(self, label: str, argv_for: ArgvFor) -> Load:
        """`argv_for(endpoints)` builds the argv once the workers are up (None: nothing to load)."""
        self.count += 1
        log = self.log_dir / f"w{self.config.n_workers}-{self.count:02d}-{label.replace(' ', '_')}.log"
        with self.workers() as endpoints:
            argv = argv_for(endpoints)
            if argv is None:
                return Load(label, None, False, 0.0)
            given = int(argv[argv.index("-c") + 1]) if "-c" in argv else None
            started = time.monotonic()
            trial = run_trial(self.server, argv, given - FILL_MARGIN if given else None, log,
                              ready_timeout_s=120, fill_timeout_s=300)
            if given or not trial.ok or not trial.n_ctx:
                seconds = time.monotonic() - started
                return Load(label, trial.n_ctx or given, trial.ok, seconds, argv, trial.tail)
        # --fit chose the ctx: fill it on fresh workers (the first load left memory mapped in them)
        with self.workers() as endpoints:
            argv = argv_for(endpoints)
            assert argv is not None
            started = time.monotonic()
            trial = run_trial(self.server, pinned_ctx(argv, trial.n_ctx), trial.n_ctx - FILL_MARGIN, log,
                              ready_timeout_s=120, fill_timeout_s=300)
            return Load(label, trial.n_ctx, trial.ok, time.monotonic() - started, argv, trial.tail)


def pinned_ctx(argv: list[str], ctx: int) -> list[str]:
    """The ctx the first load chose, fixed: the second load is the same (--fit picks from free memory)."""
    return with_ctx(argv, ctx) if "-c" in argv else [*argv, "-c", str(ctx)]


def fit_target_args(endpoints: list[str], room_mib: int) -> list[str]:
    from llamalaunch.api import probe_worker

    free_mib = [probe_worker(endpoint).devices[0].free_bytes // MIB for endpoint in endpoints]
    return ["-fitt", ",".join(str(max(free - room_mib, 0)) for free in free_mib)]


def measure_config(bin_dir: Path, model: Path, n_workers: int, room_mib: int, baseline_vsz: int,
                   log_dir: Path, max_checks: int | None = None) -> Config:
    config = Config(n_workers, room_mib, baseline_vsz + room_mib * MIB)
    runner = Runner(bin_dir, model, config, log_dir)
    server = bin_dir / "llama-server"
    plans: dict[str, dict] = {}

    def ours(extra: list[str], key: str) -> ArgvFor:
        def argv_for(endpoints: list[str]) -> list[str] | None:
            plan = plan_argv(model, server, endpoints, room_mib, extra)
            plans.setdefault(key, plan)
            return with_rpc(plan["argv"], endpoints) if "argv" in plan else None
        return argv_for

    config.loads.append(runner.load("ours", ours([], "ours")))
    config.loads.append(runner.load("ours m0", ours(["--margin", "0"], "ours m0")))
    config.loads.append(runner.load("fit", lambda eps: ["-m", str(model), "--rpc", ",".join(eps)]))
    config.loads.append(runner.load("fit -fitt", lambda eps: ["-m", str(model), "--rpc", ",".join(eps),
                                                              *fit_target_args(eps, room_mib)]))
    for load in config.loads:
        if load.label.startswith("ours") and load.ctx is None:
            load.ctx = plans.get(load.label, {}).get("ctx")
            load.tail = load.tail or [plans.get(load.label, {}).get("error", "")]
    base_argv = plans["ours"].get("argv") or plans["ours m0"].get("argv")
    if base_argv:
        config.true_ctx = true_maximum(runner, config, base_argv, max_checks)
    return config


def with_rpc(argv: list[str], endpoints: list[str]) -> list[str]:
    changed = list(argv)
    changed[changed.index("--rpc") + 1] = ",".join(endpoints)
    return changed


def true_maximum(runner: Runner, config: Config, base_argv: list[str], max_checks: int | None) -> int:
    """Bisection on ctx with the plan's split and --fit off; starts from the largest ctx seen to pass.
    With `max_checks` (the smoke test), loads past that many count as failed: not a true maximum."""
    def loads_and_fills(ctx: int) -> bool:
        if max_checks is not None and len(config.checks) >= max_checks:
            return False
        load = runner.load(f"true {ctx}", lambda eps: with_ctx(with_rpc(base_argv, eps), ctx))
        config.checks.append((ctx, load.ok))
        return load.ok

    passed = [load.ctx for load in config.loads if load.ok and load.ctx]
    failed = [load.ctx for load in config.loads if not load.ok and load.ctx]
    low = max(passed) if passed else CTX_STEP
    above = [ctx for ctx in failed if ctx > low]
    high = min(above) if above and min(above) - low <= 8 * CTX_STEP else low + 4 * CTX_STEP
    return largest_passing(loads_and_fills, low, high, CTX_STEP)


def to_json(configs: list[Config], bin_dir: Path, baseline_vsz: int, shape: dict) -> dict:
    rows = []
    for c in configs:
        row = asdict(c)
        row["ratio_to_true"] = {load.label: (load.ctx / c.true_ctx if load.ctx and c.true_ctx else None)
                                for load in c.loads}
        rows.append(row)
    return {"benchmark": "capacity_cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
            "llama_cpp": llama_build(bin_dir), "model_shape": shape,
            "kv_bytes_per_token": kv_per_token(shape),
            "worker_baseline_vsz_bytes": baseline_vsz, "configs": rows}


def kv_per_token(shape: dict) -> int:
    """f16 K and V, every layer: n_layer x 2 x n_head_kv x head_dim x 2 bytes."""
    return int(shape["n_layer"]) * 2 * int(shape["n_head_kv"]) * int(shape["head_dim"]) * 2


def format_table(data: dict) -> list[str]:
    labels = ("ours", "ours m0", "fit", "fit -fitt")
    header = " ".join(f"{label:>17}" for label in labels)
    lines = [("ctx reached per configuration (ratio to the true maximum; FAIL = did not load or did not "
              "finish a prompt filling the context)"),
             f"{'workers':>7} {'room/worker':>11} {header} {'true':>6}"]
    for c in data["configs"]:
        cells = []
        for label in labels:
            load = next((x for x in c["loads"] if x["label"] == label), None)
            ratio = c["ratio_to_true"].get(label)
            if load is None or not load["ctx"]:
                cells.append(f"{'FAIL (no plan)':>17}")
                continue
            text = f"{load['ctx']} ok {ratio:.0%}" if load["ok"] and ratio else f"{load['ctx']} FAIL"
            cells.append(f"{text:>17}")
        lines.append(f"{c['n_workers']:>7} {str(c['room_mib']) + ' MiB':>11} " + " ".join(cells)
                     + f" {c['true_ctx'] or 0:>6}")
    lines.append("bisection checks (ctx: ok): " + "; ".join(
        f"{c['n_workers']}w " + ", ".join(f"{ctx}:{'y' if ok else 'n'}" for ctx, ok in c["checks"])
        for c in data["configs"]))
    return lines


def main(argv: list[str] | None = None) -> int:
    from tests.synthetic import write_preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for capacity.json and capacity.txt")
    parser.add_argument("--logs", type=Path, default=None, help="keep the server logs here (default: temp)")
    parser.add_argument("--quick", action="store_true", help="1 worker, a small room (the smoke test)")
    args = parser.parse_args(argv)
    bin_dir = args.bin_dir or default_bin_dir()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-capacity-cpu-"))
    logs.mkdir(parents=True, exist_ok=True)
    shape = {**MODEL_SHAPE, "n_layer": 4} if args.quick else MODEL_SHAPE
    model = write_preset(logs / "wide-kv.gguf", "tiny-llama", **shape)
    baseline = worker_baseline_vsz(bin_dir)
    configs = [measure_config(bin_dir, model, n, room, baseline, logs, 2 if args.quick else None)
               for n, room in (QUICK_ROOMS_MIB if args.quick else ROOMS_MIB).items()]
    data = to_json(configs, bin_dir, baseline, shape)
    table = format_table(data)
    print("\n".join(table))
    if args.out:
        write_results(args.out, "capacity", data, table)
        print(f"wrote {args.out}/capacity.json and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
