"""Expert spill checked against what llama-server really did, on real ggml-rpc-server workers.

MoE synthetic models (qwen3moe; deepseek2 and glm4moe with a dense lead layer and a shared expert;
gpt-oss with expert biases; deepseek4 with hash routing and compressed caches) on one or two
workers whose budget holds the dense parts and KV but not every expert; one worker is also held to
its budget by `prlimit --as`. The plan's `-ot` must be reproduced exactly: every layer on the planned
device, the devices' model and KV buffers equal to the plan, the host's model buffer (loaded, not
mapped) equal to the plan's host weights, compute within max(1%, 32 MiB), and a prompt of a whole
ubatch served (the host's experts are used for real).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from llamalaunch.launch.logparse import HOST, LayerAssigned, parse_events
from llamalaunch.units import MIB
from tests.serve_support import ServeRun
from tests.support import RpcWorker, run_llama_server
from tests.synthetic import write_preset
from tests.test_plan_vs_llama import (
    WORKER_ADDRESS_SPACE_SLACK,
    buffer_sums,
    cache_tolerance,
    child_device_names,
    plan_json,
)

pytestmark = pytest.mark.llama

# (preset, shape changes, budgets in MiB per worker, prlimit on the first worker)
CASES = {
    "qwen3moe-1-worker": ("tiny-qwen3moe", {"n_layer": 8, "n_embd": 256, "n_expert": 16, "n_ff_exp": 512,
                                            "n_vocab": 2048}, [48], False),
    "qwen3moe-2-workers-prlimit": ("tiny-qwen3moe", {"n_layer": 10, "n_embd": 256, "n_expert": 16,
                                                     "n_ff_exp": 512, "n_vocab": 2048}, [40, 30], True),
    "deepseek2-dense-lead": ("tiny-deepseek2", {"n_layer": 6, "n_embd": 256, "n_expert": 16, "n_ff_exp": 512,
                                                "n_vocab": 2048}, [40], False),
    # expert biases (ffn_*_exps.bias) move with their experts
    "gpt-oss": ("tiny-gpt-oss", {"n_layer": 6, "n_embd": 256, "n_expert": 16, "n_ff_exp": 512, "n_vocab": 2048},
                [40], False),
    "glm4moe-shared-expert": ("tiny-glm4moe", {"n_layer": 6, "n_embd": 256, "n_expert": 16, "n_ff_exp": 512,
                                               "n_vocab": 2048}, [40], False),
    # --cpu-spill where not even the dense parts fit: whole layers on the host, the device's blocks' experts too
    "qwen3moe-cpu-spill": ("tiny-qwen3moe", {"n_layer": 10, "n_embd": 256, "n_expert": 16, "n_ff_exp": 512,
                                             "n_vocab": 2048}, [20], False),
    # hash-routed first block, compressed caches, hyper-connections; the states are cache memory
    "deepseek4": ("tiny-deepseek4", {"n_layer": 6, "n_embd": 256, "n_expert": 16, "n_ff_exp": 512,
                                     "n_vocab": 2048}, [40], False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_llama_server_reproduces_the_expert_spill(name: str, tmp_path: Path, llama_bin_dir: Path,
                                                 rpc_workers: Callable[..., RpcWorker]) -> None:
    preset, changes, budgets_mib, prlimit = CASES[name]
    model = write_preset(tmp_path / "m.gguf", preset, **changes)
    workers = [rpc_workers(b * MIB + WORKER_ADDRESS_SPACE_SLACK if prlimit and i == 0 else None)
               for i, b in enumerate(budgets_mib)]
    args = ["--rpc", ",".join(w.endpoint for w in workers), "--ctx", "4096", "-np", "1"]
    for index, budget in enumerate(budgets_mib):
        args += ["--budget", f"RPC{index}={budget}MiB"]
    spills_layers = name.endswith("cpu-spill")
    plan = plan_json(model, [*args, *(["--cpu-spill"] if spills_layers else [])], llama_bin_dir)
    assert plan["host_expert_layers"] or plan["host_expert_parts"], "the case must spill experts"
    if spills_layers:  # whole layers on the host, and the experts of the device's blocks there too (it said none)
        assert 0 < plan["n_gpu_layers"] < plan["model"]["n_slots"]
    else:
        assert plan["n_gpu_layers"] == plan["model"]["n_slots"]  # every layer stays on the workers
    # a prompt of one whole ubatch, with the host's weights loaded (not mapped) so its buffer is exact
    run = run_llama_server(llama_bin_dir, [*plan["argv"], "-lm", "none"], prompt=[7] * 512)
    assert run.served, "\n".join(run.lines[-30:])

    names = child_device_names(plan)
    assigned = {e.layer: e.device for e in parse_events(run.lines) if isinstance(e, LayerAssigned)
                and e.device != "CPU"}
    expected = {slot: names[d["name"]] for d in plan["devices"] if not d["excluded"]
                for slot in range(d["first_slot"], d["first_slot"] + d["n_layers"])}
    assert assigned == expected

    endpoints = plan["argv"][plan["argv"].index("--rpc") + 1].split(",")
    seen = buffer_sums(list(parse_events(run.lines)), endpoints)
    for device in (d for d in plan["devices"] if not d["excluded"]):
        child = names[device["name"]]
        assert abs(seen[(child, "model")] - device["weights_bytes"]) <= 0.01 * MIB, (child, "model")
        kv = seen.get((child, "kv"), 0) + seen.get((child, "rs"), 0)
        assert abs(kv - device["kv_bytes"]) <= cache_tolerance(seen, child), (child, "kv")
        error = seen[(child, "compute")] - device["compute_bytes"]
        assert abs(error) <= max(0.01 * seen[(child, "compute")], 32 * MIB), (child, "compute", error / MIB)
    host_model = seen[(HOST, "model")]
    assert abs(host_model - plan["host"]["weights_bytes"]) <= 0.02 * MIB, (host_model, plan["host"])
    host_compute_error = seen[(HOST, "compute")] - plan["host"]["compute_bytes"]
    assert abs(host_compute_error) <= max(0.01 * seen[(HOST, "compute")], 32 * MIB)


def test_serve_checks_readiness_with_a_whole_ubatch_when_experts_live_on_the_host(
        tmp_path: Path, serve: Callable[..., ServeRun], rpc_workers: Callable[..., RpcWorker]) -> None:
    """Large batches stream host experts to the device and allocate there at run time: one token would not."""
    preset, changes, budgets_mib, _ = CASES["qwen3moe-1-worker"]
    model = write_preset(tmp_path / "m.gguf", preset, **changes)
    worker = rpc_workers()
    run = serve(model, "--rpc", worker.endpoint, "--budget", f"RPC0={budgets_mib[0]}MiB", "--ctx", "4096",
                "-np", "1")
    run.wait_ready(120)
    prompts = [int(n) for n in re.findall(r"new prompt, .*task\.n_tokens = (\d+)", run.log_path.read_text())]
    assert prompts and prompts[0] == 512, prompts  # -ub 512: the readiness request is one whole ubatch
