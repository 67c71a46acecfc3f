"""Synthetic GGUF models of any family and shape, for tests and benchmarks.

The header, tensor table and a small SentencePiece vocabulary are written by hand (the layout is what
gguf_header reads back); the file is then truncated to its full size, so the tensor data is a sparse
hole of zeros: a 70B shape costs no disk and llama.cpp loads it at page-cache speed. Zero weights give
equal logits, so the server answers (greedy picks token 0); send "ignore_eos": true to get n tokens.

Pitfalls llama.cpp has taught (DESIGN.md §4): no rope_freqs / phi3 rope-factor tensors (zeros make
every logit NaN), gemma2/3 tied (no output.weight), `<|endoftext|>` in every vocab (phi3 wants it),
deepseek2 gets q_lora_rank (only the "lite" block counts may omit it).
"""

from __future__ import annotations

import functools
import math
import struct
from array import array
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from llamalaunch.model.ggml.types import GGML_TYPE_IDS, type_block, type_name
from llamalaunch.model.gguf_header import DEFAULT_ALIGNMENT, GGUF_MAGIC, pad, read_header

# ggml type ids by name (only those a synthetic model uses for its matrices).
WEIGHT_TYPES = {name: GGML_TYPE_IDS[name] for name in ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K",
                                                      "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "BF16")}
# general.file_type (LLAMA_FTYPE) for a file whose matrices are all of one type.
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
               "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25, "BF16": 32}
F32, F16, I32 = 0, 1, 26
_T_STRING, _T_ARRAY, _T_U32, _T_I32, _T_F32, _T_BOOL = 8, 9, 4, 5, 6, 7


@dataclass(frozen=True)
class SyntheticShape:
    """Sizes of a synthetic model. 0 means "the family's default" where a default exists."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    head_dim: int = 0  # 0: n_embd // n_head
    n_ctx_train: int = 4096
    tied: bool = False  # no output.weight: llama.cpp copies token_embd to the output device
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_expert_shared: int = 0
    n_layer_dense_lead: int = 0  # deepseek2: the first blocks have a dense FFN
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0  # deepseek2: rope part of each key head
    mla: bool = True  # deepseek2: write the MLA layout (key_length_mla, attn_k_b/attn_v_b)
    n_swa: int = 0  # sliding window (gemma2/3, lfm2)
    swa_pattern: int = 0  # 0: the family's default period
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_d_conv: int = 4
    ssm_n_group: int = 1
    ssm_n_head: int = 0  # ssm.time_step_rank
    attention_layers: tuple[int, ...] = field(default=())  # hybrids: blocks with attention; others recurrent
    shortconv_l_cache: int = 3
    rope_freqs: bool = False  # write rope_freqs.weight: zeros make logits NaN; for memory tests only
    full_attn_interval: int = 0  # qwen3next/qwen35: every Nth block has attention (0: the default, 4)
    moe_every: int = 0  # llama4: every Nth block is MoE (interleave_moe_layer_step)
    n_ff_shexp: int = 0  # shared-expert FFN length (0: the family's default)
    n_nextn: int = 0  # glm4moe: trailing NextN/MTP blocks (llama.cpp skips their weights)
    head_dim_swa: int = 0  # gemma4: head size of the sliding-window blocks (full blocks use head_dim)
    n_head_kv_full: int = 0  # gemma4: KV heads of the full-attention blocks (0: n_head_kv)
    n_kv_shared: int = 0  # gemma4: the last blocks reuse earlier blocks' KV cache
    n_embd_per_layer: int = 0  # gemma4: per-layer embedding width (0: none)
    ffn_layers: tuple[int, ...] = field(default=())  # nemotron_h: FFN/MoE blocks (the rest: mamba2 or attention)
    compress_ratios: tuple[int, ...] = field(default=())  # deepseek4: 0, 4 (CSA + indexer) or 128 (HCA), repeated
    hc_mult: int = 4  # deepseek4: hyper-connection copies of the residual stream
    o_groups: int = 2  # deepseek4: grouped low-rank output projection
    o_lora_rank: int = 16
    indexer_n_head: int = 4  # deepseek4: lightning indexer of the CSA blocks
    indexer_head_dim: int = 64
    indexer_top_k: int = 8
    n_hash_layers: int = 1  # deepseek4: the first blocks route by token id (ffn_gate_tid2eid)

    @property
    def head_dim_k(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


@dataclass(frozen=True)
class SyntheticSpec:
    """A named preset: family, shape and the type of its matrices."""

    arch: str
    shape: SyntheticShape
    file_type: str = "Q4_0"


_TINY = SyntheticShape(n_layer=4, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=512, n_ctx_train=4096)
_QWEN_NEXT = replace(_TINY, head_dim=32, n_expert=4, n_expert_used=2, n_ff_exp=64, n_ff_shexp=64, ssm_d_inner=64,
                     ssm_d_state=16, ssm_n_group=2, ssm_n_head=4)
_NEMOTRON_H = replace(_TINY, ssm_d_inner=128, ssm_d_state=16, ssm_n_head=4, attention_layers=(2,), ffn_layers=(1, 3))
SHAPES: dict[str, SyntheticSpec] = {
    "llama-8b": SyntheticSpec("llama", SyntheticShape(32, 4096, 14336, 32, 8, 128256, n_ctx_train=131072)),
    "llama-70b": SyntheticSpec("llama", SyntheticShape(80, 8192, 28672, 64, 8, 128256, n_ctx_train=131072)),
    "tiny-llama": SyntheticSpec("llama", _TINY),
    "tiny-mixtral": SyntheticSpec("llama", replace(_TINY, n_expert=4, n_expert_used=2)),
    "tiny-qwen2": SyntheticSpec("qwen2", _TINY),
    "tiny-qwen3": SyntheticSpec("qwen3", replace(_TINY, head_dim=32, tied=True)),
    "tiny-gemma2": SyntheticSpec("gemma2", replace(_TINY, head_dim=32, tied=True, n_swa=128)),
    "tiny-gemma3": SyntheticSpec("gemma3", replace(_TINY, n_layer=7, head_dim=32, tied=True, n_swa=128)),
    "tiny-qwen3moe": SyntheticSpec("qwen3moe", replace(_TINY, head_dim=32, n_expert=8, n_expert_used=2,
                                                       n_ff_exp=64)),
    "tiny-deepseek2": SyntheticSpec("deepseek2", replace(
        _TINY, n_layer=3, n_head_kv=4, n_expert=4, n_expert_used=2, n_ff_exp=64, n_expert_shared=1,
        n_layer_dense_lead=1, q_lora_rank=32, kv_lora_rank=64, rope_dim=32, head_dim=64)),
    "tiny-deepseek2-nomla": SyntheticSpec("deepseek2", replace(
        _TINY, n_layer=3, n_head_kv=4, n_expert=4, n_expert_used=2, n_ff_exp=64, n_expert_shared=1,
        n_layer_dense_lead=1, q_lora_rank=32, kv_lora_rank=64, rope_dim=32, head_dim=64, mla=False)),
    "tiny-phi3": SyntheticSpec("phi3", replace(_TINY, n_head_kv=4)),
    "tiny-mamba2": SyntheticSpec("mamba2", replace(_TINY, n_head=0, n_head_kv=0, n_ff=0, tied=True,
                                                   ssm_d_inner=128, ssm_d_state=16, ssm_n_head=4)),
    "tiny-granitehybrid": SyntheticSpec("granitehybrid", replace(
        _TINY, ssm_d_inner=128, ssm_d_state=16, ssm_n_head=4, attention_layers=(1, 3))),
    "tiny-lfm2": SyntheticSpec("lfm2", replace(_TINY, tied=True, attention_layers=(1, 3))),
    # the 2026 families (DESIGN.md §8)
    "tiny-qwen3next": SyntheticSpec("qwen3next", _QWEN_NEXT),
    "tiny-qwen35": SyntheticSpec("qwen35", replace(_QWEN_NEXT, n_expert=0, n_expert_used=0, n_ff_exp=0,
                                                   n_ff_shexp=0)),
    "tiny-qwen35moe": SyntheticSpec("qwen35moe", _QWEN_NEXT),
    "tiny-gpt-oss": SyntheticSpec("gpt-oss", replace(_TINY, head_dim=32, n_expert=4, n_expert_used=2, n_ff_exp=64,
                                                     n_swa=128)),
    "tiny-glm4moe": SyntheticSpec("glm4moe", replace(_TINY, head_dim=32, n_expert=4, n_expert_used=2, n_ff_exp=64,
                                                     n_expert_shared=1, n_layer_dense_lead=1)),
    "tiny-llama4": SyntheticSpec("llama4", replace(_TINY, head_dim=32, n_expert=4, n_expert_used=1, n_ff_exp=64,
                                                   moe_every=2)),
    "tiny-mistral3": SyntheticSpec("mistral3", replace(_TINY, head_dim=32)),
    "tiny-minimax-m2": SyntheticSpec("minimax-m2", replace(_TINY, head_dim=32, n_expert=4, n_expert_used=2,
                                                           n_ff_exp=128)),
    "tiny-nemotron_h": SyntheticSpec("nemotron_h", _NEMOTRON_H),
    "tiny-nemotron_h_moe": SyntheticSpec("nemotron_h_moe", replace(_NEMOTRON_H, n_expert=4, n_expert_used=2,
                                                                   n_ff_exp=64, n_ff_shexp=128)),
    # long-tail archs: llama.cpp runs them, llamalaunch plans them with the generic estimate
    "tiny-smollm3": SyntheticSpec("smollm3", _TINY),
    "tiny-exaone": SyntheticSpec("exaone", _TINY),
    "tiny-ernie4_5": SyntheticSpec("ernie4_5", _TINY),
    "tiny-granite": SyntheticSpec("granite", _TINY),
    "tiny-seed_oss": SyntheticSpec("seed_oss", replace(_TINY, head_dim=32)),
    "tiny-olmo2": SyntheticSpec("olmo2", _TINY),
    "tiny-deepseek4": SyntheticSpec("deepseek4", replace(
        _TINY, head_dim=64, n_head_kv=1, n_expert=4, n_expert_used=2, n_ff_exp=64, n_expert_shared=1,
        q_lora_rank=32, rope_dim=16, n_swa=128, compress_ratios=(0, 4, 128, 4))),
    "tiny-gemma4": SyntheticSpec("gemma4", replace(_TINY, n_layer=6, head_dim=64, head_dim_swa=32, n_head_kv=2,
                                                   n_head_kv_full=1, tied=True, n_swa=128)),
}


def write_preset(path: str | Path, name: str, **changes: object) -> Path:
    """Write a preset from SHAPES, with shape fields changed (`n_layer=8`) or the matrices' `file_type`."""
    spec = SHAPES[name]
    file_type = str(changes.pop("file_type", spec.file_type))
    shape = replace(spec.shape, **changes)  # type: ignore[arg-type]
    return write_synthetic(path, spec.arch, shape, file_type)


def write_synthetic(path: str | Path, arch: str, shape: SyntheticShape, file_type: str = "Q4_0",
                    varied_routing: bool = False) -> Path:
    """Write a sparse GGUF that llama.cpp loads: header, tensor table, then a hole of zeros.

    With zeros every token of a MoE model routes to the same experts (its hidden state and router logits are
    zero). `varied_routing` writes random token embeddings and routers and norms of ones, so each token picks
    experts by its own embedding, as tokens of a real model spread over the experts (the rest stays zeros:
    the hidden state is the embedding in every block)."""
    if arch not in _TENSORS:
        raise ValueError(f"no synthetic layout for arch {arch!r}; known: {', '.join(sorted(_TENSORS))}")
    if file_type not in WEIGHT_TYPES:
        raise ValueError(f"file_type {file_type!r} not one of {', '.join(WEIGHT_TYPES)}")
    weight_type = WEIGHT_TYPES[file_type]
    tensors = [(name, dims, _tensor_type(kind, dims, weight_type))
               for name, dims, kind in _TENSORS[arch](shape)]
    out = _Writer()
    kv = _keys(arch, shape, file_type)
    out.header(len(tensors), len(kv) + _VOCAB_KEYS)
    for key, value_type, value in kv:
        out.kv(key, value_type, value)
    out.raw(_vocab_bytes(shape.n_vocab))
    offset = 0
    offsets: dict[str, int] = {}
    for name, dims, ggml_type in tensors:
        out.tensor_info(name, dims, ggml_type, offset)
        offsets[name] = offset
        offset += pad(_nbytes(dims, ggml_type), DEFAULT_ALIGNMENT)
    path = Path(path)
    with open(path, "wb") as stream:
        stream.write(out.data())
        data_offset = pad(stream.tell(), DEFAULT_ALIGNMENT)
        stream.truncate(data_offset + offset)
        for name, dims, ggml_type in tensors:
            # ones: F32 tensors that zeros would turn into NaN logits; with varied routing, the norms too
            # (a zero norm weight would zero the router's input)
            if name in _ONES or (varied_routing and ggml_type == F32 and name.endswith("norm.weight")):
                stream.seek(data_offset + offsets[name])
                stream.write(array("f", [1.0] * (_nbytes(dims, F32) // 4)).tobytes())
            elif varied_routing and (name == "token_embd.weight" or name.endswith(".ffn_gate_inp.weight")):
                stream.seek(data_offset + offsets[name])
                stream.write(_random_tensor(name, dims, ggml_type))
    return path


# Where a block of each type keeps its f16 scales (byte offsets): random bytes elsewhere are valid quants.
_SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
                  "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82)}


def _random_tensor(name: str, dims: tuple[int, ...], ggml_type: int) -> bytes:
    """Finite random values (seeded by the name): F32/F16 normal, quantized blocks random with small scales."""
    import numpy

    generator = numpy.random.default_rng(list(name.encode()))
    count = math.prod(dims)
    kind = type_name(ggml_type)
    if kind in ("F32", "F16"):
        return generator.normal(0.0, 0.1, count).astype(numpy.float32 if kind == "F32" else numpy.float16).tobytes()
    if kind not in _SCALE_OFFSETS:
        raise ValueError(f"no random blocks for {kind}; varied routing knows {', '.join(_SCALE_OFFSETS)}")
    block_size, type_size = type_block(ggml_type)
    blocks = generator.integers(0, 256, (count // block_size, type_size), dtype=numpy.uint8)
    scale = numpy.frombuffer(numpy.float16(0.02).tobytes(), dtype=numpy.uint8)
    for offset in _SCALE_OFFSETS[kind]:
        blocks[:, offset:offset + 2] = scale
    return blocks.tobytes()


def _nbytes(dims: tuple[int, ...], ggml_type: int) -> int:
    block_size, type_size = type_block(ggml_type)
    count = 1
    for ne in dims:
        count *= ne
    return count // block_size * type_size


def _tensor_type(kind: str, dims: tuple[int, ...], weight_type: int) -> int:
    """Norms, biases, routers and SSM parameters stay F32 (as converters write them); matrices take the
    file's type, or F16 where a row is not a whole number of its blocks (as llama-quantize falls back)."""
    if kind == "f32" or len(dims) < 2:
        return F32
    if kind == "i32":
        return I32
    return weight_type if dims[0] % type_block(weight_type)[0] == 0 else F16


# gemma4 needs rope_freqs (zeros give NaN logits): written as ones, plain RoPE.
_ONES = frozenset({"rope_freqs.weight"})


# --- key/values -------------------------------------------------------------------------------------

def _keys(arch: str, s: SyntheticShape, file_type: str) -> list[tuple[str, int, object]]:
    kv: list[tuple[str, int, object]] = [
        ("general.architecture", _T_STRING, arch),
        ("general.name", _T_STRING, f"synthetic {arch} {s.n_layer}x{s.n_embd}"),
        ("general.file_type", _T_U32, _FILE_TYPES[file_type]),
        ("general.quantization_version", _T_U32, 2),
        (f"{arch}.context_length", _T_U32, s.n_ctx_train),
        (f"{arch}.embedding_length", _T_U32, s.n_embd),
        (f"{arch}.block_count", _T_U32, s.n_layer),
        (f"{arch}.attention.layer_norm_rms_epsilon", _T_F32, 1e-5),
        (f"{arch}.rope.freq_base", _T_F32, 10000.0),
    ]
    if s.n_ff and not arch.startswith("nemotron_h"):  # nemotron_h: one length per block, 0 off FFN blocks
        kv.append((f"{arch}.feed_forward_length", _T_U32, s.n_ff))
    if s.n_head:
        kv.append((f"{arch}.attention.head_count", _T_U32, s.n_head))
    kv += _head_kv_keys(arch, s)
    if s.n_expert:
        kv += [(f"{arch}.expert_count", _T_U32, s.n_expert),
               (f"{arch}.expert_used_count", _T_U32, s.n_expert_used)]
    if s.n_ff_exp:
        kv.append((f"{arch}.expert_feed_forward_length", _T_U32, s.n_ff_exp))
    if s.n_swa:
        kv.append((f"{arch}.attention.sliding_window", _T_U32, s.n_swa))
    if s.swa_pattern and arch != "gemma4":  # gemma4 writes the per-block array
        kv.append((f"{arch}.attention.sliding_window_pattern", _T_U32, s.swa_pattern))
    return kv + _ARCH_KEYS.get(arch, _no_keys)(arch, s)


def _head_kv_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    if arch in ("granitehybrid", "lfm2", "nemotron_h", "nemotron_h_moe"):  # a 0 marks a block without attention
        per_layer = [s.n_head_kv if il in s.attention_layers else 0 for il in range(s.n_layer)]
        return [(f"{arch}.attention.head_count_kv", _T_ARRAY, (_T_U32, per_layer))]
    if arch in ("deepseek2", "gemma4", "deepseek4"):
        return []  # written with the arch's own keys
    keys: list[tuple[str, int, object]] = []
    if s.n_head:
        keys.append((f"{arch}.attention.head_count_kv", _T_U32, s.n_head_kv))
    if s.head_dim:
        keys += [(f"{arch}.attention.key_length", _T_U32, s.head_dim),
                 (f"{arch}.attention.value_length", _T_U32, s.head_dim)]
    return keys


def _no_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    return []


def _deepseek2_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    nope = s.head_dim - s.rope_dim
    keys: list[tuple[str, int, object]] = [
        (f"{arch}.leading_dense_block_count", _T_U32, s.n_layer_dense_lead),
        (f"{arch}.attention.kv_lora_rank", _T_U32, s.kv_lora_rank),
        (f"{arch}.rope.dimension_count", _T_U32, s.rope_dim),
        (f"{arch}.expert_shared_count", _T_U32, s.n_expert_shared),
        (f"{arch}.expert_weights_scale", _T_F32, 1.0),
        (f"{arch}.expert_weights_norm", _T_BOOL, True),
    ]
    if s.q_lora_rank:
        keys.append((f"{arch}.attention.q_lora_rank", _T_U32, s.q_lora_rank))
    if s.mla:  # cache holds kv_lora_rank + rope_dim per token, one KV head
        return keys + [
            (f"{arch}.attention.head_count_kv", _T_U32, 1),
            (f"{arch}.attention.key_length", _T_U32, s.kv_lora_rank + s.rope_dim),
            (f"{arch}.attention.value_length", _T_U32, s.kv_lora_rank),
            (f"{arch}.attention.key_length_mla", _T_U32, nope + s.rope_dim),
            (f"{arch}.attention.value_length_mla", _T_U32, nope),
        ]
    return keys + [
        (f"{arch}.attention.head_count_kv", _T_U32, s.n_head),
        (f"{arch}.attention.key_length", _T_U32, nope + s.rope_dim),
        (f"{arch}.attention.value_length", _T_U32, nope),
    ]


def _ssm_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    return [
        (f"{arch}.ssm.conv_kernel", _T_U32, s.ssm_d_conv),
        (f"{arch}.ssm.inner_size", _T_U32, s.ssm_d_inner),
        (f"{arch}.ssm.state_size", _T_U32, s.ssm_d_state),
        (f"{arch}.ssm.time_step_rank", _T_U32, s.ssm_n_head),
        (f"{arch}.ssm.group_count", _T_U32, s.ssm_n_group),
    ]


def _lfm2_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    return [(f"{arch}.shortconv.l_cache", _T_U32, s.shortconv_l_cache)]


def _qwen3next_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    keys = _ssm_keys(arch, s) + [(f"{arch}.full_attention_interval", _T_U32, s.full_attn_interval or 4)]
    if s.n_ff_shexp:
        keys.append((f"{arch}.expert_shared_feed_forward_length", _T_U32, s.n_ff_shexp))
    if arch != "qwen3next":  # qwen35: M-RoPE, the sections key is required
        rot = s.head_dim_k
        keys.append((f"{arch}.rope.dimension_sections", _T_ARRAY, (_T_U32, [rot // 4, rot // 8, rot // 8, 0])))
    return keys


def _glm4moe_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    return [(f"{arch}.expert_shared_count", _T_U32, s.n_expert_shared),
            (f"{arch}.leading_dense_block_count", _T_U32, s.n_layer_dense_lead),
            (f"{arch}.expert_gating_func", _T_U32, 2),  # sigmoid
            (f"{arch}.expert_weights_scale", _T_F32, 1.0),
            (f"{arch}.expert_weights_norm", _T_BOOL, True),
            (f"{arch}.nextn_predict_layers", _T_U32, s.n_nextn)]


def _llama4_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    return [(f"{arch}.interleave_moe_layer_step", _T_U32, s.moe_every or 1),
            (f"{arch}.rope.dimension_count", _T_U32, s.head_dim_k)]


def _rope_dim_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    return [(f"{arch}.rope.dimension_count", _T_U32, s.head_dim_k)]


def _gemma4_swa(s: SyntheticShape) -> list[bool]:
    """Five sliding-window blocks, then one full-attention block (the last block is always full)."""
    period = s.swa_pattern or 6
    return [il % period < period - 1 and il != s.n_layer - 1 for il in range(s.n_layer)]


def _gemma4_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    swa = _gemma4_swa(s)
    full_kv = s.n_head_kv_full or s.n_head_kv
    keys: list[tuple[str, int, object]] = [
        (f"{arch}.attention.sliding_window_pattern", _T_ARRAY, (_T_BOOL, swa)),
        (f"{arch}.attention.head_count_kv", _T_ARRAY, (_T_U32, [s.n_head_kv if w else full_kv for w in swa])),
        (f"{arch}.attention.key_length", _T_U32, s.head_dim_k),
        (f"{arch}.attention.value_length", _T_U32, s.head_dim_k),
        (f"{arch}.attention.key_length_swa", _T_U32, s.head_dim_swa or s.head_dim_k),
        (f"{arch}.attention.value_length_swa", _T_U32, s.head_dim_swa or s.head_dim_k),
        (f"{arch}.rope.dimension_count", _T_U32, s.head_dim_k),
        (f"{arch}.rope.dimension_count_swa", _T_U32, s.head_dim_swa or s.head_dim_k),
        (f"{arch}.embedding_length_per_layer_input", _T_U32, s.n_embd_per_layer),
        (f"{arch}.final_logit_softcapping", _T_F32, 30.0),
    ]
    if s.n_kv_shared:
        keys.append((f"{arch}.attention.shared_kv_layers", _T_U32, s.n_kv_shared))
    return keys


def _minimax_m2_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    return [(f"{arch}.expert_gating_func", _T_U32, 2),  # sigmoid
            (f"{arch}.rope.dimension_count", _T_U32, s.head_dim_k // 2)]  # partial rotary, as the real model


def _nemotron_h_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    """Mamba2 keys, one FFN length per block (0 marks mamba2 and attention blocks), the MoE keys."""
    keys = _ssm_keys(arch, s) + [
        (f"{arch}.feed_forward_length", _T_ARRAY, (_T_U32, [s.n_ff if il in s.ffn_layers else 0
                                                             for il in range(s.n_layer)])),
        (f"{arch}.attention.layer_norm_epsilon", _T_F32, 1e-5)]
    if s.n_expert:
        keys += [(f"{arch}.expert_shared_feed_forward_length", _T_U32, s.n_ff_shexp or s.n_ff_exp),
                 (f"{arch}.expert_weights_norm", _T_BOOL, True),
                 (f"{arch}.expert_weights_scale", _T_F32, 2.5)]
    return keys


def _granite_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    return [(f"{arch}.logit_scale", _T_F32, 8.0), (f"{arch}.residual_scale", _T_F32, 0.22),
            (f"{arch}.embedding_scale", _T_F32, 12.0), (f"{arch}.attention.scale", _T_F32, 0.015625)]


def _deepseek4_keys(arch: str, s: SyntheticShape) -> list[tuple[str, int, object]]:
    """As conversion/deepseek.py writes them: one K/V head of head_dim, sqrt-softplus routing."""
    return [(f"{arch}.attention.head_count_kv", _T_U32, 1),
            (f"{arch}.attention.key_length", _T_U32, s.head_dim_k),
            (f"{arch}.attention.value_length", _T_U32, s.head_dim_k),
            (f"{arch}.rope.dimension_count", _T_U32, s.rope_dim),
            (f"{arch}.attention.q_lora_rank", _T_U32, s.q_lora_rank),
            (f"{arch}.expert_shared_count", _T_U32, s.n_expert_shared),
            (f"{arch}.expert_weights_scale", _T_F32, 1.5),
            (f"{arch}.expert_weights_norm", _T_BOOL, True),
            (f"{arch}.expert_gating_func", _T_U32, 4),  # sqrt(softplus)
            (f"{arch}.swiglu_clamp_exp", _T_ARRAY, (_T_F32, [10.0] * s.n_layer)),
            (f"{arch}.swiglu_clamp_shexp", _T_ARRAY, (_T_F32, [10.0] * s.n_layer)),
            (f"{arch}.attention.indexer.head_count", _T_U32, s.indexer_n_head),
            (f"{arch}.attention.indexer.key_length", _T_U32, s.indexer_head_dim),
            (f"{arch}.attention.indexer.top_k", _T_U32, s.indexer_top_k),
            (f"{arch}.attention.output_group_count", _T_U32, s.o_groups),
            (f"{arch}.attention.output_lora_rank", _T_U32, s.o_lora_rank),
            (f"{arch}.attention.compress_ratios", _T_ARRAY, (_T_U32, [_dsv4_ratio(s, i) for i in range(s.n_layer)])),
            (f"{arch}.attention.compress_rope_freq_base", _T_F32, 160000.0),
            (f"{arch}.hyper_connection.count", _T_U32, s.hc_mult),
            (f"{arch}.hyper_connection.sinkhorn_iterations", _T_U32, 20),
            (f"{arch}.hyper_connection.epsilon", _T_F32, 1e-6),
            (f"{arch}.hash_layer_count", _T_U32, s.n_hash_layers),
            (f"{arch}.embedding_length_out", _T_U32, s.n_embd * s.hc_mult)]


_ARCH_KEYS = {"deepseek2": _deepseek2_keys, "deepseek4": _deepseek4_keys, "mamba2": _ssm_keys, "granitehybrid": _ssm_keys,
              "lfm2": _lfm2_keys, "qwen3next": _qwen3next_keys, "qwen35": _qwen3next_keys,
              "qwen35moe": _qwen3next_keys, "glm4moe": _glm4moe_keys, "llama4": _llama4_keys,
              "gpt-oss": _rope_dim_keys, "mistral3": _rope_dim_keys,
              "gemma4": _gemma4_keys, "minimax-m2": _minimax_m2_keys, "nemotron_h": _nemotron_h_keys,
              "nemotron_h_moe": _nemotron_h_keys, "granite": _granite_keys}


# --- tensors (names and shapes as src/models/<arch>.cpp creates them) --------------------------------

Tensor = tuple[str, tuple[int, ...], str]  # name, ggml dims (ne0 first), "w" (matrix) or "f32"


def _embeddings(s: SyntheticShape, output_norm: str = "output_norm") -> list[Tensor]:
    tensors: list[Tensor] = [("token_embd.weight", (s.n_embd, s.n_vocab), "w"),
                             (f"{output_norm}.weight", (s.n_embd,), "f32")]
    if s.rope_freqs:
        tensors.append(("rope_freqs.weight", (s.head_dim_k // 2,), "f32"))
    if not s.tied:
        tensors.append(("output.weight", (s.n_embd, s.n_vocab), "w"))
    return tensors


def _attention(i: int, s: SyntheticShape, q_bias: bool = False, qk_norm: bool = False) -> list[Tensor]:
    q, kv = s.head_dim_k * s.n_head, s.head_dim_k * s.n_head_kv
    b = f"blk.{i}."
    tensors: list[Tensor] = [(b + "attn_q.weight", (s.n_embd, q), "w"),
                             (b + "attn_k.weight", (s.n_embd, kv), "w"),
                             (b + "attn_v.weight", (s.n_embd, kv), "w"),
                             (b + "attn_output.weight", (q, s.n_embd), "w")]
    if q_bias:
        tensors += [(b + "attn_q.bias", (q,), "f32"), (b + "attn_k.bias", (kv,), "f32"),
                    (b + "attn_v.bias", (kv,), "f32")]
    if qk_norm:
        tensors += [_norm(i, "attn_q_norm", s.head_dim_k), _norm(i, "attn_k_norm", s.head_dim_k)]
    return tensors


def _ffn(i: int, n_embd: int, n_ff: int, suffix: str = "") -> list[Tensor]:
    b = f"blk.{i}."
    return [(f"{b}ffn_gate{suffix}.weight", (n_embd, n_ff), "w"),
            (f"{b}ffn_down{suffix}.weight", (n_ff, n_embd), "w"),
            (f"{b}ffn_up{suffix}.weight", (n_embd, n_ff), "w")]


def _experts(i: int, s: SyntheticShape, n_ff_exp: int) -> list[Tensor]:
    b, e = f"blk.{i}.", s.n_expert
    return [(b + "ffn_gate_inp.weight", (s.n_embd, e), "f32"),
            (b + "ffn_gate_exps.weight", (s.n_embd, n_ff_exp, e), "w"),
            (b + "ffn_down_exps.weight", (n_ff_exp, s.n_embd, e), "w"),
            (b + "ffn_up_exps.weight", (s.n_embd, n_ff_exp, e), "w")]


def _norm(i: int, name: str, size: int) -> Tensor:
    return (f"blk.{i}.{name}.weight", (size,), "f32")


def _llama_like(s: SyntheticShape, q_bias: bool = False, qk_norm: bool = False) -> list[Tensor]:
    tensors = _embeddings(s)
    for i in range(s.n_layer):
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "ffn_norm", s.n_embd)]
        tensors += _attention(i, s, q_bias, qk_norm)
        tensors += _experts(i, s, s.n_ff_exp or s.n_ff) if s.n_expert else _ffn(i, s.n_embd, s.n_ff)
    return tensors


def _gemma(s: SyntheticShape, qk_norm: bool) -> list[Tensor]:
    tensors = _embeddings(replace(s, tied=True))  # gemma refuses output.weight
    for i in range(s.n_layer):
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "post_attention_norm", s.n_embd),
                    _norm(i, "ffn_norm", s.n_embd), _norm(i, "post_ffw_norm", s.n_embd)]
        tensors += _attention(i, s, qk_norm=qk_norm) + _ffn(i, s.n_embd, s.n_ff)
    return tensors


def _deepseek2(s: SyntheticShape) -> list[Tensor]:
    nope, v_dim = s.head_dim - s.rope_dim, s.head_dim - s.rope_dim
    tensors = _embeddings(s)
    for i in range(s.n_layer):
        b = f"blk.{i}."
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "attn_kv_a_norm", s.kv_lora_rank),
                    _norm(i, "ffn_norm", s.n_embd),
                    (b + "attn_kv_a_mqa.weight", (s.n_embd, s.kv_lora_rank + s.rope_dim), "w"),
                    (b + "attn_output.weight", (s.n_head * v_dim, s.n_embd), "w")]
        if s.q_lora_rank:
            tensors += [_norm(i, "attn_q_a_norm", s.q_lora_rank),
                        (b + "attn_q_a.weight", (s.n_embd, s.q_lora_rank), "w"),
                        (b + "attn_q_b.weight", (s.q_lora_rank, s.n_head * s.head_dim), "w")]
        else:
            tensors.append((b + "attn_q.weight", (s.n_embd, s.n_head * s.head_dim), "w"))
        if s.mla:
            tensors += [(b + "attn_k_b.weight", (nope, s.kv_lora_rank, s.n_head), "w"),
                        (b + "attn_v_b.weight", (s.kv_lora_rank, v_dim, s.n_head), "w")]
        else:
            tensors.append((b + "attn_kv_b.weight", (s.kv_lora_rank, s.n_head * (nope + v_dim)), "w"))
        if i < s.n_layer_dense_lead:
            tensors += _ffn(i, s.n_embd, s.n_ff)
        else:
            shared = _ffn(i, s.n_embd, s.n_ff_exp * s.n_expert_shared, "_shexp")
            tensors += _experts(i, s, s.n_ff_exp) + shared
    return tensors


def _phi3(s: SyntheticShape) -> list[Tensor]:
    tensors = _embeddings(s)
    qkv = s.n_embd + 2 * s.head_dim_k * s.n_head_kv
    for i in range(s.n_layer):
        b = f"blk.{i}."
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "ffn_norm", s.n_embd),
                    (b + "attn_qkv.weight", (s.n_embd, qkv), "w"),
                    (b + "attn_output.weight", (s.n_embd, s.n_embd), "w"),
                    (b + "ffn_down.weight", (s.n_ff, s.n_embd), "w"),
                    (b + "ffn_up.weight", (s.n_embd, 2 * s.n_ff), "w")]  # gate and up fused
    return tensors


def _mamba2_block(i: int, s: SyntheticShape, d_in_proj: int) -> list[Tensor]:
    b, conv_dim = f"blk.{i}.", s.ssm_d_inner + 2 * s.ssm_n_group * s.ssm_d_state
    return [(b + "ssm_in.weight", (s.n_embd, d_in_proj), "w"),
            (b + "ssm_conv1d.weight", (s.ssm_d_conv, conv_dim), "f32"),
            (b + "ssm_conv1d.bias", (conv_dim,), "f32"),
            (b + "ssm_dt.bias", (s.ssm_n_head,), "f32"),
            (b + "ssm_a", (1, s.ssm_n_head), "f32"), (b + "ssm_d", (1, s.ssm_n_head), "f32"),
            (b + "ssm_norm.weight", (s.ssm_d_inner // s.ssm_n_group, s.ssm_n_group), "f32"),
            (b + "ssm_out.weight", (s.ssm_d_inner, s.n_embd), "w")]


def _mamba2(s: SyntheticShape) -> list[Tensor]:
    d_in_proj = 2 * s.ssm_d_inner + 2 * s.ssm_n_group * s.ssm_d_state + s.ssm_n_head
    tensors = _embeddings(s)
    for i in range(s.n_layer):
        tensors += [_norm(i, "attn_norm", s.n_embd)] + _mamba2_block(i, s, d_in_proj)
    return tensors


def _granitehybrid(s: SyntheticShape) -> list[Tensor]:
    d_in_proj = 2 * s.ssm_d_inner + 2 * s.ssm_n_group * s.ssm_d_state + s.ssm_n_head
    tensors = _embeddings(s)
    for i in range(s.n_layer):
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "ffn_norm", s.n_embd)]
        tensors += _attention(i, s) if i in s.attention_layers else _mamba2_block(i, s, d_in_proj)
        tensors += _ffn(i, s.n_embd, s.n_ff)
    return tensors


def _lfm2(s: SyntheticShape) -> list[Tensor]:
    tensors = _embeddings(s, output_norm="token_embd_norm")
    for i in range(s.n_layer):
        b = f"blk.{i}."
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "ffn_norm", s.n_embd)]
        tensors += _ffn(i, s.n_embd, s.n_ff)
        if i in s.attention_layers:
            tensors += _attention(i, s, qk_norm=True)
        else:
            tensors += [(b + "shortconv.conv.weight", (s.shortconv_l_cache, s.n_embd), "f32"),
                        (b + "shortconv.in_proj.weight", (s.n_embd, 3 * s.n_embd), "w"),
                        (b + "shortconv.out_proj.weight", (s.n_embd, s.n_embd), "w")]
    return tensors


def _is_recurrent(s: SyntheticShape, il: int) -> bool:
    """qwen3next/qwen35: llama.cpp's default layout, attention on every `full_attn_interval`-th block."""
    return (il + 1) % (s.full_attn_interval or 4) != 0


def _gated_attention(i: int, s: SyntheticShape) -> list[Tensor]:
    """qwen3next/qwen35 attention blocks: Q doubled (query and gate), Q/K norms, a post-attention norm."""
    b, hd = f"blk.{i}.", s.head_dim_k
    return [(b + "attn_q.weight", (s.n_embd, hd * s.n_head * 2), "w"),
            (b + "attn_k.weight", (s.n_embd, hd * s.n_head_kv), "w"),
            (b + "attn_v.weight", (s.n_embd, hd * s.n_head_kv), "w"),
            (b + "attn_output.weight", (hd * s.n_head, s.n_embd), "w"),
            _norm(i, "attn_q_norm", hd), _norm(i, "attn_k_norm", hd)]


def _delta_net(i: int, s: SyntheticShape, split_beta_alpha: bool) -> list[Tensor]:
    """A gated delta net block: key_dim = d_state*n_group, value_dim = d_state*dt_rank (= d_inner)."""
    b = f"blk.{i}."
    key_dim, value_dim, heads = s.ssm_d_state * s.ssm_n_group, s.ssm_d_state * s.ssm_n_head, s.ssm_n_head
    tensors: list[Tensor] = [(b + "attn_qkv.weight", (s.n_embd, key_dim * 2 + value_dim), "w"),
                             (b + "attn_gate.weight", (s.n_embd, value_dim), "w"),
                             (b + "ssm_conv1d.weight", (s.ssm_d_conv, key_dim * 2 + value_dim), "f32"),
                             (b + "ssm_dt.bias", (heads,), "f32"), (b + "ssm_a", (heads,), "f32"),
                             _norm(i, "ssm_norm", s.ssm_d_state),
                             (b + "ssm_out.weight", (value_dim, s.n_embd), "w")]
    if split_beta_alpha:
        tensors += [(b + "ssm_beta.weight", (s.n_embd, heads), "w"), (b + "ssm_alpha.weight", (s.n_embd, heads), "w")]
    else:
        tensors.append((b + "ssm_ba.weight", (s.n_embd, 2 * heads), "w"))
    return tensors


def _shared_expert(i: int, s: SyntheticShape, n_ff: int, gate_inp: bool = False) -> list[Tensor]:
    tensors = _ffn(i, s.n_embd, n_ff, "_shexp")
    return tensors + [(f"blk.{i}.ffn_gate_inp_shexp.weight", (s.n_embd,), "f32")] if gate_inp else tensors


def _qwen3next_like(s: SyntheticShape, arch: str) -> list[Tensor]:
    tensors = _embeddings(s)
    for i in range(s.n_layer):
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "post_attention_norm", s.n_embd)]
        tensors += _delta_net(i, s, arch != "qwen3next") if _is_recurrent(s, i) else _gated_attention(i, s)
        if arch == "qwen35":
            tensors += _ffn(i, s.n_embd, s.n_ff)
        else:
            tensors += _experts(i, s, s.n_ff_exp) + _shared_expert(i, s, s.n_ff_shexp or s.n_ff, gate_inp=True)
    return tensors


def _gpt_oss(s: SyntheticShape) -> list[Tensor]:
    tensors = _embeddings(replace(s, tied=False))  # gpt-oss requires output.weight
    for i in range(s.n_layer):
        b, e, ff = f"blk.{i}.", s.n_expert, s.n_ff_exp
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "post_attention_norm", s.n_embd)]
        tensors += _attention(i, s, q_bias=True)
        tensors += [(b + "attn_output.bias", (s.n_embd,), "f32"), (b + "attn_sinks.weight", (s.n_head,), "f32")]
        tensors += _experts(i, s, ff)
        tensors += [(b + "ffn_gate_inp.bias", (e,), "f32"), (b + "ffn_gate_exps.bias", (ff, e), "f32"),
                    (b + "ffn_down_exps.bias", (s.n_embd, e), "f32"), (b + "ffn_up_exps.bias", (ff, e), "f32")]
    return tensors


def _glm4moe(s: SyntheticShape) -> list[Tensor]:
    tensors = _embeddings(s)
    for i in range(s.n_layer):
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "post_attention_norm", s.n_embd)]
        tensors += _attention(i, s, q_bias=True)
        if i < s.n_layer_dense_lead:
            tensors += _ffn(i, s.n_embd, s.n_ff)
        else:
            tensors += _experts(i, s, s.n_ff_exp) + [(f"blk.{i}.exp_probs_b.bias", (s.n_expert,), "f32")]
            if s.n_expert_shared:
                tensors += _shared_expert(i, s, s.n_ff_exp * s.n_expert_shared)
        if i >= s.n_layer - s.n_nextn:
            b = f"blk.{i}."
            tensors += [(b + "nextn.eh_proj.weight", (2 * s.n_embd, s.n_embd), "w"),
                        _norm(i, "nextn.enorm", s.n_embd), _norm(i, "nextn.hnorm", s.n_embd)]
    return tensors


def _llama4(s: SyntheticShape) -> list[Tensor]:
    tensors = _embeddings(s)
    step = s.moe_every or 1
    for i in range(s.n_layer):
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "ffn_norm", s.n_embd)] + _attention(i, s)
        if (i + 1) % step == 0:
            tensors += _experts(i, s, s.n_ff_exp) + _shared_expert(i, s, s.n_ff_exp)
        else:
            tensors += _ffn(i, s.n_embd, s.n_ff)
    return tensors


def _gemma4(s: SyntheticShape) -> list[Tensor]:
    """gemma4, dense, no per-layer embeddings: per-block head size and KV heads, tied output, one
    rope_freqs for the full-attention blocks; shared-KV blocks have no K/V projections."""
    tensors = _embeddings(replace(s, tied=True))
    swa = _gemma4_swa(s)
    tensors.append(("rope_freqs.weight", (s.head_dim_k // 2,), "f32"))
    ple = s.n_embd_per_layer
    if ple:
        tensors += [("per_layer_token_embd.weight", (ple * s.n_layer, s.n_vocab), "w"),
                    ("per_layer_model_proj.weight", (s.n_embd, ple * s.n_layer), "w"),
                    ("per_layer_proj_norm.weight", (ple,), "f32")]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        hd = (s.head_dim_swa or s.head_dim_k) if swa[i] else s.head_dim_k
        n_kv = s.n_head_kv if swa[i] else (s.n_head_kv_full or s.n_head_kv)
        has_kv = i < s.n_layer - s.n_kv_shared
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "post_attention_norm", s.n_embd),
                    _norm(i, "ffn_norm", s.n_embd), _norm(i, "post_ffw_norm", s.n_embd),
                    (b + "attn_q.weight", (s.n_embd, hd * s.n_head), "w"),
                    (b + "attn_output.weight", (hd * s.n_head, s.n_embd), "w"), _norm(i, "attn_q_norm", hd)]
        if has_kv:
            tensors += [(b + "attn_k.weight", (s.n_embd, hd * n_kv), "w"),
                        (b + "attn_v.weight", (s.n_embd, hd * n_kv), "w"), _norm(i, "attn_k_norm", hd)]
        tensors += _ffn(i, s.n_embd, s.n_ff)
        if s.n_expert:  # routed experts beside the dense FFN, each branch between its own norms
            tensors += _experts(i, s, s.n_ff_exp) + [(b + "ffn_gate_inp.scale", (s.n_embd,), "f32"),
                                                     _norm(i, "pre_ffw_norm_2", s.n_embd),
                                                     _norm(i, "post_ffw_norm_1", s.n_embd),
                                                     _norm(i, "post_ffw_norm_2", s.n_embd)]
        if ple:
            tensors += [(b + "inp_gate.weight", (s.n_embd, ple), "w"), (b + "proj.weight", (ple, s.n_embd), "w"),
                        _norm(i, "post_norm", s.n_embd)]
    return tensors


def _minimax_m2(s: SyntheticShape) -> list[Tensor]:
    """minimax-m2: Q/K norms over the whole projection, every block MoE (experts n_ff wide) with a
    selection bias; untied output."""
    tensors = _embeddings(replace(s, tied=False))
    for i in range(s.n_layer):
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "ffn_norm", s.n_embd)] + _attention(i, s)
        tensors += [_norm(i, "attn_q_norm", s.head_dim_k * s.n_head),
                    _norm(i, "attn_k_norm", s.head_dim_k * s.n_head_kv)]
        tensors += _experts(i, s, s.n_ff) + [(f"blk.{i}.exp_probs_b.bias", (s.n_expert,), "f32")]
    return tensors


def _nemotron_h(s: SyntheticShape) -> list[Tensor]:
    """nemotron_h / nemotron_h_moe: every block is one of mamba2, attention (no RoPE) or an FFN with a
    squared-ReLU up/down pair; with experts, the FFN blocks are up/down experts plus a shared expert."""
    d_in_proj = 2 * s.ssm_d_inner + 2 * s.ssm_n_group * s.ssm_d_state + s.ssm_n_head
    tensors = _embeddings(s)
    for i in range(s.n_layer):
        b = f"blk.{i}."
        tensors.append(_norm(i, "attn_norm", s.n_embd))
        if i in s.attention_layers:
            tensors += _attention(i, s)
        elif i not in s.ffn_layers:
            tensors += _mamba2_block(i, s, d_in_proj)
        elif s.n_expert:
            e, ff, shared = s.n_expert, s.n_ff_exp, s.n_ff_shexp or s.n_ff_exp
            tensors += [(b + "ffn_gate_inp.weight", (s.n_embd, e), "f32"), (b + "exp_probs_b.bias", (e,), "f32"),
                        (b + "ffn_up_exps.weight", (s.n_embd, ff, e), "w"),
                        (b + "ffn_down_exps.weight", (ff, s.n_embd, e), "w"),
                        (b + "ffn_up_shexp.weight", (s.n_embd, shared), "w"),
                        (b + "ffn_down_shexp.weight", (shared, s.n_embd), "w")]
        else:
            tensors += [(b + "ffn_up.weight", (s.n_embd, s.n_ff), "w"),
                        (b + "ffn_down.weight", (s.n_ff, s.n_embd), "w")]
    return tensors


def _seed_oss(s: SyntheticShape) -> list[Tensor]:
    tensors = _embeddings(s)
    for i in range(s.n_layer):
        tensors += [_norm(i, "attn_norm", s.n_embd), _norm(i, "post_attention_norm", s.n_embd)]
        tensors += _attention(i, s, q_bias=True) + _ffn(i, s.n_embd, s.n_ff)
    return tensors


def _olmo2(s: SyntheticShape) -> list[Tensor]:
    tensors = _embeddings(s)
    for i in range(s.n_layer):
        tensors += [_norm(i, "post_attention_norm", s.n_embd), _norm(i, "post_ffw_norm", s.n_embd)]
        tensors += _attention(i, s) + [_norm(i, "attn_q_norm", s.head_dim_k * s.n_head),
                                       _norm(i, "attn_k_norm", s.head_dim_k * s.n_head_kv)]
        tensors += _ffn(i, s.n_embd, s.n_ff)
    return tensors


def _deepseek4(s: SyntheticShape) -> list[Tensor]:
    """src/models/deepseek4.cpp load_arch_tensors: hyper-connection mixers around every sub-block, low-rank Q,
    one K/V head, grouped low-rank output, compressors on the CSA (ratio 4, with an indexer) and HCA blocks."""
    hd, hc_dim, hc_mix = s.head_dim_k, s.hc_mult * s.n_embd, (2 + s.hc_mult) * s.hc_mult
    tensors = _embeddings(s) + [("output_hc_fn.weight", (hc_dim, s.hc_mult), "f32"),
                                ("output_hc_base.weight", (s.hc_mult,), "f32"), ("output_hc_scale.weight", (1,), "f32")]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        tensors += [_norm(i, "attn_norm", s.n_embd), (b + "attn_sinks.weight", (s.n_head,), "f32"),
                    (b + "attn_q_a.weight", (s.n_embd, s.q_lora_rank), "w"), _norm(i, "attn_q_a_norm", s.q_lora_rank),
                    (b + "attn_q_b.weight", (s.q_lora_rank, s.n_head * hd), "w"),
                    (b + "attn_kv.weight", (s.n_embd, hd), "w"), _norm(i, "attn_kv_a_norm", hd),
                    (b + "attn_output_a.weight", (s.n_head * hd // s.o_groups, s.o_groups * s.o_lora_rank), "w"),
                    (b + "attn_output_b.weight", (s.o_groups * s.o_lora_rank, s.n_embd), "w")]
        for part in ("attn", "ffn"):
            tensors += [(f"{b}hc_{part}_fn.weight", (hc_dim, hc_mix), "f32"),
                        (f"{b}hc_{part}_base.weight", (hc_mix,), "f32"), (f"{b}hc_{part}_scale.weight", (3,), "f32")]
        tensors += _dsv4_compressor(i, s)
        if i < s.n_hash_layers:
            tensors.append((b + "ffn_gate_tid2eid.weight", (s.n_expert_used, s.n_vocab), "i32"))
        else:
            tensors.append((b + "exp_probs_b.bias", (s.n_expert,), "f32"))
        tensors += [_norm(i, "ffn_norm", s.n_embd)] + _experts(i, s, s.n_ff_exp)
        tensors += _ffn(i, s.n_embd, s.n_ff_exp * s.n_expert_shared, "_shexp")
    return tensors


def _dsv4_ratio(s: SyntheticShape, i: int) -> int:
    """The shape's ratios repeat over the blocks (so that a preset scales to any block count)."""
    return s.compress_ratios[i % len(s.compress_ratios)] if s.compress_ratios else 0


def _dsv4_compressor(i: int, s: SyntheticShape) -> list[Tensor]:
    ratio, hd, b = _dsv4_ratio(s, i), s.head_dim_k, f"blk.{i}."
    if ratio == 0:
        return []
    width = (2 if ratio == 4 else 1) * hd  # CSA compresses overlapping windows: two rows per block
    tensors: list[Tensor] = [(b + "attn_compressor_kv.weight", (s.n_embd, width), "w"),
                             (b + "attn_compressor_gate.weight", (s.n_embd, width), "w"),
                             (b + "attn_compressor_ape.weight", (width, ratio), "f32"),
                             _norm(i, "attn_compressor_norm", hd)]
    if ratio == 4:
        ihd = s.indexer_head_dim
        tensors += [(b + "indexer.proj.weight", (s.n_embd, s.indexer_n_head), "w"),
                    (b + "indexer.attn_q_b.weight", (s.q_lora_rank, s.indexer_n_head * ihd), "w"),
                    (b + "indexer_compressor_kv.weight", (s.n_embd, 2 * ihd), "w"),
                    (b + "indexer_compressor_gate.weight", (s.n_embd, 2 * ihd), "w"),
                    (b + "indexer_compressor_ape.weight", (2 * ihd, ratio), "f32"),
                    _norm(i, "indexer_compressor_norm", ihd)]
    return tensors


_TENSORS = {
    "deepseek4": _deepseek4,
    "llama": _llama_like,
    # long-tail archs (no exact family: planned with the generic estimate), for its accuracy benchmark
    "smollm3": _llama_like,
    "exaone": _llama_like,
    "ernie4_5": _llama_like,
    "granite": _llama_like,
    "seed_oss": _seed_oss,
    "olmo2": _olmo2,
    "nemotron_h": _nemotron_h,
    "nemotron_h_moe": _nemotron_h,
    "minimax-m2": _minimax_m2,
    "gemma4": _gemma4,
    "mistral3": _llama_like,
    "qwen3next": lambda s: _qwen3next_like(s, "qwen3next"),
    "qwen35": lambda s: _qwen3next_like(s, "qwen35"),
    "qwen35moe": lambda s: _qwen3next_like(s, "qwen35moe"),
    "gpt-oss": _gpt_oss,
    "glm4moe": _glm4moe,
    "llama4": _llama4,
    "qwen2": lambda s: _llama_like(s, q_bias=True),
    "qwen3": lambda s: _llama_like(s, qk_norm=True),
    "qwen3moe": lambda s: _llama_like(s, qk_norm=True),
    "gemma2": lambda s: _gemma(s, qk_norm=False),
    "gemma3": lambda s: _gemma(s, qk_norm=True),
    "deepseek2": _deepseek2,
    "phi3": _phi3,
    "mamba2": _mamba2,
    "granitehybrid": _granitehybrid,
    "lfm2": _lfm2,
}


# --- vocabulary: a SentencePiece ("llama") vocab of n_vocab tokens ---------------------------------

_SPECIALS = ("<unk>", "<s>", "</s>", "<|endoftext|>")
_VOCAB_KEYS = 7
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_BYTE = 1, 2, 3, 6
MIN_VOCAB = len(_SPECIALS) + 256


@functools.lru_cache(maxsize=8)
def _vocab_bytes(n_vocab: int) -> bytes:
    """The tokenizer key/values: specials, 256 byte-fallback tokens, letters, then filler pieces."""
    if n_vocab < MIN_VOCAB:
        raise ValueError(f"n_vocab {n_vocab} is below {MIN_VOCAB} (specials and byte tokens)")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = ["\u2581", *letters, "\u2581h", "\u2581hi", "\u2581the"]
    tokens = list(_SPECIALS) + [f"<0x{b:02X}>" for b in range(256)] + words
    tokens += [f"\u2581t{i}" for i in range(n_vocab - len(tokens))]
    tokens = tokens[:n_vocab]
    types = [_TYPE_UNKNOWN] + [_TYPE_CONTROL] * 3 + [_TYPE_BYTE] * 256
    types += [_TYPE_NORMAL] * (n_vocab - len(types))
    scores = array("f", (-float(i) for i in range(n_vocab)))
    out = _Writer()
    out.kv("tokenizer.ggml.model", _T_STRING, "llama")
    out.kv_array_raw("tokenizer.ggml.tokens", _T_STRING, n_vocab, b"".join(_string(t) for t in tokens))
    out.kv_array_raw("tokenizer.ggml.scores", _T_F32, n_vocab, scores.tobytes())
    out.kv_array_raw("tokenizer.ggml.token_type", _T_I32, n_vocab, array("i", types).tobytes())
    out.kv("tokenizer.ggml.bos_token_id", _T_U32, 1)
    out.kv("tokenizer.ggml.eos_token_id", _T_U32, 2)
    out.kv("tokenizer.ggml.unknown_token_id", _T_U32, 0)
    return out.data()


# --- the writer ------------------------------------------------------------------------------------

def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


_SCALAR_FORMATS = {_T_U32: "<I", _T_I32: "<i", _T_F32: "<f", _T_BOOL: "<?"}


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def data(self) -> bytes:
        return b"".join(self.parts)

    def raw(self, data: bytes) -> None:
        self.parts.append(data)

    def header(self, n_tensors: int, n_kv: int) -> None:
        self.parts.append(GGUF_MAGIC + struct.pack("<IQQ", 3, n_tensors, n_kv))

    def kv(self, key: str, value_type: int, value: object) -> None:
        self.parts.append(_string(key) + struct.pack("<I", value_type))
        if value_type == _T_STRING:
            self.parts.append(_string(str(value)))
        elif value_type == _T_ARRAY:
            element_type, values = cast("tuple[int, list[int]]", value)
            fmt = _SCALAR_FORMATS[element_type]
            self.parts.append(struct.pack("<IQ", element_type, len(values)))
            self.parts.append(b"".join(struct.pack(fmt, v) for v in values))
        else:
            self.parts.append(struct.pack(_SCALAR_FORMATS[value_type], value))

    def kv_array_raw(self, key: str, element_type: int, count: int, payload: bytes) -> None:
        self.parts.append(_string(key) + struct.pack("<IIQ", _T_ARRAY, element_type, count) + payload)

    def tensor_info(self, name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> None:
        layout = struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
        self.parts.append(_string(name) + layout)


def describe(path: str | Path) -> str:
    """One line: what a synthetic file claims to be (for logs of tests and benchmarks)."""
    header = read_header(path)
    types = sorted({type_name(t.ggml_type) for t in header.tensors})
    return f"{header.get('general.name')} ({len(header.tensors)} tensors, {', '.join(types)})"
