"""Where a model's slots go and what a device holds: the types the estimator, the compute-buffer replay
and the planner share (a module of its own, so that compute.py and estimate.py need not import each other).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryUse:
    """Bytes one device (or the host) holds, by component."""

    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    overhead_bytes: int = 0  # outside llama.cpp's accounting: CUDA context, cuBLAS, pool

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes


@dataclass(frozen=True)
class SlotRange:
    """`n_slots` consecutive slots from `first_slot` on one device."""

    device: str
    backend: str
    first_slot: int
    n_slots: int


@dataclass(frozen=True)
class Placement:
    """Devices in llama.cpp order, contiguous, covering slots [n_slots_total - n_gpu_layers, n_slots_total).

    Slots before the first range stay on the host (CPU spill). The routed experts of the blocks in
    `host_expert_layers` stay in host memory although their block is on a device (`-ot …=CPU`); of a block
    split between the two, `host_expert_parts` names the expert tensor kinds on the host (block, kind).
    """

    ranges: tuple[SlotRange, ...]
    host_expert_layers: frozenset[int] = frozenset()
    host_expert_parts: frozenset[tuple[int, str]] = frozenset()

    def split_parts(self, layer: int) -> frozenset[str]:
        """The expert kinds of a split block that are on the host (empty for other blocks)."""
        return frozenset(kind for il, kind in self.host_expert_parts if il == layer)

    @property
    def n_gpu_layers(self) -> int:
        return sum(r.n_slots for r in self.ranges)
