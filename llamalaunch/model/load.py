"""GGUF header(s) → ModelProfile: per-slot weight bytes as llama.cpp allocates them, and the hparams.

Weights per slot follow ggml_backend_alloc_ctx_tensors_from_buft: each tensor takes
GGML_PAD(alloc_size, buffer alignment). CPU buffers (and RPC workers backed by a CPU) align to 32 and
allocate ggml_nbytes; CUDA buffers (local or behind an RPC worker) align to 128 and pad a quantized
tensor whose ne0 % 512 != 0 up to the next 512 elements of one row (MATRIX_ROW_PADDING). `bytes` is the
CPU figure; `cuda_extra_bytes` is what a CUDA buffer needs on top of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llamalaunch.errors import ModelError
from llamalaunch.model import arch as arches
from llamalaunch.model.ggml.buffers import CPU_ALIGNMENT, CUDA_ALIGNMENT, cuda_alloc_size
from llamalaunch.model.gguf_header import (
    GgufArray,
    GgufHeader,
    TensorInfo,
    file_type_name,
    pad,
    read_header,
)
from llamalaunch.model.profile import ExpertPart, GraphDetails, ModelProfile, SlotWeights

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
_SHARD = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_EXPERTS = re.compile(r"_exps(\.|$)")


def load_profile(path: str | Path, allow_unknown_arch: bool = False, generic: bool = False) -> ModelProfile:
    """Read a model's header(s) — one file or all shards of a split model — into a ModelProfile.

    `generic` plans even a known arch as an unknown one would be (the generic estimate's benchmark)."""
    shard_paths = shard_set(Path(path))
    headers = [read_header(shard) for shard in shard_paths]
    _check_shards(headers)
    first = headers[0]
    arch = _string(first, "general.architecture")
    if not arches.is_supported(arch) and not allow_unknown_arch:
        raise ModelError(
            f"{first.path}: architecture {arch!r} is not supported by llamalaunch",
            f"supported: {', '.join(arches.SUPPORTED_ARCHS)}; --generic-arch gives a generic estimate",
        )
    keys = arches.Keys(first.kv, arch, first.path)
    tensors = [t for header in headers for t in header.tensors]
    return _profile(first, keys, tensors, shard_paths, sum(h.file_size for h in headers), generic)


def shard_set(path: Path) -> tuple[Path, ...]:
    """All parts of a split model (`x-00001-of-00003.gguf` …), in order; just `path` otherwise."""
    match = _SHARD.match(path.name)
    if not match:
        return (path,)
    prefix, count = match["prefix"], int(match["count"])
    if count < 1:
        raise ModelError(f"{path}: a split model of {count} parts", "check the file name")
    expected = [path.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in expected if not p.exists()]
    if missing:
        raise ModelError(
            f"{path}: split model part {missing[0]} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            "download every part into the same directory",
        )
    extra = sorted(
        p.name
        for p in path.parent.glob(f"{_glob_escape(prefix)}-*-of-*.gguf")
        if _SHARD.match(p.name) and p not in expected
    )
    if extra:
        raise ModelError(
            f"{path}: extra split model part {extra[0]} does not belong to the {count}-part set",
            "remove the stray part, or keep one complete set per directory",
        )
    return tuple(expected)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _check_shards(headers: list[GgufHeader]) -> None:
    """Each part must say it is part i of n (split.no is 0-based) and no tensor may appear twice."""
    if len(headers) > 1:
        for index, header in enumerate(headers):
            count = header.get("split.count")
            number = header.get("split.no")
            if count != len(headers) or number != index:
                raise ModelError(
                    f"{header.path}: says it is part {number} of {count}, expected part {index} "
                    f"of {len(headers)}",
                    "the parts come from different downloads; fetch them again",
                )
    seen: set[str] = set()
    for header in headers:
        for tensor in header.tensors:
            if tensor.name in seen:
                raise ModelError(
                    f"{header.path}: tensor {tensor.name!r} appears in two parts",
                    "the parts do not belong together",
                )
            seen.add(tensor.name)
    declared = headers[0].get("split.tensors.count")
    if len(headers) > 1 and isinstance(declared, int) and declared != len(seen):
        raise ModelError(
            f"{headers[0].path}: the parts hold {len(seen)} tensors, the first part declares {declared}",
            "a part is from another model or damaged",
        )


def _string(header: GgufHeader, key: str) -> str:
    value = header.get(key)
    if value is None:
        raise ModelError(
            f"{header.path}: required key {key!r} is missing", "the file is not a llama.cpp model"
        )
    if not isinstance(value, str):
        raise ModelError(f"{header.path}: key {key!r} is not a string", "the file is damaged")
    return value


@dataclass(frozen=True)
class _Sizes:
    cpu: int = 0
    cuda: int = 0
    experts: int = 0
    experts_cuda: int = 0
    parts: tuple[tuple[str, int, int], ...] = ()  # expert tensor kind, its CPU and CUDA bytes

    def __add__(self, other: _Sizes) -> _Sizes:
        merged: dict[str, tuple[int, int]] = {}
        for name, cpu, cuda in (*self.parts, *other.parts):
            had_cpu, had_cuda = merged.get(name, (0, 0))
            merged[name] = (had_cpu + cpu, had_cuda + cuda)
        return _Sizes(self.cpu + other.cpu, self.cuda + other.cuda, self.experts + other.experts,
                      self.experts_cuda + other.experts_cuda,
                      tuple((name, cpu, cuda) for name, (cpu, cuda) in sorted(merged.items())))

    def slot(self) -> SlotWeights:
        parts = sorted((ExpertPart(name, cpu, cuda - cpu) for name, cpu, cuda in self.parts),
                       key=lambda part: (-part.bytes, part.name))
        return SlotWeights(bytes=self.cpu, cuda_extra_bytes=self.cuda - self.cpu, expert_bytes=self.experts,
                           expert_cuda_extra_bytes=self.experts_cuda - self.experts, expert_parts=tuple(parts))


def tensor_sizes(tensor: TensorInfo) -> _Sizes:
    """What one tensor takes in a CPU buffer and in a CUDA buffer (ggml_backend_buft_get_alloc_size)."""
    cpu = pad(tensor.nbytes, CPU_ALIGNMENT)
    ne0 = tensor.shape[0] if tensor.shape else 1
    cuda = pad(cuda_alloc_size(tensor.ggml_type, ne0, tensor.nbytes), CUDA_ALIGNMENT)
    if not _EXPERTS.search(tensor.name):
        return _Sizes(cpu, cuda)
    kind = tensor.name.split(".")[2] if _BLOCK.match(tensor.name) else tensor.name
    return _Sizes(cpu, cuda, cpu, cuda, ((kind, cpu, cuda),))


def _sum(tensors: Iterable[TensorInfo]) -> _Sizes:
    total = _Sizes()
    for tensor in tensors:
        total = total + tensor_sizes(tensor)
    return total


@dataclass(frozen=True)
class _Placement:
    blocks: tuple[_Sizes, ...]
    output: _Sizes
    host: _Sizes
    per_device: _Sizes
    output_is_token_embd: bool


def _place(arch: str, tensors: list[TensorInfo], n_layer: int, path: str) -> _Placement:
    """Group tensors by where llama.cpp puts them: block i, the output slot, the host, every device."""
    blocks: list[list[TensorInfo]] = [[] for _ in range(n_layer)]
    roles: dict[str, list[TensorInfo]] = {"input": [], "output": [], "per_device": [], "first_block": []}
    for tensor in tensors:
        match = _BLOCK.match(tensor.name)
        if match:
            index = int(match.group(1))
            if index >= n_layer:
                raise ModelError(
                    f"{path}: tensor {tensor.name!r} belongs to block {index}, the model has {n_layer}",
                    "the file is damaged or block_count is wrong",
                )
            blocks[index].append(tensor)
        else:
            roles[arches.top_level_role(arch, tensor.name)].append(tensor)
    names = {t.name for t in tensors}
    if "token_embd.weight" not in names:
        raise ModelError(f"{path}: tensor 'token_embd.weight' is missing", "the file is not a complete model")
    tied = "output.weight" not in names
    output = _sum(roles["output"])
    if tied:
        # llama.cpp loads token_embd a second time as the output tensor (TENSOR_DUPLICATED)
        embd = tensor_sizes(_by_name(tensors, "token_embd.weight"))
        output = output + _Sizes(embd.cpu, embd.cuda)
    blocks[0] += roles["first_block"]
    return _Placement(
        tuple(_sum(b) for b in blocks), output, _sum(roles["input"]), _sum(roles["per_device"]), tied
    )


def _by_name(tensors: list[TensorInfo], name: str) -> TensorInfo:
    return next(t for t in tensors if t.name == name)


def _n_vocab(header: GgufHeader, keys: arches.Keys) -> int:
    """{arch}.vocab_size, else the length of tokenizer.ggml.tokens (read without its strings)."""
    if keys.has("vocab_size"):
        return keys.number("vocab_size")
    tokens = header.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GgufArray):
        return tokens.count
    raise ModelError(
        f"{header.path}: no vocabulary (neither {keys.arch}.vocab_size nor tokenizer.ggml.tokens)",
        "the file is not a complete model",
    )


def _hparams(keys: arches.Keys, n_layer: int) -> arches.Hparams:
    n_embd = keys.number("embedding_length")
    zeros = (0,) * n_layer
    n_head = keys.per_layer("attention.head_count", n_layer, zeros)
    n_head_kv = keys.per_layer("attention.head_count_kv", n_layer, n_head)  # llama.cpp: defaults to n_head
    return arches.Hparams(n_layer, n_embd, n_head, n_head_kv)


def _profile(
    header: GgufHeader,
    keys: arches.Keys,
    tensors: list[TensorInfo],
    shard_paths: tuple[Path, ...],
    file_bytes: int,
    generic: bool = False,
) -> ModelProfile:
    arch = keys.arch
    known = arches.is_supported(arch) and not generic
    n_layer = keys.number("block_count")
    if not 0 < n_layer <= MAX_LAYERS:
        raise ModelError(f"{header.path}: block_count is {n_layer}", f"a model has 1 to {MAX_LAYERS} blocks")
    hp = _hparams(keys, n_layer)
    if not known and not any(hp.n_head):
        raise ModelError(
            f"{header.path}: architecture {arch!r} has no attention.head_count; its cache cannot be "
            "estimated",
            "use a supported architecture",
        )
    head_dim_k, head_dim_v = arches.head_dims(arch, keys, hp)
    layout = arches.arch_layout(arch if known else "", keys, hp)
    _check_attention(keys, hp, layout, known)
    placement = _place(arch, tensors, n_layer, header.path)
    blocks = placement.blocks
    n_nextn = keys.number("nextn_predict_layers", 0)
    if known and arch in arches.SKIPS_NEXTN_WEIGHTS and 0 < n_nextn < n_layer:
        blocks = blocks[:n_layer - n_nextn] + (_Sizes(),) * n_nextn
    n_ff = keys.per_layer("feed_forward_length", n_layer, (0,) * n_layer)
    n_ff_exp = keys.per_layer("expert_feed_forward_length", n_layer, (0,) * n_layer)
    n_expert = keys.number("expert_count", 0)
    n_expert_used = max(keys.per_layer("expert_used_count", n_layer, (0,) * n_layer))
    _check_experts(keys, tensors, n_expert, n_expert_used)
    name = header.get("general.name")
    return ModelProfile(
        path=str(shard_paths[0]),
        shard_paths=tuple(str(p) for p in shard_paths),
        arch=arch,
        name=name if isinstance(name, str) else shard_paths[0].stem,
        file_type=_file_type(header),
        file_bytes=file_bytes,
        n_layer=n_layer,
        slots=tuple(b.slot() for b in blocks) + (placement.output.slot(),),
        host_bytes=placement.host.cpu,
        output_is_token_embd=placement.output_is_token_embd,
        n_vocab=_n_vocab(header, keys),
        n_ctx_train=keys.number("context_length"),
        n_embd=hp.n_embd,
        n_ff=max(n_ff),
        n_head=hp.n_head,
        n_head_kv=hp.n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_swa=layout.n_swa,
        swa_layers=layout.swa_layers or (False,) * n_layer,
        kv_lora_rank=layout.kv_lora_rank,
        rope_dim=layout.rope_dim or keys.number("rope.dimension_count", head_dim_k),
        recurrent_layers=layout.recurrent_layers or (False,) * n_layer,
        recurrent_r_bytes_per_seq=layout.recurrent_r_bytes_per_seq,
        recurrent_s_bytes_per_seq=layout.recurrent_s_bytes_per_seq,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_embd_out=keys.number("embedding_length_out", 0),
        generic_estimate=not known,
        per_device_bytes=placement.per_device.cpu,
        n_nextn_layers=n_nextn,
        n_ff_exp=max(n_ff_exp),
        head_dim_k_swa=keys.number("attention.key_length_swa", 0),
        head_dim_v_swa=keys.number("attention.value_length_swa", 0),
        n_kv_shared_layers=keys.number("attention.shared_kv_layers", 0) if known else 0,
        compress_ratios=layout.compress_ratios,
        indexer_head_dim=layout.indexer_head_dim,
        graph=graph_details(keys, tensors, n_layer, head_dim_k, head_dim_v),
    )


def graph_details(keys: arches.Keys, tensors: list[TensorInfo], n_layer: int, head_dim_k: int,
                  head_dim_v: int) -> GraphDetails:
    """The tensor names (biases, fused QKV, expert bias) and the family keys (deepseek2/4, gemma, SSM)
    the compute-buffer replay reads. Lenient: a key of the wrong type reads as absent, as llama.cpp's
    optional keys do."""
    arch, kv = keys.arch, keys.kv

    def number(key: str, default: float = 0) -> float:
        value = kv.get(f"{arch}.{key}")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    ffn_layers: tuple[bool, ...] = ()
    if arch.startswith("nemotron_h"):  # FFN-only blocks: a per-block feed_forward_length above 0
        ff = kv.get(f"{arch}.feed_forward_length")
        values = getattr(ff, "values", None) or (ff,) * n_layer
        ffn_layers = tuple(isinstance(n, int) and n > 0 for n in values)
    moe_step = int(number("interleave_moe_layer_step")) if arch == "llama4" else 0  # experts every step-th block
    deepseek4 = arch == "deepseek4"
    return GraphDetails(
        tensors=frozenset(t.name for t in tensors),
        expert_types=expert_types(tensors),
        n_lora_kv=int(number("attention.kv_lora_rank")),
        q_lora_rank=int(number("attention.q_lora_rank")),
        head_dim_k_mla=int(number("attention.key_length_mla", head_dim_k)),
        head_dim_v_mla=int(number("attention.value_length_mla", head_dim_v)),
        n_layer_dense_lead=int(number("leading_dense_block_count")),
        n_expert_shared=int(number("expert_shared_count")),
        expert_gating_sigmoid=number("expert_gating_func", 1) == 2,
        expert_weights_norm=bool(kv.get(f"{arch}.expert_weights_norm", arch not in ("deepseek2", "glm4moe"))),
        expert_weights_scale=number("expert_weights_scale", 1.0) not in (0.0, 1.0),
        attn_softcap=number("attn_logit_softcapping") > 0 and arch == "gemma2",
        final_softcap=number("final_logit_softcapping") > 0 or arch == "gemma2",
        ssm_d_conv=int(number("ssm.conv_kernel")),
        ssm_d_inner=int(number("ssm.inner_size")),
        ssm_d_state=int(number("ssm.state_size")),
        ssm_n_group=int(number("ssm.group_count", 1)) or 1,
        ssm_dt_rank=int(number("ssm.time_step_rank")),
        shortconv_l_cache=int(number("shortconv.l_cache")),
        n_ff_shexp=int(number("expert_shared_feed_forward_length")),
        n_embd_per_layer=int(number("embedding_length_per_layer_input")) if arch == "gemma4" else 0,
        mrope=arch in ("qwen35", "qwen35moe")
        or (arch == "glm4moe" and _uses_mrope(kv.get(f"{arch}.rope.dimension_sections"))),
        ffn_layers=ffn_layers,
        moe_layers=tuple(moe_step > 0 and (il + 1) % moe_step == 0 for il in range(n_layer)) if moe_step else (),
        n_hash_layers=int(number("hash_layer_count")) if deepseek4 else 0,
        hc_mult=int(number("hyper_connection.count")) if deepseek4 else 0,
        o_groups=int(number("attention.output_group_count")) if deepseek4 else 0,
        o_lora_rank=int(number("attention.output_lora_rank")) if deepseek4 else 0,
        indexer_n_head=int(number("attention.indexer.head_count")) if deepseek4 else 0,
        indexer_top_k=int(number("attention.indexer.top_k")) if deepseek4 else 0,
        names_sliding_window=any(f"{arch}.attention.sliding_window{suffix}" in kv
                                 for suffix in ("", "_pattern")),
    )


def expert_types(tensors: Iterable[TensorInfo]) -> tuple[str, str, str] | None:
    """The up, gate and down routed-expert weight types, the widest of each over the blocks (a Q4_K_M
    file mixes Q4_K and Q6_K); op offload copies these tensors whole, so their sizes set the copy buffers."""
    found: dict[str, TensorInfo] = {}
    for tensor in tensors:
        for part in ("up", "gate", "down"):
            if tensor.name.endswith(f".ffn_{part}_exps.weight") and (part not in found
                                                                    or tensor.nbytes > found[part].nbytes):
                found[part] = tensor
    if len(found) < 3:
        return None
    up, gate, down = (found[part].type_name.lower() for part in ("up", "gate", "down"))
    return up, gate, down


def _uses_mrope(sections: object) -> bool:
    """llama_hparams::use_mrope: the first two rope sections are non-zero."""
    values = tuple(getattr(sections, "values", None) or ())
    return len(values) >= 2 and bool(values[0]) and bool(values[1])


def _check_attention(keys: arches.Keys, hp: arches.Hparams, layout: arches.ArchLayout, known: bool) -> None:
    """Reject what llama.cpp would divide by: no embedding, attention layers without heads or KV heads,
    or a head count that is not a multiple of the KV head count (grouped-query attention)."""
    def bad(name: str, value: object, why: str) -> ModelError:
        return ModelError(f"{keys.path}: key {keys.arch + '.' + name!r} is {value}: {why}",
                          "the file is damaged or was converted wrongly; convert it again")

    if hp.n_embd == 0:
        raise bad("embedding_length", 0, "a model needs a positive embedding length")
    recurrent = layout.recurrent_layers or (False,) * hp.n_layer
    no_attention = layout.attention_free or (False,) * hp.n_layer
    for il in range(hp.n_layer):
        if recurrent[il] or no_attention[il] or (not known and 0 in (hp.n_head[il], hp.n_head_kv[il])):
            continue  # an unknown arch may mark recurrent layers with 0 heads
        n_head, n_head_kv = hp.n_head[il], hp.n_head_kv[il]
        if n_head == 0:
            raise bad("attention.head_count", 0, f"layer {il} has attention and needs heads")
        if n_head_kv == 0:
            raise bad("attention.head_count_kv", 0, f"layer {il} has attention and needs KV heads")
        if n_head % n_head_kv:
            raise bad("attention.head_count_kv", n_head_kv,
                      f"{n_head} heads are not a multiple of {n_head_kv} KV heads (layer {il})")


_EXPERT_WEIGHT = re.compile(r"^blk\.\d+\.(ffn_(?:gate|up|down|gate_up)_exps)\.weight$")


def _check_experts(keys: arches.Keys, tensors: list[TensorInfo], n_expert: int, n_expert_used: int) -> None:
    """Reject the expert counts llama.cpp would abort on (GGML_ASSERT in load_hparams, a wrong tensor shape):
    expert_count must be the experts the routed-expert weights hold (their third dimension) and
    expert_used_count, the most of any layer, between 1 and expert_count on a MoE model, 0 on a dense one."""
    count_key, used_key = f"{keys.arch}.expert_count", f"{keys.arch}.expert_used_count"
    count_said = f"is {n_expert}" if keys.has("expert_count") else "is missing"
    weights = [(match[1], t.shape[2]) for t in tensors
               if (match := _EXPERT_WEIGHT.match(t.name)) and len(t.shape) == 3]
    wrong = next(((kind, held) for kind, held in weights if held != n_expert), None)
    if wrong is not None:
        kind, held = wrong
        problem = f"{count_key} {count_said} but the model has {held} experts per layer ({kind} holds {held})"
    elif n_expert and not 0 < n_expert_used <= n_expert:
        holds = f" ({weights[0][0]} holds {n_expert})" if weights else ""
        problem = f"{used_key} is {n_expert_used} but the model has {n_expert} experts per layer{holds}"
    elif not n_expert and n_expert_used:
        problem = f"{used_key} is {n_expert_used} but {count_key} {count_said}: the model has no experts to route to"
    else:
        return
    raise ModelError(f"{keys.path}: {problem}: the GGUF header is inconsistent",
                     "re-convert or re-download the model")


def _file_type(header: GgufHeader) -> str:
    value = header.get("general.file_type")
    return file_type_name(value) if isinstance(value, int) and not isinstance(value, bool) else "unknown"
