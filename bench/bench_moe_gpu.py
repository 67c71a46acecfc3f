"""MoE on a squeezed GPU: llamalaunch's expert spill vs llama-server's --fit vs the best --n-cpu-moe N.

Issue 17's benchmark. For each case (a MoE shape, the free memory a ballast leaves, a context): plan
with `llamalaunch plan`, then load each contender in the same run and measure, median of three,
generation and prompt tok/s (a 1,024-token prompt, 128 generated tokens, llama-server's own timings),
the context it got, host RSS of llama-server, load time, on models with varied routing (tokens spread
over the experts as in a real model). Memory checks run on the zero-weight twin of each model (same
shapes, so the same buffers; every token routes to the same experts, so prompts stream only those to
the GPU and are fast): a prompt filling the context with each contender's argv (the run-time
allocations happen there), the `--n-cpu-moe` search, and `--ctx max` against the true largest context
with every expert on the host (dense parts + KV on the GPU: what --ctx max promises).

Generation moves ±10-15% between loads of the same argv: `--rounds N` loads the contenders N times in turn and
prints each one's pooled median, so a comparison rests on more than one load of each.

Usage (on the GPU machine): python -m bench.bench_moe_gpu --server BIN/llama-server --out DIR [--cases a d]
    [--parts ours,fit] [--rounds 3] [--threads 8,12] [--no-fill] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.llama_runs import (
    N_CTX,
    Ballast,
    free_port,
    largest_passing,
    plan_cli,
    post,
    run_trial,
    stop_process,
    timed_completions,
)
from tests.synthetic import SyntheticShape, write_synthetic

MIB = 1 << 20
PROMPT_TOKENS = 1024
GEN_TOKENS = 128
FILL_MARGIN = 160  # tokens left for the generated ones

QWEN3_30B_A3B = SyntheticShape(n_layer=48, n_embd=2048, n_ff=6144, n_head=32, n_head_kv=4, n_vocab=151936,
                               head_dim=128, n_ctx_train=40960, n_expert=128, n_expert_used=8, n_ff_exp=768)
# gpt-oss-120b-like (issue 17 case b): 36 blocks, 128 experts, top-4, SWA 128 on alternate blocks
GPT_OSS_120B = SyntheticShape(n_layer=36, n_embd=2880, n_ff=2880, n_head=64, n_head_kv=8, n_vocab=201088,
                              head_dim=64, n_ctx_train=131072, n_expert=128, n_expert_used=4, n_ff_exp=2880,
                              n_swa=128)
# GLM-4.5-Air-like (case c): 46 blocks (one NextN), dense first block, 128 experts top-8, a shared expert
GLM_45_AIR = SyntheticShape(n_layer=47, n_embd=4096, n_ff=10944, n_head=96, n_head_kv=8, n_vocab=151552,
                            head_dim=128, n_ctx_train=131072, n_expert=128, n_expert_used=8, n_ff_exp=1408,
                            n_expert_shared=1, n_layer_dense_lead=1, n_nextn=1)
MODELS = {"qwen3-30b-a3b-q4_k.gguf": ("qwen3moe", QWEN3_30B_A3B, "Q4_K"),
          "gpt-oss-120b-like-q4_0.gguf": ("gpt-oss", GPT_OSS_120B, "Q4_0"),
          "glm-4.5-air-like-q4_0.gguf": ("glm4moe", GLM_45_AIR, "Q4_0")}


@dataclass
class Case:
    name: str
    model: str
    free_mib: int
    ctx: int
    rpc_budget_mib: int = 0  # > 0: an RPC worker on the same GPU with this budget, CUDA0 with cuda_budget_mib
    cuda_budget_mib: int = 0
    ours_args: list[str] = field(default_factory=list)


CASES = {
    "a": Case("a: qwen3-30b-a3b @10GiB", "qwen3-30b-a3b-q4_k.gguf", 10 * 1024, 16384),
    # the worker's own CUDA context and pools come out of the free memory too: leave room for them
    "b": Case("b: gpt-oss-120b-like @24GiB", "gpt-oss-120b-like-q4_0.gguf", 24 * 1024, 32768),
    "c": Case("c: glm-4.5-air-like @16GiB", "glm-4.5-air-like-q4_0.gguf", 16 * 1024, 32768),
    "d": Case("d: qwen3-30b-a3b CUDA0 6GiB + RPC0 4GiB", "qwen3-30b-a3b-q4_k.gguf", 11 * 1024, 16384,
              rpc_budget_mib=4 * 1024, cuda_budget_mib=6 * 1024),
}


def write_models(folder: Path, varied_routing: bool, names: set[str]) -> None:
    """The models named (each takes a minute or so to write on a GPU machine: only those the cases use)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (arch, shape, file_type) in MODELS.items():
        if name in names and not (folder / name).exists():
            write_synthetic(folder / name, arch, shape, file_type, varied_routing=varied_routing)


def twin_argv(argv: list[str], twin: Path) -> list[str]:
    """The same load of the zero-weight twin: llama.cpp sizes its buffers from shapes alone, so the twin's memory
    is the varied model's, and its prompts are fast (a host expert is streamed to the GPU only when a token
    routes to it: with zero weights, 8 of 128)."""
    return [str(twin) if previous == "-m" else arg for previous, arg in zip(["", *argv], argv)]


def fill_check(server: Path, argv: list[str], twin: Path, ctx: int, log_path: Path) -> dict:
    """Load the zero-weight twin with `argv` and fill its context: a run-time out of memory shows here."""
    trial = run_trial(server, twin_argv(argv, twin), ctx - FILL_MARGIN, log_path)
    return {"filled": trial.ok, "fill_n_ctx": trial.n_ctx, "fill_tail": trial.tail[-3:],
            "fill_buffers": [line[-120:] for line in log_path.read_text(errors="replace").splitlines()
                             if "buffer size" in line][:12]}


def gpu_free_mib() -> int | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True)
    except OSError:
        return None
    return int(result.stdout.split()[0]) if result.returncode == 0 and result.stdout.strip() else None


def pages_reclaimed() -> int:
    """Pages the kernel has reclaimed since boot (kswapd and direct): reclaim during a run takes CPU time."""
    with open("/proc/vmstat") as vmstat:
        return sum(int(value) for key, value in (line.split() for line in vmstat) if key.startswith("pgsteal_"))


def host_memory(pid: int) -> dict:
    """Where llama-server's host memory lies (MiB in huge pages, locked; 4 KiB pages per NUMA node): the CPU
    reads the host's experts for every token, and small pages or a remote node would slow it."""
    found: dict = {}
    try:
        # AnonHugePages: anonymous memory in 2 MiB pages; FilePmdMapped: the mapped file in 2 MiB pages (large
        # folios): 4 KiB pages cost a TLB miss per 4 KiB the CPU reads
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("AnonHugePages", "FilePmdMapped", "ShmemPmdMapped", "Locked"):
                found[key] = int(value.split()[0]) // 1024  # kB -> MiB
        by_node: dict[str, int] = {}
        for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
            for word in line.split()[2:]:
                if word[:1] == "N" and "=" in word:
                    node, pages = word.split("=")
                    by_node[node] = by_node.get(node, 0) + int(pages)
        found["pages_by_node"] = by_node
    except (OSError, ValueError):
        pass
    return found


def measure(server: Path, argv: list[str], log_path: Path) -> dict:
    """One load: ready, 3 x (1,024-token prompt + 128 generated)."""
    port = free_port()
    record: dict = {"argv": argv}
    started = time.monotonic()
    with open(log_path, "w+b") as log:
        process = subprocess.Popen([str(server), *argv, "--host", "127.0.0.1", "--port", str(port), "-lv", "4"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            ready = False
            while time.monotonic() < started + 300 and process.poll() is None:
                if post(port, "/completion", {"prompt": "Hi", "n_predict": 1}, 30)[0] == 200:
                    ready = True
                    break
                time.sleep(0.2)
            record["ready"] = ready
            record["load_s"] = round(time.monotonic() - started, 2)
            record["gpu_free_after_load_mib"] = gpu_free_mib()
            record["host_available_mib"] = round(psutil.virtual_memory().available / MIB)
            reclaimed_before = pages_reclaimed()
            gen, prompt, failed = timed_completions(port, PROMPT_TOKENS, GEN_TOKENS, 3 if ready else 0)
            record["pages_reclaimed_during_requests"] = pages_reclaimed() - reclaimed_before
            if failed:
                record["failed"] = failed
            record["gen_tps"] = round(statistics.median(gen), 2) if gen else None
            record["prompt_tps"] = round(statistics.median(prompt), 1) if prompt else None
            record["gen_tps_all"], record["prompt_tps_all"] = gen, prompt
            record["host_rss_mib"] = round(psutil.Process(process.pid).memory_info().rss / MIB) \
                if process.poll() is None else None
            record["host_memory"] = host_memory(process.pid) if process.poll() is None else {}
        finally:
            record["returncode"] = stop_process(process, 30)
            log.seek(0)
            lines = log.read().decode("utf-8", "replace").splitlines()
    contexts = [int(m.group(1)) for line in lines if (m := N_CTX.search(line))]
    record["n_ctx"] = contexts[-1] if contexts else None
    record["buffers"] = [line[-120:] for line in lines if "buffer size" in line][:12]
    record["threads"] = next((line[line.index("n_threads"):][:60] for line in lines if "n_threads =" in line), None)
    record["errors"] = [line[-200:] for line in lines if "out of memory" in line or " E " in line][-4:]
    record["ok"] = bool(record.get("ready") and record.get("gen_tps") and record["returncode"] in (0, -15, 143))
    return record


def n_cpu_moe_search(server: Path, models: Models, case: Case, start: int, logs: Path, rpc: list[str]) -> dict:
    """The smallest --n-cpu-moe N that loads and survives a 1,024-token prompt (downward from `start`; on the
    zero-weight twin: memory only), then that N measured on the varied model."""
    def argv(n: int) -> list[str]:
        return ["-m", str(models.varied / case.model), "-c", str(case.ctx), "-ngl", "999", "--n-cpu-moe", str(n),
                "--fit", "off", "-np", "4", "-kvu", *rpc]

    best, tried = None, {}
    n = start
    while 0 <= n <= 64:
        trial = run_trial(server, twin_argv(argv(n), models.zero / case.model), PROMPT_TOKENS,
                          logs / f"ncmoe-{n}.log", ready_timeout_s=240)
        tried[n] = trial.ok
        if trial.ok:
            best = n
            n -= 1
        elif best is None:
            n += 1
        else:
            break
    found = {"tried": tried, "best_n": best}
    if best is not None:
        found["measured"] = measure(server, argv(best), logs / f"ncmoe-best-{best}.log")
    return found


# Ours (pinned where a GPU streams host weights: the default) with the host's weights held the other ways
# (--host-weights); later flags win in llama-server, so each variant's flag overrides the plan's own mode.
# threads: one per core this process may run on (llama.cpp's default counts physical cores).
CORES = str(len(os.sched_getaffinity(0)))
VARIANTS = {"pinned": ["-lm", "none"], "dio": ["-lm", "dio"], "mapped": ["-lm", "mmap"],
            "repacked": ["-lm", "mmap", "--no-host"],
            "threads": ["-t", CORES, "-tb", CORES]}
# whole: ours with no block split device/host; ubatch: ours planned with -ub 2048 (a prompt streams the host's
# experts to the GPU once per ubatch: 4x fewer times, for a larger compute buffer and fewer experts on the GPU)
PARTS = ("ours", *VARIANTS, "whole", "ubatch", "ubatch_pinned", "fit", "search", "max")
LARGE_UBATCH = 2048  # the -ub a plan's note names when a GPU streams host weights


@dataclass(frozen=True)
class Models:
    varied: Path  # tokens routed over all experts, as in a real model: the speeds
    zero: Path  # the same shapes with zero weights: the same buffers, fast context-filling prompts


@dataclass(frozen=True)
class Runs:
    parts: tuple[str, ...] = PARTS
    fill: bool = True  # also fill the context with each main contender's argv on the zero-weight twin
    rounds: int = 1  # the contenders' loads again, in the same order: generation moves between loads
    threads: tuple[int, ...] = ()  # ours again with each of these -t


def run_case(server: Path, models: Models, case: Case, logs: Path, runs: Runs = Runs(),
             saved: callable[[dict], None] = lambda record: None) -> dict:
    """One case; `saved(record)` after each contender, so a run cut short still leaves what it measured.
    Round r > 1 stores a contender's load under "key@r" (no fills: memory does not move between loads)."""
    parts = runs.parts
    model = models.varied / case.model
    record: dict = {"case": case.name, "ctx": case.ctx}
    ballast = Ballast(case.free_mib)
    record["ballast_free_mib"] = ballast.free_mib
    worker = None
    rpc: list[str] = []
    budget: list[str] = []

    suffix = ""

    def fill_twin(measured: dict, key: str) -> None:
        if runs.fill and not suffix and measured["ok"]:
            measured.update(fill_check(server, measured["argv"], models.zero / case.model, case.ctx,
                                       logs / f"{key}-fill.log"))

    def contender(key: str, argv: list[str], fills: bool) -> None:
        record[key + suffix] = measured = measure(server, argv, logs / f"{key}{suffix}.log")
        if fills:
            fill_twin(measured, key)
        print(key + suffix, json.dumps(measured), flush=True)
        saved(record)

    try:
        if case.rpc_budget_mib:
            port = free_port()
            worker = subprocess.Popen([str(server.parent / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                       "-d", "CUDA0"], stdout=open(logs / "rpc.log", "w"),  # noqa: SIM115 (the worker keeps it)
                                      stderr=subprocess.STDOUT)
            time.sleep(3)
            rpc = ["--rpc", f"127.0.0.1:{port}"]
            record["gpu_free_with_worker_mib"] = gpu_free_mib()
            budget = ["--budget", f"CUDA0={case.cuda_budget_mib}MiB", "--budget", f"RPC0={case.rpc_budget_mib}MiB"]
        plan, _ = plan_cli(model, server, ["--ctx", str(case.ctx), *rpc, *budget, *case.ours_args])
        record["plan"] = {k: plan.get(k) for k in ("ctx", "n_gpu_layers", "host_expert_layers", "host_expert_parts",
                                                    "argv", "error")}
        record["plan_devices"] = [{k: d.get(k) for k in ("name", "n_layers", "expert_layers", "moe_layers",
                                                         "weights_bytes", "kv_bytes", "compute_bytes",
                                                         "overhead_bytes", "headroom_bytes")}
                                  for d in plan.get("devices", [])]
        host_blocks = len(plan.get("host_expert_layers") or [])
        split_blocks = {il for il, _ in plan.get("host_expert_parts") or []}
        whole: dict = {}
        if "argv" in plan and "whole" in parts and len(split_blocks) == 1:  # does the split block cost speed?
            # the host's experts as whole blocks: the first MoE layers up to and including the split one
            whole, _ = plan_cli(model, server, ["--ctx", str(case.ctx), *rpc, *budget, *case.ours_args,
                                                "--cpu-experts", str(host_blocks + 1)])
        large: dict = {}
        if "ubatch" in parts or "ubatch_pinned" in parts:
            large, _ = plan_cli(model, server, ["--ctx", str(case.ctx), *rpc, *budget, *case.ours_args,
                                                "-ub", str(LARGE_UBATCH)])
            record["plan_ubatch"] = {k: large.get(k) for k in ("ctx", "host_expert_layers", "host_expert_parts",
                                                               "error")}
        variants = {**{name: extra for name, extra in VARIANTS.items() if name in parts},
                    **{f"t{n}": ["-t", str(n)] for n in runs.threads}}
        for round_ in range(1, runs.rounds + 1):
            suffix = "" if round_ == 1 else f"@{round_}"
            if "argv" in plan and "ours" in parts:
                contender("ours", plan["argv"], True)
            for variant, extra in variants.items():  # the same placement, held or run another way
                if "argv" in plan:
                    contender(f"ours_{variant}", [*plan["argv"], *extra], False)
            if "argv" in whole:
                contender("ours_whole", whole["argv"], False)
            if "ubatch" in parts and "argv" in large:
                contender("ours_ubatch", large["argv"], True)
            if "ubatch_pinned" in parts and "argv" in large:
                contender("ours_ubatch_pinned", [*large["argv"], *VARIANTS["pinned"]], False)
            if not case.rpc_budget_mib and "fit" in parts:  # --fit cannot budget a shared GPU between two devices
                contender("fit", ["-m", str(model), "-c", str(case.ctx)], True)
        suffix = ""
        start = host_blocks or 24
        if not case.rpc_budget_mib and "search" in parts:
            record["n_cpu_moe"] = found = n_cpu_moe_search(server, models, case, start, logs, rpc)
            if "measured" in found:
                fill_twin(found["measured"], "ncmoe-best")
            print("n-cpu-moe", json.dumps(record["n_cpu_moe"]), flush=True)
            saved(record)
        if "max" in parts:
            record.update(ctx_max(server, models.zero / case.model, logs, rpc, budget))
            saved(record)
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        ballast.close()
    return record


def ctx_max(server: Path, model: Path, logs: Path, rpc: list[str], budget: list[str]) -> dict:
    """--ctx max against the true largest context with dense parts + KV on the GPU (experts on the host), on the
    zero-weight model (memory only: its buffers are the varied model's, its context-filling prompts fast)."""
    plan, _ = plan_cli(model, server, ["--ctx", "max", *rpc, *budget])
    ours_ctx = plan.get("ctx")
    found: dict = {"max_ours_ctx": ours_ctx, "max_ours_error": plan.get("error")}
    if not ours_ctx:
        return found
    trial = run_trial(server, plan["argv"], ours_ctx - FILL_MARGIN, logs / "max-ours.log")
    found["max_ours_ok"] = trial.ok
    n_ctx_train = MODELS[model.name][1].n_ctx_train

    def loads_and_fills(ctx: int) -> bool:
        if ctx > n_ctx_train:
            return False
        argv = ["-m", str(model), "-c", str(ctx), "-ngl", "999", "--cpu-moe", "--fit", "off", "-np", "4", "-kvu",
                *rpc]
        return run_trial(server, argv, ctx - FILL_MARGIN, logs / "max-true.log").ok

    found["max_true_ctx"] = largest_passing(loads_and_fills, ours_ctx, min(ours_ctx + 1024, n_ctx_train), 256) \
        if trial.ok else None
    return found


def loads(record: dict) -> list[tuple[str, dict]]:
    """Each measured load of a case in run order, named as in the table ("ours t8", "--fit @2")."""
    found = [(key, value) for key, value in record.items() if isinstance(value, dict) and "gen_tps" in value]
    best = record.get("n_cpu_moe") or {}
    if best.get("measured"):
        found.append((f"--n-cpu-moe {best['best_n']}", best["measured"]))
    return [(label(key), value) for key, value in found]


def label(key: str) -> str:
    """A record key as the table names it: ours_t8@2 -> "ours t8 @2", fit -> "--fit"."""
    name, _, round_ = key.partition("@")
    name = "--fit" if name == "fit" else name.replace("ours_", "ours ")
    return f"{name} @{round_}" if round_ else name


def pooled(record: dict) -> dict[str, dict]:
    """Per contender measured in several rounds: the median over its loads' medians and over all its requests."""
    by_name: dict[str, list[dict]] = {}
    for name, measured in loads(record):
        by_name.setdefault(name.split(" @")[0], []).append(measured)
    return {name: {"loads": len(group),
                   "gen_median_of_loads": statistics.median(m["gen_tps"] for m in group if m.get("gen_tps")),
                   "gen_median_all": statistics.median(g for m in group for g in m.get("gen_tps_all") or []),
                   "prompt_median_all": statistics.median(p for m in group for p in m.get("prompt_tps_all") or [])}
            for name, group in by_name.items() if len(group) > 1 and all(m.get("gen_tps") for m in group)}


def table(results: list[dict]) -> list[str]:
    rows = [f"{'case':<42}{'contender':<22}{'ctx':>7}{'gen t/s':>9}{'prompt t/s':>11}{'load s':>8}"
            f"{'host RSS':>10}{'filled':>8}"]
    for r in results:
        for name, m in loads(r):
            rows.append(f"{r['case']:<42}{name:<22}{m.get('n_ctx') or 0:>7}{m.get('gen_tps') or 0:>9.1f}"
                        f"{m.get('prompt_tps') or 0:>11.0f}{m.get('load_s') or 0:>8.1f}"
                        f"{m.get('host_rss_mib') or 0:>9}M{m.get('filled', '-')!s:>8}")
        for name, summary in pooled(r).items():
            rows.append(f"{r['case']:<42}{name + ' pooled':<22}{'':>7}{summary['gen_median_of_loads']:>9.1f}"
                        f"{summary['prompt_median_all']:>11.0f}  ({summary['loads']} loads; all requests' gen "
                        f"median {summary['gen_median_all']:.1f})")
        if r.get("max_ours_ctx"):
            true = r.get("max_true_ctx") or 0
            rows.append(f"{r['case']:<42}{'--ctx max':<22}{r['max_ours_ctx']:>7}  true max {true}  "
                        f"({r['max_ours_ctx'] / max(true, 1):.1%}) ok={r.get('max_ours_ok')}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, default=Path("/tmp/moe-logs"))
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS))
    parser.add_argument("--tag", default="moe", help="name of the result files")
    parser.add_argument("--no-fill", action="store_true", help="speeds only: no context-filling prompt")
    parser.add_argument("--rounds", type=int, default=1, help="load the contenders this many times, in turn")
    parser.add_argument("--threads", default="", help="comma-separated -t values to run ours with as well")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    models = Models(args.logs / "models-varied", args.logs / "models")
    names = {CASES[key].model for key in args.cases}
    write_models(models.varied, varied_routing=True, names=names)
    parts = set(args.parts.split(","))
    if not args.no_fill or parts & {"search", "max"}:  # the zero-weight twins: fills, the search and --ctx max
        write_models(models.zero, varied_routing=False, names=names)
    results = []
    for key in args.cases:
        def saved(record: dict) -> None:
            (args.out / f"{args.tag}.json").write_text(json.dumps([*results, record], indent=2) + "\n")
        runs = Runs(tuple(args.parts.split(",")), not args.no_fill, args.rounds,
                    tuple(int(n) for n in args.threads.split(",") if n))
        results.append(run_case(args.server, models, CASES[key], args.logs, runs, saved))
        (args.out / f"{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = table(results)
    (args.out / f"{args.tag}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
