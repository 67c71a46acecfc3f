"""The planner: devices × model × request → which slots go where, with every buffer reserved.

Pure: no probing, no processes. A slot is a block of the model or the output layer (the last slot);
llama.cpp offloads the *last* `-ngl` slots and gives each device a contiguous range, in device order,
so a placement is a list of per-device slot counts in the order the devices are handed to llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from llamalaunch.errors import BadInputError
from llamalaunch.model.estimate import Placement, SlotRange
from llamalaunch.plan.costs import CostModel
from llamalaunch.plan.request import Request
from llamalaunch.probe.assume import unknown_device
from llamalaunch.probe.device import Device
from llamalaunch.units import format_bytes

CTX_STEP = 256  # llama.cpp rounds n_ctx up to a multiple of 256


def select_devices(devices: Sequence[Device], request: Request) -> tuple[Device, ...]:
    """Apply `-dev` (which devices, in which order) and `--exclude`; unknown names are errors."""
    by_name = {device.name: device for device in devices if not device.is_host}
    wanted = list(request.devices) if request.devices is not None else list(by_name)
    for name in [*wanted, *request.exclude]:
        if name not in by_name:
            known = ", ".join(by_name) or "none"
            raise BadInputError(f"unknown device {name!r}", f"devices here: {known}")
    for name in sorted({*request.budget_bytes, *request.reserve_bytes} - set(by_name)):
        raise unknown_device("--budget" if name in request.budget_bytes else "--reserve", name, by_name)
    if request.devices and (both := [name for name in request.devices if name in request.exclude]):
        raise BadInputError(f"-dev lists {', '.join(both)}, which --exclude leaves out",
                            "drop it from -dev or from --exclude")
    return tuple(by_name[name] for name in wanted if name not in request.exclude)


def device_limit(device: Device, request: Request) -> int:
    """Bytes we allow ourselves on a device: min(free, budget) less reservations and margin."""
    usable = min(device.free_bytes, request.budget_bytes.get(device.name, device.free_bytes))
    return usable - request.reserve_bytes.get(device.name, 0) - request.margin_for(usable)


class Fitter:
    """Finds placements for one context size; the cost model holds the per-ctx tables."""

    def __init__(self, costs: CostModel, request: Request) -> None:
        self.costs = costs
        self.request = request
        self.n_slots = costs.profile.n_slots

    def greedy(self, order: Sequence[Device], n_gpu_layers: int, spare_per_mille: int,
               compute_guess: Placement) -> tuple[int, ...] | None:
        """Fill devices in order, each up to its limit less a spare share; None if slots remain.

        Every device that can hold a slot at all gets at least one: a small card is used, not idled.
        """
        counts: list[int] = []
        first = self.n_slots - n_gpu_layers
        for index, device in enumerate(order):
            limit = device_limit(device, self.request)
            fixed = self.costs.compute_bytes(compute_guess, device.name) + self.costs.overhead_bytes(device)
            room = limit - limit * spare_per_mille // 1000 - fixed
            if index == len(order) - 1:
                count = self.n_slots - first
                if self.costs.range_bytes(device.backend, first, count) > room:
                    return None
            else:
                most = self.n_slots - 1 - first
                count = self.costs.max_slots(device.backend, first, most, room) or \
                    self.costs.max_slots(device.backend, first, min(most, 1), limit - fixed)
            counts.append(count)
            first += count
        return tuple(counts)

    def place(self, order: Sequence[Device], n_gpu_layers: int) -> tuple[int, ...] | None:
        """Contiguous counts for `order` that fit, with the spare memory shared out evenly.

        Bisection on a common spare share: the largest fraction of its limit every device can
        keep free while the greedy fill still places every slot, so a 6 GB card carries its
        proportion of the layers rather than none. Compute buffers depend on the placement (which device
        holds the output layer, how many devices share the graph), so the guess is refined once.
        """
        guess = self.even_placement(order, n_gpu_layers)
        counts: tuple[int, ...] | None = None
        for _ in range(2):
            counts = self._bisect_spare(order, n_gpu_layers, guess)
            if counts is None:
                return None
            guess = self.placement(order, counts, n_gpu_layers)
        return counts if counts is not None and self.fits(order, counts, n_gpu_layers) else None

    def _bisect_spare(self, order: Sequence[Device], n_gpu_layers: int,
                         guess: Placement) -> tuple[int, ...] | None:
        best = self.greedy(order, n_gpu_layers, 0, guess)
        if best is None:
            return None
        low, high = 0, 1000
        while high - low > 1:
            middle = (low + high) // 2
            counts = self.greedy(order, n_gpu_layers, middle, guess)
            if counts is None:
                high = middle
            else:
                low, best = middle, counts
        return best

    def even_placement(self, order: Sequence[Device], n_gpu_layers: int) -> Placement:
        share, rest = divmod(n_gpu_layers, len(order))
        counts = tuple(share + (1 if index < rest else 0) for index in range(len(order)))
        return self.placement(order, counts, n_gpu_layers)

    def placement(self, order: Sequence[Device], counts: Sequence[int], n_gpu_layers: int) -> Placement:
        ranges, first = [], self.n_slots - n_gpu_layers
        for device, count in zip(order, counts):
            ranges.append(SlotRange(device.name, device.backend, first, count))
            first += count
        return Placement(tuple(ranges), self.costs.host_expert_layers)

    def fits(self, order: Sequence[Device], counts: Sequence[int], n_gpu_layers: int) -> bool:
        estimate = self.costs.estimate(self.placement(order, counts, n_gpu_layers))
        return all(estimate.devices[device.name].total_bytes <= device_limit(device, self.request)
                   for device in order)

    def one_layer_bytes(self, device: Device, guess: Placement) -> int:
        """One block with its KV, plus the compute buffer and overhead the device would carry."""
        return (self.costs.largest_block_bytes(device.backend) + self.costs.compute_bytes(guess, device.name)
                + self.costs.overhead_bytes(device))


def output_device_orders(devices: Sequence[Device], request: Request) -> list[tuple[Device, ...]]:
    """Candidate orders: llama.cpp's order, and the same with the roomiest device moved last.

    The last device holds the output layer and the largest compute buffer, so which device is
    last matters most; the others keep llama.cpp's order (RPC first), which keeps `-dev` short.
    """
    orders = [tuple(devices)]
    roomiest = max(devices, key=lambda device: device_limit(device, request))
    if roomiest is not devices[-1]:
        orders.append(tuple(device for device in devices if device is not roomiest) + (roomiest,))
    return orders


@dataclass(frozen=True)
class Choice:
    order: tuple[Device, ...]
    counts: tuple[int, ...]
    n_gpu_layers: int
    excluded: dict[str, str]
    host_expert_layers: frozenset[int] = frozenset()  # blocks on a device whose routed experts stay on the host
    host_expert_parts: frozenset[tuple[int, str]] = frozenset()  # (block, expert kind) on the host of split blocks


def choose_placement(fitter: Fitter, devices: Sequence[Device], n_gpu_layers: int) -> Choice | None:
    """Leave out devices that cannot hold one layer, then try each output-device order."""
    excluded: dict[str, str] = {}
    usable = list(devices)
    while usable:
        guess = fitter.even_placement(usable, n_gpu_layers)
        small = [d for d in usable if fitter.one_layer_bytes(d, guess) > device_limit(d, fitter.request)]
        if not small:
            break
        for device in small:
            excluded[device.name] = exclusion_reason(fitter, device, guess)
            usable.remove(device)
    if not usable:
        return None
    best: Choice | None = None
    best_spare = -1.0
    for order in output_device_orders(usable, fitter.request):
        counts = fitter.place(order, n_gpu_layers)
        if counts is None:
            continue
        spare = min_spare_share(fitter, order, counts, n_gpu_layers)
        if spare > best_spare:
            best = Choice(order, counts, n_gpu_layers, excluded, fitter.costs.host_expert_layers)
            best_spare = spare
    if best is None and len(usable) > 1:  # a small device that holds a layer can still keep the rest from fitting
        smallest = min(usable, key=lambda d: device_limit(d, fitter.request))
        rest = choose_placement(fitter, [d for d in usable if d is not smallest], n_gpu_layers)
        if rest is not None:
            why = "the plan fits without it, not with it"
            return replace(rest, excluded={**excluded, smallest.name: why, **rest.excluded})
    return drop_idle(best) if best is not None else None


def drop_idle(choice: Choice) -> Choice:
    """A device left with no slot would still get buffers from llama.cpp: leave it out instead."""
    idle = [device for device, count in zip(choice.order, choice.counts) if count == 0]
    if not idle:
        return choice
    kept = [(device, count) for device, count in zip(choice.order, choice.counts) if count > 0]
    excluded = {**choice.excluded, **{d.name: "not needed: the other devices hold every layer" for d in idle}}
    return replace(choice, order=tuple(d for d, _ in kept), counts=tuple(c for _, c in kept), excluded=excluded)


def min_spare_share(fitter: Fitter, order: Sequence[Device], counts: Sequence[int], n_gpu_layers: int) -> float:
    """The smallest fraction of its limit any device keeps free under this placement."""
    estimate = fitter.costs.estimate(fitter.placement(order, counts, n_gpu_layers))
    return min(1 - estimate.devices[d.name].total_bytes / max(device_limit(d, fitter.request), 1) for d in order)


def exclusion_reason(fitter: Fitter, device: Device, guess: Placement) -> str:
    need = fitter.one_layer_bytes(device, guess)
    limit = device_limit(device, fitter.request)
    return (f"cannot hold one layer with its KV cache and compute buffer at ctx {fitter.costs.ctx_tokens}: "
            f"needs {format_bytes(need)}, has {format_bytes(max(limit, 0))} after margin and reservations")
