"""Tokens per second before launch: what each device reads and computes per token, and the hops between them.

Pure: figures in, estimate out. One sequence is served at a time, so the devices of a layer split work
one after another and their times add up: a generated token costs every device the bytes it reads (the
weights of its slots, for MoE only the active experts, and the KV cache at the context fill) over its
memory bandwidth, a fixed cost per slot (kernel launches, thread barriers), and every hop between devices
(an RPC round trip and the activations). A prompt is processed an ubatch at a time: each device reads
its weights once per ubatch and computes every token, whichever takes longer; experts left in host
memory are streamed to a GPU for large batches (llama.cpp's op offload; the rate is --host-weights': pinned,
mapped, or never when repacked) or computed by the host.

Every figure may be unknown: the estimate then says so and the plan is made by memory alone.
The defaults below are stated as defaults; `efficiency` factors are calibrated from real runs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamalaunch.model.ggml.types import is_known, type_block
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.request import STREAMING_BACKENDS, Request, resolved_host_weights
from llamalaunch.probe.speed_figures import DeviceSpeed, SpeedFigures

if TYPE_CHECKING:  # model.estimate imports plan.types, which holds a SpeedEstimate
    from llamalaunch.model.estimate import Placement

# K-quant file types mix block types (more bits for some tensors): the mix's average bits per weight, which
# no one ggml type's block gives (Q4_K_M: 4.85, its Q4_K blocks 4.5). Other file types: ggml/types.py.
_MIX_BITS_PER_WEIGHT = {"Q5_K_S": 5.5, "Q5_K_M": 5.7, "Q4_K_S": 4.6, "Q4_K_M": 4.85, "Q3_K_S": 3.5, "Q3_K_M": 3.9,
                        "Q3_K_L": 4.3, "Q2_K": 3.35}
DEFAULT_BITS_PER_WEIGHT = 4.5  # a file type of neither kind (IQ3_M, a guessed one)

HOST_TO_GPU_BYTES_S = 25e9  # PCIe 4.0 x16 in practice: experts streamed to a GPU for a prompt ubatch
# Host weights a GPU streams for a prompt ubatch, by --host-weights: pinned memory at the bus's rate; the mapped
# file (pageable memory, staged by the driver) at about a quarter of it (H100, models routing over all experts,
# bench/results/h100-2026-12-07e: ~37 GB/s pinned, 6-9 GB/s mapped); repacked weights are never streamed (ggml's
# scheduler offloads only ops on weights in a host buffer, and CPU_REPACK is not one): the host computes the prompt.
STREAM_BYTES_S = {"pinned": HOST_TO_GPU_BYTES_S, "mapped": HOST_TO_GPU_BYTES_S / 4}
LOCAL_HOP_S = 10e-6  # a copy between the host and a local GPU
# An RPC device gets its graph with every compute call: tensor descriptions, about this much per slot.
RPC_GRAPH_BYTES_PER_SLOT = 16 * 1024
OP_OFFLOAD_MIN_BATCH = 32  # llama.cpp streams host weights to a GPU for batches at least this large


@dataclass(frozen=True)
class DeviceTime:
    """One device's (or the host's) share of a token's time."""

    name: str
    generation_s: float
    prompt_s: float  # per ubatch
    read_bytes: int  # per generated token: weights and KV
    # of the times above, what the device's efficiency does not scale (slot overheads)
    generation_fixed_s: float = 0.0
    prompt_fixed_s: float = 0.0
    prompt_streamed_s: float = 0.0  # of prompt_s, streaming host weights in (scaled by its stream_efficiency)


@dataclass(frozen=True)
class SpeedEstimate:
    generation_tps: float | None  # None: a figure is unknown (see `unknown`)
    prompt_tps: float | None
    fill_tokens: int
    ubatch_tokens: int
    parts: tuple[DeviceTime, ...] = ()
    hop_generation_s: float = 0.0
    hop_prompt_s: float = 0.0
    unknown: tuple[str, ...] = ()
    calibrated: tuple[str, ...] = ()  # parts whose efficiencies earlier runs calibrated (speed_calibration)


@dataclass(frozen=True)
class Alternative:
    """A placement that fits, for `plan --compare`."""

    label: str
    ctx_tokens: int
    speed: SpeedEstimate
    chosen: bool


@dataclass
class _Work:
    """What one compute location does per token (generation) and per ubatch (prompt)."""

    gen_bytes: float = 0.0  # bytes read per generated token
    gen_flops: float = 0.0
    prompt_bytes: float = 0.0  # bytes read once per ubatch
    prompt_flops: float = 0.0  # per token
    slots: int = 0
    streamed_s: float = 0.0  # seconds per ubatch streaming host weights to this GPU (and the hand-overs), nominal


def bits_per_weight(profile: ModelProfile) -> float:
    """Bits per weight of the bulk of the file (for FLOPs from bytes): a K-quant mix's average, else the block
    of the ggml type the file type names (Q8_0, F16; MXFP4_MOE: its MXFP4 experts)."""
    name = profile.file_type.upper()
    if name in _MIX_BITS_PER_WEIGHT:
        return _MIX_BITS_PER_WEIGHT[name]
    bulk = name.removesuffix("_MOE")
    if not is_known(bulk):
        return DEFAULT_BITS_PER_WEIGHT
    elements, size = type_block(bulk)
    return size * 8 / elements


def default_fill(ctx_tokens: int) -> int:
    return max(ctx_tokens // 2, 1)


def estimate_speed(profile: ModelProfile, request: Request, ctx_tokens: int, placement: Placement,
                   figures: SpeedFigures) -> SpeedEstimate:
    """Generation and prompt tokens per second of `placement` at the figures' context fill."""
    fill = min(figures.fill_tokens or default_fill(ctx_tokens), ctx_tokens)
    ubatch = max(1, min(request.n_ubatch, request.n_batch, ctx_tokens))
    works, route = _work(profile, request, placement, fill, ubatch)
    found = {**{r.device: figures.devices.get(r.device) for r in placement.ranges}, "host": figures.host}
    speeds = {name: speed for name, speed in found.items() if speed is not None}
    unknown = [f"{name} speed" for name, work in works.items()
               if _busy(work) and (name not in speeds or not speeds[name].known)]
    hop_gen, hop_prompt, link_unknown = _hops(profile, placement, route, figures, ubatch)
    unknown += link_unknown
    if unknown:
        return SpeedEstimate(None, None, fill, ubatch, unknown=tuple(dict.fromkeys(unknown)))
    parts = tuple(_time(name, work, speeds[name], ubatch) for name, work in works.items() if _busy(work))
    gen_s = sum(p.generation_s for p in parts) + hop_gen
    prompt_s = sum(p.prompt_s for p in parts) + hop_prompt
    return SpeedEstimate(1 / gen_s if gen_s > 0 else None, ubatch / prompt_s if prompt_s > 0 else None, fill,
                         ubatch, parts, hop_gen, hop_prompt,
                         calibrated=tuple(p.name for p in parts if speeds[p.name].calibrated))


def _busy(work: _Work) -> bool:
    return work.slots > 0 or work.gen_bytes > 0 or work.streamed_s > 0 or work.prompt_flops > 0


def _work(profile: ModelProfile, request: Request, placement: Placement, fill: int,
          ubatch: int) -> tuple[dict[str, _Work], list[str]]:
    """Per location, what it does; and the order the locations compute a token in (for the hops)."""
    from llamalaunch.model.kv import kv_bytes_per_layer

    owners = _owners(profile, placement)
    backends = {r.device: r.backend for r in placement.ranges}
    one_sequence = dataclasses.replace(request, n_parallel=1, kv_unified=True)
    kv = {b: kv_bytes_per_layer(profile, one_sequence, fill, b) for b in {"CPU", *backends.values()}}
    bpw = bits_per_weight(profile)
    used = profile.n_expert_used / profile.n_expert if profile.n_expert else 1.0
    works: dict[str, _Work] = {"host": _Work(), **{name: _Work() for name in backends}}
    route = ["host"]  # token embeddings are looked up in host memory
    streaming_gpu = next((r.device for r in placement.ranges if r.backend in STREAMING_BACKENDS), None)
    mode = resolved_host_weights(request.host_weights, streaming_gpu is not None)
    stream_bytes_s = STREAM_BYTES_S.get(mode) if ubatch >= OP_OFFLOAD_MIN_BATCH else None
    for il, slot in enumerate(profile.slots):
        owner = owners[il]
        backend = backends.get(owner, "CPU")
        work = works[owner]
        experts_here = il not in placement.host_expert_layers or owner == "host"
        expert_bytes = slot.expert_bytes + (slot.expert_cuda_extra_bytes if backend == "CUDA" else 0)
        dense = slot.full_bytes(backend) - expert_bytes
        layer_kv = kv[backend][il] if il < profile.n_layer else 0
        attention_flops = _attention_flops(profile, il, fill) if il < profile.n_layer else 0.0
        # a prompt ubatch ending at the fill: its tokens see half an ubatch fewer cells on average (causal)
        prompt_attention = _attention_flops(profile, il, max(fill - ubatch // 2, 1)) if il < profile.n_layer else 0.0
        weight_flops = (dense + (expert_bytes * used if experts_here else 0)) * 8 / bpw * 2
        work.slots += 1
        work.gen_bytes += dense + layer_kv + (expert_bytes * used if experts_here else 0)
        work.gen_flops += weight_flops + attention_flops
        _append(route, owner)
        if owner == "host" and streaming_gpu is not None and stream_bytes_s is not None:
            # a whole slot in host memory: a GPU streams its weights in for a prompt ubatch and multiplies
            # there (op offload); the attention stays with the host's KV cache
            work.prompt_bytes += layer_kv
            work.prompt_flops += prompt_attention
            hand_over = 2 * (LOCAL_HOP_S + profile.n_embd * 4 * ubatch / HOST_TO_GPU_BYTES_S)  # there and back
            works[streaming_gpu].streamed_s += slot.full_bytes("CPU") / stream_bytes_s + hand_over
            works[streaming_gpu].prompt_flops += weight_flops
        else:
            work.prompt_bytes += dense + layer_kv + (expert_bytes if experts_here else 0)
            work.prompt_flops += weight_flops + prompt_attention
        if not experts_here:
            _host_experts(works, route, owner, backend, slot.expert_bytes, used, bpw, stream_bytes_s)
    _append(route, "host")  # logits come back to the host
    return works, route


def _host_experts(works: dict[str, _Work], route: list[str], owner: str, backend: str, expert_bytes: int,
                  used: float, bpw: float, stream_bytes_s: float | None) -> None:
    """A block's routed experts in host memory: the host computes them for a token; a GPU streams them in
    for a prompt ubatch at `stream_bytes_s` (op offload; None: not streamed), any other device hands the
    ubatch to the host and back."""
    host = works["host"]
    host.gen_bytes += expert_bytes * used
    host.gen_flops += expert_bytes * used * 8 / bpw * 2
    if backend == "CUDA" and stream_bytes_s is not None:
        works[owner].streamed_s += expert_bytes / stream_bytes_s
        works[owner].prompt_flops += expert_bytes * used * 8 / bpw * 2
    else:
        host.prompt_bytes += expert_bytes
        host.prompt_flops += expert_bytes * used * 8 / bpw * 2
    route.extend(["host", owner])


def _attention_flops(profile: ModelProfile, il: int, fill: int) -> float:
    """QK and AV for one token against `fill` cached tokens (recurrent layers: none)."""
    if profile.recurrent_layers and profile.recurrent_layers[il]:
        return 0.0
    cells = min(fill, profile.n_swa) if profile.n_swa and profile.swa_layers[il] else fill
    head_k, head_v = profile.layer_head_dims(il)
    return 2.0 * profile.n_head[il] * (head_k + head_v) * cells


def _owners(profile: ModelProfile, placement: Placement) -> list[str]:
    owners = ["host"] * profile.n_slots
    for r in placement.ranges:
        for il in range(r.first_slot, r.first_slot + r.n_slots):
            owners[il] = r.device
    return owners


def _append(route: list[str], where: str) -> None:
    if route[-1] != where:
        route.append(where)


def _time(name: str, work: _Work, speed: DeviceSpeed, ubatch: int) -> DeviceTime:
    """The roofline (reading or computing, whichever is slower) over the share of it the device reaches."""
    bandwidth = speed.bandwidth_bytes_s or 1.0
    flops = speed.flops or 1.0
    gen = max(work.gen_bytes / bandwidth, work.gen_flops / flops) / speed.gen_efficiency
    prompt = max(work.prompt_bytes / bandwidth, ubatch * work.prompt_flops / flops) / speed.prompt_efficiency
    overhead = work.slots * speed.slot_overhead_s
    streamed = work.streamed_s / speed.stream_efficiency
    return DeviceTime(name, gen + overhead, prompt + streamed + overhead, int(work.gen_bytes), overhead, overhead,
                      streamed)


def _hops(profile: ModelProfile, placement: Placement, route: Sequence[str], figures: SpeedFigures,
          ubatch: int) -> tuple[float, float, list[str]]:
    """Time of the hand-overs between locations: per token and per ubatch."""
    backends = {r.device: r.backend for r in placement.ranges}
    slots = {r.device: r.n_slots for r in placement.ranges}
    activation = profile.n_embd * 4  # f32 hidden state per token
    gen = prompt = 0.0
    unknown: list[str] = []
    for a, b in itertools.pairwise(route):
        device = b if b != "host" else a
        if backends.get(device) == "RPC":
            link = figures.links.get(device)
            if link is None:
                unknown.append(f"{device} link")
                continue
            graph = RPC_GRAPH_BYTES_PER_SLOT * slots[device] if b == device else 0
            gen += link.round_trip_s + (activation + graph) / link.bytes_s
            prompt += link.round_trip_s + (activation * ubatch + graph) / link.bytes_s
        else:
            gen += LOCAL_HOP_S
            prompt += LOCAL_HOP_S + activation * ubatch / HOST_TO_GPU_BYTES_S
    return gen, prompt, unknown
