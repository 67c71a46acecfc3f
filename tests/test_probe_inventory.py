"""The device inventory: names and order as llama.cpp gives them (checked against `llama-server
--list-devices` with real workers), busy and dead workers, what-if devices, budgets, host RAM."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from llamalaunch.errors import BadInputError, ProbeError, ToolchainError
from llamalaunch.probe import rpc
from llamalaunch.probe.assume import canonical_device_name, parse_assumptions, parse_device_sizes
from llamalaunch.probe.device import HostMemory
from llamalaunch.probe.host import cpu_model, probe_host
from llamalaunch.probe.inventory import (
    Inventory,
    ListedDevice,
    disagreements,
    fill_unknown_memory,
    list_devices_from_binary,
    parse_list_devices,
    probe_devices,
    split_endpoints,
)
from llamalaunch.probe.nvml import NvmlGpu
from llamalaunch.units import GIB, MIB
from tests.fake_rpc_worker import FakeRpcWorker
from tests.support import RpcWorker, free_port
from tests.test_probe_rpc import holding_worker, start_worker_with_args

PHYSICAL_RAM_BYTES = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _no_gpus() -> list[NvmlGpu]:
    return []


def _one_gpu() -> list[NvmlGpu]:
    return [NvmlGpu(0, "NVIDIA H100 80GB HBM3", "GPU-1111", "0000:01:00.0", 70 * GIB, 80 * GIB, "9.0")]


# --- real workers, checked against llama-server's own list -------------------------------------------

@pytest.mark.llama
@pytest.mark.parametrize("devices_per_worker", [(1,), (1, 1), (1, 2, 1)])
def test_names_and_order_agree_with_llama_server(
        devices_per_worker: tuple[int, ...], rpc_workers: Callable[..., RpcWorker],
        llama_bin_dir: Path, tmp_path: Path) -> None:
    workers = []
    for count in devices_per_worker:
        if count == 1:
            workers.append(rpc_workers())
        else:
            workers.append(start_worker_with_args(llama_bin_dir, tmp_path, "-d", ",".join(["CPU"] * count)))
    endpoints = [worker.endpoint for worker in workers]
    try:
        inventory = probe_devices(endpoints, local_gpus=False)
        listed = list_devices_from_binary(llama_bin_dir / "llama-server", endpoints)
    finally:
        for worker in workers:
            worker.stop()
    expected_names = [f"RPC{i}" for i in range(sum(devices_per_worker))]
    assert [d.name for d in inventory.devices] == [item.name for item in listed] == expected_names
    assert disagreements(inventory.devices, listed) == []
    assert [d.order for d in inventory.devices] == list(range(len(expected_names)))
    expected_endpoints = [endpoint for endpoint, count in zip(endpoints, devices_per_worker, strict=True)
                          for _ in range(count)]
    assert [d.endpoint for d in inventory.devices] == expected_endpoints
    worker_indices = [i for count in devices_per_worker for i in range(count)]
    assert [d.worker_index for d in inventory.devices] == worker_indices
    for device, item in zip(inventory.devices, listed, strict=True):
        assert device.total_bytes // MIB == item.total_bytes // MIB
        assert device.free_bytes == device.total_bytes == PHYSICAL_RAM_BYTES  # a CPU worker: all "free"


@pytest.mark.llama
def test_local_gpus_come_after_rpc_devices(rpc_workers: Callable[..., RpcWorker]) -> None:
    worker = rpc_workers()
    inventory = probe_devices([worker.endpoint], read_gpus=_one_gpu)
    assert [(d.name, d.order) for d in inventory.devices] == [("RPC0", 0), ("CUDA0", 1)]


@pytest.mark.llama
def test_busy_worker_has_unknown_memory_and_planning_needs_a_budget(
        rpc_workers: Callable[..., RpcWorker]) -> None:
    idle, busy, last = rpc_workers(), rpc_workers(), rpc_workers()
    with holding_worker(busy.endpoint):
        inventory = probe_devices([idle.endpoint, busy.endpoint, last.endpoint], local_gpus=False,
                                  reply_timeout_s=0.3)
    assert [d.name for d in inventory.devices] == ["RPC0", "RPC1", "RPC2"]
    assert inventory.unknown_memory == ("RPC1",)
    busy_device = inventory.device("RPC1")
    assert (busy_device.free_bytes, busy_device.endpoint) == (0, busy.endpoint)
    assert busy_device.note and busy_device.note.startswith("busy")
    assert len(inventory.problems) == 1 and busy.endpoint in inventory.problems[0]
    with pytest.raises(ProbeError, match=f"RPC1 {busy.endpoint}: busy serving another client \\(python") as caught:
        fill_unknown_memory(inventory, {})
    assert "--budget RPC1=SIZE" in str(caught.value.hint)
    planned = fill_unknown_memory(inventory, {"RPC1": 3 * GIB})
    assert planned.device("RPC1").free_bytes == 3 * GIB and planned.unknown_memory == ()
    assert rpc.wait_for_keepers(10)
    assert busy.process.poll() is None and rpc.probe_worker(busy.endpoint).version == "7.0.0"


@pytest.mark.llama
def test_dead_worker_names_endpoint_and_fix(rpc_workers: Callable[..., RpcWorker]) -> None:
    alive, dead = rpc_workers(), rpc_workers()
    dead.stop()
    with pytest.raises(ProbeError) as caught:
        probe_devices([alive.endpoint, dead.endpoint], local_gpus=False)
    assert dead.endpoint in str(caught.value) and "llamalaunch worker" in str(caught.value.hint)


@pytest.mark.llama
def test_list_devices_refuses_a_busy_worker_without_killing_it(
        rpc_workers: Callable[..., RpcWorker], llama_bin_dir: Path) -> None:
    worker = rpc_workers()
    with holding_worker(worker.endpoint), pytest.raises(rpc.WorkerBusyError):
        list_devices_from_binary(llama_bin_dir / "llama-server", [worker.endpoint], reply_timeout_s=0.3)
    assert rpc.wait_for_keepers(10)
    assert worker.process.poll() is None


@pytest.mark.llama
def test_list_devices_without_workers(llama_bin_dir: Path) -> None:
    assert list_devices_from_binary(llama_bin_dir / "llama-server", []) == []  # a CPU build: (none)


def test_list_devices_with_a_broken_binary(tmp_path: Path) -> None:
    with pytest.raises(ToolchainError):
        list_devices_from_binary(tmp_path / "no-such-llama-server", [])


def test_wrong_port() -> None:
    with pytest.raises(rpc.WorkerRefusedError):
        probe_devices([f"127.0.0.1:{free_port()}"], local_gpus=False)


def test_fake_worker_in_the_inventory() -> None:
    with FakeRpcWorker("two_devices") as two, FakeRpcWorker("good") as one:
        inventory = probe_devices([two.endpoint, one.endpoint], read_gpus=_one_gpu)
    assert [(d.name, d.endpoint, d.worker_index) for d in inventory.devices] == [
        ("RPC0", two.endpoint, 0), ("RPC1", two.endpoint, 1), ("RPC2", one.endpoint, 0),
        ("CUDA0", None, None)]
    assert inventory.devices[3].description == "NVIDIA H100 80GB HBM3"


def test_fake_garbage_worker_fails_the_inventory() -> None:
    with FakeRpcWorker("garbage") as fake, pytest.raises(rpc.WorkerReplyError, match=fake.endpoint):
        probe_devices([fake.endpoint], local_gpus=False)


def test_no_driver_is_a_note_here() -> None:
    inventory = probe_devices()
    if inventory.devices:
        pytest.skip("this machine has GPUs")
    assert inventory.notes and inventory.notes[0].startswith("local GPUs: ")
    assert inventory.problems == () and inventory.unknown_memory == ()


def test_endpoints_are_checked_before_anything_runs() -> None:
    assert split_endpoints(["a:1,b:2", " c:3 "]) == ("a:1", "b:2", "c:3")
    with pytest.raises(BadInputError, match="more than once"):
        split_endpoints(["a:1", "a:1"])
    with pytest.raises(BadInputError, match="is not HOST:PORT"):
        probe_devices(["a:1", "bad"], local_gpus=False)


# --- what-if devices ------------------------------------------------------------------------------------

def test_assume_probes_nothing_and_orders_like_llama_cpp() -> None:
    dead = f"127.0.0.1:{free_port()}"  # never contacted
    inventory = probe_devices([dead], assume=["CUDA1=6GiB", "cuda0=24GiB", "RPC0=6GiB/8GiB"],
                              read_gpus=_explode)
    assert [(d.name, d.backend, d.order, d.assumed) for d in inventory.devices] == [
        ("RPC0", "RPC", 0, True), ("CUDA0", "CUDA", 1, True), ("CUDA1", "CUDA", 2, True)]
    rpc0 = inventory.device("RPC0")
    assert (rpc0.free_bytes, rpc0.total_bytes, rpc0.endpoint) == (6 * GIB, 8 * GIB, dead)
    assert inventory.device("CUDA0").total_bytes == 24 * GIB


def _explode() -> list[NvmlGpu]:
    raise AssertionError("what-if must not probe GPUs")


def test_assume_host_ram_and_backends() -> None:
    host = HostMemory(1, 2, 16, "Test CPU")
    devices, assumed_host = parse_assumptions(["Vulkan0=8G,ROCm0=16G", "MTL0=32G", "CPU=64GiB/128GiB",
                                               "rpc2=1G", "RPC10=1G", "SYCL0=4G"], host)
    assert [d.name for d in devices] == ["RPC2", "RPC10", "ROCm0", "MTL0", "SYCL0", "Vulkan0"]
    assert [d.backend for d in devices] == ["RPC", "RPC", "ROCm", "Metal", "SYCL", "Vulkan"]
    assert assumed_host == HostMemory(64 * GIB, 128 * GIB, 16, "Test CPU")


@pytest.mark.parametrize(("value", "words"), [
    ("CUDA0", "is not NAME=FREE[/TOTAL]"),
    ("CUDA0=", "is not NAME=FREE[/TOTAL]"),
    ("CUDA0=6GiB/", "is not NAME=FREE[/TOTAL]"),
    ("GPU0=6GiB", "'GPU0' is not a llama.cpp device name"),
    ("CUDA=6GiB", "'CUDA' is not a llama.cpp device name"),
    ("CUDA0=lots", "'lots' is not a size"),
    ("CUDA0=8GiB/6GiB", "free is larger than total"),
    ("CUDA0=1G,cuda0=2G", "gives CUDA0 twice"),
])
def test_bad_assume_values(value: str, words: str) -> None:
    with pytest.raises(BadInputError) as caught:
        parse_assumptions([value])
    assert words in str(caught.value)
    assert caught.value.hint


def test_device_sizes_for_budget_and_reserve() -> None:
    assert parse_device_sizes(["RPC0=1GiB", "cuda1=1.5GiB,CPU=512MiB"], "--budget") == {
        "RPC0": GIB, "CUDA1": 3 * GIB // 2, "CPU": 512 * MIB}
    assert parse_device_sizes([], "--reserve") == {}
    with pytest.raises(BadInputError, match="--reserve value 'CUDA0' is not NAME=SIZE"):
        parse_device_sizes(["CUDA0"], "--reserve")
    with pytest.raises(BadInputError, match="--budget gives RPC0 twice"):
        parse_device_sizes(["RPC0=1G", "rpc0=2G"], "--budget")
    with pytest.raises(BadInputError, match="--budget RPC0"):
        parse_device_sizes(["RPC0=-1G"], "--budget")


def test_canonical_names() -> None:
    assert canonical_device_name(" cuda01 ", "x") == ("CUDA1", "CUDA")
    assert canonical_device_name("metal0", "x") == ("MTL0", "Metal")
    assert canonical_device_name("cpu", "x") == ("CPU", "CPU")


# --- host and parsing ----------------------------------------------------------------------------------

def test_probe_host() -> None:
    host = probe_host()
    assert 0 < host.free_bytes <= host.total_bytes == PHYSICAL_RAM_BYTES
    assert host.cpu_count == os.cpu_count() and host.cpu_description


def test_cpu_model_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                       "model name\t: AMD EPYC 7763 64-Core Processor\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7763 64-Core Processor"
    assert cpu_model(tmp_path / "missing")  # falls back to the platform's word, never empty


def test_parse_list_devices() -> None:
    output = ("Available devices:\n  RPC0: 127.0.0.1:50631 (24105 MiB, 24105 MiB free)\n"
              "  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80474 MiB free)\n")
    assert parse_list_devices(output) == [
        ListedDevice("RPC0", "127.0.0.1:50631", 24105 * MIB, 24105 * MIB),
        ListedDevice("CUDA0", "NVIDIA H100 80GB HBM3", 81079 * MIB, 80474 * MIB)]
    assert parse_list_devices("Available devices:\n  (none)\n") == []


def test_inventory_device_lookup() -> None:
    inventory = Inventory((), HostMemory(1, 1, 1, "x"))
    with pytest.raises(BadInputError, match="no device named 'CUDA0'"):
        inventory.device("CUDA0")
