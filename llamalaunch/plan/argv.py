"""The llama-server argv that reproduces a placement exactly. Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from llamalaunch.model.estimate import Placement, host_experts_override
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.companions import Companion
from llamalaunch.plan.request import STREAMING_BACKENDS, Request, resolved_host_weights
from llamalaunch.plan.split import Choice
from llamalaunch.probe.device import Device


@dataclass(frozen=True)
class ArgvOptions:
    model_path: str
    # Flags the llama-server binary knows (from its --help); None: assume a current build.
    capabilities: frozenset[str] | None = None
    # --mmproj / --draft models and the device (our name) each is pinned to
    companions: tuple[tuple[Companion, str], ...] = ()

    def knows(self, flag: str) -> bool:
        return self.capabilities is None or flag in self.capabilities


def used_endpoints(all_devices: Sequence[Device], used: Sequence[Device]) -> list[str]:
    """--rpc list: workers with at least one used device, in the user's order.

    Workers left out entirely are not passed at all, so llama-server never waits on them.
    """
    wanted = {device.endpoint for device in used if device.endpoint}
    ordered: list[str] = []
    for device in all_devices:
        if device.endpoint in wanted and device.endpoint not in ordered:
            ordered.append(device.endpoint)
    return ordered


def child_names(all_devices: Sequence[Device], endpoints: Sequence[str]) -> dict[str, str]:
    """Our device names → the names llama-server will give them with this --rpc list.

    llama.cpp numbers RPC devices across workers in --rpc order; dropping a worker renumbers the rest.
    """
    names: dict[str, str] = {}
    offset = 0
    for endpoint in endpoints:
        worker = [d for d in all_devices if d.endpoint == endpoint]
        for device in worker:
            names[device.name] = f"RPC{offset + (device.worker_index or 0)}"
        offset += len(worker)
    for device in all_devices:
        names.setdefault(device.name, device.name)  # local GPUs, and what-if workers with no endpoint
    return names


def renaming_note(all_devices: Sequence[Device], argv: Sequence[str]) -> str:
    """A note when the command line's RPC names differ from the plan's: llama-server numbers only the workers on
    its --rpc, so a worker left out (down, or not needed) shifts the names of those after it."""
    endpoints = argv[list(argv).index("--rpc") + 1].split(",") if "--rpc" in argv else []
    names = child_names(all_devices, endpoints)
    renamed = [f"{names[d.name]} is this plan's {d.name} ({d.endpoint})" for d in all_devices
               if d.endpoint in endpoints and names[d.name] != d.name]
    return f"llama-server numbers only the workers on its --rpc: in the command line {', '.join(renamed)}" \
        if renamed else ""


def default_order(all_devices: Sequence[Device], endpoints: Sequence[str]) -> list[str]:
    """Devices llama-server offloads to when no -dev is given: the workers' devices, then local GPUs."""
    rpc = [d.name for endpoint in endpoints for d in all_devices if d.endpoint == endpoint]
    unreachable = [d.name for d in all_devices if d.backend == "RPC" and not d.endpoint]
    local = [d.name for d in all_devices if d.backend != "RPC" and not d.is_host]
    return rpc + unreachable + with_lower_numbers(local)


def with_lower_numbers(names: Sequence[str]) -> list[str]:
    """A what-if CUDA1 alone stands for a machine whose CUDA0 the plan does not use: llama-server numbers a
    backend's GPUs from 0 and would offload to CUDA0 too, so the default order counts it (and -dev is written)."""
    implied: list[str] = []
    for name in names:
        match = re.fullmatch(r"([A-Za-z]+)(\d+)", name)
        if match is not None:
            implied += [f"{match.group(1)}{i}" for i in range(int(match.group(2)))]
    return list(dict.fromkeys([*implied, *names])) if set(implied) - set(names) else list(names)


def holds_host_weights(profile: ModelProfile, choice: Choice) -> bool:
    """Whether the plan leaves weights of its devices' model in host memory: experts (-ot ...=CPU) or whole layers
    (-ngl below all). A plan without devices (a CPU-only machine, -dev none) spills nothing: llama.cpp's default.

    token_embd always stays there (DESIGN.md) and does not count: it is one row per token, never streamed."""
    spilled = bool(choice.host_expert_layers or choice.host_expert_parts) or choice.n_gpu_layers < profile.n_slots
    return spilled and bool(choice.order)


def streams_host_weights(choice: Choice) -> bool:
    """Whether a GPU of the plan streams weights left in host memory to itself for large batches."""
    return any(device.backend in STREAMING_BACKENDS for device in choice.order)


def host_weights_mode(profile: ModelProfile, request: Request, choice: Choice) -> str | None:
    """How the plan keeps the weights it leaves in host memory (`auto` resolved); None: it leaves none."""
    if not holds_host_weights(profile, choice):
        return None
    return resolved_host_weights(request.host_weights, streams_host_weights(choice))


def host_weights_args(mode: str, options: ArgvOptions) -> list[str]:
    """llama-server's flags for `--host-weights` (llama.cpp src/llama-model.cpp make_cpu_buft_list: host tensors
    take the first of [the first GPU's pinned host buffer unless --no-host, CPU_REPACK, CPU] that can hold them;
    with mmap, a host buffer becomes the mapped file).

    pinned: -lm none (older builds: --no-mmap), so CUDA_Host is not swapped for the mapping. mapped: llama.cpp's
    default (auto: mmap unless a device cannot, like an integrated GPU). repacked: --no-host only: repack
    buffers are allocated copies whatever the load mode, so -lm none would only load the tensors no CPU kernel
    repacks (norms, token_embd) into memory too, for nothing. Weights take the same bytes in every mode; the
    compute estimate keeps, in every mode, the GPU's copies of host experts streamed for a prompt (repacked
    ones are not streamed: there it reserves more than llama.cpp allocates, never less).
    """
    if mode == "pinned":
        if options.knows("--load-mode"):
            return ["-lm", "none"]
        return ["--no-mmap"] if options.knows("--no-mmap") else []
    if mode == "repacked" and options.knows("--no-host"):
        return ["--no-host"]
    return []


def build_argv(profile: ModelProfile, request: Request, ctx_tokens: int, choice: Choice,
               all_devices: Sequence[Device], options: ArgvOptions) -> tuple[str, ...]:
    argv = ["-m", options.model_path, "-c", str(ctx_tokens), "-ngl", str(choice.n_gpu_layers)]
    pinned = {device for _companion, device in options.companions}
    # A companion's worker stays on --rpc even when no layer went there, so its name stays valid.
    endpoints = used_endpoints(all_devices, [*choice.order, *(d for d in all_devices if d.name in pinned)])
    if endpoints:
        argv += ["--rpc", ",".join(endpoints)]  # must come before -dev
    names = child_names(all_devices, endpoints)
    order = [device.name for device in choice.order]
    if order != default_order(all_devices, endpoints):
        argv += ["-dev", ",".join(names[name] for name in order) if order else "none"]
    if len(order) > 1:
        argv += ["-ts", ",".join(str(count) for count in choice.counts)]
    argv += ["-np", str(request.n_parallel), "-kvu" if request.kv_unified else "-no-kvu"]
    argv += ["-b", str(request.n_batch), "-ub", str(request.n_ubatch)]
    argv += ["-ctk", request.cache_type_k, "-ctv", request.cache_type_v, "-fa", request.flash_attn]
    if request.swa_full:
        argv.append("--swa-full")
    if choice.host_expert_layers or choice.host_expert_parts:
        argv += ["-ot", host_experts_override(Placement((), choice.host_expert_layers, choice.host_expert_parts))]
    host_weights = host_weights_mode(profile, request, choice)
    if host_weights is not None:
        argv += host_weights_args(host_weights, options)
    for companion, device in options.companions:
        argv += companion.argv(names[device])
    if options.knows("--fit"):
        argv += ["--fit", "off"]
    return tuple(argv)
