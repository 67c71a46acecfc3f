"""What the user asks for: context, slots, cache types, reservations, budgets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from llamalaunch.model.kv import ContextSpec
from llamalaunch.options import DEFAULTS
from llamalaunch.units import MIB

FLASH_ATTN = ("on", "off", "auto")
# How llama.cpp keeps weights left in host memory (--host-weights; the default is the option table's):
# pinned: loaded into the first GPU's pinned host buffer (CUDA_Host), streamed to it for large batches at full
# speed; mapped: the file mapped (CPU_Mapped, page cache), streamed from pageable memory; repacked: the CPU
# backend's own layout (CPU_REPACK), never streamed to a GPU: the host computes them. auto: pinned where a GPU
# of the plan streams host weights, mapped elsewhere (HOST_WEIGHTS_AUTO).
# Measured on an H100 against --fit with models whose tokens route over all experts (bench/results/
# h100-2026-12-07e): a prompt streams every host expert to the GPU once per ubatch, from pinned memory at ~37 GB/s,
# from the mapping at 6-9 GB/s: prompts 4-6x faster pinned, the load 2-5x slower; generation moves with the host
# (0.84-1.18x --fit's on H100 hosts, 0.84-0.94x on an H200's: h200-2026-12-07g). A 1,024-token prompt and 128
# generated tokens take less than half the time pinned, so auto pins. Without a GPU nothing streams from pinned
# memory: mapped loads fastest.
HOST_WEIGHTS = ("auto", "pinned", "mapped", "repacked")
HOST_WEIGHTS_AUTO = {True: "pinned", False: "mapped"}  # by whether a GPU of the plan streams host weights
STREAMING_BACKENDS = frozenset({"CUDA"})  # devices whose host buffer type llama.cpp puts first for host weights


def resolved_host_weights(mode: str, streaming: bool) -> str:
    """The mode --host-weights names, `auto` resolved for a plan whose GPU streams host weights (or not)."""
    return HOST_WEIGHTS_AUTO[streaming] if mode == "auto" else mode
# Default safety margin per device. llama.cpp's --fit keeps 1024 MiB; we plan exactly and keep only
# what run-time allocations outside llama.cpp's accounting needed in measured runs: the CUDA pool's
# growth (10-50 MiB on an H100), an RPC worker's graph input buffer (2.5 MiB on a small model). A
# twentieth of a small device, never under 8 MiB, at most 64 MiB.
DEFAULT_MARGIN_BYTES = 64 * MIB
MIN_MARGIN_BYTES = 8 * MIB


def _frozen(mapping: Mapping[str, int] | None) -> Mapping[str, int]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Request(ContextSpec):
    """A plan request. `ctx_tokens=None` means the largest context that fits (`--ctx max`).

    It is the model layer's ContextSpec (slots, KV layout, batch sizes, cache types) plus what only
    planning needs, so the model layer sizes a Request as it is without importing plan/.
    """

    ctx_tokens: int | None = 4096
    ctx_min_tokens: int = 256
    ctx_is_target: bool = False  # serve: fall back to the largest ctx >= ctx_min when ctx does not fit
    margin_bytes: int | None = None  # None: the default, scaled to the device
    extra_margin_bytes: int = 0  # learnt from run-time out-of-memory failures
    reserve_bytes: Mapping[str, int] = field(default_factory=lambda: _frozen(None))
    budget_bytes: Mapping[str, int] = field(default_factory=lambda: _frozen(None))
    devices: tuple[str, ...] | None = None  # -dev: which devices, in which order (None: all)
    exclude: tuple[str, ...] = ()
    cpu_spill: bool = False
    n_gpu_layers: int | None = None  # force a layer count (partial offload); None: as many as fit
    cpu_experts: int | None = None  # MoE: keep the experts of the first N MoE blocks on the host; None: plan it
    prefer: str = "context"  # which wins when placements differ: the larger context, or the faster estimate
    host_weights: str = DEFAULTS["host_weights"]  # one of HOST_WEIGHTS: how weights left on the host are kept

    def margin_for(self, usable_bytes: int) -> int:
        """Free memory kept on a device with `usable_bytes` (free, or its budget)."""
        base = self.margin_bytes if self.margin_bytes is not None else \
            min(DEFAULT_MARGIN_BYTES, max(MIN_MARGIN_BYTES, usable_bytes // 20))
        return base + self.extra_margin_bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "reserve_bytes", _frozen(self.reserve_bytes))
        object.__setattr__(self, "budget_bytes", _frozen(self.budget_bytes))
