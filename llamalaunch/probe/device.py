"""Device: one memory pool llama.cpp can place layers on, under the name llama.cpp gives it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """A snapshot of one device as llama.cpp will see it.

    `name` is llama.cpp's name (`CUDA0`, `RPC1`, `CPU`); `order` is its position in llama.cpp's
    device order (RPC devices first in `--rpc` order, then local GPUs), which `-ts` indexes.
    """

    name: str
    backend: str  # "CUDA", "RPC", "CPU", or what a what-if device says
    description: str
    free_bytes: int
    total_bytes: int
    order: int
    endpoint: str | None = None  # RPC: host:port of the worker
    worker_index: int | None = None  # RPC: device index inside that worker
    pci_bus_id: str | None = None
    uuid: str | None = None
    compute_capability: str | None = None
    memory_bus_width_bits: int | None = None
    memory_clock_mhz: int | None = None
    assumed: bool = False  # a what-if device typed by the user, not probed
    note: str | None = None  # e.g. "busy: serving another client; figures from the last probe"
    rpc_round_trip_s: float | None = None  # RPC: the fastest tiny round trip the probe timed
    error: str | None = None  # RPC: why the worker could not be probed (it is down); free/total unknown (0 here)

    @property
    def is_host(self) -> bool:
        return self.backend == "CPU"


@dataclass(frozen=True)
class HostMemory:
    """Host RAM and CPU, for spilled layers and the host's own buffers."""

    free_bytes: int
    total_bytes: int
    cpu_count: int
    cpu_description: str
