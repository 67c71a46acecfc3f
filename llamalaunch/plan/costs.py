"""Per-context cost tables for the planner: slot bytes as prefix sums, compute buffers cached."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from functools import lru_cache
from itertools import accumulate

from llamalaunch.model.estimate import DEFAULT_OVERHEAD_BYTES, Estimate, Placement, estimate
from llamalaunch.model.kv import kv_bytes_per_layer
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.request import Request
from llamalaunch.probe.device import Device


def moe_pool_bytes(profile: ModelProfile, request: Request) -> int:
    """CUDA pool growth of a MoE model's batched expert products, outside every buffer llama.cpp reports.

    Seen on the H100 (Qwen3-30B-A3B shape, ubatch 512): 134 MiB of free memory went between the load
    and the end of a 16k-token prompt, in our plan and in --fit's (both with experts on the host; not
    measured with every expert on the GPU, reserved there too); dense models grow by 10-50 MiB, which the
    margin covers. Four f32 copies of a ubatch's routed activations (n_ubatch x n_expert_used x n_embd)
    come to 128 MiB there, and scale with the shape.
    """
    if not profile.expert_layers:
        return 0
    return 4 * request.n_ubatch * max(profile.n_expert_used, 1) * profile.n_embd * 4


class CostModel:
    """What each slot and device costs at one context size.

    Weights and KV are additive per slot, so a device's share is a difference of prefix sums and
    the greedy fill is a binary search; compute buffers depend on the whole placement and come from
    the estimator (cached, since the planner asks for the same placements many times).
    """

    def __init__(self, profile: ModelProfile, request: Request, ctx_tokens: int,
                 overhead: Mapping[str, int], host_expert_layers: frozenset[int] = frozenset()) -> None:
        self.profile = profile
        self.request = request
        self.ctx_tokens = ctx_tokens
        self.host_expert_layers = host_expert_layers  # blocks whose routed experts stay in host memory
        self.overhead = {**DEFAULT_OVERHEAD_BYTES, **overhead}
        self._prefix = {backend: self._prefix_sums(backend) for backend in ("CUDA", "CPU")}
        self._estimate = lru_cache(maxsize=4096)(self._estimate_uncached)

    def _prefix_sums(self, backend: str) -> list[int]:
        layer_kv = kv_bytes_per_layer(self.profile, self.request, self.ctx_tokens, backend)
        slot_bytes = [slot.dense_bytes(backend) if index in self.host_expert_layers else slot.full_bytes(backend)
                      for index, slot in enumerate(self.profile.slots)]
        for layer, kv in enumerate(layer_kv):
            slot_bytes[layer] += kv
        return [0, *accumulate(slot_bytes)]

    def _sums(self, backend: str) -> list[int]:
        return self._prefix["CUDA" if backend == "CUDA" else "CPU"]

    def range_bytes(self, backend: str, first: int, count: int) -> int:
        """Weights and KV of slots [first, first + count) on a device of this backend."""
        sums = self._sums(backend)
        return sums[first + count] - sums[first]

    def max_slots(self, backend: str, first: int, max_count: int, room: int) -> int:
        """The most slots from `first` (at most `max_count`) whose weights and KV fit in `room`."""
        sums = self._sums(backend)
        end = bisect.bisect_right(sums, sums[first] + room, lo=first, hi=first + max_count + 1) - 1
        return max(end - first, 0)

    def overhead_bytes(self, device: Device) -> int:
        return self._overhead(device.name, device.backend)

    def _overhead(self, name: str, backend: str) -> int:
        """By device name first, then backend (defaults merged in at construction); on a GPU, plus what
        MoE matrix products take from the CUDA pool at run time."""
        base = self.overhead.get(name, self.overhead.get(backend, 0))
        return base + (moe_pool_bytes(self.profile, self.request) if backend == "CUDA" else 0)

    def estimate(self, placement: Placement) -> Estimate:
        return self._estimate(placement)

    def _estimate_uncached(self, placement: Placement) -> Estimate:
        overhead = {r.device: self._overhead(r.device, r.backend) for r in placement.ranges}
        return estimate(self.profile, placement, self.request, self.ctx_tokens, overhead)

    def compute_bytes(self, placement: Placement, device_name: str) -> int:
        return self.estimate(placement).devices[device_name].compute_bytes

    def largest_block_bytes(self, backend: str) -> int:
        sums = self._sums(backend)
        return max(sums[i + 1] - sums[i] for i in range(self.profile.n_layer)) if self.profile.n_layer else 0
