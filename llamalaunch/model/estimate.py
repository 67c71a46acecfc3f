"""The analytic memory estimator: weights, KV cache, compute buffers and overhead per device.

`estimate()` answers "what does llama-server allocate where" for a placement of slots on devices,
from the GGUF header alone. Weights and KV are exact (kv.py); compute buffers come from compute.py;
the per-backend overhead llama.cpp does not account is a parameter, never a hidden constant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from llamalaunch.errors import BadInputError
from llamalaunch.model import compute
from llamalaunch.model.kv import (
    ContextSpec,
    check_cache_types,
    context_shape,
    layer_kv_bytes,
    output_buffer_bytes,
)
from llamalaunch.model.placement import MemoryUse, Placement, SlotRange
from llamalaunch.model.profile import ModelProfile
from llamalaunch.units import MIB

# the placement types are part of this API (estimate() takes a Placement, answers in MemoryUse)
__all__ = ["DEFAULT_OVERHEAD_BYTES", "Estimate", "MemoryUse", "Placement", "SlotRange", "estimate",
           "host_experts_override", "overhead_for", "slot_devices"]

# Memory a backend takes outside llama.cpp's accounting when the caller has no measurement.
# CUDA: context, cuBLAS workspace and memory pool were 597-599 MiB on an H100 (CUDA 13, driver 580)
# whatever the context; 640 MiB covers that with room for pool growth. Measure it per GPU when you can.
DEFAULT_OVERHEAD_BYTES: Mapping[str, int] = MappingProxyType({"CUDA": 640 * MIB, "RPC": 0, "CPU": 0})


def host_experts_override(placement: Placement) -> str:
    """`-ot` value keeping the routed-expert tensors (`blk.N.*_exps.*`) of the host's blocks in host memory.

    llama.cpp matches each pattern with std::regex_search on every tensor name; `\\.` after the number
    keeps `blk.1.` from matching `blk.12.`. A block split between device and host names its host kinds.
    """
    whole = "|".join(str(il) for il in sorted(placement.host_expert_layers))
    patterns = [f"blk\\.({whole})\\.[^.]*_exps\\.=CPU"] if whole else []
    for il in sorted({il for il, _ in placement.host_expert_parts}):
        patterns.append(f"blk\\.{il}\\.({'|'.join(sorted(placement.split_parts(il)))})\\.=CPU")
    return ",".join(patterns)


@dataclass(frozen=True)
class Estimate:
    devices: Mapping[str, MemoryUse]
    host: MemoryUse


def slot_devices(profile: ModelProfile, placement: Placement) -> tuple[SlotRange | None, ...]:
    """The range holding each slot, None for slots on the host."""
    owners: list[SlotRange | None] = [None] * profile.n_slots
    expected_first = profile.n_slots - placement.n_gpu_layers
    if expected_first < 0:
        raise BadInputError(f"placement offloads {placement.n_gpu_layers} slots of {profile.n_slots}",
                            "offload at most one slot per block plus the output slot")
    for slot_range in placement.ranges:
        if slot_range.first_slot != expected_first or slot_range.n_slots < 0:
            raise BadInputError(f"placement range {slot_range} is not contiguous",
                                "ranges must follow each other and end at the output slot")
        for slot in range(slot_range.first_slot, slot_range.first_slot + slot_range.n_slots):
            owners[slot] = slot_range
        expected_first += slot_range.n_slots
    return tuple(owners)


def overhead_for(slot_range: SlotRange, overhead_bytes: Mapping[str, int] | None) -> int:
    """The caller's figure for this device (by name, then backend), else the backend's default."""
    given = overhead_bytes or {}
    if slot_range.device in given:
        return given[slot_range.device]
    if slot_range.backend in given:
        return given[slot_range.backend]
    return DEFAULT_OVERHEAD_BYTES.get(slot_range.backend, 0)


def _host_slot_bytes(profile: ModelProfile, slot: int) -> int:
    """A tied output slot left on the host reads token_embd itself: no second copy there."""
    size = profile.slots[slot].bytes
    if slot == profile.output_slot and profile.output_is_token_embd:
        size -= min(size, profile.host_bytes)
    return size


def _per_device_weights(profile: ModelProfile, owners: tuple[SlotRange | None, ...], owner: SlotRange | None) -> int:
    """rope_freqs & co.: llama.cpp keeps one copy on every device (or the host) that holds a block."""
    holds_block = any(owners[slot] is owner for slot in range(profile.n_layer))
    return profile.per_device_bytes if holds_block else 0


def estimate(profile: ModelProfile, placement: Placement, spec: ContextSpec, ctx_tokens: int,
             overhead_bytes: Mapping[str, int] | None = None) -> Estimate:
    """Bytes llama-server would allocate on each device of `placement` and on the host."""
    check_cache_types(spec, profile)
    shape = context_shape(spec, ctx_tokens)
    owners = slot_devices(profile, placement)
    weights = {r.device: 0 for r in placement.ranges}
    kv = {r.device: 0 for r in placement.ranges}
    host_weights, host_kv = profile.host_bytes, output_buffer_bytes(profile, spec)
    for slot, owner in enumerate(owners):
        layer_kv = 0
        if slot < profile.n_layer:
            layer_kv = layer_kv_bytes(profile, spec, shape, slot, owner.backend if owner else "CPU")
        if owner is None:
            host_weights += _host_slot_bytes(profile, slot)
            host_kv += layer_kv
            continue
        weights_here = profile.slots[slot]
        if slot in placement.host_expert_layers:
            weights[owner.device] += weights_here.dense_bytes(owner.backend)
            host_weights += weights_here.expert_bytes
        elif placement.split_parts(slot):
            on_host = placement.split_parts(slot)
            weights[owner.device] += weights_here.full_bytes(owner.backend) - \
                weights_here.parts_bytes(on_host, owner.backend)
            host_weights += weights_here.parts_bytes(on_host, "CPU")
        else:
            weights[owner.device] += weights_here.full_bytes(owner.backend)
        kv[owner.device] += layer_kv
    host_weights += _per_device_weights(profile, owners, None)
    for r in placement.ranges:
        weights[r.device] += _per_device_weights(profile, owners, r)
    device_compute, host_compute = compute.compute_buffers(profile, placement, spec, shape)
    devices = {r.device: MemoryUse(weights[r.device], kv[r.device], device_compute.get(r.device, 0),
                                   overhead_for(r, overhead_bytes))
               for r in placement.ranges}
    host = MemoryUse(host_weights, host_kv, host_compute, 0)
    return Estimate(MappingProxyType(devices), host)
