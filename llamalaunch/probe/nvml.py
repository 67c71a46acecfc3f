"""The only module that imports pynvml (nvidia-ml-py): one query function and one reader of GPU facts.

Follows nvitop's `nvmlQuery`: NVML starts lazily and once, under a lock, with shutdown at exit; every
call goes through `nvml_query`, which turns NVML errors into `default` unless told otherwise. A machine
without the NVIDIA driver is a normal case: `nvml_unavailable_reason()` says why, once.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pynvml
else:
    pynvml = None  # imported by _start_once (40 ms): only commands that look at local GPUs pay for it


@dataclass(frozen=True)
class NvmlGpu:
    """What NVML says about one GPU or MIG instance (None where NVML does not say)."""

    nvml_index: int  # NVML's index (PCI bus order); for a MIG instance, its parent's
    name: str
    uuid: str  # "GPU-…" or "MIG-…"
    pci_bus_id: str  # "0000:01:00.0"
    free_bytes: int
    total_bytes: int
    compute_capability: str | None = None  # "9.0"
    memory_bus_width_bits: int | None = None
    memory_clock_mhz: int | None = None  # maximum memory clock
    mig_instances: tuple[NvmlGpu, ...] = ()  # MIG devices of a GPU in MIG mode


class NvmlUnavailableError(Exception):
    """NVML cannot start (no driver, no GPU, driver/library mismatch); str() is the reason."""


_lock = threading.Lock()
_state: dict[str, Any] = {"started": False, "reason": None}


def _start_once() -> None:
    """Start NVML the first time it is needed; remember why it could not start."""
    with _lock:
        if _state["started"] or _state["reason"] is not None:
            return
        global pynvml
        import pynvml

        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            _state["reason"] = "no NVIDIA driver (libnvidia-ml.so not found)"
        except pynvml.NVMLError_DriverNotLoaded:
            _state["reason"] = "NVIDIA driver not loaded"
        except pynvml.NVMLError_NoPermission:
            _state["reason"] = "no permission to use the NVIDIA driver"
        except pynvml.NVMLError as exc:
            _state["reason"] = f"NVML failed to start: {_text(str(exc))}"
        else:
            _state["started"] = True
            atexit.register(_shutdown)


def _shutdown() -> None:
    with _lock:
        if _state["started"]:
            _state["started"] = False
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()


def nvml_unavailable_reason() -> str | None:
    """None when NVML works; otherwise one line saying why not (e.g. no NVIDIA driver)."""
    _start_once()
    return _state["reason"]  # type: ignore[no-any-return]


def _text(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def nvml_query(func: str | Callable[..., Any], *args: Any, default: Any = None,
               ignore_errors: bool = True) -> Any:
    """Call an NVML function (`'nvmlDeviceGetCount'` or the function itself), decoding bytes.

    Returns `default` when NVML is unavailable or the call fails; with `ignore_errors=False` the
    `pynvml.NVMLError` (or `NvmlUnavailableError`) is raised instead.
    """
    if (reason := nvml_unavailable_reason()) is not None:
        if ignore_errors:
            return default
        raise NvmlUnavailableError(reason)
    function = getattr(pynvml, func) if isinstance(func, str) else func
    try:
        return _text(function(*args))
    except pynvml.NVMLError:
        if ignore_errors:
            return default
        raise


def normalize_pci_bus_id(bus_id: str) -> str:
    """'00000000:01:00.0' (NVML) → '0000:01:00.0' (CUDA's and sysfs's form), lower case."""
    domain, sep, rest = bus_id.strip().lower().partition(":")
    return f"{domain[-4:].rjust(4, '0')}:{rest}" if sep else bus_id.strip().lower()


def _read_one(handle: Any, nvml_index: int) -> NvmlGpu:
    memory = nvml_query("nvmlDeviceGetMemoryInfo", handle)
    capability = nvml_query("nvmlDeviceGetCudaComputeCapability", handle)
    pci = nvml_query("nvmlDeviceGetPciInfo", handle)
    return NvmlGpu(
        nvml_index=nvml_index,
        name=nvml_query("nvmlDeviceGetName", handle, default="NVIDIA GPU"),
        uuid=nvml_query("nvmlDeviceGetUUID", handle, default=""),
        pci_bus_id=normalize_pci_bus_id(_text(pci.busId)) if pci is not None else "",
        free_bytes=int(memory.free) if memory is not None else 0,
        total_bytes=int(memory.total) if memory is not None else 0,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        memory_bus_width_bits=nvml_query("nvmlDeviceGetMemoryBusWidth", handle),
        memory_clock_mhz=nvml_query("nvmlDeviceGetMaxClockInfo", handle, pynvml.NVML_CLOCK_MEM),
    )


def _read_mig_instances(handle: Any, nvml_index: int, parent_pci_bus_id: str) -> tuple[NvmlGpu, ...]:
    mode = nvml_query("nvmlDeviceGetMigMode", handle)
    if not mode or mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
        return ()
    instances = []
    for mig_index in range(nvml_query("nvmlDeviceGetMaxMigDeviceCount", handle, default=0)):
        mig_handle = nvml_query("nvmlDeviceGetMigDeviceHandleByIndex", handle, mig_index)
        if mig_handle is not None:
            instance = _read_one(mig_handle, nvml_index)
            # NVML may not give a MIG handle PCI facts: it lives on its parent's bus id.
            instances.append(dataclasses.replace(instance,
                                                 pci_bus_id=instance.pci_bus_id or parent_pci_bus_id))
    return tuple(instances)


def read_nvml_gpus() -> list[NvmlGpu]:
    """Every GPU NVML sees, in NVML order. Raises NvmlUnavailableError (with the reason) when NVML cannot
    start; a GPU NVML cannot read shows with zero memory, a field it cannot read is None."""
    try:
        count = nvml_query("nvmlDeviceGetCount", ignore_errors=False)
    except pynvml.NVMLError as exc:
        raise NvmlUnavailableError(f"NVML cannot count the GPUs: {_text(str(exc))}") from None
    gpus = []
    for index in range(count):
        handle = nvml_query("nvmlDeviceGetHandleByIndex", index)
        if handle is None:  # keep its place: CUDA_VISIBLE_DEVICES indices count it
            gpus.append(NvmlGpu(index, "GPU unreadable by NVML (lost?)", "", "", 0, 0))
        else:
            gpu = _read_one(handle, index)
            mig_instances = _read_mig_instances(handle, index, gpu.pci_bus_id)
            gpus.append(dataclasses.replace(gpu, mig_instances=mig_instances))
    return gpus
