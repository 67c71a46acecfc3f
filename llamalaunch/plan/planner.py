"""make_plan: the Planner's context and placement (search.py), by speed when figures are given (choose.py),
assembled into a Plan with its argv and notes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from llamalaunch.model.estimate import SlotRange
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.argv import (
    ArgvOptions,
    build_argv,
    host_weights_args,
    host_weights_mode,
    renaming_note,
    streams_host_weights,
)
from llamalaunch.plan.choose import alternatives, candidates, pick
from llamalaunch.plan.request import Request
from llamalaunch.plan.search import Planner, round_ctx
from llamalaunch.plan.speed import STREAM_BYTES_S
from llamalaunch.plan.split import CTX_STEP, Choice, device_limit
from llamalaunch.plan.types import DevicePlan, MemoryUse, Plan
from llamalaunch.probe.device import Device
from llamalaunch.probe.speed_figures import SpeedFigures
from llamalaunch.units import format_bytes


def plan_notes(planner: Planner, ctx_tokens: int, choice: Choice) -> tuple[str, ...]:
    """What the plan does other than asked, said rather than done silently."""
    request, profile = planner.request, planner.profile
    notes = []
    if request.ctx_tokens is None and request.cpu_spill and planner.devices \
            and choice.n_gpu_layers < planner.layers_wanted():
        notes.append(f"--ctx max with layers on the CPU: ctx {ctx_tokens} (llama.cpp --fit's floor: a larger "
                     "context leaves fewer layers on the devices); --ctx chooses another")
    if request.ctx_tokens is not None and ctx_tokens < round_ctx(request.ctx_tokens):
        notes.append(f"--ctx {request.ctx_tokens} does not fit: ctx {ctx_tokens} is used, the largest that does "
                     f"(--ctx-min {request.ctx_min_tokens})")
    elif request.ctx_tokens is not None and ctx_tokens != request.ctx_tokens:
        notes.append(f"--ctx {request.ctx_tokens} becomes {ctx_tokens}: llama.cpp sizes the context in steps "
                     f"of {CTX_STEP}")
    if request.ctx_tokens is None and profile.n_ctx_train and ctx_tokens == profile.n_ctx_train:
        notes.append(f"--ctx max stops at the {ctx_tokens} tokens the model was trained on, not at the memory: "
                     "--ctx N plans a larger one (output past the trained length may degrade)")
    if profile.n_ctx_train and ctx_tokens > profile.n_ctx_train:
        notes.append(f"ctx {ctx_tokens} is beyond the {profile.n_ctx_train} tokens the model was trained on: "
                     f"llama-server uses {ctx_tokens}, but output past {profile.n_ctx_train} tokens may degrade")
    for device in planner.devices:
        budget = request.budget_bytes.get(device.name)
        if budget is not None and budget > device.free_bytes:
            notes.append(f"--budget {device.name}={format_bytes(budget)} is above its "
                         f"{format_bytes(device.free_bytes)} free: the plan uses at most the free memory")
        elif budget is not None:
            notes.append(f"--budget {device.name}={format_bytes(budget)} of its {format_bytes(device.free_bytes)} "
                         "free: its spare is what the plan leaves of the budget")
    return tuple(notes)


def make_plan(profile: ModelProfile, devices: Sequence[Device], request: Request,
              options: ArgvOptions, overhead: Mapping[str, int] | None = None,
              on_choice: Callable[[int, Choice], None] | None = None,
              host_free_bytes: int | None = None, speed: SpeedFigures | None = None,
              compare: bool = False) -> Plan:
    """Plan `profile` on `devices`; raise PlanError saying what would fit when nothing does.

    With `speed` figures, the fastest of the placements that fit is taken (plan/choose.py); `compare`
    also lists smaller contexts among the alternatives."""
    planner = Planner(profile, devices, request, overhead, host_free_bytes)
    ctx_tokens, choice = planner.solve()
    found = candidates(planner, ctx_tokens, choice, speed, request.prefer, compare) if speed is not None else []
    picked = pick(found, request.prefer) if found else None
    if picked is not None:
        ctx_tokens, choice = picked.ctx_tokens, picked.choice
    if on_choice is not None:
        on_choice(ctx_tokens, choice)
    plan = assemble(planner, ctx_tokens, choice, options)
    plan = replace(plan, notes=(*plan.notes, *plan_notes(planner, ctx_tokens, choice)))
    if picked is None:
        return plan
    return replace(plan, speed=picked.speed, alternatives=alternatives(found, picked))


def assemble(planner: Planner, ctx_tokens: int, choice: Choice, options: ArgvOptions) -> Plan:
    placement, estimate = planner.placed(ctx_tokens, choice)
    spilled = choice.host_expert_layers | {il for il, _ in choice.host_expert_parts}
    plans: list[DevicePlan] = []
    for device, slot_range in zip(choice.order, placement.ranges):
        plans.append(device_plan(planner.request, device, None, slot_range.first_slot, slot_range.n_slots,
                                 estimate.devices[device.name], expert_counts(planner.profile, slot_range, spilled)))
    for device in planner.all_devices:
        if device.is_host or device in choice.order:
            continue
        plans.append(device_plan(planner.request, device, leave_out_reason(planner, device, choice),
                                 None, 0, MemoryUse()))
    argv = build_argv(planner.profile, planner.request, ctx_tokens, choice, planner.all_devices, options)
    host_weights = host_weights_mode(planner.profile, planner.request, choice)
    streaming = streaming_note(planner.request, host_weights, choice) if host_weights else ""
    renamed = renaming_note(planner.all_devices, argv)
    locked = locked_note(host_weights, estimate.host.weights_bytes, planner.host_free_bytes)
    notes = (*((expert_note(planner.profile, choice),) if spilled else ()), *((streaming,) if streaming else ()),
             *((host_weights_note(host_weights, choice, options),) if host_weights else ()),
             *((locked,) if locked else ()), *((renamed,) if renamed else ()))
    return Plan(planner.profile, planner.request, ctx_tokens, tuple(plans), estimate.host,
                choice.n_gpu_layers, argv, notes, host_expert_layers=choice.host_expert_layers,
                host_expert_parts=choice.host_expert_parts, host_weights=host_weights,
                host_free_bytes=planner.host_free_bytes)


LOCKED_SHARE = 0.8  # pinned host weights above this share of the available RAM get a note


def locked_note(host_weights: str | None, weights_bytes: int, host_free_bytes: int | None) -> str | None:
    """Pinned memory cannot be paged out: most of the host's RAM locked for llama-server is worth a word."""
    if host_weights != "pinned" or not host_free_bytes or weights_bytes <= LOCKED_SHARE * host_free_bytes:
        return None
    return (f"pinned host weights lock {format_bytes(weights_bytes)} of the {format_bytes(host_free_bytes)} of RAM "
            "available: everything else on this machine shares the rest; --host-weights mapped leaves them to "
            "the page cache instead")


def expert_note(profile: ModelProfile, choice: Choice) -> str:
    held = len(choice.host_expert_layers)
    split = sorted({il for il, _ in choice.host_expert_parts})
    blocks = " and ".join(", ".join(map(str, split)).rsplit(", ", 1))
    partly = f" (and part of block{'s' if len(split) > 1 else ''} {blocks})" if split else ""
    on_host = profile.n_slots - choice.n_gpu_layers
    rest = "every layer's attention, shared weights and KV cache are on the devices" if not on_host else \
        f"{on_host} of {profile.n_slots} layers are on the host whole (-ngl {choice.n_gpu_layers})"
    return f"experts of {held} of {len(profile.expert_layers)} MoE layers{partly} stay in host memory; {rest}"


# What each --host-weights mode does with a GPU in the plan; measured with models routing over all experts: prompts
# from pinned memory 4-6x those from the file mapping, the load 2-5x slower (bench/results/h100-2026-12-07e);
# generation from pinned memory 0.84-0.94x --fit's from the mapping in four loads on one host (an H200's,
# h200-2026-12-07g), 0.84-1.18x on H100 hosts (h100-2026-12-07f).
_HOST_WEIGHTS_WITH_GPU = {
    "pinned": "loaded into pinned memory, which prompts stream to the GPU 4-6x as fast as from the file mapping; "
              "a slower load, the host memory stays locked while it runs, and on some hosts generation is up to "
              "16% slower",
    "mapped": "read through the file mapping: the fastest load; prompts stream them to the GPU at a quarter to a "
              "sixth of the speed of pinned memory",
    "repacked": "repacked into the CPU's own layout (the types its kernels take; the rest mapped): the host computes "
                "them, prompts included, never streaming them to the GPU",
}
_HOST_WEIGHTS_WITHOUT_GPU = {
    "pinned": "loaded into memory (no GPU of this plan has pinned memory); the host computes them",
    "mapped": "read through the file mapping (the CPU repacks the types its kernels take into memory, as in "
              "every mode without a GPU): the fastest load; the host computes them",
    "repacked": "the host computes them (the CPU's own layout, as in every mode without a GPU)",
}


LARGE_UBATCH = 2048  # llama.cpp's default -b: the largest ubatch one prompt batch can fill


def streaming_note(request: Request, mode: str, choice: Choice) -> str:
    """The lever on prompt speed when a GPU streams host weights: it does so once per ubatch ("" if none)."""
    if mode not in STREAM_BYTES_S or not streams_host_weights(choice) or request.n_ubatch >= LARGE_UBATCH:
        return ""
    # measured on an H100 (bench/results/h100-2026-12-07e): 2048 against 512, pinned: prompts 1.7-1.9x
    batch = f" -b {LARGE_UBATCH}" if request.n_batch < LARGE_UBATCH else ""
    return (f"prompts stream the host's weights to the GPU once per ubatch:{batch} -ub {LARGE_UBATCH} streams them "
            f"{LARGE_UBATCH / request.n_ubatch:.2g}x less often (on an H100, 1.7-1.9x the prompt speed of -ub 512), "
            "for a larger compute buffer and less room for weights on the devices")


def host_weights_note(mode: str, choice: Choice, options: ArgvOptions) -> str:
    """The --host-weights mode of a plan that leaves weights in host memory, its flags, and what it trades."""
    gpu = streams_host_weights(choice)
    flags = " ".join(host_weights_args(mode, options)) or "no flag"
    how = (_HOST_WEIGHTS_WITH_GPU if gpu else _HOST_WEIGHTS_WITHOUT_GPU)[mode]
    return f"host weights {mode} ({flags}): {how}; --host-weights chooses auto, pinned, mapped or repacked"


def leave_out_reason(planner: Planner, device: Device, choice: Choice) -> str:
    if device.name in choice.excluded:
        return choice.excluded[device.name]
    down = f" ({device.note})" if device.error is not None else ""
    if device.name in planner.request.exclude:
        return f"named by --exclude{down}"
    if device not in planner.devices:
        return f"not listed in -dev{down}"
    return "not needed: the other devices hold every layer with more headroom"


def device_plan(request: Request, device: Device, reason: str | None, first_slot: int | None,
                n_layers: int, memory: MemoryUse, experts: tuple[int, int] = (0, 0)) -> DevicePlan:
    return DevicePlan(device=device, excluded=reason is not None, reason=reason, first_slot=first_slot,
                      n_layers=n_layers, memory=memory, reserved_bytes=request.reserve_bytes.get(device.name, 0),
                      limit_bytes=device_limit(device, request), expert_layers=experts[0],
                      moe_layers=experts[1], budget_bytes=request.budget_bytes.get(device.name))


def expert_counts(profile: ModelProfile, slot_range: SlotRange, host_experts: frozenset[int]) -> tuple[int, int]:
    """(MoE blocks whose experts this device holds, MoE blocks it holds)."""
    mine = [il for il in profile.expert_layers if slot_range.first_slot <= il < slot_range.first_slot + slot_range.n_slots]
    return sum(1 for il in mine if il not in host_experts), len(mine)
