"""Local NVIDIA GPUs under the names llama.cpp's CUDA backend gives them (CUDA0, CUDA1, …).

CUDA numbers the GPUs that CUDA_VISIBLE_DEVICES lets through, in the order it lists them; without it,
all GPUs in CUDA_DEVICE_ORDER. `serve` sets CUDA_DEVICE_ORDER=PCI_BUS_ID for llama-server, so here the
base order is PCI bus order (NVML's own order, sorted to be sure).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from llamalaunch.probe.device import Device
from llamalaunch.probe.nvml import NvmlGpu, NvmlUnavailableError, read_nvml_gpus


@dataclass(frozen=True)
class GpuProbe:
    devices: tuple[Device, ...]  # CUDA0, CUDA1, … with order = CUDA index
    reason: str | None = None  # why there are none, or what was left out


def probe_local_gpus(read_gpus: Callable[[], Sequence[NvmlGpu]] = read_nvml_gpus,
                     environ: Mapping[str, str] | None = None) -> GpuProbe:
    """The GPUs llama-server would see as CUDA devices, with free/total memory.

    `read_gpus` is NVML (a fake in unit tests); `environ` (default: ours) gives CUDA_VISIBLE_DEVICES.
    A machine without the driver gives no devices and a reason, not an error.
    """
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    try:
        gpus = sorted(read_gpus(), key=lambda gpu: (gpu.pci_bus_id, gpu.nvml_index))
    except NvmlUnavailableError as exc:
        return GpuProbe((), str(exc))
    if not gpus:
        return GpuProbe((), "NVML sees no GPU")
    selected, problem = select_visible(gpus, visible)
    devices = tuple(_cuda_device(index, gpu) for index, gpu in enumerate(selected))
    if not devices and problem is None:
        problem = "CUDA_VISIBLE_DEVICES hides every GPU"
    return GpuProbe(devices, problem)


def _whole_or_mig(gpus: Sequence[NvmlGpu]) -> list[NvmlGpu]:
    """What CUDA enumerates with no CUDA_VISIBLE_DEVICES: a GPU in MIG mode shows as its MIG instances."""
    return [unit for gpu in gpus for unit in (gpu.mig_instances or (gpu,))]


def select_visible(gpus: Sequence[NvmlGpu], visible: str | None) -> tuple[list[NvmlGpu], str | None]:
    """The GPUs CUDA_VISIBLE_DEVICES lets through, in its order, and a note when it has a bad entry.

    Entries are indices into `gpus` (PCI order), `GPU-…` or `MIG-…` UUID prefixes. Like CUDA, an
    invalid, ambiguous or repeated entry hides itself and every entry after it.
    """
    if visible is None:
        return _whole_or_mig(gpus), None
    if not visible.strip():
        return [], "CUDA_VISIBLE_DEVICES is empty: no GPU is visible"
    selected: list[NvmlGpu] = []
    for entry in (part.strip() for part in visible.split(",")):
        gpu = _match_entry(gpus, entry)
        if gpu is None or gpu in selected:
            return selected, (f"CUDA_VISIBLE_DEVICES={visible!r}: entry {entry!r} matches no GPU (or "
                              "repeats one); CUDA ignores it and every entry after it")
        selected.append(gpu)
    return selected, None


def _match_entry(gpus: Sequence[NvmlGpu], entry: str) -> NvmlGpu | None:
    if entry.isdigit():
        return gpus[int(entry)] if int(entry) < len(gpus) else None
    if entry.startswith("MIG-"):
        candidates = [mig for gpu in gpus for mig in gpu.mig_instances]
    elif entry.startswith("GPU-"):
        candidates = list(gpus)
    else:
        return None
    matches = [gpu for gpu in candidates if gpu.uuid.startswith(entry)]
    return matches[0] if len(matches) == 1 else None


def _cuda_device(index: int, gpu: NvmlGpu) -> Device:
    return Device(
        name=f"CUDA{index}", backend="CUDA", description=gpu.name,
        free_bytes=gpu.free_bytes, total_bytes=gpu.total_bytes, order=index,
        pci_bus_id=gpu.pci_bus_id or None, uuid=gpu.uuid or None,
        compute_capability=gpu.compute_capability, memory_bus_width_bits=gpu.memory_bus_width_bits,
        memory_clock_mhz=gpu.memory_clock_mhz)
