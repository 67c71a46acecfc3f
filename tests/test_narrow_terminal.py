"""Tables on a terminal narrower than they are: nothing cut with "…", no line past the edge, every word kept.

The CLI prints through cli_console; on a terminal rich would fit a table by cutting its cells ("CU…",
"10.0…"). Each table here is printed to a pseudo-terminal of 80 columns (and narrower), and its words are
compared with those of the same table printed to a pipe (full width).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import pytest
from rich.console import RenderableType

from llamalaunch.model.load import load_profile
from llamalaunch.observe.console import PIPE_WIDTH, cli_console
from llamalaunch.observe.render import (
    alternatives_table,
    devices_table,
    plan_table,
    plan_view,
    toolchain_table,
)
from llamalaunch.observe.snapshot import DeviceStatus, HostStatus, StatusSnapshot
from llamalaunch.observe.view import devices_table as status_devices_table
from llamalaunch.observe.view import status_view
from llamalaunch.plan.argv import ArgvOptions
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.plan.types import Plan
from llamalaunch.probe.device import Device, HostMemory
from llamalaunch.toolchain.discover import Binary, Toolchain
from llamalaunch.units import GIB, MIB
from tests.synthetic import SyntheticShape, write_synthetic

# Qwen3-30B-A3B's shape (bench/bench_moe_gpu.py): its plan table is about 118 columns wide.
QWEN3_30B_A3B = SyntheticShape(n_layer=48, n_embd=2048, n_ff=6144, n_head=32, n_head_kv=4, n_vocab=151936,
                               head_dim=128, n_ctx_train=40960, n_expert=128, n_expert_used=8, n_ff_exp=768)
DENSE_8B = SyntheticShape(n_layer=36, n_embd=4096, n_ff=12288, n_head=32, n_head_kv=8, n_vocab=151936, head_dim=128)
BOX = re.compile("[\u2500-\u257f]")


def _terminal(renderable: RenderableType, width: int) -> str:
    console = cli_console(file=io.StringIO(), width=width, force_terminal=True, color_system=None, record=True)
    assert console.is_terminal and console.width == width
    console.print(renderable)
    return console.export_text()


def _pipe(renderable: RenderableType) -> str:
    console = cli_console(file=io.StringIO(), record=True)
    assert not console.is_terminal and console.width == PIPE_WIDTH
    console.print(renderable)
    return console.export_text()


def _words(text: str) -> Counter[str]:
    return Counter(word for word in text.split() if not BOX.search(word))


def assert_nothing_cut(renderable: RenderableType, width: int) -> str:
    text = _terminal(renderable, width)
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= width, text
    assert not _words(_pipe(renderable)) - _words(text), text  # every word, as often (a header more often)
    return text


def _cuda(index: int, free: int, total: int = 80 * GIB) -> Device:
    return Device(f"CUDA{index}", "CUDA", "NVIDIA H100 80GB HBM3", free, total, index)


def _plan(path: Path, shape: SyntheticShape, arch: str, devices: tuple[Device, ...], compare: bool = False) -> Plan:
    profile = load_profile(write_synthetic(path, arch, shape, "Q4_K"))
    return make_plan(profile, devices, Request(ctx_tokens=16384), ArgvOptions(profile.path), compare=compare)


@pytest.fixture(scope="module")
def moe_plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    return _plan(tmp_path_factory.mktemp("m") / "a3b.gguf", QWEN3_30B_A3B, "qwen3moe", (_cuda(0, 10 * GIB),))


@pytest.mark.parametrize("width", [80, 100, 60, 40])
def test_moe_plan_table_keeps_every_name_and_number(moe_plan: Plan, width: int) -> None:
    text = assert_nothing_cut(plan_view(moe_plan), width)
    device = moe_plan.devices[0]
    assert "CUDA0" in text and "overhead" in text and f"{device.expert_layers}/{device.moe_layers}" in text


def test_a_table_that_fits_is_printed_as_built(moe_plan: Plan) -> None:
    """Wide enough, the table is rich's own (the heavy-headed box); narrower, a compact one on one line a row."""
    wide = _terminal(plan_table(moe_plan), 130)
    assert "┏" in wide and wide == _pipe(plan_table(moe_plan))
    compact = assert_nothing_cut(plan_view(moe_plan), 100)
    assert "┏" not in compact and re.search(r"^CUDA0 +10\.00 GiB .* 21/48 .*MiB$", compact, re.MULTILINE), compact


def test_dense_and_two_device_plans(tmp_path: Path) -> None:
    dense = _plan(tmp_path / "dense.gguf", DENSE_8B, "qwen3", (_cuda(0, 10 * GIB),))
    two = _plan(tmp_path / "a3b.gguf", QWEN3_30B_A3B, "qwen3moe", (_cuda(0, 10 * GIB), _cuda(1, 8 * GIB)),
                compare=True)
    for width in (80, 100):
        assert_nothing_cut(plan_view(dense), width)
        assert_nothing_cut(plan_view(two), width)
        assert_nothing_cut(alternatives_table(two), width)


def test_devices_and_toolchain_tables() -> None:
    devices = [Device("CUDA0", "CUDA", "NVIDIA GeForce RTX 4090 Laptop GPU", 15 * GIB, 16 * GIB, 0,
                      pci_bus_id="0000:01:00.0"),
               Device("RPC0", "RPC", "NVIDIA H100 80GB HBM3 (via RPC)", 79 * GIB, 80 * GIB, 1,
                      endpoint="192.168.100.200:50052")]
    host = HostMemory(400 * GIB, 512 * GIB, 192, "AMD EPYC 9654 96-Core Processor")
    for width in (80, 60):
        assert_nothing_cut(devices_table(devices, host), width)
    binary = Binary("llama-server", Path("/home/someone/.cache/llamalaunch/llama.cpp/b6000-cuda-12.4/bin/llama-server"),
                    "b6000 (build 6000, commit 0123abc)", "CUDA", frozenset({"--fit", "--rpc", "--list-devices"}))
    tools = toolchain_table(Toolchain(server=binary, rpc_server=None, fit_params=None, source="cache"))
    # too wide with its words whole: one row after another, the name whole, the long path folded only where
    # it is longer than the line (compared without the line breaks)
    text = _terminal(tools, 80)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    assert re.search(r"^binary +llama-server *$", text, re.MULTILINE), text
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("path "))
    last = next(i for i, line in enumerate(lines) if line.startswith("version "))
    assert "".join(line[len("path "):].strip() for line in lines[first:last]) == str(binary.path), text


def _status_snapshot() -> StatusSnapshot:
    def device(name: str, layers: int, experts: int, moe: int, planned_gib: float) -> DeviceStatus:
        return DeviceStatus(
            name=name, backend=name.rstrip("0123456789"), description="NVIDIA H100 80GB HBM3", endpoint=None,
            excluded=False, reason=None, n_layers=layers, first_slot=0, planned_weights_bytes=int(7.45 * GIB),
            planned_kv_bytes=1536 * MIB, planned_compute_bytes=184 * MIB, planned_overhead_bytes=768 * MIB,
            planned_bytes=int(planned_gib * GIB), free_at_plan_bytes=10 * GIB, total_bytes=80 * GIB,
            actual_weights_bytes=int(7.41 * GIB), actual_kv_bytes=1536 * MIB, actual_compute_bytes=int(24.6 * MIB),
            used_bytes=int(61.3 * GIB), free_bytes=int(18.7 * GIB), memory_source="nvml",
            expert_layers=experts, moe_layers=moe)

    return StatusSnapshot(
        taken_at=100.0, source="url", name=None, url="http://127.0.0.1:8080", running=True, gone_reason=None,
        phase="ready", model_name="Qwen3-30B-A3B-Instruct-2507", model_arch="qwen3moe", n_layer=48, n_slots=49,
        ctx_tokens=16384, n_gpu_layers=49,
        devices=(device("CUDA0", 39, 20, 39, 9.86), device("RPC0", 10, 1, 9, 3.2)),
        host=HostStatus(planned_weights_bytes=int(8.6 * GIB), planned_kv_bytes=int(2.3 * MIB),
                        planned_compute_bytes=24 * MIB, actual_bytes=int(8.7 * GIB), server_rss_bytes=int(9.1 * GIB),
                        free_bytes=300 * GIB, total_bytes=512 * GIB))


@pytest.mark.parametrize("width", [80, 60])
def test_status_devices_table_keeps_every_name_and_number(width: int) -> None:
    snapshot = _status_snapshot()
    text = assert_nothing_cut(status_devices_table(snapshot, bar_width=0), width)
    assert "RPC0" in text and "(1/9" in text and "experts)" in text
    frame = _terminal(status_view(snapshot, show_log=False), width)
    assert "…" not in frame and "RPC0" in frame and max(len(line) for line in frame.splitlines()) <= width, frame


def test_a_wrapped_table_keeps_whole_words_in_its_headers(moe_plan: Plan) -> None:
    """At 80 columns the MoE table's cells wrap at their spaces, no header is folded ("overhe" / "ad")."""
    text = assert_nothing_cut(plan_view(moe_plan), 80)
    header = next(line for line in text.splitlines() if line.startswith("device "))
    assert header.split() == ["device", "free", "slots", "layers", "experts", "weights", "KV", "compute",
                              "overhead", "planned", "spare"]

