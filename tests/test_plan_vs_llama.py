"""Plans checked against what llama-server really did, on real ggml-rpc-server workers.

Random synthetic models on 1-3 workers, each declared with a --budget (one also held to it by
`prlimit --as`): the layer assignment llama-server logs equals the plan slot for slot, the load
serves a token, and the buffers it reports match the plan. LLAMALAUNCH_PLAN_CASES widens the sample.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from llamalaunch.launch.logparse import BufferSize, LayerAssigned, buffer_device, parse_events
from llamalaunch.units import MIB
from tests.support import RpcWorker, run_llama_server
from tests.synthetic import write_preset

pytestmark = pytest.mark.llama

FAMILIES = ("tiny-llama", "tiny-qwen3", "tiny-gemma3", "tiny-qwen3moe")
CASES = int(os.environ.get("LLAMALAUNCH_PLAN_CASES", "3"))
# A CPU worker's own mappings (binary, libraries, thread stacks) count against `prlimit --as` too.
WORKER_ADDRESS_SPACE_SLACK = 1536 * MIB


def plan_json(model: Path, args: list[str], llama_bin_dir: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", str(model), "--json",
                             "--llama-server", str(llama_bin_dir / "llama-server"), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def child_device_names(plan: dict) -> dict[str, str]:
    """Our device names → llama-server's (it numbers only the workers on its --rpc list)."""
    argv = plan["argv"]
    endpoints = argv[argv.index("--rpc") + 1].split(",") if "--rpc" in argv else []
    return {d["name"]: f"RPC{endpoints.index(d['endpoint'])}" for d in plan["devices"]
            if d["endpoint"] in endpoints}


def case(seed: int) -> dict:
    rng = random.Random(seed)
    return {"family": rng.choice(FAMILIES), "n_layer": rng.randint(4, 24), "workers": rng.randint(1, 3),
            "ctx": rng.choice([2048, 4096, 8192]), "budgets_mib": [rng.randint(90, 400) for _ in range(3)],
            "parallel": rng.choice([1, 4]), "prlimit": seed % 2 == 0}


@pytest.mark.parametrize("seed", range(CASES))
def test_llama_server_does_what_the_plan_says(seed: int, tmp_path: Path, llama_bin_dir: Path,
                                              rpc_workers: Callable[..., RpcWorker]) -> None:
    check_plan_against_llama_server(case(seed), tmp_path, llama_bin_dir, rpc_workers)


# the 2026 families (issue 21): each planned on two budgeted workers, then loaded and served
FAMILIES_2026 = ("tiny-qwen3next", "tiny-qwen35", "tiny-qwen35moe", "tiny-gpt-oss", "tiny-glm4moe", "tiny-llama4",
                 "tiny-mistral3", "tiny-gemma4", "tiny-minimax-m2", "tiny-nemotron_h", "tiny-nemotron_h_moe",
                 "tiny-deepseek4")


@pytest.mark.parametrize("family", FAMILIES_2026)
def test_2026_family_plan_is_what_llama_server_does(family: str, tmp_path: Path, llama_bin_dir: Path,
                                                    rpc_workers: Callable[..., RpcWorker]) -> None:
    spec = {"family": family, "n_layer": 8, "workers": 2, "ctx": 4096, "budgets_mib": [150, 120],
            "parallel": 4, "prlimit": False}
    check_plan_against_llama_server(spec, tmp_path, llama_bin_dir, rpc_workers)


def check_plan_against_llama_server(spec: dict, tmp_path: Path, llama_bin_dir: Path,
                                    rpc_workers: Callable[..., RpcWorker]) -> None:
    model = write_preset(tmp_path / "m.gguf", spec["family"], n_layer=spec["n_layer"])
    budgets = [b * MIB for b in spec["budgets_mib"][: spec["workers"]]]
    workers = [rpc_workers(budget + WORKER_ADDRESS_SPACE_SLACK if spec["prlimit"] and i == 0 else None)
               for i, budget in enumerate(budgets)]
    args = ["--rpc", ",".join(w.endpoint for w in workers), "--ctx", str(spec["ctx"]), "-np", str(spec["parallel"])]
    for index, budget in enumerate(budgets):
        args += ["--budget", f"RPC{index}={budget}B"]
    try:
        plan = plan_json(model, args, llama_bin_dir)
    except AssertionError as refusal:
        pytest.skip(f"case {spec} does not fit: {refusal}")
    run = run_llama_server(llama_bin_dir, plan["argv"])
    assert run.served, "\n".join(run.lines[-30:])

    names = child_device_names(plan)
    events = list(parse_events(run.lines))
    # 1. every slot where the plan put it (the fit dry run is off: one assignment per layer)
    assigned = {e.layer: e.device for e in events if isinstance(e, LayerAssigned)}
    expected = {slot: names[d["name"]] for d in plan["devices"] if not d["excluded"]
                for slot in range(d["first_slot"], d["first_slot"] + d["n_layers"])}
    assert assigned == expected
    # 2. buffers: weights and KV exact (printed to 0.01 MiB), compute within max(5%, 16 MiB)
    assert_buffers_match(plan, events)


def cache_tolerance(seen: dict[tuple[str, str], int], device: str) -> float:
    """Each printed KV/state buffer rounds by 0.005 MiB (two for SWA and full caches, seven for deepseek4)."""
    return max(2, seen.get((device, "cache_lines"), 0)) * 0.005 * MIB + 8


def buffer_sums(events: list, endpoints: list[str]) -> dict[tuple[str, str], int]:
    """Bytes per (device, buffer kind), and per device the number of KV/state lines ("cache_lines")."""
    seen: dict[tuple[str, str], int] = {}
    for event in events:
        if isinstance(event, BufferSize) and not event.at_exit:
            device = buffer_device(event.buffer, endpoints)
            seen[(device, event.kind)] = seen.get((device, event.kind), 0) + event.bytes
            if event.kind in ("kv", "rs"):
                seen[(device, "cache_lines")] = seen.get((device, "cache_lines"), 0) + 1
    return seen


def assert_buffers_match(plan: dict, events: list) -> None:
    """Per device of the plan: weights and KV (with recurrent state) as printed, compute within max(5%, 16 MiB)."""
    names = child_device_names(plan)
    endpoints = plan["argv"][plan["argv"].index("--rpc") + 1].split(",")
    seen = buffer_sums(events, endpoints)
    for device in plan["devices"]:
        if device["excluded"]:
            continue
        name = names[device["name"]]
        assert abs(seen[(name, "model")] - device["weights_bytes"]) <= 0.01 * MIB, (name, "model")
        kv = seen.get((name, "kv"), 0) + seen.get((name, "rs"), 0)
        assert abs(kv - device["kv_bytes"]) <= cache_tolerance(seen, name), (name, "kv", kv, device["kv_bytes"])
        error = seen[(name, "compute")] - device["compute_bytes"]
        assert abs(error) <= max(0.05 * seen[(name, "compute")], 16 * MIB), (name, "compute", error / MIB)
