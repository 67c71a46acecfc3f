"""NVML for real where there is a driver (the GPU machine) or none (here); the CUDA_VISIBLE_DEVICES
mapping with a fake NVML reader injected as a parameter (the only fake allowed for it)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

from llamalaunch.probe.gpus import probe_local_gpus, select_visible
from llamalaunch.probe.nvml import (
    NvmlGpu,
    NvmlUnavailableError,
    normalize_pci_bus_id,
    nvml_query,
    nvml_unavailable_reason,
    read_nvml_gpus,
)

# --- real NVML ------------------------------------------------------------------------------------------

HAS_DRIVER = nvml_unavailable_reason() is None


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
def test_no_driver_is_a_reason_not_an_error() -> None:
    reason = nvml_unavailable_reason()
    assert reason is not None and "\n" not in reason
    assert nvml_query("nvmlDeviceGetCount", default=-1) == -1
    with pytest.raises(NvmlUnavailableError, match=re.escape(reason)):
        nvml_query("nvmlDeviceGetCount", ignore_errors=False)
    with pytest.raises(NvmlUnavailableError):
        read_nvml_gpus()
    probe = probe_local_gpus()
    assert probe.devices == () and probe.reason == reason


@pytest.mark.skipif(not HAS_DRIVER, reason="no NVIDIA driver here")
def test_real_gpus_get_cuda_names_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = read_nvml_gpus()
    probe = probe_local_gpus()
    assert [d.name for d in probe.devices] == [f"CUDA{i}" for i in range(len(gpus))]
    for device in probe.devices:
        assert 0 < device.free_bytes <= device.total_bytes
        assert device.pci_bus_id and device.uuid and device.uuid.startswith(("GPU-", "MIG-"))
        assert device.compute_capability and "." in device.compute_capability
        print(device)
    assert nvml_query("nvmlDeviceGetCount") == len(gpus)


@pytest.mark.skipif(not HAS_DRIVER, reason="no NVIDIA driver here")
def test_real_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = sorted(read_nvml_gpus(), key=lambda gpu: gpu.pci_bus_id)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus[-1].uuid[:12])
    assert [d.uuid for d in probe_local_gpus().devices] == [gpus[-1].uuid]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert probe_local_gpus().devices == ()


# --- fake NVML reader -------------------------------------------------------------------------------

def _gpu(index: int, bus: str, uuid: str, total_gib: int, mig: Sequence[NvmlGpu] = ()) -> NvmlGpu:
    return NvmlGpu(index, f"GPU {uuid[:8]}", uuid, f"0000:{bus}:00.0", (total_gib - 1) << 30,
                   total_gib << 30, "8.6", 384, 9751, tuple(mig))


# NVML order deliberately not PCI order, to show that PCI_BUS_ID order wins.
BIG = _gpu(0, "41", "GPU-bbbb1111-0000", 24)
SMALL = _gpu(1, "01", "GPU-aaaa2222-0000", 6)
MIDDLE = _gpu(2, "21", "GPU-aaaa3333-0000", 12)
FAKE_GPUS = [BIG, SMALL, MIDDLE]  # PCI order: SMALL (01), MIDDLE (21), BIG (41)


def _probe(visible: str | None, gpus: Sequence[NvmlGpu] = FAKE_GPUS) -> tuple[list[str], str | None]:
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    probe = probe_local_gpus(lambda: list(gpus), environ)
    assert [d.name for d in probe.devices] == [f"CUDA{i}" for i in range(len(probe.devices))]
    assert [d.order for d in probe.devices] == list(range(len(probe.devices)))
    return [d.uuid or "" for d in probe.devices], probe.reason


@pytest.mark.parametrize(("visible", "uuids"), [
    (None, [SMALL.uuid, MIDDLE.uuid, BIG.uuid]),
    ("0,1,2", [SMALL.uuid, MIDDLE.uuid, BIG.uuid]),
    ("2,0", [BIG.uuid, SMALL.uuid]),  # CUDA numbers them in the listed order
    (" 1 , 0 ", [MIDDLE.uuid, SMALL.uuid]),
    ("GPU-bbbb", [BIG.uuid]),
    ("GPU-aaaa3333,0", [MIDDLE.uuid, SMALL.uuid]),
    (BIG.uuid, [BIG.uuid]),
])
def test_cuda_visible_devices_selects_and_orders(visible: str | None, uuids: list[str]) -> None:
    assert _probe(visible) == (uuids, None)


@pytest.mark.parametrize(("visible", "uuids"), [
    ("0,7,1", [SMALL.uuid]),  # an invalid entry hides itself and all after it
    ("0,0,1", [SMALL.uuid]),  # so does a repeat
    ("GPU-aaaa,2", []),  # ambiguous prefix
    ("-1", []),
    ("nonsense", []),
])
def test_cuda_visible_devices_stops_at_a_bad_entry(visible: str, uuids: list[str]) -> None:
    found, reason = _probe(visible)
    assert found == uuids
    assert reason is not None and "CUDA ignores it and every entry after it" in reason


def test_empty_cuda_visible_devices_hides_all() -> None:
    assert _probe("") == ([], "CUDA_VISIBLE_DEVICES is empty: no GPU is visible")


def test_fields_are_carried_over() -> None:
    probe = probe_local_gpus(lambda: [BIG], {})
    (device,) = probe.devices
    assert (device.backend, device.description, device.pci_bus_id) == ("CUDA", BIG.name, "0000:41:00.0")
    assert (device.free_bytes, device.total_bytes) == (23 << 30, 24 << 30)
    speed = (device.compute_capability, device.memory_bus_width_bits, device.memory_clock_mhz)
    assert speed == ("8.6", 384, 9751)
    assert not device.assumed and device.endpoint is None


def test_mig_instances_replace_their_gpu() -> None:
    mig_a = _gpu(0, "41", "MIG-1234aaaa", 10)
    mig_b = _gpu(0, "41", "MIG-5678bbbb", 10)
    mig_gpu = _gpu(0, "41", "GPU-cccc", 80, mig=[mig_a, mig_b])
    gpus = [mig_gpu, SMALL]
    assert _probe(None, gpus) == ([SMALL.uuid, mig_a.uuid, mig_b.uuid], None)
    assert _probe("MIG-5678", gpus) == ([mig_b.uuid], None)
    assert _probe("MIG-5678,0", gpus) == ([mig_b.uuid, SMALL.uuid], None)


def test_no_gpus_and_no_driver_from_the_reader() -> None:
    assert probe_local_gpus(list, {}).reason == "NVML sees no GPU"

    def no_driver() -> list[NvmlGpu]:
        raise NvmlUnavailableError("no NVIDIA driver (libnvidia-ml.so not found)")

    probe = probe_local_gpus(no_driver, {})
    assert probe.devices == () and probe.reason == "no NVIDIA driver (libnvidia-ml.so not found)"


def test_select_visible_is_pure() -> None:
    assert select_visible([SMALL, BIG], "1") == ([BIG], None)


@pytest.mark.parametrize(("raw", "normal"), [
    ("00000000:01:00.0", "0000:01:00.0"),
    ("0000:C1:00.0", "0000:c1:00.0"),
    ("00000001:41:00.0", "0001:41:00.0"),
])
def test_normalize_pci_bus_id(raw: str, normal: str) -> None:
    assert normalize_pci_bus_id(raw) == normal
