"""Choosing between placements that fit by their estimated speed (`--prefer`, `plan --compare`).

The planner finds the largest context (or checks the requested one) with the even-spare split; here the
placements that fit at that context are compared: each output-device order, and a split that moves
layers from slower to faster devices while they still fit (one sequence runs through the devices one
after another, so a layer costs what its device takes for it). `--prefer speed` with `--ctx max` also
weighs smaller contexts: keeping every expert on the devices, or leaving the slowest device out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llamalaunch.errors import PlanError
from llamalaunch.model.estimate import Placement, SlotRange
from llamalaunch.plan.search import Planner
from llamalaunch.plan.speed import Alternative, SpeedEstimate, SpeedFigures, estimate_speed
from llamalaunch.plan.split import Choice, Fitter, device_limit, drop_idle, output_device_orders
from llamalaunch.plan.types import Plan
from llamalaunch.probe.device import Device

BETTER = 1.05  # a candidate must be 5% faster to displace the even-spare split (estimates are rough; a
# loopback hop under load, for one, is not worth a device kept nearly full)
MAX_MOVES = 32


@dataclass(frozen=True)
class Candidate:
    label: str
    ctx_tokens: int
    choice: Choice
    speed: SpeedEstimate


def speed_of(planner: Planner, ctx_tokens: int, choice: Choice, figures: SpeedFigures) -> SpeedEstimate:
    fitter = Fitter(planner.costs(ctx_tokens, choice.host_expert_layers), planner.request)
    placement = fitter.placement(choice.order, choice.counts, choice.n_gpu_layers)
    return estimate_speed(planner.profile, planner.request, ctx_tokens, placement, figures)


def rate(speed: SpeedEstimate) -> tuple[float, float]:
    return speed.generation_tps or 0.0, speed.prompt_tps or 0.0


def candidates(planner: Planner, ctx_tokens: int, chosen: Choice, figures: SpeedFigures,
               prefer: str = "context", compare: bool = False) -> list[Candidate]:
    """The planner's choice first, then the other placements that fit, fastest first after it. Smaller
    contexts (--ctx max) are weighed for `--prefer speed`, and listed for `--compare`."""
    first = Candidate(_label(chosen, "even spare"), ctx_tokens, chosen, speed_of(planner, ctx_tokens, chosen, figures))
    found = [first]
    if first.speed.generation_tps is not None:
        found += _same_context(planner, ctx_tokens, chosen, figures)
    if planner.request.ctx_tokens is None and (prefer == "speed" or compare):
        found += _smaller_contexts(planner, ctx_tokens, chosen, figures)
    unique: dict[tuple, Candidate] = {}
    for candidate in found:
        key = (candidate.ctx_tokens, tuple(d.name for d in candidate.choice.order), candidate.choice.counts,
               candidate.choice.host_expert_layers)
        unique.setdefault(key, candidate)
    rest = sorted(list(unique.values())[1:], key=lambda c: (rate(c.speed), c.ctx_tokens), reverse=True)
    return [first, *rest]


def pick(found: Sequence[Candidate], prefer: str) -> Candidate:
    """Default: the largest context, then the fastest; `speed`: the fastest, then the largest context."""
    first = found[0]
    if first.speed.generation_tps is None:
        return first  # speed unknown: plan by memory
    def better(candidate: Candidate, best: Candidate) -> bool:
        if prefer == "context" and candidate.ctx_tokens != best.ctx_tokens:
            return candidate.ctx_tokens > best.ctx_tokens
        return rate(candidate.speed)[0] > rate(best.speed)[0] * BETTER
    best = first
    for candidate in found[1:]:
        if better(candidate, best):
            best = candidate
    return best


def _label(choice: Choice, how: str) -> str:
    if not choice.order:
        return "host only"
    split = "+".join(f"{d.name}:{c}" for d, c in zip(choice.order, choice.counts))
    experts = f", experts of {len(choice.host_expert_layers)} layers on host" if choice.host_expert_layers else ""
    return f"{split} ({how}{experts})"


def _same_context(planner: Planner, ctx_tokens: int, chosen: Choice, figures: SpeedFigures) -> list[Candidate]:
    if not chosen.order or chosen.host_expert_layers:
        return []  # expert spill fills each device's own blocks: its split stays the planner's
    found = []
    fitter = Fitter(planner.costs(ctx_tokens), planner.request)
    for order in output_device_orders(chosen.order, planner.request):
        counts = chosen.counts if order == chosen.order else fitter.place(order, chosen.n_gpu_layers)
        if counts is None:
            continue
        base = dataclasses.replace(chosen, order=order, counts=counts)
        if order != chosen.order:
            found.append(Candidate(_label(base, "even spare"), ctx_tokens, base,
                                   speed_of(planner, ctx_tokens, base, figures)))
        tuned = by_speed(fitter, base, lambda c: speed_of(planner, ctx_tokens, c, figures))
        if tuned != base:
            found.append(Candidate(_label(tuned, "faster devices filled"), ctx_tokens, tuned,
                                   speed_of(planner, ctx_tokens, tuned, figures)))
    return found


def by_speed(fitter: Fitter, choice: Choice, speed: Callable[[Choice], SpeedEstimate]) -> Choice:
    """Move layers towards devices that take less time a slot while they fit and the estimate improves
    (the most that fit at once)."""
    best, best_speed = choice, speed(choice)
    for _ in range(MAX_MOVES):
        step = _best_move(fitter, best, best_speed, speed)
        if step is None:
            break
        best, best_speed = step
    return drop_idle(best)


def _best_move(fitter: Fitter, choice: Choice, current: SpeedEstimate,
               speed: Callable[[Choice], SpeedEstimate]) -> tuple[Choice, SpeedEstimate] | None:
    found: tuple[Choice, SpeedEstimate] | None = None
    times = {part.name: part.generation_s for part in current.parts}
    per_slot = [times.get(d.name, 0.0) / max(count, 1) for d, count in zip(choice.order, choice.counts)]
    for source in range(len(choice.order)):
        for target in range(len(choice.order)):
            if source == target or choice.counts[source] == 0 or per_slot[target] > per_slot[source]:
                continue
            moved = _largest_move(fitter, choice, source, target)
            if moved is None:
                continue
            estimate = speed(moved)
            if rate(estimate)[0] > rate(current)[0] * 1.001 and (found is None or rate(estimate) > rate(found[1])):
                found = (moved, estimate)
    return found


def _largest_move(fitter: Fitter, choice: Choice, source: int, target: int) -> Choice | None:
    """The most slots from `source` to `target` that still fit: bisection with the compute buffers of the
    current placement (prefix sums only), then checked with the full estimate, one slot less at a time."""
    def moved(k: int) -> tuple[int, ...]:
        counts = list(choice.counts)
        counts[source] -= k
        counts[target] += k
        return tuple(counts)

    guess = fitter.placement(choice.order, choice.counts, choice.n_gpu_layers)
    low, high = 0, choice.counts[source]
    while low < high:
        middle = (low + high + 1) // 2
        if _roughly_fits(fitter, choice, moved(middle), guess):
            low = middle
        else:
            high = middle - 1
    for k in range(low, max(low - 4, 0), -1):
        if fitter.fits(choice.order, moved(k), choice.n_gpu_layers):
            return dataclasses.replace(choice, counts=moved(k))
    return None


def _roughly_fits(fitter: Fitter, choice: Choice, counts: Sequence[int], guess: Placement) -> bool:
    first = fitter.n_slots - choice.n_gpu_layers
    for device, count in zip(choice.order, counts):
        fixed = fitter.costs.compute_bytes(guess, device.name) + fitter.costs.overhead_bytes(device)
        if count and fitter.costs.range_bytes(device.backend, first, count) + fixed > device_limit(device,
                                                                                                   fitter.request):
            return False
        first += count
    return True


def _smaller_contexts(planner: Planner, ctx_tokens: int, chosen: Choice,
                      figures: SpeedFigures) -> list[Candidate]:
    """--ctx max: every expert on the devices, or one device fewer, each at its own largest context."""
    found: list[Candidate] = []
    floor = max(planner.request.ctx_min_tokens, 256)
    if chosen.host_expert_layers:
        dense = planner.largest_ctx(planner.profile.n_slots, floor, ctx_tokens)
        if dense is not None:
            found.append(Candidate(_label(dense[1], "every expert on the devices"), dense[0], dense[1],
                                   speed_of(planner, dense[0], dense[1], figures)))
    if len(chosen.order) > 1 and not chosen.host_expert_layers:
        for device in chosen.order:
            fewer = _without(planner, device, floor, ctx_tokens)
            if fewer is not None:
                found.append(Candidate(_label(fewer[1], f"without {device.name}"), fewer[0], fewer[1],
                                       speed_of(planner, fewer[0], fewer[1], figures)))
    return found


def _without(planner: Planner, device: Device, floor: int, high: int) -> tuple[int, Choice] | None:
    saved = planner.devices
    try:
        planner.devices = tuple(d for d in saved if d is not device)
        found = planner.largest_ctx(planner.profile.n_slots, floor, high)
    except PlanError:
        return None
    finally:
        planner.devices = saved
    if found is None:
        return None
    why = "the plan is faster without it (--prefer speed)"
    return found[0], dataclasses.replace(found[1], excluded={**found[1].excluded, device.name: why})


def alternatives(found: Sequence[Candidate], picked: Candidate, limit: int = 5) -> tuple[Alternative, ...]:
    """The picked candidate and the best others, for `plan --compare`."""
    others = [c for c in found if c is not picked][:limit - 1]
    return tuple(Alternative(c.label, c.ctx_tokens, c.speed, c is picked) for c in [picked, *others])


def estimate_plan(plan: Plan, figures: SpeedFigures) -> SpeedEstimate:
    """The estimate for a finished plan (e.g. one made without speed figures, or with other figures)."""
    ranges = tuple(SlotRange(d.device.name, d.device.backend, d.first_slot or 0, d.n_layers)
                   for d in plan.devices if not d.excluded and d.n_layers)
    return estimate_speed(plan.model, plan.request, plan.ctx_tokens, Placement(ranges, plan.host_expert_layers),
                          figures)
