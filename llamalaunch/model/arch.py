"""Per-architecture quirks, as llama.cpp's src/models/<arch>.cpp and llama-hparams.cpp apply them.

Everything here is a pure function of the GGUF key/values: which layers use a sliding window, which
are recurrent and how large their states are, whether K/V are stored MLA-compressed, and which
top-level (non-`blk.`) tensors llama.cpp puts on the input (host) device, the output device, or on
every device that holds a layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from llamalaunch.errors import ModelError
from llamalaunch.model.gguf_header import GgufArray, GgufValue

SUPPORTED_ARCHS = (
    "llama",
    "qwen2",
    "qwen3",
    "qwen3moe",
    "gemma2",
    "gemma3",
    "deepseek2",
    "phi3",
    "mamba2",
    "granitehybrid",
    "lfm2",
    "qwen3next",
    "qwen35",
    "qwen35moe",
    "gpt-oss",
    "glm4moe",
    "llama4",
    "mistral3",
    "gemma4",
    "minimax-m2",
    "nemotron_h",
    "nemotron_h_moe",
    "deepseek4",
)
# Top-level tensors by the layer llama.cpp assigns them (llama-arch.cpp LLM_TENSOR_INFOS).
INPUT_TENSORS = ("token_embd", "position_embd", "token_types", "per_layer_token_embd")
OUTPUT_TENSORS = (
    "output",
    "output_norm",
    "cls",
    "cls.output",
    "cls.norm",
    "enc.output_norm",
    "dec.output_norm",
    "dense_2",
    "dense_3",
)
# Repeating-layer tensors without a block number: llama.cpp creates one copy per device that holds
# a layer (TENSOR_DUPLICATED, one per buffer type).
PER_DEVICE_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")
# Repeating-layer tensors created with block index 0 under a name without one: they sit with block 0.
FIRST_BLOCK_TENSORS = ("per_layer_model_proj", "per_layer_proj_norm")
F32_BYTES = 4  # recurrent states default to f32 (cparams type_r/type_s)
# Archs whose NextN/MTP blocks (the last `nextn_predict_layers`) llama.cpp creates with TENSOR_SKIP unless
# an MTP draft is loaded: llama-server never allocates their weights.
SKIPS_NEXTN_WEIGHTS = frozenset({"deepseek2", "glm4moe", "qwen3next", "qwen35", "qwen35moe", "nemotron_h",
                                 "nemotron_h_moe", "deepseek4"})


@dataclass(frozen=True)
class Hparams:
    """The per-layer attention shape llama.cpp derives before any arch quirk."""

    n_layer: int
    n_embd: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]


@dataclass(frozen=True)
class ArchLayout:
    n_swa: int = 0
    swa_layers: tuple[bool, ...] = ()
    recurrent_layers: tuple[bool, ...] = ()
    recurrent_r_bytes_per_seq: int = 0
    recurrent_s_bytes_per_seq: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0
    attention_free: tuple[bool, ...] = ()  # neither attention nor state: FFN-only blocks (nemotron_h)
    compress_ratios: tuple[int, ...] = ()  # deepseek4: 0, 4 (CSA) or 128 (HCA) compressed caches per block
    indexer_head_dim: int = 0  # deepseek4: key length of the lightning indexer's cache


class Keys:
    """Typed access to `{arch}.*` keys with errors that name the key."""

    def __init__(self, kv: Mapping[str, GgufValue], arch: str, path: str) -> None:
        self.kv = kv
        self.arch = arch
        self.path = path

    def missing(self, key: str) -> ModelError:
        return ModelError(
            f"{self.path}: required key {key!r} is missing",
            "the file is incomplete or was converted by an old tool; convert it again",
        )

    def number(self, name: str, default: int | None = None) -> int:
        key = f"{self.arch}.{name}"
        value = self.kv.get(key)
        if value is None:
            if default is None:
                raise self.missing(key)
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelError(f"{self.path}: key {key!r} is not an integer", "the file is damaged")
        if value < 0:
            raise ModelError(f"{self.path}: key {key!r} is negative ({value})", "the file is damaged")
        return int(value)

    def per_layer(self, name: str, n_layer: int, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """A key that is a scalar or an array of one value per layer (llama.cpp get_key_or_arr)."""
        key = f"{self.arch}.{name}"
        value = self.kv.get(key)
        if value is None:
            if default is None:
                raise self.missing(key)
            return default
        if isinstance(value, GgufArray):
            if value.values is None or value.count != n_layer:
                raise ModelError(
                    f"{self.path}: key {key!r} has {value.count} entries, expected {n_layer}",
                    "the file is damaged",
                )
            numbers = value.values
        else:
            numbers = (value,) * n_layer
        counts = tuple(x for x in numbers if isinstance(x, int) and not isinstance(x, bool) and x >= 0)
        if len(counts) != len(numbers):
            raise ModelError(
                f"{self.path}: key {key!r} holds something other than counts", "the file is damaged"
            )
        return counts

    def bools(self, name: str) -> tuple[bool, ...] | None:
        value = self.kv.get(f"{self.arch}.{name}")
        if isinstance(value, GgufArray) and value.values is not None:
            return tuple(bool(x) for x in value.values)
        return None

    def has(self, name: str) -> bool:
        return f"{self.arch}.{name}" in self.kv


def swa_pattern(n_layer: int, n_pattern: int, dense_first: bool = False) -> tuple[bool, ...]:
    """llama_hparams::set_swa_pattern: with n=6, layers 0-4 slide and layer 5 is full, and so on."""
    if dense_first:
        return tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))


def _swa_layers(keys: Keys, n_layer: int, default_pattern: int) -> tuple[bool, ...]:
    """llama_model_base::load_swa_pattern: a per-layer bool array, else a period (default per arch)."""
    explicit = keys.bools("attention.sliding_window_pattern")
    if explicit is not None:
        if len(explicit) != n_layer:
            raise ModelError(
                f"{keys.path}: sliding_window_pattern has {len(explicit)} entries, expected {n_layer}",
                "the file is damaged",
            )
        return explicit
    return swa_pattern(n_layer, keys.number("attention.sliding_window_pattern", default_pattern))


def _none(keys: Keys, hp: Hparams) -> ArchLayout:
    return ArchLayout()


def _gemma2(keys: Keys, hp: Hparams) -> ArchLayout:
    return ArchLayout(
        n_swa=keys.number("attention.sliding_window", 4096), swa_layers=_swa_layers(keys, hp.n_layer, 2)
    )


def _gemma3(keys: Keys, hp: Hparams) -> ArchLayout:
    n_swa = keys.number("attention.sliding_window", 0)
    if n_swa == 0:
        return ArchLayout()
    return ArchLayout(n_swa=n_swa, swa_layers=_swa_layers(keys, hp.n_layer, 6))


def _ssm_state_bytes(keys: Keys) -> tuple[int, int]:
    """llama_hparams::n_embd_r / n_embd_s for Mamba-style layers, in f32 bytes per sequence."""
    d_conv = keys.number("ssm.conv_kernel")
    d_inner = keys.number("ssm.inner_size")
    d_state = keys.number("ssm.state_size")
    n_group = keys.number("ssm.group_count", 0)
    conv = (d_conv - 1 if d_conv > 0 else 0) * (d_inner + 2 * n_group * d_state)
    return conv * F32_BYTES, d_state * d_inner * F32_BYTES


def _mamba2(keys: Keys, hp: Hparams) -> ArchLayout:
    r_bytes, s_bytes = _ssm_state_bytes(keys)
    return ArchLayout(
        recurrent_layers=(True,) * hp.n_layer,
        recurrent_r_bytes_per_seq=r_bytes,
        recurrent_s_bytes_per_seq=s_bytes,
    )


def _granitehybrid(keys: Keys, hp: Hparams) -> ArchLayout:
    # "A layer is recurrent IFF the n_head_kv value is set to 0"
    r_bytes, s_bytes = _ssm_state_bytes(keys)
    return ArchLayout(
        recurrent_layers=tuple(n == 0 for n in hp.n_head_kv),
        recurrent_r_bytes_per_seq=r_bytes,
        recurrent_s_bytes_per_seq=s_bytes,
    )


def _lfm2(keys: Keys, hp: Hparams) -> ArchLayout:
    recurrent = tuple(n == 0 for n in hp.n_head_kv)
    l_cache = keys.number("shortconv.l_cache")
    n_swa = keys.number("attention.sliding_window", 0)
    swa = tuple(not r for r in recurrent) if n_swa > 0 else ()
    # n_embd_r for LFM2's short convolutions; n_embd_s is d_state*d_inner, 0 without ssm keys.
    return ArchLayout(
        n_swa=n_swa,
        swa_layers=swa,
        recurrent_layers=recurrent,
        recurrent_r_bytes_per_seq=hp.n_embd * max(l_cache - 1, 0) * F32_BYTES,
    )


def _deepseek2(keys: Keys, hp: Hparams) -> ArchLayout:
    """MLA. With key_length_mla/value_length_mla in the file (newer converts) llama.cpp caches only
    K = kv_lora_rank + rope_dim per token and layer (one KV head, V is a view of K). Without them it
    rebuilds full per-head K/V and caches those: an ordinary KV cache, so kv_lora_rank is reported 0."""
    kv_lora_rank = keys.number("attention.kv_lora_rank")
    rope_dim = keys.number("rope.dimension_count", 0)
    is_mla = keys.number("attention.key_length_mla", 0) > 0 and keys.number("attention.value_length_mla", 0) > 0
    return ArchLayout(kv_lora_rank=kv_lora_rank if is_mla else 0, rope_dim=rope_dim)


def _gated_delta_net(keys: Keys, hp: Hparams) -> ArchLayout:
    """qwen3next / qwen35 / qwen35moe: gated delta net blocks, and attention on every
    `full_attention_interval`-th block (default 4) unless `attention.recurrent_layers` lists them."""
    explicit = keys.bools("attention.recurrent_layers")
    n_main = hp.n_layer - keys.number("nextn_predict_layers", 0)  # MTP blocks are attention blocks
    if explicit is not None and len(explicit) == hp.n_layer:
        recurrent = explicit
    else:
        interval = keys.number("full_attention_interval", 4) or 4
        recurrent = tuple(il < n_main and (il + 1) % interval != 0 for il in range(hp.n_layer))
    r_bytes, s_bytes = _ssm_state_bytes(keys)
    return ArchLayout(recurrent_layers=recurrent, recurrent_r_bytes_per_seq=r_bytes, recurrent_s_bytes_per_seq=s_bytes)


def _gpt_oss(keys: Keys, hp: Hparams) -> ArchLayout:
    """Standard sliding window (required key) on every other block, the first one sliding."""
    return ArchLayout(n_swa=keys.number("attention.sliding_window"), swa_layers=_swa_layers(keys, hp.n_layer, 2))


def _gemma4(keys: Keys, hp: Hparams) -> ArchLayout:
    """Standard sliding window; the per-block pattern array is required."""
    return ArchLayout(n_swa=keys.number("attention.sliding_window"), swa_layers=_swa_layers(keys, hp.n_layer, 6))


def _nemotron_h(keys: Keys, hp: Hparams) -> ArchLayout:
    """Each block is mamba2 (no KV heads, no FFN), attention (KV heads, no FFN) or FFN only."""
    n_ff = keys.per_layer("feed_forward_length", hp.n_layer, (0,) * hp.n_layer)
    n_main = hp.n_layer - keys.number("nextn_predict_layers", 0)
    r_bytes, s_bytes = _ssm_state_bytes(keys)
    return ArchLayout(
        recurrent_layers=tuple(il < n_main and hp.n_head_kv[il] == 0 and n_ff[il] == 0 for il in range(hp.n_layer)),
        recurrent_r_bytes_per_seq=r_bytes,
        recurrent_s_bytes_per_seq=s_bytes,
        attention_free=tuple(n > 0 for n in n_ff),
    )


LLAMA4_CHUNK = 8192  # llama.cpp fixes llama4's attention chunk, whatever the file says


def _llama4(keys: Keys, hp: Hparams) -> ArchLayout:
    """Chunked attention on 3 of every 4 blocks, unless the file sets sliding_window to 0 (all full)."""
    if keys.has("attention.sliding_window") and keys.number("attention.sliding_window") == 0:
        return ArchLayout()
    return ArchLayout(n_swa=LLAMA4_CHUNK, swa_layers=_swa_layers(keys, hp.n_layer, 4))


def _deepseek4(keys: Keys, hp: Hparams) -> ArchLayout:
    """A K-only sliding-window cache on every block, plus compressed K caches on the blocks whose
    compress ratio is 4 (with the indexer's cache) or 128 (llama-kv-cache-dsv4.cpp)."""
    ratios = _compress_ratios(keys, hp)
    return ArchLayout(n_swa=keys.number("attention.sliding_window"), swa_layers=(True,) * hp.n_layer,
                      compress_ratios=ratios, indexer_head_dim=keys.number("attention.indexer.key_length"))


def _compress_ratios(keys: Keys, hp: Hparams) -> tuple[int, ...]:
    """attention.compress_ratios: at least one entry per block (llama.cpp refuses a shorter array)."""
    value = keys.kv.get(f"{keys.arch}.attention.compress_ratios")
    if value is None:
        raise keys.missing(f"{keys.arch}.attention.compress_ratios")
    ratios = tuple(r for r in (value.values or ()) if isinstance(r, int)) if isinstance(value, GgufArray) else ()
    if len(ratios) < hp.n_layer or any(r not in (0, 4, 128) for r in ratios[:hp.n_layer]):
        raise ModelError(f"{keys.path}: key {keys.arch + '.attention.compress_ratios'!r} is not one ratio of "
                         f"0, 4 or 128 per block ({hp.n_layer} blocks)", "the file is damaged")
    return ratios[:hp.n_layer]


_LAYOUTS: dict[str, Callable[[Keys, Hparams], ArchLayout]] = {
    "llama": _none,
    "qwen2": _none,
    "qwen3": _none,
    "qwen3moe": _none,
    "phi3": _none,  # llama.cpp disables phi3's sliding window (PR 13676): all layers full
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "deepseek2": _deepseek2,
    "mamba2": _mamba2,
    "granitehybrid": _granitehybrid,
    "lfm2": _lfm2,
    "qwen3next": _gated_delta_net,
    "qwen35": _gated_delta_net,
    "qwen35moe": _gated_delta_net,
    "gpt-oss": _gpt_oss,
    "glm4moe": _none,
    "llama4": _llama4,
    "mistral3": _none,
    "gemma4": _gemma4,
    "minimax-m2": _none,
    "nemotron_h": _nemotron_h,
    "nemotron_h_moe": _nemotron_h,
    "deepseek4": _deepseek4,
}


def is_supported(arch: str) -> bool:
    return arch in _LAYOUTS


def arch_layout(arch: str, keys: Keys, hp: Hparams) -> ArchLayout:
    """The quirks of a supported arch; unknown archs get none (the caller labels that a guess)."""
    return _LAYOUTS.get(arch, _none)(keys, hp)


def head_dims(arch: str, keys: Keys, hp: Hparams) -> tuple[int, int]:
    """(key_length, value_length) per head; llama.cpp defaults both to n_embd / n_head."""
    n_head = max(hp.n_head, default=0)
    default = hp.n_embd // n_head if n_head else 0
    return keys.number("attention.key_length", default), keys.number("attention.value_length", default)


def top_level_role(arch: str, name: str) -> str:
    """'input', 'output', 'per_device' or 'first_block' for a tensor outside the blocks ('output' if
    unknown)."""
    base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    if arch == "lfm2" and base == "token_embd_norm":
        return "output"  # LLM_TENSOR_OUTPUT_NORM_LFM2: the name is a historical mistake
    if base in FIRST_BLOCK_TENSORS:
        return "first_block"
    if base in INPUT_TENSORS:
        return "input"
    if base in PER_DEVICE_TENSORS:
        return "per_device"
    return "output"  # conservative: the output slot is on a device, never free
