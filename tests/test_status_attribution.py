"""`status`, `status --json` and /metrics put llama.cpp's buffers on the device they are on, and count expert layers as
the plan does, when the plan puts the workers in another order than --rpc (`-dev RPC1,RPC0`) and splits a block's
experts between a device and the host.

The real test runs `serve` on a 12-block qwen3moe with two real ggml-rpc-server workers, and reads the buffer
lines of the server log by endpoint with a regex of its own, as a person reading the log would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from llamalaunch.observe.collector import StatusCollector
from llamalaunch.observe.live_memory import MemoryReader
from llamalaunch.observe.log_follower import LogFollower
from llamalaunch.observe.plan_devices import host_expert_blocks, moe_blocks, rpc_workers
from llamalaunch.observe.target import StatusTarget
from llamalaunch.observe.view import short_bytes
from llamalaunch.probe.rpc import WorkerDevice, WorkerReport
from llamalaunch.units import GIB, MIB
from tests.serve_support import StartServe
from tests.support import RpcWorker, free_port
from tests.synthetic import write_preset
from tests.test_metrics import value, wait_for
from tests.test_status import _write_run, run_status

FIXTURE_LOG = Path(__file__).parent / "fixtures" / "llama-server-logs" / "cpu-2rpc-smollm2-ts1-3-verbose.log"
_BUFFER = re.compile(r"RPC\d+\[(?P<endpoint>[^\]]+)\] (?P<kind>model|KV|compute) buffer size = +(?P<mib>[\d.]+) MiB")
_KINDS = {"model": "weights", "KV": "kv", "compute": "compute"}


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "150")


def _rpc_device(name: str, endpoint: str, **fields: object) -> dict[str, Any]:
    return {"name": name, "backend": "RPC", "endpoint": endpoint, "excluded": False, "planned_bytes": 0,
            "free_bytes": 0, **fields}


def test_buffers_of_a_real_log_go_to_the_endpoint_whatever_the_plan_order() -> None:
    """The plan lists RPC1 (the second --rpc worker) first: its buffers are still the 50062 worker's."""
    follower = LogFollower(FIXTURE_LOG)
    follower.update()
    workers = rpc_workers([_rpc_device("RPC1", "127.0.0.1:50062"), _rpc_device("RPC0", "127.0.0.1:50061")])
    assert workers == {"127.0.0.1:50061": ["RPC0"], "127.0.0.1:50062": ["RPC1"]}
    found = follower.device_bytes(list(workers), {e: len(names) for e, names in workers.items()})
    assert round(found["RPC0"]["model"] / MIB, 2) == 16.91 and found["RPC0"]["kv"] == 48 * MIB
    assert round(found["RPC1"]["model"] / MIB, 2) == 75.19 and found["RPC1"]["kv"] == 132 * MIB


def test_a_worker_of_two_devices_keeps_its_own_order_and_a_dropped_worker_keeps_its_names(tmp_path: Path) -> None:
    """RPC0 left out (its worker not on --rpc), RPC2 before RPC1 on the two-device worker: names stay ours."""
    devices = [_rpc_device("RPC2", "b:1"), _rpc_device("RPC1", "b:1"), _rpc_device("RPC0", "a:1", excluded=True)]
    assert rpc_workers(devices) == {"a:1": ["RPC0"], "b:1": ["RPC1", "RPC2"]}
    log = tmp_path / "server.log"
    log.write_text("".join(f"0.00.001.000 I load_tensors: RPC{local}[b:1] model buffer size = {mib:.2f} MiB\n"
                           for local, mib in ((0, 10), (1, 20))))
    follower = LogFollower(log)
    follower.update()
    workers = rpc_workers(devices)
    found = follower.device_bytes(list(workers), {e: len(names) for e, names in workers.items()})
    assert found == {"RPC1": {"model": 10 * MIB}, "RPC2": {"model": 20 * MIB}}


def test_an_idle_two_device_worker_is_probed_at_each_devices_own_index(tmp_path: Path) -> None:
    """The plan puts the worker's second device first: the probe's device 1 is still RPC1's."""
    report = WorkerReport("b:1", "7.0.0", (WorkerDevice(0, 10 * GIB, 24 * GIB), WorkerDevice(1, 2 * GIB, 24 * GIB)),
                          0.01)
    plan = {"model": {"path": "m.gguf", "n_slots": 5}, "ctx": 4096, "n_gpu_layers": 5, "argv": [],
            "devices": [_rpc_device("RPC1", "b:1", n_layers=3, first_slot=0),
                        _rpc_device("RPC0", "b:1", n_layers=2, first_slot=3)]}
    me = psutil.Process()
    path = _write_run(plan, pid=me.pid, started=me.create_time(), log=tmp_path / "none.log", phase="stopped",
                      name="two")
    snapshot = StatusCollector(StatusTarget(path, None), memory=MemoryReader(probe=lambda _: report)).collect()
    assert {d.name: (d.memory_source, d.free_bytes) for d in snapshot.devices} == {
        "RPC1": ("rpc probe", 2 * GIB), "RPC0": ("rpc probe", 10 * GIB)}


def _log_buffers(log_text: str) -> dict[str, dict[str, int]]:
    """Endpoint → component → bytes, from the last buffer line of each (the load; no fit dry run with --fit off)."""
    found: dict[str, dict[str, int]] = {}
    for match in _BUFFER.finditer(log_text):
        found.setdefault(match["endpoint"], {})[_KINDS[match["kind"]]] = round(float(match["mib"]) * MIB)
    return found


@pytest.mark.llama
def test_a_reordered_moe_plan_shows_each_workers_own_buffers_and_the_plans_expert_counts(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], tmp_path: Path) -> None:
    first, second = rpc_workers(), rpc_workers()
    model = write_preset(tmp_path / "small-moe.gguf", "tiny-qwen3moe", n_layer=12, n_embd=512, n_expert=16,
                         n_ff_exp=1024, n_vocab=2048)
    port = free_port()
    run = serve(model, "--rpc", f"{first.endpoint},{second.endpoint}", "--budget", "RPC0=100MiB",
                "--budget", "RPC1=50MiB", "--ctx", "4k", "--metrics-port", str(port))
    run.wait_ready(timeout_s=90)
    plan = run.state()["plan"]
    argv = plan["argv"]
    assert argv[argv.index("-dev") + 1] == "RPC1,RPC0", argv  # the case: the plan reorders the workers
    assert plan["host_expert_parts"], plan["host_expert_layers"]  # and splits a block with the host
    endpoints = {"RPC0": first.endpoint, "RPC1": second.endpoint}
    assert {d["name"]: d["endpoint"] for d in plan["devices"]} == endpoints
    logged = _log_buffers(run.log_path.read_text())
    assert set(logged) == set(endpoints.values()) and logged[first.endpoint] != logged[second.endpoint]
    moe = sum(d["moe_layers"] for d in plan["devices"])
    host_experts = moe - sum(d["expert_layers"] for d in plan["devices"])  # the plan table's host cell
    assert moe == 12 and host_experts > len(plan["host_expert_layers"])  # a split block counts as the host's

    data = json.loads(run_status("--json").output)
    for device in data["devices"]:
        expected = logged[endpoints[device["name"]]]
        assert device["endpoint"] == endpoints[device["name"]]
        for component in ("weights", "kv", "compute"):
            assert abs(device[f"actual_{component}_bytes"] - expected[component]) <= MIB // 200, (device, expected)
    assert data["host_expert_layers"] == host_experts and data["moe_layers"] == moe

    text = run_status("--once").output
    for name, endpoint in endpoints.items():  # weights, KV, compute, planned, then llama.cpp's own total
        row = re.search(rf"^{name}\s+\d+(?: \(\d+/\d+ experts\))?(.*)$", text, re.MULTILINE)
        assert row is not None, text
        cells = re.findall(r"[\d.]+ [KMG]iB", row.group(1))
        assert cells[4] == short_bytes(sum(logged[endpoint].values())), (name, cells, logged)
    assert re.search(rf"^host\s+0 \({host_experts}/{moe} experts\)", text, re.MULTILINE), text

    samples = wait_for(port, lambda s: value(s, "llamalaunch_up") == 1)
    for name, endpoint in endpoints.items():
        for component, size in logged[endpoint].items():
            got = value(samples, "llamalaunch_device_allocated_bytes", device=name, id=endpoint, component=component)
            assert got is not None and abs(got - size) <= MIB // 200, (name, component, got, size)
    assert value(samples, "llamalaunch_host_expert_layers") == host_experts


def test_moe_blocks_left_whole_on_the_host_count_as_the_host_s() -> None:
    """-ngl below every layer leaves blocks 0-1 (MoE) whole on the host: the plan's table counts their experts as
    the host's, and so does status, from the model's MoE blocks the plan's JSON lists."""
    plan = {"model": {"moe_blocks": [0, 1, 2, 3]}, "host_expert_layers": [2], "host_expert_parts": [],
            "devices": [{"name": "CUDA0", "first_slot": 2, "n_layers": 3, "moe_layers": 2, "expert_layers": 1}]}
    assert host_expert_blocks(plan) == {0, 1, 2} and moe_blocks(plan) == 4
    del plan["model"]  # a plan written before the list: the blocks it places and the host's split ones
    assert host_expert_blocks(plan) == {2} and moe_blocks(plan) == 2
