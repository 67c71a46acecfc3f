"""Compute buffers per device and for the host, by replaying llama.cpp's own reservation.

llama.cpp sizes its compute buffers by building the worst-case graph (n_ubatch tokens over the full
KV cache), splitting it across backends and running ggml-alloc over it (llama_context::sched_reserve).
We do the same on shapes only: ggml/graphs builds the graph, ggml/sched splits and allocates it. The
prompt-processing graph is the largest of the reservations llama.cpp makes, so it alone sets the size.

Speed: layers of one kind on one device repeat the same allocation pattern, so only a few of them are
replayed (replayed_layers). Sizes are tracked as affine functions of the KV cells, and the allocator
reports the range of contexts over which all its decisions hold: one replay (a few ms for an 80-layer
model) answers every later context inside that range by arithmetic (~0.1 ms per estimate() call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache

from llamalaunch.model.ggml.buffers import CPU_ALIGNMENT, alignment
from llamalaunch.model.ggml.graphs import BUILDERS, ModelSpec, Reserve
from llamalaunch.model.ggml.sched import Backend, reserve_affine
from llamalaunch.model.ggml.sim import capture
from llamalaunch.model.kv import ContextShape, ContextSpec, swa_cells
from llamalaunch.model.placement import Placement
from llamalaunch.model.profile import ModelProfile

# Archs without an exact graph here are replayed with a superset llama graph of the same shape (MoE beside
# the dense FFN, a second mask when the file names a sliding window) and padded by this factor: their
# extra ops are not modelled. 1.2 keeps llama-like long-tail archs within +25% of each device's total
# (bench/bench_accuracy.py --families smollm3,exaone,ernie4_5,granite,seed_oss,olmo2).
GENERIC_MARGIN = 1.2


def compute_buffers(profile: ModelProfile, placement: Placement, spec: ContextSpec,
                    shape: ContextShape) -> tuple[dict[str, int], int]:
    """(compute bytes per device name, host compute bytes) for `placement`."""
    ranges = tuple((r.device, r.backend, r.first_slot, r.n_slots) for r in placement.ranges)
    offloaded = range(profile.n_slots - placement.n_gpu_layers, profile.n_layer)
    host_experts = frozenset(il for il in placement.host_expert_layers if il in offloaded)
    host_parts = frozenset(part for part in placement.host_expert_parts if part[0] in offloaded)
    sizes = _cached(_ProfileKey(profile), ranges, (host_experts, host_parts), _spec_key(spec), shape)
    devices = {name: sizes[i] for i, (name, _, _, _) in enumerate(ranges)}
    return devices, sizes[-1]


def _spec_key(spec: ContextSpec) -> tuple[object, ...]:
    """The context options not already in ContextShape that change the graph."""
    return (spec.cache_type_k, spec.cache_type_v, spec.swa_full)


class _ProfileKey:
    """Hash a profile by identity (profiles are frozen; hashing all their tuples each call is slow)."""

    __slots__ = ("profile",)

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile

    def __hash__(self) -> int:
        return id(self.profile)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ProfileKey) and other.profile is self.profile


CELL_STEP = 256  # contexts come in multiples of 256 cells


@dataclass(frozen=True)
class _Piece:
    """Buffer sizes that are exact for n_kv in [lo, hi]: base + slope·(n_kv - n0) per backend."""

    lo: float
    hi: float
    n0: int
    base: tuple[int, ...]
    slope: tuple[int, ...]

    def at(self, n_kv: int) -> tuple[int, ...]:
        return tuple(b + s * (n_kv - self.n0) for b, s in zip(self.base, self.slope))


_pieces: dict[tuple[object, ...], list[_Piece]] = {}
_MAX_KEYS = 4096


HostExperts = tuple[frozenset[int], frozenset[tuple[int, str]]]  # whole blocks, (block, kind) of split ones


def _cached(key: _ProfileKey, ranges: tuple[tuple[str, str, int, int], ...], host_experts: HostExperts,
            spec_key: tuple[object, ...], shape: ContextShape) -> tuple[int, ...]:
    """Sizes per backend; one replay answers every context over which the allocation pattern holds."""
    profile = key.profile
    n_kv = shape.n_ctx_seq
    n_kv_swa = swa_cells(profile, ContextSpec(swa_full=bool(spec_key[2]), n_parallel=shape.n_seq,
                                              n_ubatch=shape.n_ubatch), shape) if any(profile.swa_layers) else 0
    structure = (key, ranges, host_experts, spec_key, shape.n_stream, shape.n_seq, shape.n_ubatch, shape.flash_attn,
                 n_kv_swa)
    for piece in _pieces.get(structure, ()):
        if piece.lo <= n_kv <= piece.hi:
            return piece.at(n_kv)
    piece = _replay(profile, ranges, host_experts, spec_key, shape, n_kv_swa)
    if len(_pieces) >= _MAX_KEYS:
        _pieces.clear()
    _pieces.setdefault(structure, []).append(piece)
    return piece.at(n_kv)


def _replay(profile: ModelProfile, ranges: tuple[tuple[str, str, int, int], ...], host_experts: HostExperts,
            spec_key: tuple[object, ...], shape: ContextShape, n_kv_swa: int) -> _Piece:
    type_k, type_v, _ = spec_key
    spec = model_spec(profile)
    backends = _backends(ranges)
    cpu = len(backends) - 1
    owners = _slot_owners(profile.n_slots, ranges, cpu)
    full_offload = sum(r[3] for r in ranges) == profile.n_slots
    n_tokens = shape.n_ubatch
    if n_tokens % shape.n_seq:
        n_tokens = (n_tokens + shape.n_seq - 1) // shape.n_seq * shape.n_seq
    builder_class = BUILDERS["llama"] if profile.generic_estimate else BUILDERS.get(profile.arch, BUILDERS["llama"])
    layers = replayed_layers(spec, owners[:profile.n_layer], host_experts)
    graphs = []
    for n_kv in (shape.n_ctx_seq, shape.n_ctx_seq + CELL_STEP):
        res = Reserve(n_tokens=n_tokens, n_seqs=shape.n_seq, n_outputs=min(n_tokens, shape.n_seq), n_kv=n_kv,
                      n_kv_swa=n_kv_swa or n_kv, n_stream=shape.n_stream, flash_attn=shape.flash_attn,
                      type_k=str(type_k), type_v=str(type_v), layer_backend=tuple(owners[:profile.n_layer]),
                      output_backend=owners[-1], cpu_backend=cpu, full_offload=full_offload,
                      host_expert_layers=host_experts[0], host_expert_parts=host_experts[1])
        with capture() as created:
            builder = builder_class(spec, res)
            builder.layers = layers
            builder.build()
        graphs.append((builder, created))
    (builder, created), (_, twin_created) = graphs
    twin = {a.id: b for a, b in zip(created, twin_created)}
    # llama_context: no pipeline parallelism when tensor overrides (-ot) are set
    pipeline = len(ranges) > 1 and full_offload and not any(host_experts)
    sizes, valid = reserve_affine(builder.gf, twin, shape.n_ctx_seq, CELL_STEP, backends, pipeline,
                                  assigned=builder.assigned)
    if profile.compress_ratios:  # deepseek4: compressed caches grow every 4 and 128 cells, not affinely
        return _Piece(shape.n_ctx_seq, shape.n_ctx_seq, shape.n_ctx_seq, tuple(b for b, _ in sizes),
                      tuple(0 for _ in sizes))
    if profile.arch not in BUILDERS or profile.generic_estimate:
        return _Piece(shape.n_ctx_seq, shape.n_ctx_seq, shape.n_ctx_seq,
                      tuple(int(base * GENERIC_MARGIN) for base, _ in sizes), tuple(0 for _ in sizes))
    return _Piece(float(valid.lo), float(valid.hi), shape.n_ctx_seq, tuple(b for b, _ in sizes),
                  tuple(s for _, s in sizes))


def _backends(ranges: Sequence[tuple[str, str, int, int]]) -> list[Backend]:
    backends = [Backend(name, kind, name, alignment(kind)) for name, kind, _, _ in ranges]
    # the CPU backend allocates from the first device's host buffer type when it has one (CUDA_Host)
    host_buft = "CUDA_Host" if ranges and ranges[0][1] == "CUDA" else "CPU"
    return [*backends, Backend("CPU", "CPU", host_buft, CPU_ALIGNMENT)]


def _slot_owners(n_slots: int, ranges: Sequence[tuple[str, str, int, int]], cpu: int) -> list[int]:
    owners = [cpu] * n_slots
    for index, (_, _, first, count) in enumerate(ranges):
        for slot in range(first, first + count):
            owners[slot] = index
    return owners


def layer_kind(spec: ModelSpec, il: int, host_experts: HostExperts = (frozenset(), frozenset())) -> tuple[object, ...]:
    moe = spec.moe_layers[il] if spec.moe_layers else spec.n_expert > 0 and il >= spec.n_layer_dense_lead
    shared_kv = bool(spec.kv_source) and spec.kv_source[il] != il
    ffn_only = bool(spec.ffn_layers) and spec.ffn_layers[il]
    split = tuple(sorted(kind for layer, kind in host_experts[1] if layer == il))
    dsv4 = (spec.compress_ratios[il], il < spec.n_hash_layers) if spec.compress_ratios else ()
    return (spec.swa_layers[il], spec.recurrent_layers[il], spec.n_head[il], spec.n_head_kv[il], spec.n_ff[il], moe,
            shared_kv, ffn_only, il in host_experts[0], split, dsv4)


MAX_PERIOD = 8  # layer patterns repeat with a period up to this (hybrids: 4; gemma: 5-6)


def replayed_layers(spec: ModelSpec, owners: Sequence[int],
                    host_experts: HostExperts = (frozenset(), frozenset())) -> tuple[int, ...]:
    """The layers whose allocation pattern can differ. On each device the layers' kinds are split into
    a prefix and a part that repeats with period P (1 for uniform models, 4 for a hybrid with attention
    on every 4th layer); the prefix and the first three periods, and the last two periods, are
    replayed. A whole period that repeats the ones before it on the same device allocates exactly as
    they did, so it is skipped; a device without such a pattern replays every layer."""
    keep: set[int] = set()
    kinds = [layer_kind(spec, il, host_experts) for il in range(spec.n_layer)]
    runs: dict[int, list[int]] = {}
    for il in range(spec.n_layer):
        runs.setdefault(owners[il], []).append(il)
    for layers in runs.values():
        pattern = _periodic(tuple(kinds[il] for il in layers))
        if pattern is None:
            keep.update(layers)
            continue
        start, period = pattern
        keep.update(layers[:start + 3 * period])
        keep.update(layers[-2 * period:])
    return tuple(sorted(keep))


def _periodic(kinds: tuple[tuple[object, ...], ...]) -> tuple[int, int] | None:
    """(start, period) with the smallest start + 3·period such that kinds[start:] repeats every period."""
    best: tuple[int, int] | None = None
    for start in range(MAX_PERIOD + 1):
        for period in range(1, MAX_PERIOD + 1):
            if all(kinds[i] == kinds[i - period] for i in range(start + period, len(kinds))):
                if best is None or start + 3 * period < best[0] + 3 * best[1]:
                    best = (start, period)
                break
    return best


@lru_cache(maxsize=64)
def _spec_for(key: _ProfileKey) -> ModelSpec:
    profile = key.profile
    n = profile.n_layer - profile.n_nextn_layers
    weight_type = _weight_type(profile.file_type)
    graph = profile.graph
    details = {f.name: getattr(graph, f.name) for f in fields(graph)}
    return ModelSpec(**details,
        arch=profile.arch, n_layer=n, n_embd=profile.n_embd, n_head=profile.n_head[:n],
        n_head_kv=profile.n_head_kv[:n], head_dim_k=profile.head_dim_k, head_dim_v=profile.head_dim_v,
        n_rot=profile.rope_dim or profile.head_dim_k, n_ff=(profile.n_ff,) * n, n_vocab=profile.n_vocab,
        swa_layers=profile.swa_layers[:n], recurrent_layers=profile.recurrent_layers[:n],
        n_expert=profile.n_expert, n_expert_used=profile.n_expert_used, n_ff_exp=profile.n_ff_exp,
        kv_lora_rank=profile.kv_lora_rank, tied_output=profile.output_is_token_embd,
        head_dim_k_swa=profile.head_dim_k_swa, head_dim_v_swa=profile.head_dim_v_swa, kv_source=_kv_source(profile),
        compress_ratios=profile.compress_ratios, indexer_head_dim=profile.indexer_head_dim,
        weight_type=weight_type, embd_type=weight_type, generic=profile.generic_estimate,
        generic_iswa=profile.generic_estimate and graph.names_sliding_window)


def _kv_source(profile: ModelProfile) -> tuple[int, ...]:
    """gemma4: the block whose cache each block attends (llama_model::create_memory's reuse callback)."""
    if profile.arch != "gemma4" or not profile.n_kv_shared_layers:
        return ()
    start = profile.n_layer - profile.n_kv_shared_layers
    return tuple(il if il < start else start - (2 if profile.swa_layers[il] else 1) for il in range(profile.n_layer))


def model_spec(profile: ModelProfile) -> ModelSpec:
    return _spec_for(_ProfileKey(profile))


_FILE_TYPE_WEIGHTS = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0",
                      "Q5_1": "q5_1", "Q8_0": "q8_0", "IQ4_NL": "iq4_nl"}


def _weight_type(file_type: str) -> str:
    """The matrices' type from general.file_type (only op-offload weight copies depend on it)."""
    upper = file_type.upper()
    for name, type_name in _FILE_TYPE_WEIGHTS.items():
        if name in upper:
            return type_name
    return "q8_0"
