"""The Planner: the context search and CPU spill around the placement search in split.py.

make_plan (planner.py) turns its answer into a Plan; choose.py compares the placements it finds by speed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

from llamalaunch.errors import BadInputError, PlanError
from llamalaunch.model.estimate import Estimate, MemoryUse, Placement
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.costs import CostModel
from llamalaunch.plan.experts import fill_experts, forced_host_experts, host_within
from llamalaunch.plan.request import Request
from llamalaunch.plan.split import CTX_STEP, Choice, Fitter, choose_placement, device_limit, select_devices
from llamalaunch.probe.device import Device
from llamalaunch.units import format_bytes

SPILL_CTX_FLOOR = 4096
Found = TypeVar("Found")


def round_ctx(tokens: int) -> int:
    return -(-tokens // CTX_STEP) * CTX_STEP


def largest_fitting(low: int, high: int, choose: Callable[[int], Found | None]) -> tuple[int, Found] | None:
    """Largest ctx in [low, high] (multiples of 256) where `choose` finds a choice (fewer as ctx grows);
    also whole plans (the draft model's context search, plan/pipeline.py)."""
    low, high = round_ctx(low), round_ctx(high)
    found = choose(low)
    if found is None:
        return None
    best = (low, found)
    top = choose(high)
    if top is not None:
        return high, top
    while high - low > CTX_STEP:
        middle = round_ctx((low + high) // 2)
        if middle in (low, high):
            break
        choice = choose(middle)
        if choice is None:
            high = middle
        else:
            low, best = middle, (middle, choice)
    return best


def use_largest(ctx_tokens: int, ceiling: int) -> str:
    """The fix when a smaller context fits; --ctx max stops at `ceiling` (the context the model was trained for)."""
    if ctx_tokens > ceiling:
        return f"the largest context that fits is {ctx_tokens}: use --ctx {ctx_tokens} (--ctx max stops at the " \
            f"{ceiling} the model was trained for)"
    return f"the largest context that fits is {ctx_tokens}: use --ctx {ctx_tokens} or --ctx max"


def require_trained_ctx(profile: ModelProfile) -> None:
    """--ctx max needs the context the model was trained for as its ceiling (llama.cpp's -c 0 would be 0 too)."""
    if not profile.n_ctx_train:
        raise BadInputError(f"{profile.name or profile.arch} does not say the context it was trained for "
                            f"({profile.arch}.context_length is 0 or missing), so --ctx max has no ceiling",
                            "give --ctx N")


class Planner:
    """Plans for one model, device set and request; `overhead` is bytes per device name or backend."""

    def __init__(self, profile: ModelProfile, devices: Sequence[Device], request: Request,
                 overhead: Mapping[str, int] | None = None, host_free_bytes: int | None = None) -> None:
        self.profile = profile
        self.all_devices = tuple(devices)
        self.request = request
        self.overhead = dict(overhead or {})
        self.devices = select_devices(devices, request)
        self.host_free_bytes = host_free_bytes  # available host RAM; None: not known (plans do not check it)
        experts = profile.expert_layers
        if request.cpu_experts and not experts:  # llama.cpp's --n-cpu-moe would do nothing: a mistake to say
            raise BadInputError(f"--cpu-experts {request.cpu_experts}: {profile.name} has no routed experts (it is "
                                "not a mixture-of-experts model)", "drop --cpu-experts")
        # --cpu-experts N fixes which experts stay on the host; otherwise the plan decides (expert spill), unless
        # -ngl keeps whole layers on the host (-ngl all keeps none there: llama.cpp's -ngl 999 with --n-cpu-moe)
        if request.cpu_experts and request.cpu_experts > len(experts):
            raise BadInputError(f"--cpu-experts {request.cpu_experts}: {profile.name} has {len(experts)} MoE "
                                "layers", f"give --cpu-experts 0 to {len(experts)}")
        self.host_experts = forced_host_experts(experts, request.cpu_experts) if request.cpu_experts else frozenset()
        every_layer = request.n_gpu_layers is None or request.n_gpu_layers >= profile.n_slots
        self.spills_experts = bool(experts) and request.cpu_experts is None and every_layer

    def costs(self, ctx_tokens: int, host_experts: frozenset[int] | None = None) -> CostModel:
        host = self.host_experts if host_experts is None else host_experts
        return CostModel(self.profile, self.request, ctx_tokens, self.overhead, host)

    def choice_at(self, ctx_tokens: int, n_gpu_layers: int,
                  host_experts: frozenset[int] | None = None) -> Choice | None:
        fitter = Fitter(self.costs(ctx_tokens, host_experts), self.request)
        return choose_placement(fitter, self.devices, n_gpu_layers) if self.devices else None

    def fitting_choice(self, ctx_tokens: int, n_gpu_layers: int) -> Choice | None:
        """choice_at, with the host's share (layers and experts left there, its KV and buffers) within its RAM."""
        choice = self.choice_at(ctx_tokens, n_gpu_layers)
        return choice if choice is not None and self.host_fits(ctx_tokens, choice) else None

    def host_use(self, ctx_tokens: int, choice: Choice) -> MemoryUse:
        return self.placed(ctx_tokens, choice)[1].host

    def host_fits(self, ctx_tokens: int, choice: Choice) -> bool:
        return self.host_free_bytes is None or \
            host_within(self.request, self.host_free_bytes, self.host_use(ctx_tokens, choice).total_bytes)

    def expert_choice(self, ctx_tokens: int, refuse_host: bool = True) -> Choice | None:
        """Every block on the devices, as many routed experts as fit there, the rest in host memory
        (a host too small for them: PlanError, or None when not `refuse_host`)."""
        every = frozenset(self.profile.expert_layers)
        dense = self.choice_at(ctx_tokens, self.profile.n_slots, every)
        if dense is None:
            return None
        choice, estimate = self.filled(ctx_tokens, dense)
        if any(estimate.devices[d.name].total_bytes > device_limit(d, self.request) for d in choice.order):
            return None
        host = estimate.host
        if not host_within(self.request, self.host_free_bytes, host.total_bytes):
            if not refuse_host:
                return None
            need, fix = self.host_refusal(ctx_tokens, host)
            smaller = self.largest_expert_ctx(self.ctx_floor(), ctx_tokens - CTX_STEP) \
                if ctx_tokens > self.ctx_floor() else None
            raise PlanError(need, self.use_largest(smaller[0]) if smaller is not None else fix)
        return choice

    def filled(self, ctx_tokens: int, dense: Choice) -> tuple[Choice, Estimate]:
        """`dense` with each device's experts taken back (fill_experts) and its estimate; where a device then
        keeps a twentieth of its room while experts stay on the host, the room split too: the fewer host bytes."""
        every = frozenset(self.profile.expert_layers)
        choice = fill_experts(self.costs(ctx_tokens, every), dense)
        _, estimate = self.placed(ctx_tokens, choice)
        on_host = choice.host_expert_layers or choice.host_expert_parts
        roomy = any(device_limit(d, self.request) - estimate.devices[d.name].total_bytes
                    > device_limit(d, self.request) // 20 for d in choice.order)
        other = self.room_split(ctx_tokens, dense) if on_host and roomy else None
        if other is None:
            return choice, estimate
        other = fill_experts(self.costs(ctx_tokens, every), other)
        _, other_estimate = self.placed(ctx_tokens, other)
        if other_estimate.host.weights_bytes < estimate.host.weights_bytes:
            return other, other_estimate
        return choice, estimate

    def room_split(self, ctx_tokens: int, dense: Choice) -> Choice | None:
        """The blocks of `dense` (every expert on the host) dealt out in proportion to each device's room: a device
        takes back only its own blocks' experts, so an even spare of the dense parts alone can leave a small last
        device a few blocks and gigabytes free while other blocks' experts stay on the host."""
        costs = self.costs(ctx_tokens, frozenset(self.profile.expert_layers))
        rooms = [max(device_limit(d, self.request) - costs.overhead_bytes(d), 0) for d in dense.order]
        shares = [dense.n_gpu_layers * room / max(sum(rooms), 1) for room in rooms]
        counts = [int(share) for share in shares]
        by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - counts[i], reverse=True)
        for index in by_remainder[:dense.n_gpu_layers - sum(counts)]:
            counts[index] += 1
        if 0 in counts or tuple(counts) == dense.counts or \
                not Fitter(costs, self.request).fits(dense.order, counts, dense.n_gpu_layers):
            return None
        return replace(dense, counts=tuple(counts))

    def placed(self, ctx_tokens: int, choice: Choice) -> tuple[Placement, Estimate]:
        """The choice's placement (the expert tensors of split blocks where it put them) and its estimate."""
        costs = self.costs(ctx_tokens, choice.host_expert_layers)
        placement = Fitter(costs, self.request).placement(choice.order, choice.counts, choice.n_gpu_layers)
        placement = replace(placement, host_expert_parts=choice.host_expert_parts)
        return placement, costs.estimate(placement)

    def host_refusal(self, ctx_tokens: int, host: MemoryUse) -> tuple[str, str]:
        """What the host would hold and what it has; the fix: the context only helps when the rest fits."""
        free = self.host_free_bytes or 0
        usable = free - self.request.margin_for(free)
        need = (f"{self.profile.name or self.profile.arch} at ctx {ctx_tokens} needs {format_bytes(host.total_bytes)}"
                f" of host memory for what does not fit on the devices (weights {format_bytes(host.weights_bytes)}, "
                f"KV cache {format_bytes(host.kv_bytes)}, buffers {format_bytes(host.compute_bytes)}); "
                f"{format_bytes(free)} is available")
        levers = [*(["raise -ngl"] if self.request.n_gpu_layers is not None else []),
                  *(["lower --cpu-experts"] if self.request.cpu_experts else [])]
        if host.weights_bytes + host.compute_bytes > usable:
            fixes = ["the weights alone do not fit: add devices", *levers, "free host memory",
                     "or use a smaller quantization"]
        else:  # --ctx max tried every context already
            fixes = ["free host memory", "add devices", *levers,
                     *(["or lower --ctx"] if self.request.ctx_tokens is not None else [])]
        return need, ", ".join(fixes)

    def largest_ctx(self, n_gpu_layers: int, low: int, high: int,
                    host_experts: frozenset[int] | None = None) -> tuple[int, Choice] | None:
        """Largest ctx in [low, high] (multiples of 256) that fits; feasibility falls as ctx grows. Given
        `host_experts` (experts to be filled onto the devices after), the host is not checked here."""
        if host_experts is not None:
            return largest_fitting(low, high, lambda ctx: self.choice_at(ctx, n_gpu_layers, host_experts))
        return largest_fitting(low, high, lambda ctx: self.fitting_choice(ctx, n_gpu_layers))

    def largest_expert_ctx(self, low: int, high: int) -> tuple[int, Choice] | None:
        """--ctx max with experts spilled: the largest ctx whose experts left on the host fit its memory
        (a smaller context leaves more room on the devices for experts)."""
        return largest_fitting(low, high, lambda ctx: self.expert_choice(ctx, refuse_host=False))

    def spill_choice(self, ctx_tokens: int) -> Choice | None:
        """CPU spill: the most trailing slots on the devices. For a MoE model whose experts the plan places, also
        with those slots' experts on the host, taken back where they fit: the one with more blocks on the devices
        (a block whose attention and KV are on a device beats one run whole on the host)."""
        layers = self.most_layers(ctx_tokens)
        if not self.profile.expert_layers or self.request.cpu_experts is not None:
            return layers
        slim = self.most_layers(ctx_tokens, frozenset(self.profile.expert_layers))
        if slim is None or (layers is not None and slim.n_gpu_layers <= layers.n_gpu_layers):
            return layers
        choice, estimate = self.filled(ctx_tokens, slim)
        fits = all(estimate.devices[d.name].total_bytes <= device_limit(d, self.request) for d in choice.order)
        return choice if fits else layers

    def most_layers(self, ctx_tokens: int, host_experts: frozenset[int] | None = None) -> Choice | None:
        """The most trailing slots that fit the devices at this ctx (bisection on -ngl, at most the -ngl given),
        `host_experts` given. The host is not checked: it holds the rest, and fewer slots on the devices would
        only give it more."""
        low, high = 0, self.layers_wanted()
        best: Choice | None = None
        while low < high:
            middle = (low + high + 1) // 2
            choice = self.choice_at(ctx_tokens, middle, host_experts)
            if choice is None:
                high = middle - 1
            else:
                low, best = middle, choice
        return best

    def use_largest(self, ctx_tokens: int) -> str:
        return use_largest(ctx_tokens, self.ctx_ceiling())

    def ctx_ceiling(self) -> int:
        return max(self.profile.n_ctx_train, self.request.ctx_min_tokens)

    def ctx_floor(self) -> int:
        return max(self.request.ctx_min_tokens, CTX_STEP)

    def layers_wanted(self) -> int:
        """-ngl as given (0 included), else every slot."""
        given = self.request.n_gpu_layers
        return self.profile.n_slots if given is None else min(given, self.profile.n_slots)

    def solve(self) -> tuple[int, Choice]:
        if self.request.ctx_tokens is None:
            require_trained_ctx(self.profile)
        if not self.devices and not self.request.devices:  # no device here, or -dev none
            return self.host_only()
        full = self.layers_wanted()
        floor = self.ctx_floor()
        if self.request.ctx_tokens is None:
            found = self.largest_ctx(full, floor, self.ctx_ceiling())
            if self.spills_experts and (found is None or found[0] < round_ctx(self.ctx_ceiling())):
                # --ctx max: the largest context with dense parts and KV on the devices, then the experts
                spilled = self.largest_ctx(full, floor, self.ctx_ceiling(), frozenset(self.profile.expert_layers))
                if spilled is not None and (found is None or spilled[0] > found[0]):
                    experts = self.largest_expert_ctx(found[0] if found else floor, spilled[0])
                    if experts is not None and (found is None or experts[0] > found[0]):
                        return experts
                    if found is None:  # not even the smallest context leaves the host enough: say so
                        self.expert_choice(floor)
            if found is not None:
                return found
            # Spilling for --ctx max: a useful context (llama.cpp's --fit floor) rather than 256 tokens.
            return self.spill_or_fail(round_ctx(max(floor, min(SPILL_CTX_FLOOR, self.ctx_ceiling()))))
        ctx = round_ctx(self.request.ctx_tokens)
        choice = self.fitting_choice(ctx, full)
        if choice is None and self.spills_experts:
            choice = self.expert_choice(ctx)
        if choice is not None:
            return ctx, choice
        if self.request.ctx_is_target and ctx > floor:
            found = self.largest_ctx(full, floor, ctx - CTX_STEP)
            if found is None and self.spills_experts:
                found = self.largest_ctx(full, floor, ctx - CTX_STEP, frozenset(self.profile.expert_layers))
                choice = self.expert_choice(found[0]) if found is not None else None
                found = (found[0], choice) if found is not None and choice is not None else None
            if found is not None:
                return found
        return self.spill_or_fail(ctx)

    def host_only(self) -> tuple[int, Choice]:
        """No GPU and no worker: llama-server runs every layer on the CPU, as it would by itself; the context
        within the host's RAM (--ctx max: the largest; --ctx N: that, or smaller when it is a target)."""
        everything = Choice((), (), 0, {})
        floor = self.ctx_floor()
        wanted = round_ctx(self.request.ctx_tokens or self.ctx_ceiling())
        if self.host_fits(wanted, everything):
            return wanted, everything
        found = largest_fitting(floor, max(floor, wanted - CTX_STEP),
                                lambda ctx: everything if self.host_fits(ctx, everything) else None)
        if found is not None and (self.request.ctx_tokens is None or self.request.ctx_is_target):
            return found
        refused = wanted if self.request.ctx_tokens is not None else round_ctx(floor)
        need, fix = self.host_refusal(refused, self.host_use(refused, everything))
        raise PlanError(need, self.use_largest(found[0]) if found is not None else fix)

    def spill_or_fail(self, ctx_tokens: int) -> tuple[int, Choice]:
        if self.request.cpu_spill:
            choice = self.spill_choice(ctx_tokens)
            if choice is not None and choice.n_gpu_layers > 0:
                if not self.host_fits(ctx_tokens, choice):
                    raise PlanError(*self.host_refusal(ctx_tokens, self.host_use(ctx_tokens, choice)))
                return ctx_tokens, choice
        raise PlanError(*self.refusal(ctx_tokens))

    def refusal(self, ctx_tokens: int) -> tuple[str, str]:
        if not self.devices:
            return "no device to place layers on", "give --rpc workers or --assume devices, or leave out -dev " \
                "to run on the CPU"
        floor = self.ctx_floor()
        layers = self.layers_wanted()
        at = ctx_tokens if self.request.ctx_tokens is not None else round_ctx(floor)  # --ctx max: the smallest
        on_devices = self.choice_at(at, layers)
        if on_devices is not None:  # the devices hold their share: the host's RAM is what is short
            need, fix = self.host_refusal(at, self.host_use(at, on_devices))
            found = self.largest_ctx(layers, floor, ctx_tokens) if self.request.ctx_tokens is not None else None
            return need, self.use_largest(found[0]) if found is not None else fix
        # --ctx max found no context at all: the 4096 tried for CPU spill is not what the user asked for
        where = f"at any context down to --ctx-min {floor} (--ctx max)" if self.request.ctx_tokens is None \
            else f"at ctx {ctx_tokens}"
        costs = CostModel(self.profile, self.request, ctx_tokens, self.overhead)
        need = f"{self.profile.name or self.profile.arch} {where} does not fit on " + \
            "; ".join(self.memory_account(device, costs) for device in self.devices)
        found = self.largest_ctx(layers, floor, ctx_tokens) if self.request.ctx_tokens is not None else None
        if self.spills_experts and self.request.ctx_tokens is not None:  # experts on the host leave room for KV
            spilled = self.largest_expert_ctx(found[0] if found is not None else floor, ctx_tokens)
            found = spilled if spilled is not None and (found is None or spilled[0] > found[0]) else found
        if found is not None:
            return need, self.use_largest(found[0])
        below = self.below_ctx_min(layers, floor)
        if below is not None:
            return f"{need}; nor does any context down to --ctx-min {floor}", \
                f"the largest context that fits is {below}: lower --ctx-min to {below}" + \
                (", or add --cpu-spill" if self.spill_choice(floor) is not None and not self.request.cpu_spill
                 else "")
        if self.request.cpu_experts:
            fewest = self.fewest_cpu_experts(ctx_tokens)
            if fewest is not None:
                return need, f"--cpu-experts {fewest} fits at ctx {ctx_tokens} (more experts on the host), or " \
                    "leave out --cpu-experts and the plan chooses"
        spill = None if self.request.cpu_spill else self.spill_choice(ctx_tokens)
        if spill is not None and spill.n_gpu_layers > 0:
            if self.host_fits(ctx_tokens, spill):
                return need, f"{spill.n_gpu_layers} of {self.profile.n_slots} layers fit at ctx {ctx_tokens}: " \
                    "add --cpu-spill"
            host = self.host_use(ctx_tokens, spill)
            return need, f"{spill.n_gpu_layers} of {self.profile.n_slots} layers fit with --cpu-spill, but the " \
                f"host would need {format_bytes(host.total_bytes)} for the rest and " \
                f"{format_bytes(self.host_free_bytes or 0)} is available: add devices, free host memory, or use " \
                "a smaller quantization"
        levers = [option for option, taken in self.takers(costs) if taken]
        budgeted = [d.name for d in self.devices if self.request.budget_bytes.get(d.name, d.free_bytes) < d.free_bytes]
        return need, "no layer fits even at the smallest context: free memory, add devices" + \
            (f", raise --budget {' and '.join(budgeted)}" if budgeted else "") + \
            (f", or lower {' or '.join(levers)}" if levers else "")

    def below_ctx_min(self, layers: int, floor: int) -> int | None:
        """The largest context under a --ctx-min the user raised that fits with `layers` on the devices."""
        if floor <= CTX_STEP or self.request.ctx_tokens is None:
            return None
        found = self.largest_ctx(layers, CTX_STEP, floor - CTX_STEP)
        return found[0] if found is not None else None

    def fewest_cpu_experts(self, ctx_tokens: int) -> int | None:
        """The smallest --cpu-experts above the one given that fits at this context (devices and host)."""
        experts = self.profile.expert_layers
        for count in range((self.request.cpu_experts or 0) + 1, len(experts) + 1):
            choice = self.choice_at(ctx_tokens, self.layers_wanted(), forced_host_experts(experts, count))
            if choice is not None and self.host_fits(ctx_tokens, choice):
                return count
        return None

    def takers(self, costs: CostModel) -> list[tuple[str, bool]]:
        """The options that set what is taken from the devices before the model, and whether any takes some."""
        return [("--overhead", any(costs.overhead_bytes(d) for d in self.devices)),
                ("--reserve", any(self.request.reserve_bytes.get(d.name) for d in self.devices)),
                ("--margin", any(self.request.margin_for(d.free_bytes) for d in self.devices))]

    def memory_account(self, device: Device, costs: CostModel) -> str:
        """'CUDA0: 300.0 MiB free - 640.0 MiB CUDA overhead (--overhead) - 15.0 MiB margin (--margin) = nothing
        left': what took the device's memory before the model's layers, KV cache and compute buffer."""
        budget = self.request.budget_bytes.get(device.name)
        usable = min(device.free_bytes, device.free_bytes if budget is None else budget)
        start = f"{format_bytes(device.free_bytes)} free" if usable == device.free_bytes else \
            f"{format_bytes(usable)} budget (--budget) of {format_bytes(device.free_bytes)} free"
        taken = [(costs.overhead_bytes(device), f"{device.backend} overhead (--overhead)"),
                 (self.request.reserve_bytes.get(device.name, 0), "reserved (--reserve, --mmproj, --draft)"),
                 (self.request.margin_for(usable), "margin (--margin)")]
        left = device_limit(device, self.request) - costs.overhead_bytes(device)
        steps = "".join(f" - {format_bytes(size)} {what}" for size, what in taken if size)
        return f"{device.name}: {start}{steps} = " + (f"{format_bytes(left)} left" if left > 0 else "nothing left")
