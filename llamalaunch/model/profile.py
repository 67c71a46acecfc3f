"""ModelProfile: everything the planner needs from a GGUF header, never the tensor data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertPart:
    """One kind of routed-expert tensor of a block (`ffn_down_exps`: its weight and bias), padded bytes."""

    name: str
    bytes: int
    cuda_extra_bytes: int = 0

    def size(self, backend: str) -> int:
        return self.bytes + (self.cuda_extra_bytes if backend == "CUDA" else 0)


@dataclass(frozen=True)
class SlotWeights:
    """Weight bytes of one slot (a block, or the output slot), padded as llama.cpp pads them."""

    bytes: int
    cuda_extra_bytes: int = 0  # one padding row per quantized tensor with ne0 % 512 != 0, on CUDA only
    expert_bytes: int = 0  # part of `bytes` in MoE expert tensors (what `-ot exps=CPU` would move)
    expert_cuda_extra_bytes: int = 0  # part of `cuda_extra_bytes` in those expert tensors
    expert_parts: tuple[ExpertPart, ...] = ()  # the expert bytes by tensor kind, largest first

    def parts_bytes(self, kinds: frozenset[str], backend: str) -> int:
        """Bytes of these expert tensor kinds in a buffer of `backend`."""
        return sum(part.size(backend) for part in self.expert_parts if part.name in kinds)

    def dense_bytes(self, backend: str) -> int:
        """What stays on a device of `backend` when this slot's routed experts live on the host."""
        return self.bytes - self.expert_bytes + (
            self.cuda_extra_bytes - self.expert_cuda_extra_bytes if backend == "CUDA" else 0)

    def full_bytes(self, backend: str) -> int:
        return self.bytes + (self.cuda_extra_bytes if backend == "CUDA" else 0)


@dataclass(frozen=True)
class GraphDetails:
    """Header facts only the compute-buffer replay reads; its ModelSpec (ggml/graphs/base.py) extends this
    class, so each is named and defaulted once (a profile built by hand, without a file, gets the defaults)."""

    tensors: frozenset[str] = field(default=frozenset(), repr=False)  # every part's tensor names
    expert_types: tuple[str, str, str] | None = None  # up, gate, down routed-expert types, widest of each
    n_lora_kv: int = 0
    q_lora_rank: int = 0
    head_dim_k_mla: int = 0
    head_dim_v_mla: int = 0
    n_layer_dense_lead: int = 0
    n_expert_shared: int = 0
    expert_gating_sigmoid: bool = False
    expert_weights_norm: bool = True
    expert_weights_scale: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_n_group: int = 1
    ssm_dt_rank: int = 0
    shortconv_l_cache: int = 0
    n_ff_shexp: int = 0
    n_embd_per_layer: int = 0
    mrope: bool = False
    ffn_layers: tuple[bool, ...] = ()  # nemotron_h: FFN-only blocks
    moe_layers: tuple[bool, ...] = ()  # llama4: blocks with experts
    n_hash_layers: int = 0  # deepseek4
    hc_mult: int = 0
    o_groups: int = 0
    o_lora_rank: int = 0
    indexer_n_head: int = 0
    indexer_top_k: int = 0
    names_sliding_window: bool = False  # {arch}.attention.sliding_window(_pattern) is set (generic archs)


@dataclass(frozen=True)
class ModelProfile:
    """Shape and sizes of a model. Per-layer tuples have one entry per block (n_layer)."""

    path: str
    shard_paths: tuple[str, ...]
    arch: str
    name: str
    file_type: str
    file_bytes: int
    n_layer: int
    slots: tuple[SlotWeights, ...]  # n_layer + 1 entries; the last is the output slot
    host_bytes: int  # token_embd and the rest that always stays in host memory
    output_is_token_embd: bool  # no output.weight: the output slot holds a copy of token_embd
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_ff: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_swa: int  # sliding window length; 0 when the model has none
    swa_layers: tuple[bool, ...]
    kv_lora_rank: int  # MLA: K/V stored compressed; 0 otherwise
    rope_dim: int  # MLA rope part of the key
    recurrent_layers: tuple[bool, ...]  # layers with a recurrent state instead of a KV cache
    recurrent_r_bytes_per_seq: int  # conv state per layer and sequence (f32)
    recurrent_s_bytes_per_seq: int  # ssm state per layer and sequence (f32)
    n_expert: int
    n_expert_used: int
    n_embd_out: int = 0  # 0: same as n_embd
    generic_estimate: bool = False  # arch unknown to llamalaunch: hparams guessed from generic keys
    per_device_bytes: int = 0  # rope_freqs & co.: one copy on every device that holds a block
    n_nextn_layers: int = 0  # the last blocks are NextN/MTP layers ({arch}.nextn_predict_layers)
    n_ff_exp: int = 0  # MoE: feed-forward length of one expert
    head_dim_k_swa: int = 0  # sliding-window layers' head sizes when they differ (gemma4); 0: the same
    head_dim_v_swa: int = 0
    n_kv_shared_layers: int = 0  # the last blocks reuse earlier blocks' cache (gemma4 shared_kv_layers)
    compress_ratios: tuple[int, ...] = ()  # deepseek4: compressed-cache ratio per block (0, 4 or 128)
    indexer_head_dim: int = 0  # deepseek4: the lightning indexer's key length
    graph: GraphDetails = GraphDetails()  # what the compute-buffer replay reads besides the above

    def layer_head_dims(self, il: int) -> tuple[int, int]:
        """(K, V) head size of block `il` (llama_hparams::n_embd_head_k/v(il))."""
        if self.head_dim_k_swa and self.swa_layers[il]:
            return self.head_dim_k_swa, self.head_dim_v_swa or self.head_dim_k_swa
        return self.head_dim_k, self.head_dim_v

    @property
    def expert_layers(self) -> tuple[int, ...]:
        """Blocks with routed-expert tensors: the ones whose experts a plan may leave on the host."""
        return tuple(il for il in range(self.n_layer) if self.slots[il].expert_bytes)

    @property
    def n_slots(self) -> int:
        return self.n_layer + 1

    @property
    def output_slot(self) -> int:
        return self.n_layer
