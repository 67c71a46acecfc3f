"""Start-up: `llamalaunch plan --json` for what-if devices, side by side with the interpreter's own start.

Each row is a fresh process, run N times in rotation (one row after the other, so a busy machine weighs on
every row alike) after one warm-up run each (bytecode written); the table gives the median and the
minimum of the wall time and the median CPU time (user + system) of the process:

  python -c pass              the interpreter alone (site, the editable install's finder)
  python -c "import typer"    plus the CLI framework
  plan demo                   llamalaunch plan DEMO.gguf --assume CUDA0=8GiB --json
  plan --demo                 the same through --demo (finds and checks the cached demo model)
  plan synthetic              llamalaunch plan tiny-llama.gguf --assume CUDA0=8GiB --json

and, once, which of the heavy third-party packages the `plan` row imported (none is the aim: rich,
psutil, pynvml, prometheus_client, pydantic, numpy, gguf). The target is a median of 0.15 s for the plan
rows; on a machine shared with other work the CPU column is the steadier figure.

    python -m bench.bench_startup --out bench/results/cpu-2026-12-07
    python -m bench.bench_startup --runs 3                              # a quick look
    python -m bench.bench_startup --baseline /tmp/main-checkout         # plus the plan rows of another tree

With --baseline DIR the plan rows are also run as `python -m llamalaunch` from DIR (another checkout, e.g.
`git worktree add DIR COMMIT`), in the same rotation: before and after side by side on one machine.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.llama_runs import machine, write_results

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.15
HEAVY = ("rich", "psutil", "pynvml", "prometheus_client", "pydantic", "pydantic_core", "numpy", "gguf", "typer_slim")
_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.MULTILINE)


def llamalaunch_command() -> list[str]:
    """The installed `llamalaunch` script beside this interpreter, as users run it; `-m` without one."""
    script = Path(sys.executable).with_name("llamalaunch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llamalaunch"]


def rows(demo: Path, synthetic: Path, baseline: Path | None = None) -> dict[str, list[str]]:
    what_if = ["--assume", "CUDA0=8GiB", "--json"]
    found = {"python -c pass": [sys.executable, "-c", "pass"],
             "python -c 'import typer'": [sys.executable, "-c", "import typer"]}
    trees = {"": llamalaunch_command(), **({" (baseline)": [sys.executable, "-m", "llamalaunch"]} if baseline else {})}
    for suffix, command in trees.items():
        found.update({f"plan demo{suffix}": [*command, "plan", str(demo), *what_if],
                      f"plan --demo{suffix}": [*command, "plan", "--demo", *what_if],
                      f"plan synthetic{suffix}": [*command, "plan", str(synthetic), *what_if]})
    return found


def tree_of(label: str, baseline: Path | None) -> Path:
    return baseline if baseline is not None and label.endswith("(baseline)") else REPO_ROOT


def child_env(tree: Path = REPO_ROOT) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env = {**env, "PYTHONUNBUFFERED": "1"}  # bytecode is written as on a user's machine
    return env if tree == REPO_ROOT else {**env, "PYTHONPATH": str(tree)}


def run_once(argv: list[str], tree: Path = REPO_ROOT) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run; the output must be what the command promises."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=tree, env=child_env(tree), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or ("plan" in argv and '"schema": 1' not in done.stdout):
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def heavy_imports(argv: list[str]) -> list[str]:
    """The HEAVY packages a run imports, from `python -X importtime`."""
    command = [sys.executable, "-X", "importtime", "-m", "llamalaunch", *argv[argv.index("plan"):]]
    done = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, check=True)
    packages = {name.split(".")[0] for name in _IMPORTED.findall(done.stderr)}
    return sorted(packages.intersection(HEAVY))


def measure(commands: dict[str, list[str]], runs: int,
            baseline: Path | None = None) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {label: {"wall_s": [], "cpu_s": []} for label in commands}
    for index in range(runs + 1):  # index 0: warm-up (bytecode, page cache), not counted
        for label, argv in commands.items():
            wall, cpu = run_once(argv, tree_of(label, baseline))
            if index:
                samples[label]["wall_s"].append(wall)
                samples[label]["cpu_s"].append(cpu)
    return samples


def summary(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {label: {"wall_median_s": statistics.median(s["wall_s"]), "wall_min_s": min(s["wall_s"]),
                    "cpu_median_s": statistics.median(s["cpu_s"])}
            for label, s in samples.items()}


def format_table(data: dict) -> list[str]:
    lines = [(f"start-up, {data['runs']} runs each in rotation after a warm-up (seconds); target for the plan "
              f"rows: median <= {TARGET_S}"),
             f"{'command':28} {'wall median':>11} {'wall min':>9} {'CPU median':>10}"]
    for label, s in data["summary"].items():
        lines.append(f"{label:28} {s['wall_median_s']:11.3f} {s['wall_min_s']:9.3f} {s['cpu_median_s']:10.3f}")
    heavy = ", ".join(data["heavy_imports_of_plan"]) or "none"
    lines.append(f"heavy packages imported by `plan --json` ({', '.join(HEAVY)}): {heavy}")
    lines.append(f"machine: {data['machine']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from llamalaunch.api import cache_dir, demo_model_path
    from tests.synthetic import write_preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per row (after one warm-up)")
    parser.add_argument("--out", type=Path, default=None, help="folder for startup.json and startup.txt")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout, timed beside this one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        synthetic = write_preset(Path(scratch) / "tiny-llama.gguf", "tiny-llama")
        commands = rows(demo_model_path(cache_dir()), synthetic, args.baseline)
        started_machine = machine()
        samples = measure(commands, args.runs, args.baseline)
        heavy = heavy_imports(commands["plan demo"])
    data = {"benchmark": "startup", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": args.runs,
            "machine": started_machine, "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "commands": commands,
            "summary": summary(samples), "samples": samples, "heavy_imports_of_plan": heavy, "target_s": TARGET_S,
            "baseline": str(args.baseline) if args.baseline else None}
    table = format_table(data)
    print("\n".join(table))
    if args.out:
        write_results(args.out, "startup", data, table)
        print(f"wrote {args.out}/startup.json and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
