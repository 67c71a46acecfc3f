"""Expert spill for mixture-of-experts models: every block on the devices, routed experts where they fit.

llama.cpp's `--fit` and `--n-cpu-moe` keep attention, norms, router, shared experts and the KV cache of
every layer on the GPUs and leave only routed-expert tensors in host memory: a token then reads its few
active experts from host RAM instead of running whole layers on the CPU, which is what makes it faster
than a layer spill. Here the dense parts and KV are placed first (the usual even-spare split, with every
expert on the host), then each device takes back the experts of its own blocks until it is full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from llamalaunch.model.estimate import Placement
from llamalaunch.plan.costs import CostModel
from llamalaunch.plan.request import Request
from llamalaunch.plan.split import Choice, Fitter, device_limit
from llamalaunch.probe.device import Device


def forced_host_experts(expert_layers: Sequence[int], count: int) -> frozenset[int]:
    """`--cpu-experts N`: the experts of the first N MoE blocks stay on the host (as --n-cpu-moe N)."""
    return frozenset(expert_layers[:count])


def fill_experts(costs: CostModel, choice: Choice) -> Choice:
    """Give each device back the experts of its own blocks, the last blocks first, while it stays in its limit.

    `costs` and `choice` have every routed expert on the host. A device keeps the experts of its first
    blocks on the host, so what stays there is one contiguous run of blocks per device; the last block of
    that run may be split, its largest expert tensors on the device (as --fit's partial layers).
    """
    base = Fitter(costs, costs.request).placement(choice.order, choice.counts, choice.n_gpu_layers)
    host = set(costs.host_expert_layers)
    owned = [[il for il in range(r.first_slot, r.first_slot + r.n_slots) if il in host] for r in base.ranges]
    for device, mine in zip(choice.order, owned):
        others = host - set(mine)
        low, high = 0, len(mine)  # bisection on how many of its blocks keep their experts on the host
        while low < high:
            middle = (low + high) // 2
            if _fits(costs, base, others | set(mine[:middle]), set(), device):
                high = middle
            else:
                low = middle + 1
        host = others | set(mine[:low])
    while True:
        # compute buffers move a little with the other devices' choices: settle one block at a time
        late = [mine for d, mine in zip(choice.order, owned) if not _fits(costs, base, host, set(), d)]
        back = [il for il in late[0] if il not in host] if late else []
        if not back:
            break
        host.add(back[0])
    parts: set[tuple[int, str]] = set()
    for mine in owned:
        spilled = [il for il in mine if il in host]
        if spilled:
            host, parts = _split(costs, base, choice, host, parts, spilled[-1])
    return replace(choice, host_expert_layers=frozenset(host), host_expert_parts=frozenset(parts))


def _split(costs: CostModel, base: Placement, choice: Choice, host: set[int], parts: set[tuple[int, str]],
           block: int) -> tuple[set[int], set[tuple[int, str]]]:
    """Bring the largest expert tensors of `block` back to its device while every device stays in its limit."""
    on_host = [part.name for part in costs.profile.slots[block].expert_parts]  # largest first
    for kind in list(on_host):
        rest = [k for k in on_host if k != kind]
        trial_host = host - {block}
        trial_parts = {p for p in parts if p[0] != block} | {(block, k) for k in rest}
        if all(_fits(costs, base, trial_host, trial_parts, device) for device in choice.order):
            host, parts, on_host = trial_host, trial_parts, rest
    return host, parts


def split_placement(base: Placement, host: frozenset[int], parts: frozenset[tuple[int, str]]) -> Placement:
    return replace(base, host_expert_layers=host, host_expert_parts=parts)


def _fits(costs: CostModel, base: Placement, host: set[int], parts: set[tuple[int, str]], device: Device) -> bool:
    placement = split_placement(base, frozenset(host), frozenset(parts))
    return costs.estimate(placement).devices[device.name].total_bytes <= device_limit(device, costs.request)


def host_within(request: Request, host_free_bytes: int | None, host_total_bytes: int) -> bool:
    """Whether the host's share (weights left there, its KV and compute buffers) fits available RAM."""
    return host_free_bytes is None or host_total_bytes <= host_free_bytes - request.margin_for(host_free_bytes)
