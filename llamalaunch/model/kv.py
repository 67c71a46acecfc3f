"""KV cache and recurrent-state bytes, exactly as llama.cpp allocates them.

Rules (llama.cpp src/llama-context.cpp, llama-kv-cache.cpp, llama-kv-cache-iswa.cpp,
llama-memory-recurrent.cpp, llama-model.cpp `create_memory`):
- n_ctx rounds up to 256. Unified cache: one stream of n_ctx cells. Not unified: n_parallel streams of
  pad256(n_ctx / n_parallel) cells each (n_ctx becomes their sum).
- Per layer: K is [n_embd_k_gqa(il), cells, streams] of type_k, V likewise of type_v. Without flash
  attention V is stored transposed and, when the V width varies across layers, padded to the widest.
- Sliding-window layers hold pad256(min(cells, n_swa * (unified ? n_parallel : 1) + n_ubatch)) cells
  per stream (all cells with --swa-full).
- MLA (deepseek2 with kv_lora_rank): K holds kv_lora_rank + rope_dim per token and there is no V.
- Recurrent layers hold r and s states of max(1, n_parallel) rows each; they never grow with context.
- Each layer's cache sits on the device holding that layer's slot; layers left on the host keep theirs
  in host memory. Every tensor is padded to the buffer's alignment; on CUDA a quantized tensor whose
  row is not a multiple of 512 elements gets a partial padding row.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamalaunch.errors import BadInputError
from llamalaunch.model.ggml.buffers import alignment, cuda_alloc_size
from llamalaunch.model.ggml.types import is_quantized, row_size, type_block
from llamalaunch.model.profile import ModelProfile

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

CTX_PAD = 256  # llama.cpp rounds n_ctx (and per-stream and SWA cell counts) up to this
F32_BYTES = 4


def pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class ContextSpec:
    """The context options the model layer sizes from; plan's Request extends it with planning options."""

    n_parallel: int = 4  # llama-server's -np auto: 4 slots, unified KV cache of n_ctx cells
    kv_unified: bool = True
    n_batch: int = 2048
    n_ubatch: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    swa_full: bool = False


@dataclass(frozen=True)
class ContextShape:
    """The context llama.cpp builds for a request: cells, streams, batch sizes, flash attention."""

    n_ctx: int  # total cells over all streams (what llama.cpp logs as n_ctx)
    n_ctx_seq: int  # cells per stream (the KV tensor's second dimension)
    n_stream: int  # 1 when unified, else n_parallel
    n_seq: int  # n_parallel (llama.cpp's n_seq_max)
    n_batch: int
    n_ubatch: int
    flash_attn: bool

    @property
    def unified(self) -> bool:
        return self.n_stream == 1


def flash_attn_enabled(spec: ContextSpec) -> bool:
    """`auto` resolves to on: every backend we plan for (CPU, CUDA, RPC) runs FA for the layer's device."""
    return spec.flash_attn != "off"


def context_shape(spec: ContextSpec, ctx_tokens: int) -> ContextShape:
    if ctx_tokens <= 0:
        raise BadInputError(f"context of {ctx_tokens} tokens", "give a positive context size")
    n_seq = max(1, spec.n_parallel)
    n_ctx = pad(ctx_tokens, CTX_PAD)
    if spec.kv_unified or n_seq == 1:
        n_ctx_seq, n_stream = n_ctx, 1
    else:
        n_ctx_seq, n_stream = pad(n_ctx // n_seq, CTX_PAD), n_seq
        n_ctx = n_ctx_seq * n_seq
    n_batch = min(n_ctx, spec.n_batch)  # causal attention: a batch never exceeds the context
    n_ubatch = min(n_batch, spec.n_ubatch or n_batch)
    return ContextShape(n_ctx, n_ctx_seq, n_stream, n_seq, n_batch, n_ubatch, flash_attn_enabled(spec))


def check_cache_types(spec: ContextSpec, profile: ModelProfile | None = None) -> None:
    for what, name in (("K", spec.cache_type_k), ("V", spec.cache_type_v)):
        if name not in CACHE_TYPES:
            raise BadInputError(f"unknown {what} cache type {name!r}", f"use one of {', '.join(CACHE_TYPES)}")
    if spec.flash_attn == "off" and is_quantized(spec.cache_type_v):
        raise BadInputError(f"a {spec.cache_type_v} V cache needs flash attention",
                            "drop --flash-attn off or use an f16 V cache")
    if profile is not None:
        _check_cache_blocks(spec, profile)


def _check_cache_blocks(spec: ContextSpec, profile: ModelProfile) -> None:
    """llama_init_from_model refuses a quantized cache whose block size does not divide the head size."""
    for what, flag, name, head in (("K", "-ctk", spec.cache_type_k, profile.head_dim_k),
                                   ("V", "-ctv", spec.cache_type_v, profile.head_dim_v)):
        block_size = type_block(name)[0]
        if is_quantized(name) and head % block_size:
            raise BadInputError(f"a {name} {what} cache has blocks of {block_size}, which do not divide this "
                                f"model's {what} head size {head}: llama.cpp refuses it at load",
                                f"use {flag} f16, bf16 or f32")


def tensor_alloc_bytes(type_name: str, ne0: int, n_rows: int, backend: str) -> int:
    """Bytes a [ne0, n_rows] tensor takes in a buffer of `backend`, padding included."""
    size = row_size(type_name, ne0) * n_rows
    if backend == "CUDA":
        size = cuda_alloc_size(type_name, ne0, size)
    return pad(size, alignment(backend))


def is_mla(profile: ModelProfile) -> bool:
    return profile.kv_lora_rank > 0


def has_attention_kv(profile: ModelProfile, il: int) -> bool:
    return not profile.recurrent_layers[il] if profile.recurrent_layers else True


def has_cache(profile: ModelProfile, il: int) -> bool:
    """NextN/MTP blocks (the last ones) are never attended by the main graph, and shared-KV blocks
    (gemma4) attend an earlier block's cache: neither has a cache of its own."""
    return il < profile.n_layer - max(profile.n_nextn_layers, profile.n_kv_shared_layers)


def n_embd_k_gqa(profile: ModelProfile, il: int) -> int:
    if is_mla(profile):
        return profile.kv_lora_rank + profile.rope_dim
    return profile.layer_head_dims(il)[0] * profile.n_head_kv[il]


def n_embd_v_gqa(profile: ModelProfile, il: int) -> int:
    return profile.layer_head_dims(il)[1] * profile.n_head_kv[il]


def swa_cells(profile: ModelProfile, spec: ContextSpec, shape: ContextShape) -> int:
    """Cells per stream of a sliding-window layer."""
    if spec.swa_full or profile.n_swa <= 0:
        return shape.n_ctx_seq
    unified = shape.unified and not is_dsv4(profile)  # deepseek4 keeps one stream per sequence
    window = profile.n_swa * (shape.n_seq if unified else 1) + shape.n_ubatch
    return pad(min(shape.n_ctx_seq, window), CTX_PAD)


def layer_cells(profile: ModelProfile, spec: ContextSpec, shape: ContextShape, il: int) -> int:
    is_swa = bool(profile.swa_layers) and profile.swa_layers[il]
    return swa_cells(profile, spec, shape) if is_swa else shape.n_ctx_seq


def _v_width(profile: ModelProfile, shape: ContextShape, il: int) -> int:
    if shape.flash_attn:
        return n_embd_v_gqa(profile, il)
    # [TAG_V_CACHE_VARIABLE]: a transposed V cache is padded to the widest layer
    return max(n_embd_v_gqa(profile, j) for j in range(profile.n_layer) if has_attention_kv(profile, j))


def layer_kv_bytes(profile: ModelProfile, spec: ContextSpec, shape: ContextShape, il: int,
                   backend: str = "CPU") -> int:
    """K + V (or the recurrent states) of layer `il` in a buffer of `backend`."""
    if not has_cache(profile, il):
        return 0
    if is_dsv4(profile):
        return _dsv4_layer_bytes(profile, spec, shape, il, backend)
    if not has_attention_kv(profile, il):
        rows = shape.n_seq  # max(1, n_seq_max) rows, one per sequence
        return (pad(profile.recurrent_r_bytes_per_seq * rows, alignment(backend))
                + pad(profile.recurrent_s_bytes_per_seq * rows, alignment(backend)))
    rows = layer_cells(profile, spec, shape, il) * shape.n_stream
    size = tensor_alloc_bytes(spec.cache_type_k, n_embd_k_gqa(profile, il), rows, backend)
    if not is_mla(profile):
        size += tensor_alloc_bytes(spec.cache_type_v, _v_width(profile, shape, il), rows, backend)
    return size


DSV4_CSA_RATIO, DSV4_HCA_RATIO = 4, 128


def is_dsv4(profile: ModelProfile) -> bool:
    return bool(profile.compress_ratios)


def dsv4_comp_cells(n_ctx_seq: int, ratio: int) -> int:
    """Cells per stream of a compressed cache: pad256(ceil(n_ctx_seq / ratio)) (dsv4_comp_size)."""
    return pad(max(1, (n_ctx_seq + ratio - 1) // ratio), CTX_PAD)


def _dsv4_layer_bytes(profile: ModelProfile, spec: ContextSpec, shape: ContextShape, il: int, backend: str) -> int:
    """llama_kv_cache_dsv4: every store keeps one stream per sequence, even with a unified KV cache.
    Raw: a K-only sliding-window cache. Ratio 4 (CSA) adds a compressed K cache, the indexer's K cache and
    two compressor states (kv and score, f32 [2·head, 8, n_seq]) for each; ratio 128 (HCA) a compressed
    K cache and its states (f32 [head, 128, n_seq])."""
    n_seq, width = shape.n_seq, profile.head_dim_k * profile.n_head_kv[il]
    size = tensor_alloc_bytes(spec.cache_type_k, width, swa_cells(profile, spec, shape) * n_seq, backend)
    ratio, align = profile.compress_ratios[il], alignment(backend)
    heads = (width,) if ratio == DSV4_HCA_RATIO else (width, profile.indexer_head_dim) if ratio else ()
    for head in heads:
        rows = dsv4_comp_cells(shape.n_ctx_seq, ratio) * n_seq
        size += tensor_alloc_bytes(spec.cache_type_k, head, rows, backend)
        state_rows, state_width = (ratio, head) if ratio == DSV4_HCA_RATIO else (2 * ratio, 2 * head)
        size += 2 * pad(state_width * state_rows * n_seq * F32_BYTES, align)
    return size


def kv_bytes_per_layer(profile: ModelProfile, spec: ContextSpec, ctx_tokens: int,
                       backend: str = "CPU") -> tuple[int, ...]:
    """Cache bytes of every block (n_layer entries) on a device of `backend`."""
    check_cache_types(spec, profile)
    shape = context_shape(spec, ctx_tokens)
    return tuple(layer_kv_bytes(profile, spec, shape, il, backend) for il in range(profile.n_layer))


def output_buffer_bytes(profile: ModelProfile, spec: ContextSpec) -> int:
    """llama-server's logits buffer in host memory: n_vocab floats for each of n_parallel outputs."""
    return profile.n_vocab * max(1, spec.n_parallel) * F32_BYTES
