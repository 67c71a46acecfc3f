"""Launch overhead: `llamalaunch serve` time-to-ready against bare llama-server with the plan's argv.

Same model, same RPC worker (a CPU ggml-rpc-server on loopback), same plan. Runs alternate
(bare, bare -lv 5, serve, bare, ...) after one warm-up of each, so page cache and machine load
hit every variant alike. Time-to-ready:
  bare       Popen(llama-server PLAN_ARGV) until a one-token completion answers 200 (polled every 20 ms)
  bare-lv5   the same with `-lv 5 --metrics`, which serve adds to the child (its log and status view)
  serve      Popen(python -m llamalaunch serve MODEL ...) until it prints its `ready:` line

Where serve's extra time goes, measured per run from the arrival time of serve's own lines and the
child's log timestamps (llama.cpp's clock starts with the child):
  start+gather   launch → `starting: planning`: interpreter start-up, imports, GGUF header, toolchain
  probe+plan     `starting` → `loading: pid`: worker probe, planning, spawning llama-server
  child load     the child's own `listening on` timestamp (model loaded; this build binds after loading)
  readiness      the rest up to `ready:`: /health polling (every 0.1 s) and the one-token completion
and once, separately: `python -c pass`, the imports serve needs, PlanInputs.gather and .plan in-process.

    python -m bench.bench_launch --out bench/results/cpu-2026-11-25
    python -m bench.bench_launch --quick --runs 1            # the smoke test's settings
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.llama_runs import (
    default_bin_dir,
    free_port,
    llama_build,
    machine,
    median_s,
    post,
    stop_process,
    write_results,
)

if TYPE_CHECKING:
    from llamalaunch.plan.pipeline import PlanInputs

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_POLL_S = 0.02
SERVE_IMPORTS = ("import llamalaunch.cli, llamalaunch.launch.serve, llamalaunch.observe.live, "
                 "llamalaunch.plan.parse")
# Import costs inside serve's start-up, each measured alone in a fresh interpreter.
IMPORT_PARTS = {"python -c pass": "pass", "python + serve imports": SERVE_IMPORTS,
                "python + import gguf (numpy)": "import gguf",
                "python + import typer._adapters (pydantic)": "import typer._adapters"}
PHASES = ("start+gather", "probe+plan", "child load", "readiness")
CHILD_LISTENING = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I .*listening on http")
SERVE_LINES = {"starting": " starting: planning", "loading": " loading: pid ", "ready": " ready: http"}


@dataclass
class ServeTiming:
    """Seconds from Popen of the launcher to each of its lines, and the child's own load time."""

    ready_s: float
    starting_s: float
    loading_s: float
    child_listening_s: float | None
    ctx: int

    def phases(self) -> dict[str, float | None]:
        load = self.child_listening_s
        return {"start+gather": self.starting_s, "probe+plan": self.loading_s - self.starting_s,
                "child load": load,
                "readiness": None if load is None else self.ready_s - self.loading_s - load}


@dataclass
class ModelResult:
    model: str
    argv: list[str]
    bare_s: list[float] = field(default_factory=list)
    bare_lv5_s: list[float] = field(default_factory=list)
    serve: list[ServeTiming] = field(default_factory=list)


# --- one run of each variant ---------------------------------------------------------------------------


def time_bare(server: Path, argv: list[str], log_path: Path, timeout_s: float = 300.0) -> float:
    port = free_port()
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen([str(server), *argv, "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while process.poll() is None and time.perf_counter() - started < timeout_s:
                status, _ = post(port, "/completion", {"prompt": "Hi", "n_predict": 1}, 60)
                if status == 200:
                    return time.perf_counter() - started
                time.sleep(READY_POLL_S)
        finally:
            stop_process(process)
    raise RuntimeError(f"llama-server never answered (exit {process.returncode}); see {log_path}")


class LineClock:
    """Collects a process's stdout lines with their arrival times (seconds since `started`)."""

    def __init__(self, process: subprocess.Popen[str], started: float) -> None:
        self.lines: list[tuple[float, str]] = []
        self.changed = threading.Condition()
        self.process = process
        self.started = started
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append((time.perf_counter() - self.started, line.rstrip("\n")))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str, timeout_s: float) -> tuple[float, str]:
        deadline = time.perf_counter() + timeout_s
        with self.changed:
            while True:
                for at, line in self.lines:
                    if text in line:
                        return at, line
                if not self.reader.is_alive() or time.perf_counter() > deadline:
                    seen = " | ".join(line for _, line in self.lines)
                    raise RuntimeError(f"no {text!r} from serve: {seen}")
                self.changed.wait(0.05)


def child_listening_s(log_path: Path) -> float | None:
    """The child's `listening on` timestamp (minutes.seconds.ms.µs since it started)."""
    if not log_path.exists():
        return None
    for line in log_path.read_text(errors="replace").splitlines():
        if match := CHILD_LISTENING.match(line):
            minutes, seconds, ms, us = (int(g) for g in match.groups())
            return minutes * 60 + seconds + ms / 1e3 + us / 1e6
    return None


def time_serve(server: Path, model: Path, serve_args: list[str], home: Path, name: str,
               timeout_s: float = 300.0) -> ServeTiming:
    argv = [sys.executable, "-m", "llamalaunch", "serve", str(model), "--name", name, "--no-tui",
            "--llama-server", str(server), *serve_args]
    env = {**os.environ, "LLAMALAUNCH_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    clock = LineClock(process, started)
    try:
        ready_s, ready_line = clock.wait_for(SERVE_LINES["ready"], timeout_s)
        starting_s, _ = clock.wait_for(SERVE_LINES["starting"], 1)
        loading_s, _ = clock.wait_for(SERVE_LINES["loading"], 1)
    finally:
        stop_process(process, 30)
    ctx = int(ready_line.rsplit(" ctx ", 1)[1].split()[0])
    return ServeTiming(ready_s, starting_s, loading_s, child_listening_s(home / "state" / f"{name}.log"), ctx)


# --- the parts measured on their own -------------------------------------------------------------------


def time_command(argv: list[str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        subprocess.run(argv, check=True, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - started)
    return samples[1:]


def gather(model: Path, server: Path, endpoint: str) -> PlanInputs:
    """What serve gathers before it plans: the same request as `serve --ctx 4096`."""
    from llamalaunch.plan.pipeline import PlanInputs
    from llamalaunch.plan.parse import build_request

    return PlanInputs.gather(model=str(model), demo=False, llama_server=str(server), rpc=[endpoint],
                             assume=[], overhead=[], request=build_request(ctx="4096", ctx_is_target=True),
                             need_toolchain=True)


def time_in_process(model: Path, server: Path, endpoint: str, runs: int) -> dict[str, list[float]]:
    gather_s, plan_s = [], []
    for index in range(runs + 1):
        started = time.perf_counter()
        inputs = gather(model, server, endpoint)
        gathered = time.perf_counter()
        inputs.plan()
        if index:
            gather_s.append(gathered - started)
            plan_s.append(time.perf_counter() - gathered)
    return {"in-process gather": gather_s, "in-process probe+plan": plan_s}


# --- the benchmark ---------------------------------------------------------------------------------------


def bench_model(model: Path, label: str, server: Path, endpoint: str, runs: int,
                work: Path) -> ModelResult:
    argv = list(gather(model, server, endpoint).plan().argv)
    result = ModelResult(label, argv)
    home = work / f"home-{label}"
    serve_args = ["--rpc", endpoint, "--ctx", "4096", "--port", "0"]
    for index in range(runs + 1):  # index 0: warm-up of each variant, not counted
        bare = time_bare(server, argv, work / f"bare-{label}.log")
        bare_lv5 = time_bare(server, [*argv, "-lv", "5", "--metrics"], work / f"bare-lv5-{label}.log")
        serve = time_serve(server, model, serve_args, home, f"{label}-{index}")
        if serve.ctx != int(argv[argv.index("-c") + 1]):
            raise RuntimeError(f"serve planned ctx {serve.ctx}, plan argv {argv}")
        if index:
            result.bare_s.append(bare)
            result.bare_lv5_s.append(bare_lv5)
            result.serve.append(serve)
    return result


def summary(result: ModelResult) -> dict:
    serve_s = [s.ready_s for s in result.serve]
    phases = {key: median_s([value for s in result.serve if (value := s.phases()[key]) is not None])
              for key in PHASES}
    bare, serve = median_s(result.bare_s), median_s(serve_s)
    return {"bare_s": bare, "bare_lv5_s": median_s(result.bare_lv5_s), "serve_s": serve,
            "ratio_serve_over_bare": serve / bare, "extra_s": serve - bare, "serve_phases_s": phases}


def to_json(results: list[ModelResult], parts: dict, runs: int, bin_dir: Path) -> dict:
    models = [{"model": r.model, "argv": r.argv, "median": summary(r),
               "samples": {"bare_s": r.bare_s, "bare_lv5_s": r.bare_lv5_s,
                           "serve": [asdict(s) for s in r.serve]}}
              for r in results]
    return {"benchmark": "launch", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs,
            "machine": machine(), "llama_cpp": llama_build(bin_dir), "models": models,
            "parts_median_s": {key: median_s(values) for key, values in parts.items()},
            "parts_samples_s": parts}


def format_table(data: dict) -> list[str]:
    lines = ["time to ready, median of alternating runs (seconds); ratio = serve / bare",
             (f"{'model':14} {'runs':>4} {'bare':>7} {'bare-lv5':>8} {'serve':>7} {'ratio':>6} {'extra':>6}"
              f"   serve phases: {' / '.join(PHASES)}")]
    for m in data["models"]:
        s = m["median"]
        phases = " / ".join(f"{s['serve_phases_s'][key]:.3f}" for key in PHASES)
        runs = len(m["samples"]["bare_s"])
        lines.append(f"{m['model']:14} {runs:>4} {s['bare_s']:7.3f} {s['bare_lv5_s']:8.3f} "
                     f"{s['serve_s']:7.3f} {s['ratio_serve_over_bare']:5.2f}x {s['extra_s']:6.3f}   {phases}")
    lines.append("measured apart (medians, seconds):")
    lines += [f"  {key:44} {value:.3f}" for key, value in data["parts_median_s"].items()]
    return lines


def prepare_models(quick: bool, work: Path) -> list[tuple[str, Path]]:
    from llamalaunch.model.synthetic import write_preset
    from llamalaunch.paths import cache_dir
    from llamalaunch.toolchain.demo import demo_model_path

    if quick:
        return [("tiny-llama", write_preset(work / "tiny-llama.gguf", "tiny-llama"))]
    return [("smollm2-135m", demo_model_path(cache_dir())),
            ("llama-8b", write_preset(work / "llama-8b.gguf", "llama-8b"))]


def main(argv: list[str] | None = None) -> int:
    from tests.support import start_rpc_worker

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--runs-8b", type=int, default=3, help="timed runs for the 8B shape (~12 s a load)")
    parser.add_argument("--bin-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for launch.json and launch.txt")
    parser.add_argument("--quick", action="store_true", help="a tiny model only (the smoke test)")
    args = parser.parse_args(argv)
    bin_dir = args.bin_dir or default_bin_dir()
    server = bin_dir / "llama-server"
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as scratch:
        work = Path(scratch)
        worker = start_rpc_worker(bin_dir, work)
        try:
            models = prepare_models(args.quick, work)
            parts = {label: time_command([sys.executable, "-c", code], args.runs)
                     for label, code in IMPORT_PARTS.items()}
            parts.update(time_in_process(models[0][1], server, worker.endpoint, args.runs))
            results = [bench_model(path, label, server, worker.endpoint, args.runs_8b if "8b" in label
                                   else args.runs, work) for label, path in models]
        finally:
            worker.stop()
    data = to_json(results, parts, args.runs, bin_dir)
    table = format_table(data)
    print("\n".join(table))
    if args.out:
        write_results(args.out, "launch", data, table)
        print(f"wrote {args.out}/launch.json and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
