"""How close the analytic memory estimate is to what llama-server really allocates.

Runs a matrix of real loads — model families (synthetic GGUFs, plus the SmolLM2 demo model when it is
cached) × ctx 4k..128k × -np 1/4 × -ub 512/2048 × K/V f16/q8_0/q4_0 × 1-3 devices — on CPU
ggml-rpc-server workers, with `--fit off` and explicit -dev/-ngl/-ts so llama.cpp places exactly what
was estimated. Prints planned vs measured per device and component, the median and worst error per
family, and writes everything as JSON.

    python -m bench.bench_accuracy                 # a seeded sample of the matrix (a few minutes)
    python -m bench.bench_accuracy --full          # the whole matrix (hours on 2 cores)
    python -m bench.bench_accuracy --families llama,gemma3 --samples 4 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from llamalaunch.api import (
    MIB,
    BufferSize,
    ComponentRow,
    LaunchError,
    Placement,
    Request,
    SlotRange,
    buffer_device,
    compare,
    estimate,
    load_profile,
    measure_load,
    within_tolerance,
)
from tests.synthetic import write_preset

MID: dict[str, object] = {"n_layer": 8, "n_embd": 1024, "n_ff": 2816, "n_head": 16, "n_head_kv": 4, "n_vocab": 32000}
_QWEN_NEXT: dict[str, object] = {**MID, "head_dim": 64, "n_expert": 8, "n_ff_exp": 512, "n_ff_shexp": 512,
                                 "ssm_d_inner": 1024, "ssm_d_state": 64, "ssm_n_group": 4, "ssm_n_head": 16}
_NEMOTRON_H: dict[str, object] = {**MID, "ssm_d_inner": 2048, "ssm_d_state": 64, "ssm_n_head": 32, "ssm_n_group": 8,
               "attention_layers": (2, 6), "ffn_layers": (1, 3, 5, 7)}
# family -> (synthetic preset, shape changes); "smollm2" is the real demo model
FAMILIES: dict[str, tuple[str, dict[str, object]]] = {
    "llama": ("tiny-llama", MID),
    "qwen2": ("tiny-qwen2", MID),
    "qwen3": ("tiny-qwen3", {**MID, "head_dim": 64}),
    "gemma2": ("tiny-gemma2", {**MID, "head_dim": 64, "n_swa": 512}),
    "gemma3": ("tiny-gemma3", {**MID, "n_layer": 7, "head_dim": 64, "n_swa": 512}),
    "mixtral": ("tiny-mixtral", MID),
    "qwen3moe": ("tiny-qwen3moe", {**MID, "head_dim": 64, "n_ff_exp": 512}),
    "deepseek2": ("tiny-deepseek2", {**MID, "n_layer": 6, "n_head_kv": 16, "n_ff_exp": 512,
                                     "q_lora_rank": 256, "kv_lora_rank": 128, "rope_dim": 32, "head_dim": 96}),
    "deepseek2-nomla": ("tiny-deepseek2-nomla", {**MID, "n_layer": 6, "n_head_kv": 16, "n_ff_exp": 512,
                                                 "q_lora_rank": 256, "kv_lora_rank": 128, "rope_dim": 32,
                                                 "head_dim": 96}),
    "phi3": ("tiny-phi3", {**MID, "n_head_kv": 16}),
    "mamba2": ("tiny-mamba2", {**MID, "n_head": 0, "n_head_kv": 0, "n_ff": 0, "ssm_d_inner": 2048,
                               "ssm_d_state": 64, "ssm_n_head": 32}),
    "granitehybrid": ("tiny-granitehybrid", {**MID, "ssm_d_inner": 2048, "ssm_d_state": 64, "ssm_n_head": 32,
                                             "attention_layers": (1, 5)}),
    "lfm2": ("tiny-lfm2", {**MID, "attention_layers": (1, 5)}),
    # the 2026 families (issue 21)
    "qwen3next": ("tiny-qwen3next", _QWEN_NEXT),
    "qwen35": ("tiny-qwen35", {**_QWEN_NEXT, "n_expert": 0, "n_expert_used": 0, "n_ff_exp": 0, "n_ff_shexp": 0,
                               "ssm_n_group": 16}),
    "qwen35moe": ("tiny-qwen35moe", _QWEN_NEXT),
    "gpt-oss": ("tiny-gpt-oss", {**MID, "head_dim": 64, "n_expert": 8, "n_ff_exp": 512, "n_swa": 128}),
    "glm4moe": ("tiny-glm4moe", {**MID, "head_dim": 64, "n_expert": 8, "n_ff_exp": 512}),
    "glm4moe-nextn": ("tiny-glm4moe", {**MID, "head_dim": 64, "n_expert": 8, "n_ff_exp": 512, "n_nextn": 1}),
    "llama4": ("tiny-llama4", {**MID, "head_dim": 64, "n_expert": 8, "n_ff_exp": 512}),
    "mistral3": ("tiny-mistral3", {**MID, "head_dim": 128}),
    "gemma4": ("tiny-gemma4", {**MID, "head_dim": 128, "head_dim_swa": 64, "n_head_kv_full": 2, "n_swa": 512}),
    "gemma4-shared": ("tiny-gemma4", {**MID, "head_dim": 128, "head_dim_swa": 64, "n_head_kv_full": 2,
                                      "n_swa": 512, "n_kv_shared": 2}),
    "gemma4-moe": ("tiny-gemma4", {**MID, "head_dim": 128, "head_dim_swa": 64, "n_head_kv_full": 2, "n_swa": 512,
                                   "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 512}),
    "gemma4-ple": ("tiny-gemma4", {**MID, "head_dim": 128, "head_dim_swa": 64, "n_head_kv_full": 2, "n_swa": 512,
                                   "n_kv_shared": 2, "n_embd_per_layer": 256}),
    "minimax-m2": ("tiny-minimax-m2", {**MID, "head_dim": 64, "n_expert": 8, "n_ff": 512}),
    "nemotron_h": ("tiny-nemotron_h", _NEMOTRON_H),
    "nemotron_h_moe": ("tiny-nemotron_h_moe", {**_NEMOTRON_H, "n_expert": 8, "n_ff_exp": 512, "n_ff_shexp": 1024}),
    "deepseek4": ("tiny-deepseek4", {**MID, "n_head_kv": 1, "head_dim": 128, "rope_dim": 64, "q_lora_rank": 256,
                                     "n_expert": 8, "n_ff_exp": 512, "o_groups": 4, "o_lora_rank": 128,
                                     "indexer_n_head": 8, "indexer_head_dim": 128, "indexer_top_k": 64,
                                     "compress_ratios": (0, 0, 4, 128, 4, 128, 4, 128)}),
    # long-tail archs, planned with the generic estimate (+25% / -0% on each device's total)
    "smollm3": ("tiny-smollm3", MID),
    "exaone": ("tiny-exaone", MID),
    "ernie4_5": ("tiny-ernie4_5", MID),
    "granite": ("tiny-granite", MID),
    "seed_oss": ("tiny-seed_oss", {**MID, "head_dim": 128}),
    "olmo2": ("tiny-olmo2", MID),
    "smollm2": ("", {}),
}
AXES: dict[str, tuple[object, ...]] = {
    "ctx": (4096, 16384, 65536, 131072),
    "parallel": (1, 4),
    "ubatch": (512, 2048),
    "cache": ("f16", "q8_0", "q4_0"),
    "devices": (1, 2, 3),
}


@dataclass(frozen=True)
class Case:
    family: str
    ctx: int
    parallel: int
    ubatch: int
    cache: str
    devices: int


@dataclass(frozen=True)
class CaseResult:
    case: Case
    rows: tuple[ComponentRow, ...]
    error: str | None = None
    generic: bool = False  # planned with the generic estimate (an arch without an exact family)
    cache_lines: tuple[tuple[str, int], ...] = ()  # printed KV/state buffers per device (deepseek4 prints 7)


GENERIC_OVER = 0.25  # the generic estimate: each device's total within +25% / -0% of the real load


def device_totals(rows: tuple[ComponentRow, ...]) -> list[ComponentRow]:
    """Weights + KV + compute per device (and the host)."""
    devices = dict.fromkeys(row.device for row in rows)
    return [ComponentRow(device, "total", sum(r.planned_bytes for r in rows if r.device == device),
                           sum(r.measured_bytes for r in rows if r.device == device)) for device in devices]


def generic_within(row: ComponentRow) -> bool:
    return 0 <= row.error_bytes <= row.measured_bytes * GENERIC_OVER


def row_ok(row: ComponentRow, generic: bool, cache_lines: int = 0) -> bool:
    """Generic: only a device's total counts (+25% / -0%). Exact: each component's tolerance, and each
    device's total within max(1%, 32 MiB). A cache of more than two printed buffers rounds by 0.005 MiB each."""
    if row.component == "total":
        return generic_within(row) if generic else abs(row.error_bytes) <= max(row.measured_bytes // 100, 32 * MIB)
    if row.component == "kv" and cache_lines > 2:
        return generic or abs(row.error_bytes) <= cache_lines * MIB // 200 + 8
    return generic or within_tolerance(row)


def cache_lines(events: tuple[object, ...], placement: Placement, endpoints: list[str]) -> tuple[tuple[str, int], ...]:
    """How many KV/state buffer lines llama-server printed for each device."""
    counts: dict[str, int] = {}
    for event in events:
        if isinstance(event, BufferSize) and not event.at_exit and event.kind in ("kv", "rs"):
            device = buffer_device(event.buffer, endpoints)
            counts[device] = counts.get(device, 0) + 1
    return tuple(sorted(counts.items()))


def all_cases(families: list[str]) -> list[Case]:
    keys = list(AXES)
    return [Case(family, **dict(zip(keys, values)))  # type: ignore[arg-type]
            for family in families for values in itertools.product(*(AXES[k] for k in keys))]


def sampled_cases(families: list[str], per_family: int, seed: int) -> list[Case]:
    """Per family, `per_family` cases that between them visit every value of every axis."""
    rng = random.Random(seed)
    chosen: list[Case] = []
    for family in families:
        columns = {key: rng.sample(list(values), len(values)) for key, values in AXES.items()}
        for i in range(per_family):
            picks = {key: column[i % len(column)] for key, column in columns.items()}
            chosen.append(Case(family, **picks))  # type: ignore[arg-type]
    return chosen


def model_path(family: str, models_dir: Path) -> str:
    if family == "smollm2":
        from llamalaunch.api import demo_model_path
        cache = Path(os.environ.get("LLAMALAUNCH_CACHE", Path.home() / ".cache" / "llamalaunch"))
        return str(demo_model_path(cache))
    preset, changes = FAMILIES[family]
    path = models_dir / f"{family}.gguf"
    if not path.exists():
        write_preset(path, preset, **changes)
    return str(path)


def even_placement(n_slots: int, n_devices: int) -> Placement:
    counts = [n_slots // n_devices + (1 if i < n_slots % n_devices else 0) for i in range(n_devices)]
    ranges, first = [], 0
    for index, count in enumerate(counts):
        ranges.append(SlotRange(f"RPC{index}", "RPC", first, count))
        first += count
    return Placement(tuple(ranges))


def run_case(case: Case, bin_dir: Path, endpoints: list[str], models_dir: Path, generic: bool = False) -> CaseResult:
    path = model_path(case.family, models_dir)
    profile = load_profile(path, allow_unknown_arch=True, generic=generic)
    request = Request(n_parallel=case.parallel, n_ubatch=case.ubatch, cache_type_k=case.cache,
                      cache_type_v=case.cache)
    placement = even_placement(profile.n_slots, case.devices)
    planned = estimate(profile, placement, request, case.ctx)
    try:
        measured = measure_load(bin_dir, path, placement, request, case.ctx, endpoints[:case.devices],
                                log_dir=models_dir / "logs")
    except LaunchError as error:
        return CaseResult(case, (), str(error), profile.generic_estimate)
    return CaseResult(case, tuple(compare(planned, measured.estimate)), None, profile.generic_estimate,
                      cache_lines(measured.events, placement, endpoints[:case.devices]))


def start_workers(bin_dir: Path, count: int, log_dir: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    from tests.support import free_port, wait_for_port
    processes, endpoints = [], []
    for _ in range(count):
        port = free_port()
        log = open(log_dir / f"rpc-{port}.log", "wb")  # noqa: SIM115 (the worker keeps it)
        processes.append(subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                           "-t", "1"], stdout=log, stderr=subprocess.STDOUT))
        wait_for_port(port)
        endpoints.append(f"127.0.0.1:{port}")
    return processes, endpoints


def summary(results: list[CaseResult]) -> dict[str, dict[str, dict[str, float]]]:
    """family -> component -> median/worst absolute error (MiB) and worst relative error (%). Exact
    families pass on each component's tolerance; generic ones on each device's total (+25% / -0%)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for family in sorted({r.case.family for r in results}):
        done = [r for r in results if r.case.family == family]
        generic = any(r.generic for r in done)
        rows = [(row, dict(r.cache_lines).get(row.device, 0)) for r in done for row in (*r.rows, *device_totals(r.rows))]
        table[family] = {}
        for component in ("weights", "kv", "compute", "total"):
            checked = [(row, lines) for row, lines in rows if row.component == component and row.measured_bytes]
            errors = [row for row, _ in checked]
            if not errors:
                continue
            absolute = [abs(row.error_bytes) / MIB for row in errors]
            table[family][component] = {
                "median_mib": round(statistics.median(absolute), 3),
                "worst_mib": round(max(absolute), 3),
                "worst_pct": round(100 * max(abs(row.relative) for row in errors), 2),
                "under_mib": round(min(min(row.error_bytes for row in errors), 0) / MIB, 3),
                "pass": all(row_ok(row, generic, lines) for row, lines in checked),
            }
    return table


def format_case(result: CaseResult) -> list[str]:
    c = result.case
    head = f"{c.family:16} ctx={c.ctx:<6} np={c.parallel} ub={c.ubatch:<4} kv={c.cache:<4} dev={c.devices}"
    if result.error:
        return [f"{head}  FAILED: {result.error}"]
    lines = [head + ("  (generic estimate)" if result.generic else "")]
    for row in (*result.rows, *device_totals(result.rows)):
        if row.measured_bytes == 0 and row.planned_bytes == 0:
            continue
        mark = "" if row_ok(row, result.generic, dict(result.cache_lines).get(row.device, 0)) else \
            "  <-- out of tolerance"
        lines.append(f"    {row.device:5} {row.component:8} planned {row.planned_bytes / MIB:10.2f}  measured "
                     f"{row.measured_bytes / MIB:10.2f}  error {row.error_bytes / MIB:+8.2f} MiB "
                     f"({100 * row.relative:+6.2f}%){mark}")
    return lines


def format_summary(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [f"{'family':16} {'component':9} {'median MiB':>10} {'worst MiB':>10} {'worst %':>8} "
             f"{'most under':>10}  pass"]
    for family, components in table.items():
        for component, stats in components.items():
            lines.append(f"{family:16} {component:9} {stats['median_mib']:10.3f} {stats['worst_mib']:10.3f} "
                         f"{stats['worst_pct']:8.2f} {stats['under_mib']:10.3f}  {'yes' if stats['pass'] else 'NO'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run the whole matrix")
    parser.add_argument("--samples", type=int, default=6, help="cases per family when sampling")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--bin-dir", default=os.environ.get("LLAMALAUNCH_BIN_DIR", "/tmp/llbuild/bin"))
    parser.add_argument("--json", default="bench_accuracy.json", help="where to write the results")
    parser.add_argument("--generic", action="store_true",
                        help="plan every family with the generic estimate, as an unknown arch would be")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    cases = all_cases(families) if args.full else sampled_cases(families, args.samples, args.seed)
    bin_dir = Path(args.bin_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    (work / "logs").mkdir()
    workers, endpoints = start_workers(bin_dir, max(AXES["devices"]), work)  # type: ignore[arg-type,type-var]
    results: list[CaseResult] = []
    try:
        for case in cases:
            result = run_case(case, bin_dir, endpoints, work, args.generic)
            results.append(result)
            print("\n".join(format_case(result)), flush=True)
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(10)
    table = summary(results)
    print("\n" + "\n".join(format_summary(table)))
    with open(args.json, "w") as out:
        json.dump({"cases": [{"case": asdict(r.case), "error": r.error, "rows": [asdict(row) for row in r.rows]}
                             for r in results], "summary": table}, out, indent=1)
    print(f"\nwrote {args.json}")
    return 0 if all(stats["pass"] for comps in table.values() for stats in comps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
