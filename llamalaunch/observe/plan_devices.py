"""What status reads from a plan's JSON form (as the run state keeps it): the worker and index of each RPC device,
and the MoE blocks whose experts stay in host memory, counted as the plan counts them.

Pure: dicts in, plain values out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_RPC_NAME = re.compile(r"RPC(\d+)")


def rpc_workers(devices: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Each worker's endpoint → our names of its devices in the worker's own order; workers in the order our names
    number them.

    Our RPC names number every worker's devices in the user's --rpc order (probe.inventory), whatever order the
    plan, and its `-dev`, puts them in: so the plan's list is read in name order, not in its own. With these
    endpoints and counts, `logparse.buffer_device` (which `plan --verify` uses too) finds a buffer's worker by the
    endpoint in its name, `RPC0[127.0.0.1:50611]`, and names the buffer's device as we do.
    """
    rpc = [d for d in devices if d.get("backend") == "RPC" and d.get("endpoint")]
    numbers = [_RPC_NAME.fullmatch(str(d.get("name", ""))) for d in rpc]
    if all(numbers):  # names of another shape (none are made today): the plan's order is the best left
        rpc = [d for _, d in sorted(zip([int(m.group(1)) for m in numbers if m], rpc, strict=True),
                                    key=lambda pair: pair[0])]
    workers: dict[str, list[str]] = {}
    for device in rpc:
        workers.setdefault(str(device["endpoint"]), []).append(str(device["name"]))
    return workers


def host_expert_blocks(plan: Mapping[str, Any]) -> frozenset[int]:
    """MoE blocks whose routed experts the plan leaves in host memory, as the plan counts them (a device's
    `expert_layers` leaves out every one of these): whole (`host_expert_layers`), in part (`host_expert_parts`: a
    block split between a device and the host counts as the host's), and MoE blocks left whole on the host
    (-ngl below every layer; the model's `moe_blocks`, in plans written since they are listed)."""
    whole = {int(block) for block in plan.get("host_expert_layers", [])}
    split = {int(part[0]) for part in plan.get("host_expert_parts", [])}
    return frozenset(whole | split | (_moe_blocks(plan) - _blocks_on_devices(plan)))


def moe_blocks(plan: Mapping[str, Any]) -> int:
    """The model's MoE blocks; from a plan that does not list them, those on its devices and the host's."""
    listed = _moe_blocks(plan)
    if listed:
        return len(listed)
    on_devices = sum(int(device.get("moe_layers", 0)) for device in _placed_devices(plan))
    return on_devices + len(host_expert_blocks(plan) - _blocks_on_devices(plan))


def _moe_blocks(plan: Mapping[str, Any]) -> set[int]:
    model = plan.get("model")
    return {int(block) for block in model.get("moe_blocks", [])} if isinstance(model, Mapping) else set()


def _placed_devices(plan: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [device for device in plan.get("devices", []) if isinstance(device, Mapping)
            and not device.get("excluded") and device.get("first_slot") is not None]


def _blocks_on_devices(plan: Mapping[str, Any]) -> set[int]:
    return {block for device in _placed_devices(plan)
            for block in range(int(device["first_slot"]), int(device["first_slot"]) + int(device.get("n_layers", 0)))}
