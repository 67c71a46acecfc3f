"""The argv builder as a table: devices, the placement chosen and the request → the exact llama-server argv.

Device naming was fixed twice here (llama.cpp numbers RPC devices across the workers on --rpc, in that
order, so leaving a worker out renumbers the rest; -dev is needed only when the order is not llama.cpp's
own): those rows come first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.argv import ArgvOptions, build_argv
from llamalaunch.plan.companions import Companion
from llamalaunch.plan.request import Request
from llamalaunch.plan.split import Choice
from llamalaunch.probe.device import Device
from llamalaunch.units import GIB
from tests.synthetic import write_preset

A, B, C = "10.0.0.5:50052", "10.0.0.6:50052", "10.0.0.7:50052"


def gpu(index: int) -> Device:
    return Device(f"CUDA{index}", "CUDA", "H100", 24 * GIB, 24 * GIB, index)


def rpc(index: int, endpoint: str | None, worker_index: int = 0) -> Device:
    return Device(f"RPC{index}", "RPC", "worker", 12 * GIB, 12 * GIB, index, endpoint=endpoint,
                  worker_index=worker_index)


TWO_WORKERS_AND_A_GPU = (rpc(0, A), rpc(1, B), gpu(0))
THREE_WORKERS = (rpc(0, A), rpc(1, B), rpc(2, C))
DOUBLE_WORKER = (rpc(0, A, 0), rpc(1, A, 1), rpc(2, B), gpu(0))
# -np 4 -kvu -b 2048 -ub 512 -ctk f16 -ctv f16 -fa auto: the request's defaults
DEFAULTS = ("-np", "4", "-kvu", "-b", "2048", "-ub", "512", "-ctk", "f16", "-ctv", "f16", "-fa", "auto")
FIT_OFF = ("--fit", "off")
MMPROJ = Companion("mmproj", "p.gguf", GIB, "--mmproj", "-mmdev")


@dataclasses.dataclass(frozen=True)
class Row:
    devices: tuple[Device, ...]
    order: tuple[str, ...]  # the choice's devices, in the order they take the slots
    counts: tuple[int, ...]
    argv: tuple[str, ...]  # what follows -m m.gguf -c 4096 -ngl N
    request: dict[str, Any] = dataclasses.field(default_factory=dict)
    capabilities: frozenset[str] | None = None
    companions: tuple[tuple[Companion, str], ...] = ()
    host_expert_layers: frozenset[int] = frozenset()


ROWS = {
    "one GPU: no -dev, no -ts": Row(
        (gpu(0),), ("CUDA0",), (33,), (*DEFAULTS, *FIT_OFF)),
    "two GPUs in llama.cpp's order: -ts only": Row(
        (gpu(0), gpu(1)), ("CUDA0", "CUDA1"), (10, 23), ("-ts", "10,23", *DEFAULTS, *FIT_OFF)),
    "two GPUs reversed: -dev names the order": Row(
        (gpu(0), gpu(1)), ("CUDA1", "CUDA0"), (23, 10),
        ("-dev", "CUDA1,CUDA0", "-ts", "23,10", *DEFAULTS, *FIT_OFF)),
    "workers first, then the GPU: --rpc before -ts, no -dev": Row(
        TWO_WORKERS_AND_A_GPU, ("RPC0", "RPC1", "CUDA0"), (8, 8, 17),
        ("--rpc", f"{A},{B}", "-ts", "8,8,17", *DEFAULTS, *FIT_OFF)),
    "an unused first worker is left off --rpc: the second becomes RPC0": Row(
        TWO_WORKERS_AND_A_GPU, ("RPC1", "CUDA0"), (8, 25),
        ("--rpc", B, "-ts", "8,25", *DEFAULTS, *FIT_OFF)),
    "an unused worker and a custom order: -dev in llama.cpp's renumbered names": Row(
        THREE_WORKERS, ("RPC2", "RPC1"), (20, 13),
        ("--rpc", f"{B},{C}", "-dev", "RPC1,RPC0", "-ts", "20,13", *DEFAULTS, *FIT_OFF)),
    "the second device of a two-device worker: numbered inside the worker": Row(
        DOUBLE_WORKER, ("RPC1", "CUDA0"), (10, 23),
        ("--rpc", A, "-dev", "RPC1,CUDA0", "-ts", "10,23", *DEFAULTS, *FIT_OFF)),
    "a worker after a two-device worker counts on from its devices": Row(
        DOUBLE_WORKER, ("RPC2", "RPC0"), (16, 17),
        ("--rpc", f"{A},{B}", "-dev", "RPC2,RPC0", "-ts", "16,17", *DEFAULTS, *FIT_OFF)),
    "a what-if worker without an endpoint keeps its name": Row(
        (rpc(0, None), gpu(0)), ("RPC0", "CUDA0"), (16, 17), ("-ts", "16,17", *DEFAULTS, *FIT_OFF)),
    "nothing offloaded: -dev none, and no --host-weights flag (nothing is spilled from a device)": Row(
        (gpu(0),), (), (), ("-dev", "none", *DEFAULTS, *FIT_OFF)),
    "a companion keeps its worker on --rpc though no layer went there": Row(
        (rpc(0, A), gpu(0)), ("CUDA0",), (33,),
        ("--rpc", A, "-dev", "CUDA0", *DEFAULTS, "--mmproj", "p.gguf", "-mmdev", "RPC0", *FIT_OFF),
        companions=((MMPROJ, "RPC0"),)),
    "a companion on a renumbered worker gets the new name": Row(
        TWO_WORKERS_AND_A_GPU, ("CUDA0",), (33,),
        ("--rpc", B, "-dev", "CUDA0", *DEFAULTS, "--mmproj", "p.gguf", "-mmdev", "RPC0", *FIT_OFF),
        companions=((MMPROJ, "RPC1"),)),
    "the request's own flags": Row(
        (gpu(0),), ("CUDA0",), (33,),
        ("-np", "1", "-no-kvu", "-b", "1024", "-ub", "256", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on",
         "--swa-full", *FIT_OFF),
        request={"n_parallel": 1, "kv_unified": False, "n_batch": 1024, "n_ubatch": 256, "cache_type_k": "q8_0",
                 "cache_type_v": "q8_0", "flash_attn": "on", "swa_full": True}),
    "a build without --fit gets no --fit off": Row(
        (gpu(0),), ("CUDA0",), (33,), DEFAULTS, capabilities=frozenset({"--rpc", "-dev"})),
    "host experts: -ot, then the mode's flag (auto with a GPU: pinned, -lm none)": Row(
        (gpu(0),), ("CUDA0",), (33,), (*DEFAULTS, "-ot", "blk\\.(0|1)\\.[^.]*_exps\\.=CPU", "-lm", "none", *FIT_OFF),
        host_expert_layers=frozenset({0, 1})),
    "host experts pinned: load them into memory": Row(
        (gpu(0),), ("CUDA0",), (33,), (*DEFAULTS, "-ot", "blk\\.(0|1)\\.[^.]*_exps\\.=CPU", "-lm", "none", *FIT_OFF),
        request={"host_weights": "pinned"}, host_expert_layers=frozenset({0, 1})),
    "host experts pinned on a build without --load-mode: --no-mmap": Row(
        (gpu(0),), ("CUDA0",), (33,), (*DEFAULTS, "-ot", "blk\\.(3)\\.[^.]*_exps\\.=CPU", "--no-mmap"),
        request={"host_weights": "pinned"}, capabilities=frozenset({"--no-mmap"}), host_expert_layers=frozenset({3})),
    # --host-weights: how llama.cpp keeps what stays in host memory (experts or whole layers), said only then
    "host experts mapped: llama.cpp's default, no flag": Row(
        (gpu(0),), ("CUDA0",), (33,), (*DEFAULTS, "-ot", "blk\\.(0)\\.[^.]*_exps\\.=CPU", *FIT_OFF),
        request={"host_weights": "mapped"}, host_expert_layers=frozenset({0})),
    "host experts repacked: --no-host, the file still mapped": Row(
        (gpu(0),), ("CUDA0",), (33,), (*DEFAULTS, "-ot", "blk\\.(0)\\.[^.]*_exps\\.=CPU", "--no-host", *FIT_OFF),
        request={"host_weights": "repacked"}, host_expert_layers=frozenset({0})),
    "host experts repacked on a build without --no-host: no flag": Row(
        (gpu(0),), ("CUDA0",), (33,), (*DEFAULTS, "-ot", "blk\\.(0)\\.[^.]*_exps\\.=CPU"),
        request={"host_weights": "repacked"}, capabilities=frozenset({"--load-mode"}),
        host_expert_layers=frozenset({0})),
    "host experts on workers only: auto maps them (no GPU streams from pinned memory)": Row(
        (rpc(0, A),), ("RPC0",), (33,),
        ("--rpc", A, *DEFAULTS, "-ot", "blk\\.(0)\\.[^.]*_exps\\.=CPU", *FIT_OFF),
        host_expert_layers=frozenset({0})),
    "the first 2 of 5 slots on the host (--cpu-spill), pinned": Row(
        (gpu(0),), ("CUDA0",), (3,), (*DEFAULTS, "-lm", "none", *FIT_OFF), request={"host_weights": "pinned"}),
    "the first layers on the host, auto with a GPU: pinned": Row(
        (gpu(0),), ("CUDA0",), (3,), (*DEFAULTS, "-lm", "none", *FIT_OFF)),
    "the first layers on the host, repacked": Row(
        (gpu(0),), ("CUDA0",), (3,), (*DEFAULTS, "--no-host", *FIT_OFF), request={"host_weights": "repacked"}),
    "everything on the devices: no mode's flag, whichever is asked": Row(
        (gpu(0),), ("CUDA0",), (33,), (*DEFAULTS, *FIT_OFF), request={"host_weights": "repacked"}),
}


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> ModelProfile:
    return load_profile(write_preset(tmp_path_factory.mktemp("m") / "tiny.gguf", "tiny-llama"))


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_argv(profile: ModelProfile, row: Row) -> None:
    by_name = {device.name: device for device in row.devices}
    order = tuple(by_name[name] for name in row.order)
    choice = Choice(order, row.counts, sum(row.counts), {}, host_expert_layers=row.host_expert_layers)
    options = ArgvOptions("m.gguf", row.capabilities, row.companions)
    argv = build_argv(profile, Request(**row.request), 4096, choice, row.devices, options)
    assert argv == ("-m", "m.gguf", "-c", "4096", "-ngl", str(sum(row.counts)), *row.argv)


def test_the_model_path_is_passed_as_given(profile: ModelProfile, tmp_path: Path) -> None:
    path = str(tmp_path / "a model with spaces.gguf")
    choice = Choice((gpu(0),), (33,), 33, {})
    argv = build_argv(profile, Request(), 4096, choice, (gpu(0),), ArgvOptions(path))
    assert argv[:2] == ("-m", path)
