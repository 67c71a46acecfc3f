"""Out-of-memory lines as llama.cpp prints them, and what the next plan learns from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamalaunch.launch.lessons import Lessons
from llamalaunch.launch.oom import OomTracker, OutOfMemory
from llamalaunch.model.load import load_profile
from llamalaunch.plan.argv import ArgvOptions
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.probe.device import Device
from llamalaunch.units import GIB, MIB

FIXTURES = Path(__file__).parent / "fixtures" / "llama-server-logs"


def fold(lines: list[str]) -> OutOfMemory | None:
    tracker = OomTracker()
    for line in lines:
        tracker.feed(line)
    return tracker.found


def bisect_block(ctx: int) -> list[str]:
    lines = (FIXTURES / "cuda-h100-excerpts-8b.log").read_text().splitlines()
    start = lines.index(f"===== bisect fail ctx={ctx}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("=====")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize(("ctx", "expected"), [
    (67584, OutOfMemory("kv", "CUDA0", 8858370048)),
    (45568, OutOfMemory("compute", "CUDA0", 168310912)),
    (44544, OutOfMemory("runtime")),
])
def test_each_kind_of_cuda_oom_seen_on_the_h100(ctx: int, expected: OutOfMemory) -> None:
    assert fold(bisect_block(ctx)) == expected


def test_rpc_and_recurrent_state_allocation_failures() -> None:
    lines = ["0.00.512.006 E ggml_backend_buft_alloc_buffer_n_default: failed to allocate RPC0[127.0.0.1:50071] "
             "buffer of size 188743680",
             "0.00.512.700 E llama_init_from_model: failed to initialize the context: failed to allocate buffer for "
             "rs cache"]
    assert fold(lines) == OutOfMemory("kv", "RPC0[127.0.0.1:50071]", 188743680)


def test_a_missing_model_is_not_an_oom() -> None:
    assert fold(["0.00.009 E cmn  common_init_: failed to load model '/nonexistent.gguf'",
                 "0.00.009 E srv  llama_server: exiting due to model loading error"]) is None


def test_the_failing_kv_allocation_caps_that_device_halfway(tmp_path: Path) -> None:
    from tests.synthetic import write_preset

    profile = load_profile(write_preset(tmp_path / "m.gguf", "llama-8b"))
    device = Device("CUDA0", "CUDA", "H100", 10 * GIB, 80 * GIB, 0)
    plan = make_plan(profile, [device], Request(ctx_tokens=None), ArgvOptions("m.gguf"))
    memory = plan.devices[0].memory
    lessons = Lessons()
    lessons.learn_allocation_failure(plan, "CUDA0", "kv", memory.kv_bytes)
    budget = lessons.budgets["CUDA0"]
    assert budget == memory.overhead_bytes + memory.weights_bytes + memory.kv_bytes // 2
    smaller = make_plan(profile, [device], lessons.apply(Request(ctx_tokens=None)), ArgvOptions("m.gguf"))
    assert smaller.ctx_tokens < plan.ctx_tokens
    assert smaller.devices[0].planned_bytes <= budget - 8 * MIB
