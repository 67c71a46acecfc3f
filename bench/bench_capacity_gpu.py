"""Capacity on one GPU squeezed by a ballast: llamalaunch vs llama-server's --fit vs the true maximum.

For each free size: the context `plan --ctx max` chooses, the context llama-server's default --fit
chooses, and the true largest context that loads AND completes a prompt filling it (bisection with
real loads, --fit off), all in one run; then the same for layers with a 70B shape in partial
offload. Also: plan speed against llama-fit-params, and our per-device figures against what the
real loads printed. Prints a table and writes JSON.

Usage (on the GPU machine): python bench/bench_capacity_gpu.py --server BIN/llama-server --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.llama_runs import Ballast, largest_passing, plan_cli, run_trial  # noqa: E402
from llamalaunch.launch.logparse import BreakdownRow, BufferSize, parse_events  # noqa: E402
from llamalaunch.model.synthetic import write_preset  # noqa: E402

FILL_MARGIN = 32  # tokens left for the one generated token and the template
MIB = 1 << 20


def fit_params_time(server: Path, model: Path, args: list[str]) -> dict:
    binary = server.parent / "llama-fit-params"
    started = time.perf_counter()
    result = subprocess.run([str(binary), "-m", str(model), *args], capture_output=True, text=True, timeout=300)
    return {"seconds": time.perf_counter() - started, "stdout": result.stdout.strip()[-200:]}


def buffers(trial_log: Path, plan: dict) -> dict:
    """Planned vs printed bytes on the GPU, and the memory llama.cpp does not account."""
    events = list(parse_events(trial_log.read_text(errors="replace").splitlines()))
    seen: dict[str, float] = {}
    for event in events:
        if isinstance(event, BufferSize) and not event.at_exit and event.buffer.startswith("CUDA0"):
            seen[event.kind] = seen.get(event.kind, 0) + event.bytes / MIB
    rows = [e for e in events if isinstance(e, BreakdownRow) and e.name == "CUDA0"]
    device = next((d for d in plan.get("devices", []) if d["name"] == "CUDA0"), None)
    return {"printed_mib": seen,
            "planned_mib": {k: device[f"{k}_bytes"] / MIB for k in ("weights", "kv", "compute", "overhead")}
            if device else {},
            "unaccounted_mib": rows[-1].unaccounted_mib if rows else None}


def full_offload(server: Path, model: Path, free_gib: int, out: Path, n_ctx_train: int) -> dict:
    ballast = Ballast(free_gib * 1024 - 0)
    record: dict = {"model": model.name, "free_gib_target": free_gib, "ballast_free_mib": ballast.free_mib}
    try:
        plan, plan_s = plan_cli(model, server, ["--ctx", "max"])
        record["plan_cli_s"] = plan_s
        record["fit_params"] = fit_params_time(server, model, [])
        ours_ctx = plan.get("ctx")
        record["ours_ctx"] = ours_ctx
        log = out / f"ours-{model.stem}-{free_gib}.log"
        ours = run_trial(server, plan["argv"], ours_ctx - FILL_MARGIN, log) if ours_ctx else None
        record["ours_ok"] = bool(ours and ours.ok)
        record["ours_tail"] = ours.tail if ours else plan.get("error")
        if ours:
            record["accuracy"] = buffers(log, plan)
        fit = run_trial(server, ["-m", str(model)], None, out / f"fit-{model.stem}-{free_gib}.log")
        record["fit_ctx"] = fit.n_ctx
        if fit.ready and fit.n_ctx:
            fit = run_trial(server, ["-m", str(model)], fit.n_ctx - FILL_MARGIN, out / f"fit2-{model.stem}.log")
        record["fit_ok"] = fit.ok

        def loads_and_fills(ctx: int) -> bool:
            if ctx > n_ctx_train:
                return False
            argv = ["-m", str(model), "-c", str(ctx), "-ngl", "999", "--fit", "off", "-np", "4", "-kvu"]
            return run_trial(server, argv, ctx - FILL_MARGIN, out / f"true-{model.stem}.log").ok

        known = max([c for c, ok in ((ours_ctx, record["ours_ok"]), (record["fit_ctx"], record["fit_ok"])) if ok and c]
                    or [4096])
        record["true_ctx"] = largest_passing(loads_and_fills, known, min(known + 1024, n_ctx_train), 256)
    finally:
        ballast.close()
    return record


def partial_offload(server: Path, model: Path, free_gib: int, ctx: int, out: Path, n_slots: int) -> dict:
    ballast = Ballast(free_gib * 1024)
    record: dict = {"model": model.name, "free_gib_target": free_gib, "ballast_free_mib": ballast.free_mib,
                    "ctx": ctx}
    fill = 256
    try:
        plan, plan_s = plan_cli(model, server, ["--ctx", str(ctx), "--cpu-spill"])
        record["plan_cli_s"] = plan_s
        record["fit_params"] = fit_params_time(server, model, ["-c", str(ctx)])
        record["ours_layers"] = plan.get("n_gpu_layers")
        ours = run_trial(server, plan["argv"], fill, out / f"ours-{model.stem}-{free_gib}.log") \
            if "argv" in plan else None
        record["ours_ok"] = bool(ours and ours.ok)
        fit = run_trial(server, ["-m", str(model), "-c", str(ctx)], fill, out / f"fit-{model.stem}-{free_gib}.log")
        record["fit_layers"], record["fit_ok"] = fit.offloaded, fit.ok

        def loads(layers: int) -> bool:
            if layers > n_slots:
                return False
            argv = ["-m", str(model), "-c", str(ctx), "-ngl", str(layers), "--fit", "off", "-np", "4", "-kvu"]
            return run_trial(server, argv, fill, out / f"true-{model.stem}.log").ok

        known = max([v for v, ok in ((record["ours_layers"], record["ours_ok"]), (record["fit_layers"],
                                                                                  record["fit_ok"])) if ok and v]
                    or [1])
        record["true_layers"] = largest_passing(loads, known, known + 1, 1)
    finally:
        ballast.close()
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, default=Path("/tmp/capacity-logs"))
    parser.add_argument("--free-gib", type=int, nargs="*", default=[6, 10, 24])
    parser.add_argument("--skip-70b", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    models = args.logs / "models"
    models.mkdir(exist_ok=True)
    m8 = write_preset(models / "llama-8b.gguf", "llama-8b")
    results: dict = {"full": [], "partial": []}
    for free in args.free_gib:
        results["full"].append(full_offload(args.server, m8, free, args.logs, 131072))
        print(json.dumps(results["full"][-1]), flush=True)
    if not args.skip_70b:
        m70 = write_preset(models / "llama-70b.gguf", "llama-70b")
        results["partial"].append(partial_offload(args.server, m70, 10, 8192, args.logs, 81))
        print(json.dumps(results["partial"][-1]), flush=True)
    (args.out / "capacity.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    print(f"{'model':<14}{'free':>6}{'ours':>9}{'fit':>9}{'true':>9}{'ours/true':>11}{'fit/true':>10}  ok(ours,fit)")
    for r in results["full"]:
        true = r.get("true_ctx") or 0
        print(f"{r['model']:<14}{r['free_gib_target']:>5}G{r.get('ours_ctx') or 0:>9}{r.get('fit_ctx') or 0:>9}"
              f"{true:>9}{(r.get('ours_ctx') or 0) / max(true, 1):>11.1%}{(r.get('fit_ctx') or 0) / max(true, 1):>10.1%}"
              f"  {r.get('ours_ok')},{r.get('fit_ok')}")
    for r in results["partial"]:
        true = r.get("true_layers") or 0
        print(f"{r['model']:<14}{r['free_gib_target']:>5}G{r.get('ours_layers') or 0:>9}{r.get('fit_layers') or 0:>9}"
              f"{true:>9}{(r.get('ours_layers') or 0) / max(true, 1):>11.1%}"
              f"{(r.get('fit_layers') or 0) / max(true, 1):>10.1%}  {r.get('ours_ok')},{r.get('fit_ok')}  (layers)")


if __name__ == "__main__":
    main()

