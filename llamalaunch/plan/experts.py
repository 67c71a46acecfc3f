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
    blocks on the host, so what stays there is one contiguous run of blocks per device.
    """
    base = Fitter(costs, costs.request).placement(choice.order, choice.counts, choice.n_gpu_layers)
    host = set(costs.host_expert_layers)
    owned = [[il for il in range(r.first_slot, r.first_slot + r.n_slots) if il in host] for r in base.ranges]
    for device, mine in zip(choice.order, owned):
        others = host - set(mine)
        low, high = 0, len(mine)  # bisection on how many of its blocks keep their experts on the host
        while low < high:
            middle = (low + high) // 2
            if _fits(costs, base, frozenset(others | set(mine[:middle])), device):
                high = middle
            else:
                low = middle + 1
        host = others | set(mine[:low])
    while True:
        # compute buffers move a little with the other devices' choices: settle one block at a time
        late = [(d, mine) for d, mine in zip(choice.order, owned) if not _fits(costs, base, frozenset(host), d)]
        back = [il for il in late[0][1] if il not in host] if late else []
        if not back:
            break
        host.add(back[0])
    return replace(choice, host_expert_layers=frozenset(host))


def _fits(costs: CostModel, base: Placement, host: frozenset[int], device: Device) -> bool:
    use = costs.estimate(replace(base, host_expert_layers=host)).devices[device.name]
    return use.total_bytes <= device_limit(device, costs.request)


def host_within(request: Request, host_free_bytes: int | None, host_total_bytes: int) -> bool:
    """Whether the host's share (weights left there, its KV and compute buffers) fits available RAM."""
    return host_free_bytes is None or host_total_bytes <= host_free_bytes - request.margin_for(host_free_bytes)
