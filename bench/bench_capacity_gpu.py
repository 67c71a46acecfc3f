"""Capacity on one GPU squeezed by a ballast: llamalaunch vs llama-server's --fit vs the true maximum.

For each free size: the context `plan --ctx max` chooses, the context llama-server's default --fit
chooses, and the true largest context that loads AND completes a prompt filling it (bisection with
real loads, --fit off), all in one run; then the same for layers with a 70B shape in partial
offload. Also: plan speed against llama-fit-params, and our per-device figures against what the
real loads printed. Prints a table and writes JSON.

Usage (on the GPU machine): python -m bench.bench_capacity_gpu --server BIN/llama-server --out DIR

`--first-serve` (issue 19): capacity on a machine's first serve. For each shape (dense, GQA, SWA,
quantized KV, one and four slots, MoE), in a fresh LLAMALAUNCH_HOME (a new machine, no calibration):
`plan --ctx max --no-calibrate` (the default overhead assumed: the old first serve), then `plan --ctx
max` (which calibrates the GPU on first sight: the new first serve), then the same plan again (calibrated,
no load); each plan loaded and its context filled; then the true maximum of the same configuration
(only -c changed) that loads and fills. Also what the GPU lost outside llama.cpp's accounting by the
end of the fill, against the calibrated figure: the run-time pool growth the margin must cover.
`--rpc ENDPOINT` runs it on RPC workers instead (the CPU smoke test), `--quick` with tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.llama_runs import Ballast, largest_passing, plan_cli, run_trial
from llamalaunch.api import BreakdownRow, BufferSize, parse_events
from tests.synthetic import SHAPES, SyntheticShape, write_preset, write_synthetic

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


# --- issue 19: capacity on a machine's first serve -----------------------------------------------------

LLAMA_8B = SHAPES["llama-8b"].shape
MHA_7B = SyntheticShape(32, 4096, 11008, 32, 32, 32000, n_ctx_train=65536)  # every head its own K/V
GEMMA3_12B = SyntheticShape(48, 3840, 15360, 16, 8, 262144, head_dim=256, n_ctx_train=131072, tied=True,
                            n_swa=1024)  # 5 of 6 blocks slide over 1,024 tokens
QWEN3_30B_A3B = SyntheticShape(n_layer=48, n_embd=2048, n_ff=6144, n_head=32, n_head_kv=4, n_vocab=151936,
                               head_dim=128, n_ctx_train=40960, n_expert=128, n_expert_used=8, n_ff_exp=768)
_TINY = SHAPES["tiny-llama"].shape


@dataclass(frozen=True)
class Shape:
    label: str
    arch: str
    shape: SyntheticShape
    file_type: str
    args: tuple[str, ...] = ()  # plan options; the plan's argv carries them to every load
    free_mib: int = 10 * 1024


FIRST_SERVE = {
    "dense": Shape("dense MHA 7B Q4_0", "llama", MHA_7B, "Q4_0"),
    "gqa": Shape("GQA 8B Q4_0", "llama", LLAMA_8B, "Q4_0"),
    "swa": Shape("SWA gemma3-12B-like Q4_0", "gemma3", GEMMA3_12B, "Q4_0", free_mib=12 * 1024),
    "qkv": Shape("8B, KV q8_0 + FA", "llama", LLAMA_8B, "Q4_0", ("-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on")),
    "np1": Shape("8B, one slot", "llama", LLAMA_8B, "Q4_0", ("-np", "1")),
    "np4-ub2048": Shape("8B, four slots, ubatch 2048", "llama", LLAMA_8B, "Q4_0", ("-np", "4", "-ub", "2048")),
    # 5 GiB: every expert on the host and the context short of the trained 40,960 (at 10 GiB it reaches it)
    "moe": Shape("MoE qwen3-30B-A3B-like Q4_K", "qwen3moe", QWEN3_30B_A3B, "Q4_K", free_mib=5 * 1024),
}
# --quick: the same cases on tiny shapes (the CPU smoke test; the figures mean nothing there)
QUICK = {
    "dense": Shape("tiny MHA", "llama", replace(_TINY, n_head_kv=4, n_ctx_train=2048), "Q4_0"),
    "gqa": Shape("tiny GQA", "llama", replace(_TINY, n_ctx_train=2048), "Q4_0"),
    "swa": Shape("tiny gemma3", "gemma3", replace(SHAPES["tiny-gemma3"].shape, n_ctx_train=2048), "Q4_0"),
    "qkv": Shape("tiny, KV q8_0", "llama", replace(_TINY, head_dim=32, n_ctx_train=2048), "Q4_0",
                 ("-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on")),
    "np1": Shape("tiny, one slot", "llama", replace(_TINY, n_ctx_train=2048), "Q4_0", ("-np", "1")),
    "np4-ub2048": Shape("tiny, ubatch 2048", "llama", replace(_TINY, n_ctx_train=2048), "Q4_0",
                        ("-np", "4", "-ub", "2048")),
    "moe": Shape("tiny qwen3moe", "qwen3moe", replace(SHAPES["tiny-qwen3moe"].shape, n_ctx_train=2048), "Q4_0"),
}


def with_ctx(argv: list[str], ctx: int) -> list[str]:
    """The plan's own argv with only the context changed: the true maximum of the same configuration."""
    changed = list(argv)
    changed[changed.index("-c") + 1] = str(ctx)
    return changed


def outside_mib(trial_log: Path, device: str, free_before_mib: int | None) -> int | None:
    """What the device lost outside llama.cpp's accounting by exit (after the fill): free before the load,
    less free at exit, less llama.cpp's own. None where free memory does not track allocations."""
    events = list(parse_events(trial_log.read_text(errors="replace").splitlines()))
    rows = [e for e in events if isinstance(e, BreakdownRow) and e.name == device and e.free_mib is not None]
    if not rows or free_before_mib is None:
        return None
    return free_before_mib - rows[-1].free_mib - rows[-1].self_mib


def load_and_fill(server: Path, plan: dict, logs: Path, label: str, device: str, free_before: int | None) -> dict:
    ctx = plan.get("ctx")
    if not ctx:
        return {"ctx": None, "ok": False, "error": plan.get("error")}
    log = logs / f"{label}.log"
    trial = run_trial(server, plan["argv"], ctx - FILL_MARGIN, log)
    planned = next((d for d in plan["devices"] if d["name"] == device), {})
    return {"ctx": ctx, "ok": trial.ok, "tail": trial.tail if not trial.ok else [],
            "planned_overhead_mib": planned.get("overhead_bytes", 0) / MIB,
            "outside_after_fill_mib": outside_mib(log, device, free_before),
            "overhead_sources": plan.get("overhead_sources"), "notes": plan.get("notes")}


def first_serve_case(server: Path, name: str, shape: Shape, logs: Path, rpc: list[str]) -> dict:
    model = logs / "models-varied" / f"{name}.gguf"  # a MoE prompt streams the experts it uses: all, as in use
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(model, shape.arch, shape.shape, shape.file_type, varied_routing=True)
    os.environ["LLAMALAUNCH_HOME"] = tempfile.mkdtemp(prefix=f"first-serve-{name}-")  # a new machine
    device = "RPC0" if rpc else "CUDA0"
    ballast = None if rpc else Ballast(shape.free_mib)
    free_before = ballast.free_mib if ballast is not None else None
    record: dict = {"case": name, "label": shape.label, "free_mib": free_before, "args": list(shape.args)}
    try:
        options = ["--ctx", "max", *(["--rpc", ",".join(rpc)] if rpc else []), *shape.args]
        assumed, _ = plan_cli(model, server, [*options, "--no-calibrate"])
        first, record["first_plan_s"] = plan_cli(model, server, [*options, "--calibrate"])
        again, record["calibrated_plan_s"] = plan_cli(model, server, [*options, "--calibrate"])
        record["calibrated_same_ctx"] = again.get("ctx") == first.get("ctx")
        record["assumed"] = load_and_fill(server, assumed, logs, f"{name}-assumed", device, free_before)
        record["first"] = load_and_fill(server, first, logs, f"{name}-first", device, free_before)
        known = [r["ctx"] for r in (record["assumed"], record["first"]) if r["ok"] and r["ctx"]]
        if known and "argv" in first:
            n_ctx_train = shape.shape.n_ctx_train

            def loads_and_fills(ctx: int) -> bool:
                return ctx <= n_ctx_train and run_trial(server, with_ctx(first["argv"], ctx), ctx - FILL_MARGIN,
                                                        logs / f"{name}-true.log").ok

            record["true_ctx"] = largest_passing(loads_and_fills, max(known), min(max(known) + 512, n_ctx_train),
                                                 256)
    finally:
        if ballast is not None:
            ballast.close()
    return record


def first_serve_table(records: list[dict]) -> list[str]:
    lines = [(f"{'case':<12}{'assumed':>9}{'first':>9}{'true':>9}{'asm/true':>10}{'first/true':>11}"
              f"{'ok(a,f)':>10}{'calib s':>9}{'planned oh':>11}{'outside':>9}")]
    for r in records:
        true = r.get("true_ctx") or 0
        a, f = r.get("assumed", {}), r.get("first", {})
        share = [f"{(side.get('ctx') or 0) / true:.1%}" if true else "-" for side in (a, f)]
        lines.append(f"{r['case']:<12}{a.get('ctx') or 0:>9}{f.get('ctx') or 0:>9}{true:>9}{share[0]:>10}{share[1]:>11}"
                     f"{str(a.get('ok'))[0] + ',' + str(f.get('ok'))[0]:>10}{r.get('first_plan_s', 0):>9.1f}"
                     f"{f.get('planned_overhead_mib') or 0:>11.0f}{f.get('outside_after_fill_mib') or 0:>9}")
    ratios = [(r.get("first", {}).get("ctx") or 0) / r["true_ctx"] for r in records if r.get("true_ctx")]
    failed = sum(1 for r in records for side in ("assumed", "first") if not r.get(side, {}).get("ok"))
    if ratios:
        lines.append(f"first serve (calibrated on first sight): worst {min(ratios):.1%}, median "
                     f"{statistics.median(ratios):.1%} of the true maximum; failed loads or fills: {failed}")
    return lines


def first_serve(argv_args: argparse.Namespace) -> int:
    cases = QUICK if argv_args.quick else FIRST_SERVE
    names = argv_args.cases or list(cases)
    (argv_args.logs / "models").mkdir(parents=True, exist_ok=True)
    records = []
    for name in names:
        records.append(first_serve_case(argv_args.server, name, cases[name], argv_args.logs, argv_args.rpc))
        print(json.dumps(records[-1]), flush=True)
        # after each case: a call cut short at its time limit keeps what it measured
        (argv_args.out / "first_serve.json").write_text(json.dumps(records, indent=2))
    table = first_serve_table(records)
    (argv_args.out / "first_serve.txt").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, default=Path("/tmp/capacity-logs"))
    parser.add_argument("--free-gib", type=int, nargs="*", default=[6, 10, 24])
    parser.add_argument("--skip-70b", action="store_true")
    parser.add_argument("--first-serve", action="store_true", help="issue 19: capacity on a new machine's first serve")
    parser.add_argument("--cases", nargs="*", help="--first-serve cases (default: all)")
    parser.add_argument("--rpc", nargs="*", default=[], help="--first-serve on these RPC workers (no ballast)")
    parser.add_argument("--quick", action="store_true", help="--first-serve with tiny shapes (CPU smoke test)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    if args.first_serve:
        return first_serve(args)
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
    return 0


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
    sys.exit(main())

