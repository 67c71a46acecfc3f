"""llama.cpp's worst-case graphs, rebuilt op for op on ggml_sim tensors.

Each builder follows its src/models/<arch>.cpp and the shared helpers of src/llama-graph.cpp
(build_inp_embd, build_norm, build_qkv, build_attn, build_attn_mha, build_ffn, build_moe_ffn), with
the same ggml_build_forward_expand calls, so the node order — which decides what ggml-alloc can reuse —
is llama.cpp's. Only shapes matter: weights are pre-allocated leafs on the backend of their layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from llamalaunch.model import ggml_sim as g
from llamalaunch.model.ggml_sim import Tensor


@dataclass(frozen=True)
class ModelSpec:
    """The hparams the graph builders read (llama_hparams), per arch."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    n_ff: tuple[int, ...]
    n_vocab: int
    swa_layers: tuple[bool, ...]
    recurrent_layers: tuple[bool, ...]
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_expert_shared: int = 0
    n_layer_dense_lead: int = 0
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    head_dim_k_mla: int = 0  # deepseek2: per-head K/V lengths after decompression
    head_dim_v_mla: int = 0
    n_lora_kv: int = 0  # deepseek2's kv_lora_rank, also when the cache is not MLA
    tied_output: bool = False
    weight_type: str = "q8_0"  # matmul weights (only their size matters, when op offload copies them)
    embd_type: str = "q8_0"
    tensors: frozenset[str] = frozenset()  # tensor names in the file; empty: assume the arch's usual set
    expert_types: tuple[str, str, str] | None = None  # up, gate, down routed-expert types (op offload copies them)
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
    n_ff_shexp: int = 0  # shared-expert FFN length (qwen3next family)
    mrope: bool = False  # multi-section RoPE (qwen35, glm4moe with rope sections)
    moe_layers: tuple[bool, ...] = ()  # layers with experts when not all have them (llama4)
    head_dim_k_swa: int = 0  # gemma4: sliding-window layers have their own head size
    head_dim_v_swa: int = 0
    n_embd_per_layer: int = 0  # gemma4 per-layer embeddings
    kv_source: tuple[int, ...] = ()  # gemma4 shared KV: the block whose cache each block attends
    ffn_layers: tuple[bool, ...] = ()  # nemotron_h: FFN-only blocks
    compress_ratios: tuple[int, ...] = ()  # deepseek4 (deepseek4_graph.py): compressed caches per block
    n_hash_layers: int = 0  # deepseek4: the first blocks route experts by token id
    hc_mult: int = 0  # deepseek4: hyper-connection copies of the residual stream
    o_groups: int = 0  # deepseek4: grouped low-rank output projection
    o_lora_rank: int = 0
    indexer_n_head: int = 0  # deepseek4: the lightning indexer of the ratio-4 blocks
    indexer_head_dim: int = 0
    indexer_top_k: int = 0
    generic: bool = False  # an arch without an exact graph, replayed as a (superset) llama graph
    generic_iswa: bool = False  # ... whose file names a sliding window

    def hd(self, il: int) -> tuple[int, int]:
        """(K, V) head size of layer `il`."""
        if self.head_dim_k_swa and self.swa_layers and self.swa_layers[il]:
            return self.head_dim_k_swa, self.head_dim_v_swa or self.head_dim_k_swa
        return self.head_dim_k, self.head_dim_v

    def has(self, name: str, default: bool) -> bool:
        """Whether the file has tensor `name` (the arch's usual answer when the table is unknown)."""
        return name in self.tensors if self.tensors else default


@dataclass(frozen=True)
class Reserve:
    """One graph_reserve(): the ubatch, the memory context, and where each layer lives."""

    n_tokens: int
    n_seqs: int
    n_outputs: int
    n_kv: int  # cells per stream of the full-attention cache
    n_kv_swa: int  # cells per stream of the sliding-window cache
    n_stream: int
    flash_attn: bool
    type_k: str
    type_v: str
    layer_backend: tuple[int, ...]  # backend index holding each block's weights and cache
    output_backend: int
    cpu_backend: int
    full_offload: bool
    host_expert_layers: frozenset[int] = frozenset()  # blocks whose routed experts stay in host memory
    host_expert_parts: frozenset[tuple[int, str]] = frozenset()  # (block, expert kind) in host memory


class Builder:
    """llm_graph_context: the shared pieces; arch subclasses write `build()`."""

    def __init__(self, spec: ModelSpec, res: Reserve) -> None:
        self.spec = spec
        self.res = res
        self.gf = g.Graph()
        self.assigned: dict[int, int] = {}  # ggml_backend_sched_set_tensor_backend
        self.n_tokens = res.n_tokens
        self.inp_pos: Tensor | None = None
        self.kv_inputs: dict[bool, tuple[Tensor, Tensor, Tensor]] = {}
        self.rot: dict[bool, tuple[Tensor | None, Tensor | None]] = {}
        self.iswa = any(spec.swa_layers)
        self.caches: dict[tuple[int, str], Tensor] = {}
        self.layers: tuple[int, ...] = tuple(range(spec.n_layer))  # blocks to replay (compute.py skips repeats)

    # -- weights and inputs --
    def w(self, il: int, *ne: int, type_name: str | None = None) -> Tensor:
        backend = self.res.output_backend if il < 0 else self.res.layer_backend[il]
        return g.weight(type_name or self.spec.weight_type, *ne, backend=backend)

    def expert_w(self, il: int, kind: str, *ne: int, type_name: str | None = None) -> Tensor:
        """A routed-expert tensor (`ffn_up_exps`, ...): on its layer's device, or in host memory when the
        plan left its block's experts, or this kind of them, there."""
        res = self.res
        on_host = il in res.host_expert_layers or (il, kind) in res.host_expert_parts
        backend = res.cpu_backend if on_host else res.layer_backend[il]
        return g.weight(type_name or self.spec.weight_type, *ne, backend=backend)

    def norm_w(self, il: int, n: int | None = None) -> Tensor:
        return self.w(il, n or self.spec.n_embd, type_name="f32")

    def cb_norm(self, tensor: Tensor, il: int) -> None:
        """llama_context::graph_get_cb: with full offload a layer's "norm" runs on the layer's device."""
        if il >= 0 and self.res.full_offload:
            self.assigned[tensor.id] = self.res.layer_backend[il]

    def build_inp_embd(self) -> Tensor:
        spec = self.spec
        tok_embd = g.weight(spec.embd_type, spec.n_embd, spec.n_vocab, backend=self.res.cpu_backend)
        tokens = g.new_input("i32", self.n_tokens, name="inp_tokens")
        embd = g.new_input("f32", spec.n_embd, self.n_tokens, name="inp_embd")
        cur = g.get_rows(tok_embd, tokens)
        self.gf.expand(cur)
        self.gf.expand(embd)  # ggml_build_forward_select keeps both inputs in the graph
        return cur

    def build_inp_pos(self) -> Tensor:
        # M-RoPE archs hold 4 positions per token (llama_hparams::n_pos_per_embd)
        self.inp_pos = g.new_input("i32", self.n_tokens * (4 if self.spec.mrope else 1), name="inp_pos")
        return self.inp_pos

    def build_inp_out_ids(self) -> Tensor:
        return g.new_input("i32", self.res.n_outputs, name="out_ids")

    def build_attn_inp_kv(self, swa: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        res = self.res
        if swa not in self.kv_inputs:
            k_idxs = g.new_input("i64", self.n_tokens, name="attn_inp_k_idxs")
            v_len = self.n_tokens if res.flash_attn else self.n_tokens * self.n_embd_v_gqa_max()
            v_idxs = g.new_input("i64", v_len, name="attn_inp_v_idxs")
            n_kv = res.n_kv_swa if swa else res.n_kv
            mask = g.new_input("f16" if res.flash_attn else "f32", n_kv, self.n_tokens // res.n_stream, 1,
                               res.n_stream, name="attn_inp_kq_mask")
            self.kv_inputs[swa] = (k_idxs, v_idxs, mask)
            self.rot[swa] = self._build_rot_inputs(swa)
        return self.kv_inputs[swa]

    def _cache_head_dims(self, swa: bool) -> tuple[int, int]:
        """n_embd_head_k_all / n_embd_head_v_all of one cache: the layers' common head size, -1 if mixed."""
        spec = self.spec
        dims = {spec.hd(il) for il in range(spec.n_layer)
                if not (spec.recurrent_layers and spec.recurrent_layers[il])
                and (not self.iswa or bool(spec.swa_layers[il]) == swa)}
        ks, vs = {k for k, _ in dims}, {v for _, v in dims}
        return (ks.pop() if len(ks) == 1 else -1), (vs.pop() if len(vs) == 1 else -1)

    def _build_rot_inputs(self, swa: bool = False) -> tuple[Tensor | None, Tensor | None]:
        """llama_kv_cache::build_input_k_rot/v_rot: Hadamard rotations for a quantized cache."""
        spec, res = self.spec, self.res
        k_rot = v_rot = None
        k_all, v_all = self._cache_head_dims(swa)
        if g.type_block(res.type_k)[0] > 1 and k_all > 0 and spec.head_dim_k % 64 == 0 and not spec.kv_lora_rank:
            nrot = 64
            while k_all % (nrot * 2) == 0:
                nrot *= 2
            k_rot = g.new_input("f32", nrot, nrot, name="attn_inp_k_rot")
        if g.type_block(res.type_v)[0] > 1 and v_all > 0 and spec.head_dim_v % 64 == 0 and not spec.kv_lora_rank:
            v_rot = g.new_input("f32", 64, 64, name="attn_inp_v_rot")
        return k_rot, v_rot

    def n_embd_v_gqa_max(self) -> int:
        spec = self.spec
        return max(spec.hd(il)[1] * n for il, n in enumerate(spec.n_head_kv))

    # -- norm, qkv, ffn --
    def build_norm(self, cur: Tensor, mw: Tensor | None, il: int, rms: bool = True,
                   mb: Tensor | None = None) -> Tensor:
        cur = g.rms_norm(cur) if rms else g.norm(cur)
        if mw is not None or mb is not None:
            self.cb_norm(cur, il)
        if mw is not None:
            cur = g.mul(cur, mw)
        if mb is not None:
            cur = g.add(cur, mb)
        return cur

    def build_qkv(self, cur: Tensor, il: int, bias: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        spec = self.spec
        hd_k, hd_v = spec.hd(il)
        n_q, n_k, n_v = hd_k * spec.n_head[il], hd_k * spec.n_head_kv[il], hd_v * spec.n_head_kv[il]
        out = []
        for width in (n_q, n_k, n_v):
            t = g.mul_mat(self.w(il, spec.n_embd, width), cur)
            if bias:
                t = g.add(t, self.w(il, width, type_name="f32"))
            out.append(t)
        q = g.reshape(out[0], hd_k, spec.n_head[il], self.n_tokens)
        k = g.reshape(out[1], hd_k, spec.n_head_kv[il], self.n_tokens)
        v = g.reshape(out[2], hd_v, spec.n_head_kv[il], self.n_tokens)
        return q, k, v

    def build_ffn_par(self, cur: Tensor, il: int, n_ff: int, gelu: bool = False) -> Tensor:
        """build_ffn(up, gate, down, SILU|GELU, PAR): up, gate, fused glu, down."""
        n_embd = self.spec.n_embd
        tmp = g.mul_mat(self.w(il, n_embd, n_ff), cur)
        cur = g.mul_mat(self.w(il, n_embd, n_ff), cur)
        cur = g.glu(cur, tmp)
        return g.mul_mat(self.w(il, n_ff, n_embd), cur)

    # -- attention --
    def cache(self, il: int, which: str, swa: bool) -> Tensor:
        key = (il, which)
        if key not in self.caches:
            spec, res = self.spec, self.res
            n_kv = res.n_kv_swa if swa else res.n_kv
            if which == "k":
                width = spec.kv_lora_rank + spec.n_rot if spec.kv_lora_rank else spec.hd(il)[0] * spec.n_head_kv[il]
                type_name = res.type_k
            else:
                width = spec.hd(il)[1] * spec.n_head_kv[il] if res.flash_attn else self.n_embd_v_gqa_max()
                type_name = res.type_v
            self.caches[key] = g.cache(type_name, width, n_kv, res.n_stream, backend=self.res.layer_backend[il])
        return self.caches[key]

    def hadamard(self, cur: Tensor, rot: Tensor) -> Tensor:
        n = rot.ne[0]
        res = g.cont(cur, n, cur.nelements() // n) if not is_contiguous(cur) else g.reshape(
            cur, n, cur.nelements() // n)
        res = g.mul_mat(rot, res)
        return g.reshape(res, *cur.ne)

    def build_attn(self, q: Tensor, k: Tensor, v: Tensor | None, wo: Tensor | None, il: int,
                   wo_b: Tensor | None = None, v_mla: Tensor | None = None, soft_cap: bool = False,
                   sinks: Tensor | None = None) -> Tensor:
        """build_attn(llm_graph_input_attn_kv*): store K/V in the cache, attend, project."""
        swa = self.spec.swa_layers[il] if self.spec.swa_layers else False
        k_idxs, v_idxs, mask = self.build_attn_inp_kv(swa)
        k_rot, v_rot = self.rot[swa] if v is not None else (None, None)
        if k_rot is not None:
            q = self.hadamard(q, k_rot)
            k = self.hadamard(k, k_rot)
        if v_rot is not None and v is not None:
            v = self.hadamard(v, v_rot)
        order = (q, k, v) if self.iswa else (q, v, k)  # build_attn(kv_iswa) expands k before v
        for tensor in order:
            if tensor is not None:
                self.gf.expand(tensor)
        self.gf.expand(self.cpy_k(k, k_idxs, il, swa))
        if v is not None:
            self.gf.expand(self.cpy_v(v, v_idxs, il, swa))
        k_view = self.get_k(il, swa)
        v_view = self.get_v(il, swa) if v is not None else self.mla_v_view(k_view)
        cur = self.build_attn_mha(q, k_view, v_view, mask, v_mla, soft_cap, sinks)
        if v_rot is not None:
            cur = self.hadamard(cur, v_rot)
        if wo is not None:
            cur = g.mul_mat(wo, cur)
        if wo_b is not None:
            cur = g.add(cur, wo_b)
        return cur

    def mla_v_view(self, k_view: Tensor) -> Tensor:
        rank = self.spec.n_lora_kv
        return g.view_4d(k_view, rank, k_view.ne[1], k_view.ne[2], k_view.ne[3], k_view.nb[1], k_view.nb[2],
                         k_view.nb[3], 0)

    def cpy_k(self, k_cur: Tensor, k_idxs: Tensor, il: int, swa: bool) -> Tensor:
        cache = self.cache(il, "k", swa)
        n_embd_gqa = k_cur.ne[0] * k_cur.ne[1]
        k_cur = g.view_2d(k_cur, n_embd_gqa, k_cur.ne[2], k_cur.nb[2], 0)
        if cache.ne[2] > 1:
            cache = g.reshape(cache, n_embd_gqa, cache.ne[1] * cache.ne[2])
        return g.set_rows(cache, k_cur, k_idxs)

    def cpy_v(self, v_cur: Tensor, v_idxs: Tensor, il: int, swa: bool) -> Tensor:
        cache = self.cache(il, "v", swa)
        n_embd_gqa = v_cur.ne[0] * v_cur.ne[1]
        if self.res.flash_attn:
            v_cur = g.view_2d(v_cur, n_embd_gqa, v_cur.ne[2], v_cur.nb[2], 0)
            if cache.ne[2] > 1:
                cache = g.reshape(cache, n_embd_gqa, cache.ne[1] * cache.ne[2])
            return g.set_rows(cache, v_cur, v_idxs)
        if g.row_size(v_cur.type, n_embd_gqa) == v_cur.nb[2]:
            v_cur = g.reshape(v_cur, n_embd_gqa, v_cur.ne[2])
        else:
            v_cur = g.cont(v_cur, n_embd_gqa, v_cur.ne[2])
        if n_embd_gqa < cache.ne[0]:
            v_cur = g.pad(v_cur, cache.ne[0] - n_embd_gqa)
        view = g.reshape(cache, 1, cache.nelements())
        v_cur = g.reshape(v_cur, 1, v_cur.nelements())
        return g.set_rows(view, v_cur, v_idxs)

    def get_k(self, il: int, swa: bool) -> Tensor:
        cache = self.cache(il, "k", swa)
        spec = self.spec
        kv_size, width = cache.ne[1], cache.ne[0]
        head, n_head = (width, 1) if spec.kv_lora_rank else (spec.hd(il)[0], spec.n_head_kv[il])
        n_kv = self.res.n_kv_swa if swa else self.res.n_kv
        return g.view_4d(cache, head, n_head, n_kv, cache.ne[2], g.row_size(cache.type, head),
                         g.row_size(cache.type, width), g.row_size(cache.type, width * kv_size), 0)

    def get_v(self, il: int, swa: bool) -> Tensor:
        cache = self.cache(il, "v", swa)
        spec = self.spec
        kv_size, width = cache.ne[1], cache.ne[0]
        n_kv = self.res.n_kv_swa if swa else self.res.n_kv
        hd, n_head = spec.hd(il)[1], spec.n_head_kv[il]
        if self.res.flash_attn:
            return g.view_4d(cache, hd, n_head, n_kv, cache.ne[2], g.row_size(cache.type, hd),
                             g.row_size(cache.type, width), g.row_size(cache.type, width * kv_size), 0)
        return g.view_4d(cache, n_kv, n_head, hd, cache.ne[2], g.row_size(cache.type, kv_size * hd),
                         g.row_size(cache.type, kv_size), g.row_size(cache.type, kv_size * width), 0)

    def build_attn_mha(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, v_mla: Tensor | None,
                       soft_cap: bool, sinks: Tensor | None = None) -> Tensor:
        v_trans = v.nb[1] > v.nb[2]
        n_stream = k.ne[3]
        q = g.view_4d(q, q.ne[0], q.ne[1], q.ne[2] // n_stream, n_stream, q.nb[1], q.nb[2],
                      q.nb[2] * (q.ne[2] // n_stream), 0)
        q = g.permute(q, 0, 2, 1, 3)
        k = g.permute(k, 0, 2, 1, 3)
        v = g.permute(v, 0, 2, 1, 3)
        if self.res.flash_attn:
            if v_trans:
                v = g.transpose(v)
            cur = g.flash_attn_ext(q, k, v, mask, sinks)
            if v_mla is not None:
                cur = g.permute(cur, 0, 2, 1, 3)
                cur = g.mul_mat(v_mla, cur)
                cur = g.permute(cur, 0, 2, 1, 3)
                cur = g.cont(cur)
            cur = g.reshape(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])
        else:
            kq = g.mul_mat(k, q)
            if soft_cap:
                kq = g.unary(g.scale(kq))
                kq = g.scale(kq)
            kq = g.soft_max(kq, mask)
            if sinks is not None:  # ggml_soft_max_add_sinks: one more source, no new tensor
                kq.src = (*kq.src, sinks)
            if not v_trans:
                v = g.cont(g.transpose(v))
            kqv = g.mul_mat(v, kq)
            if v_mla is not None:
                kqv = g.mul_mat(v_mla, kqv)
            cur = g.permute(kqv, 0, 2, 1, 3)
            cur = g.cont(cur, cur.ne[0] * cur.ne[1], cur.ne[2] * cur.ne[3])
        self.gf.expand(cur)
        return cur

    # -- the head --
    def build_output(self, cur: Tensor, il_norm: int = -1) -> Tensor:
        spec = self.spec
        cur = self.build_norm(cur, self.norm_w(-1), il_norm)
        cur.flags |= g.FLAG_OUTPUT  # res->t_embd
        logits = g.mul_mat(self.w(-1, spec.n_embd, spec.n_vocab, type_name=spec.embd_type
                                  if spec.tied_output else None), cur)
        logits.flags |= g.FLAG_OUTPUT  # res->t_logits
        self.gf.expand(logits)
        return logits

    def build(self) -> None:
        raise NotImplementedError


def is_contiguous(t: Tensor) -> bool:
    block, size = g.type_block(t.type)
    next_nb = size
    if t.ne[0] != block and t.nb[0] != next_nb:
        return False
    next_nb *= t.ne[0] // block
    for i in (1, 2, 3):
        if t.ne[i] != 1:
            if t.nb[i] != next_nb:
                return False
            next_nb *= t.ne[i]
    return True


class LlamaGraph(Builder):
    """llama_model_llama::graph (also mistral-style MoE with ffn_gate_inp)."""

    qkv_bias = False
    qk_norm = False

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        self.build_attn_inp_kv()
        if spec.generic_iswa:  # an unknown arch with a sliding window may hold a second mask (kv_iswa)
            self.build_attn_inp_kv(True)
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            q, k, v = self.build_qkv(cur, il, bias=self.qkv_bias)
            if self.qk_norm:
                q = self.build_norm(q, self.norm_w(il, spec.head_dim_k), il)
                k = self.build_norm(k, self.norm_w(il, spec.head_dim_k), il)
            q = g.rope(q, inp_pos)
            k = g.rope(k, inp_pos)
            cur = self.build_attn(q, k, v, self.w(il, spec.head_dim_k * spec.n_head[il], spec.n_embd), il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_sa = g.get_rows(inp_sa, out_ids)
            ffn_inp = g.add(cur, inp_sa)
            cur = self.build_norm(ffn_inp, self.norm_w(il), il)
            if spec.n_expert and spec.generic and spec.n_ff[il]:
                # an unknown MoE arch may mix dense, routed and shared FFNs: plan for all of them
                cur = g.add(self.build_moe(cur, il), self.build_ffn_par(cur, il, spec.n_ff[il]))
            else:
                cur = self.build_moe(cur, il) if spec.n_expert else self.build_ffn_par(cur, il, spec.n_ff[il])
            inp_l = g.add(cur, ffn_inp)
        self.build_output(inp_l)

    def build_moe(self, cur: Tensor, il: int, n_ff_exp: int | None = None, weights_norm: bool = True,
                  sigmoid: bool = False) -> Tensor:
        return build_moe_ffn(self, cur, il, n_ff_exp or self.spec.n_ff_exp or self.spec.n_ff[il],
                             weights_norm, sigmoid)


def build_moe_ffn(b: Builder, cur: Tensor, il: int, n_ff: int, weights_norm: bool, sigmoid: bool,
                  probs_bias: bool = False, w_scale: bool = False, biases: bool = False,
                  softmax_weight: bool = False, weight_before_ffn: bool = False, gate: bool = True,
                  logits: Tensor | None = None, relu_sqr: bool = False, sqrt_softplus: bool = False,
                  selected_in: Tensor | None = None) -> Tensor:
    """llm_graph_context::build_moe_ffn: softmax, sigmoid or softmax-of-selected (gpt-oss) gating, optional
    router and expert biases (gpt-oss), weights applied before the experts (llama4); sqrt(softplus) gating and
    experts chosen by the caller (deepseek4's hash routing)."""
    spec = b.spec
    n_embd, n_expert, n_used, n_tokens = spec.n_embd, spec.n_expert, spec.n_expert_used, cur.ne[1]
    if logits is None:  # gemma4 passes its own router logits (probs_in)
        logits = g.mul_mat(b.w(il, n_embd, n_expert), cur)
    if biases:
        logits = g.add(logits, b.w(il, n_expert, type_name="f32"))
    if sqrt_softplus:
        probs = g.Tensor(logits.type, logits.ne, "SQRT", (g.unary(logits),))
    else:
        probs = logits if softmax_weight else g.unary(logits) if sigmoid else g.soft_max(logits)
    selection = g.add(probs, b.w(il, n_expert, type_name="f32")) if probs_bias else probs
    if weight_before_ffn:  # llama4 selects on the raw logits
        selection = logits
    selected = selected_in if selected_in is not None else g.argsort_top_k(selection, n_used)
    weights = g.get_rows(g.reshape(probs, 1, n_expert, n_tokens), selected)
    if softmax_weight:
        weights = g.reshape(g.soft_max(g.reshape(weights, n_used, n_tokens)), 1, n_used, n_tokens)
    if weights_norm:
        weights = g.reshape(weights, n_used, n_tokens)
        weights_sum = g.clamp(g.sum_rows(weights))
        weights = g.div(weights, weights_sum)
        weights = g.reshape(weights, 1, n_used, n_tokens)
    if w_scale:
        weights = g.scale(weights)
    b.gf.expand(weights)
    cur = g.reshape(cur, n_embd, 1, n_tokens)
    if weight_before_ffn:
        cur = g.mul(g.repeat(cur, g.Tensor("f32", (n_embd, n_used, n_tokens))), weights)

    def add_id(t: Tensor, kind: str, width: int) -> Tensor:
        return g.Tensor(t.type, t.ne, "ADD_ID", (t, b.expert_w(il, kind, width, n_expert, type_name="f32"), selected))

    up_type, gate_type, down_type = spec.expert_types or (None, None, None)
    up = g.mul_mat_id(b.expert_w(il, "ffn_up_exps", n_embd, n_ff, n_expert, type_name=up_type), cur, selected)
    if biases:
        up = add_id(up, "ffn_up_exps", n_ff)
    if gate:
        cur = g.mul_mat_id(b.expert_w(il, "ffn_gate_exps", n_embd, n_ff, n_expert, type_name=gate_type), cur,
                           selected)
        if biases:
            cur = add_id(cur, "ffn_gate_exps", n_ff)
        par = g.glu(cur, up)
    else:
        par = g.sqr(g.unary(up)) if relu_sqr else g.unary(up)
    experts = g.mul_mat_id(b.expert_w(il, "ffn_down_exps", n_ff, n_embd, n_expert, type_name=down_type), par,
                           selected)
    if biases:
        experts = add_id(experts, "ffn_down_exps", n_embd)
    if not weight_before_ffn:
        experts = g.mul(experts, weights)
    b.gf.expand(experts)
    views = [g.view_2d(experts, n_embd, n_tokens, experts.nb[2], i * experts.nb[1]) for i in range(n_used)]
    for view in views:
        b.gf.expand(view)
    moe_out = views[0]
    for view in views[1:]:
        moe_out = g.add(moe_out, view)
        b.gf.expand(moe_out)
    return g.cont(moe_out) if n_used == 1 else moe_out


class Qwen2Graph(LlamaGraph):
    qkv_bias = True


class Qwen3Graph(LlamaGraph):
    qk_norm = True


class GemmaGraph(Builder):
    """gemma2 / gemma3: scaled embeddings, post-attention and post-FFN norms, GELU, soft-capping."""

    def build(self) -> None:
        spec = self.spec
        qk_norm = spec.arch == "gemma3"
        inp_l = g.scale(self.build_inp_embd())
        inp_pos = self.build_inp_pos()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            q, k, v = self.build_qkv(cur, il)
            if qk_norm:
                q = self.build_norm(q, self.norm_w(il, spec.head_dim_k), il)
            q = g.rope(q, inp_pos)
            if qk_norm:
                k = self.build_norm(k, self.norm_w(il, spec.head_dim_k), il)
            k = g.rope(k, inp_pos)
            q = g.scale(q)
            cur = self.build_attn(q, k, v, self.w(il, spec.head_dim_k * spec.n_head[il], spec.n_embd), il,
                                  soft_cap=spec.attn_softcap)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_l = g.get_rows(inp_l, out_ids)
            cur = self.build_norm(cur, self.norm_w(il), il)
            sa_out = g.add(cur, inp_l)
            cur = self.build_norm(sa_out, self.norm_w(il), il)
            cur = self.build_ffn_par(cur, il, spec.n_ff[il])
            cur = self.build_norm(cur, self.norm_w(il), -1)
            inp_l = g.add(cur, sa_out)
        cur = self.build_norm(inp_l, self.norm_w(-1), -1)
        cur.flags |= g.FLAG_OUTPUT
        logits = g.mul_mat(self.w(-1, spec.n_embd, spec.n_vocab, type_name=spec.embd_type), cur)
        if spec.final_softcap:
            logits = g.scale(g.unary(g.scale(logits)))
        logits.flags |= g.FLAG_OUTPUT
        self.gf.expand(logits)


class Phi3Graph(Builder):
    """phi3: fused QKV, fused gate+up (SWIGLU over one 2*n_ff matrix), Q scaled after RoPE."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            residual = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            q, k, v = self.build_qkv_fused(cur, il)
            q = g.scale(g.rope(q, inp_pos))
            k = g.rope(k, inp_pos)
            cur = self.build_attn(q, k, v, self.w(il, spec.n_embd, spec.n_embd), il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                residual = g.get_rows(residual, out_ids)
            cur = g.add(cur, residual)
            residual = cur
            cur = self.build_norm(cur, self.norm_w(il), il)
            up = g.mul_mat(self.w(il, spec.n_embd, 2 * spec.n_ff[il]), cur)
            cur = g.mul_mat(self.w(il, spec.n_ff[il], spec.n_embd), g.glu(up))
            inp_l = g.add(residual, cur)
        self.build_output(inp_l)

    def build_qkv_fused(self, cur: Tensor, il: int) -> tuple[Tensor, Tensor, Tensor]:
        spec = self.spec
        hd, n_head, n_kv = spec.head_dim_k, spec.n_head[il], spec.n_head_kv[il]
        qkv = g.mul_mat(self.w(il, spec.n_embd, hd * (n_head + 2 * n_kv)), cur)
        row = g.row_size(qkv.type, hd)
        q = g.view_3d(qkv, hd, n_head, self.n_tokens, row, qkv.nb[1], 0)
        k = g.view_3d(qkv, hd, n_kv, self.n_tokens, row, qkv.nb[1], g.row_size(qkv.type, hd * n_head))
        v = g.view_3d(qkv, hd, n_kv, self.n_tokens, row, qkv.nb[1], g.row_size(qkv.type, hd * (n_head + n_kv)))
        return q, k, v


class GptOssGraph(Builder):
    """gpt-oss (openai-moe.cpp): biased attention with sinks on alternating sliding-window layers, MoE with
    router and expert biases, softmax over the selected experts; the output rows are taken after the loop."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        self.build_attn_inp_kv(False)
        self.build_attn_inp_kv(True)
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            q, k, v = self.build_qkv(cur, il, bias=True)
            q, k = g.rope(q, inp_pos), g.rope(k, inp_pos)
            wo = self.w(il, spec.head_dim_k * spec.n_head[il], spec.n_embd)
            cur = self.build_attn(q, k, v, wo, il, wo_b=self.w(il, spec.n_embd, type_name="f32"),
                                  sinks=self.w(il, spec.n_head[il], type_name="f32"))
            ffn_inp = g.add(cur, inp_sa)
            cur = self.build_norm(ffn_inp, self.norm_w(il), il)
            cur = build_moe_ffn(self, cur, il, spec.n_ff_exp, weights_norm=False, sigmoid=False, biases=True,
                                softmax_weight=True)
            inp_l = g.add(cur, ffn_inp)
        self.build_output(g.get_rows(inp_l, out_ids))


class Glm4MoeGraph(LlamaGraph):
    """glm4moe: biased QKV (optional Q/K norms), dense lead layers, sigmoid-routed experts with a selection
    bias plus a shared expert, the post-attention norm in front of the FFN."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        self.build_attn_inp_kv()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            q, k, v = self.build_qkv(cur, il, bias=spec.has(f"blk.{il}.attn_q.bias", True))
            if spec.has(f"blk.{il}.attn_q_norm.weight", False):
                q = self.build_norm(q, self.norm_w(il, spec.head_dim_k), il)
                k = self.build_norm(k, self.norm_w(il, spec.head_dim_k), il)
            q, k = g.rope(q, inp_pos), g.rope(k, inp_pos)
            cur = self.build_attn(q, k, v, self.w(il, spec.head_dim_k * spec.n_head[il], spec.n_embd), il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_sa = g.get_rows(inp_sa, out_ids)
            ffn_inp = g.add(cur, inp_sa)
            cur = self.build_norm(ffn_inp, self.norm_w(il), il)
            if il < spec.n_layer_dense_lead:
                cur = self.build_ffn_par(cur, il, spec.n_ff[il])
            else:
                routed = build_moe_ffn(self, cur, il, spec.n_ff_exp, spec.expert_weights_norm, sigmoid=True,
                                       probs_bias=True, w_scale=spec.expert_weights_scale)
                shared = self.build_ffn_par(cur, il, spec.n_ff_exp * max(spec.n_expert_shared, 1))
                cur = g.add(routed, shared)
            inp_l = g.add(cur, ffn_inp)
        self.build_output(inp_l)


class Llama4Graph(Builder):
    """llama4: chunked attention on 3 of 4 layers (RoPE and L2-normed Q/K there, temperature-scaled Q on
    the others), MoE every `interleave_moe_layer_step` layers with the router weights applied before
    the experts, plus a shared expert."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        attn_scale = g.new_input("f32", 1, 1, self.n_tokens, name="inp_attn_scale")
        self.build_attn_inp_kv(False)
        if self.iswa:
            self.build_attn_inp_kv(True)
        out_ids = self.build_inp_out_ids()
        no_rope_step = spec.n_layer if not self.iswa else 4
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            q, k, v = self.build_qkv(cur, il)
            use_rope = (il + 1) % no_rope_step != 0
            if use_rope:
                q, k = g.rope(q, inp_pos), g.rope(k, inp_pos)
            else:
                q = g.mul(q, attn_scale)
            if use_rope and spec.n_expert != 128:  # use_kq_norm: every shape but the 128-expert one
                q, k = g.rms_norm(q), g.rms_norm(k)
            cur = self.build_attn(q, k, v, self.w(il, spec.head_dim_k * spec.n_head[il], spec.n_embd), il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_sa = g.get_rows(inp_sa, out_ids)
            ffn_inp = g.add(cur, inp_sa)
            cur = self.build_norm(ffn_inp, self.norm_w(il), il)
            if spec.moe_layers and spec.moe_layers[il]:
                routed = build_moe_ffn(self, cur, il, spec.n_ff_exp, weights_norm=False, sigmoid=True,
                                       weight_before_ffn=True)
                cur = g.add(routed, self.build_ffn_par(cur, il, spec.n_ff_exp))
            else:
                cur = self.build_ffn_par(cur, il, spec.n_ff[il])
            inp_l = g.add(cur, ffn_inp)
        self.build_output(inp_l)


class DeepSeek2Graph(LlamaGraph):
    """deepseek2: low-rank Q, compressed KV (MLA: cache the latent, absorb wk_b/wv_b), MoE with shared experts."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            cur = self.build_mla_attention(cur, inp_pos, il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_sa = g.get_rows(inp_sa, out_ids)
            ffn_inp = g.add(cur, inp_sa)
            cur = self.build_norm(ffn_inp, self.norm_w(il), il)
            if il < spec.n_layer_dense_lead:
                cur = self.build_ffn_par(cur, il, spec.n_ff[il])
            else:
                moe_out = build_moe_ffn(self, cur, il, spec.n_ff_exp, spec.expert_weights_norm,
                                        spec.expert_gating_sigmoid,
                                        probs_bias=spec.has(f"blk.{il}.exp_probs_b.bias", spec.expert_gating_sigmoid),
                                        w_scale=spec.expert_weights_scale)
                shared = self.build_ffn_par(cur, il, spec.n_ff_exp * max(spec.n_expert_shared, 1))
                cur = g.add(moe_out, shared)
            inp_l = g.add(cur, ffn_inp)
        self.build_output(inp_l)

    def build_mla_attention(self, cur: Tensor, inp_pos: Tensor, il: int) -> Tensor:
        spec, n_tokens = self.spec, self.n_tokens
        n_head, rope, rank = spec.n_head[il], spec.n_rot, spec.n_lora_kv
        head_k, head_v = spec.head_dim_k_mla, spec.head_dim_v_mla
        nope = head_k - rope
        if spec.q_lora_rank:
            q = g.mul_mat(self.w(il, spec.n_embd, spec.q_lora_rank), cur)
            q = self.build_norm(q, self.norm_w(il, spec.q_lora_rank), il)
            q = g.mul_mat(self.w(il, spec.q_lora_rank, n_head * head_k), q)
        else:
            q = g.mul_mat(self.w(il, spec.n_embd, n_head * head_k), cur)
        q = g.reshape(q, head_k, n_head, n_tokens)
        kv_pe = g.mul_mat(self.w(il, spec.n_embd, rank + rope), cur)
        stride = g.row_size(kv_pe.type, rank + rope)
        kv_cmpr = g.view_2d(kv_pe, rank, n_tokens, stride, 0)
        k_pe = g.view_3d(kv_pe, rope, 1, n_tokens, stride, stride, g.row_size(kv_pe.type, rank))
        k_pe = g.rope(k_pe, inp_pos)
        kv_cmpr = self.build_norm(kv_cmpr, self.norm_w(il, rank), il)
        wo = self.w(il, n_head * head_v, spec.n_embd)
        if spec.kv_lora_rank:  # MLA
            q_nope = g.view_3d(q, nope, n_head, n_tokens, q.nb[1], q.nb[2], 0)
            q_pe = g.view_3d(q, rope, n_head, n_tokens, q.nb[1], q.nb[2], g.row_size(q.type, nope))
            q_pe = g.rope(q_pe, inp_pos)
            q_nope = g.permute(q_nope, 0, 2, 1, 3)
            absorbed = g.permute(g.mul_mat(self.w(il, nope, rank, n_head), q_nope), 0, 2, 1, 3)
            q_cur = g.concat(absorbed, q_pe, 0)
            kv_cmpr = g.reshape(kv_cmpr, rank, 1, n_tokens)
            k_cur = g.concat(kv_cmpr, k_pe, 0)
            return self.build_attn_k(q_cur, k_cur, kv_cmpr, wo, il, self.w(il, rank, head_v, n_head))
        kv = g.mul_mat(self.w(il, rank, n_head * (nope + head_v)), kv_cmpr)
        row = g.row_size(kv.type, nope + head_v)
        k_nope = g.view_3d(kv, nope, n_head, n_tokens, row, row * n_head, 0)
        v_cur = g.cont(g.view_3d(kv, head_v, n_head, n_tokens, row, row * n_head, g.row_size(kv.type, nope)))
        q_cur = g.rope(q, inp_pos)
        k_cur = g.concat(k_nope, g.repeat(k_pe, g.Tensor("f32", (rope, n_head, n_tokens))), 0)
        return self.build_attn(q_cur, k_cur, v_cur, wo, il)

    def build_attn_k(self, q: Tensor, k: Tensor, v: Tensor, wo: Tensor, il: int, v_mla: Tensor) -> Tensor:
        """build_attn(llm_graph_input_attn_k*): only K is cached; V is a view of its first rank columns."""
        k_idxs, _, mask = self.build_attn_inp_kv(False)
        for tensor in (q, v, k):
            self.gf.expand(tensor)
        self.gf.expand(self.cpy_k(k, k_idxs, il, False))
        k_view = self.get_k(il, False)
        v_view = g.view_4d(k_view, v.ne[0], k_view.ne[1], k_view.ne[2], k_view.ne[3], k_view.nb[1], k_view.nb[2],
                           k_view.nb[3], 0)
        cur = self.build_attn_mha(q, k_view, v_view, mask, v_mla, False)
        return g.mul_mat(wo, cur)


class RecurrentBuilder(Builder):
    """Recurrent-state helpers: build_rs_inp and build_rs (llama-graph.cpp) over the state tensors."""

    def build_rs_inp(self) -> None:
        n_rs = self.res.n_seqs  # full-memory reservation: n_rs = the state size = max(1, n_seq_max)
        self.s_copy = g.new_input("i32", n_rs, name="rs_s_copy")
        self.s_copy_main = g.view_1d(self.s_copy, self.res.n_seqs, 0)
        self.s_copy_extra = g.view_1d(self.s_copy, n_rs - self.res.n_seqs, self.res.n_seqs * 4)

    def state(self, il: int, which: str, width: int) -> Tensor:
        key = (il, which)
        if key not in self.caches:
            self.caches[key] = g.cache("f32", width, self.res.n_seqs, backend=self.res.layer_backend[il])
        return self.caches[key]

    def build_rs(self, s: Tensor, state_size: int,
                 get_rows: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        n_seqs = self.res.n_seqs
        states = g.reshape(s, state_size, s.ne[1])
        zero = g.view_1d(states, state_size, 0)
        self.gf.expand(g.view_tensor(zero, "SCALE", (zero,)))
        out = (get_rows or g.get_rows)(states, self.s_copy_main)
        self.gf.expand(out)
        extra = g.get_rows(states, self.s_copy_extra)
        self.gf.expand(g.cpy(extra, g.view_2d(s, state_size, s.ne[1] - n_seqs, s.nb[1], n_seqs * s.nb[1])))
        return out

    def build_mamba2_layer(self, cur: Tensor, il: int) -> Tensor:
        spec, n_seqs = self.spec, self.res.n_seqs
        n_st = self.n_tokens // n_seqs
        d_conv, d_inner, d_state, n_group = spec.ssm_d_conv, spec.ssm_d_inner, spec.ssm_d_state, spec.ssm_n_group
        n_head = spec.ssm_dt_rank
        head_dim = d_inner // n_head
        conv_dim = d_inner + 2 * n_group * d_state
        conv_states = self.state(il, "r", (d_conv - 1) * conv_dim)
        ssm_states = self.state(il, "s", d_state * d_inner)
        conv = self.build_rs(conv_states, (d_conv - 1) * conv_dim)
        conv = g.reshape(conv, d_conv - 1, conv_dim, n_seqs)
        zx = g.mul_mat(self.w(il, spec.n_embd, 2 * d_inner + 2 * n_group * d_state + n_head), cur)
        zx = g.reshape(zx, zx.ne[0], n_st, n_seqs)
        z = g.view_4d(zx, head_dim, n_head, n_st, n_seqs, head_dim * zx.nb[0], zx.nb[1], zx.nb[2], 0)
        xbc = g.view_3d(zx, conv_dim, n_st, n_seqs, zx.nb[1], zx.nb[2], d_inner * 4)
        dt = g.view_3d(zx, n_head, n_st, n_seqs, zx.nb[1], zx.nb[2], (2 * d_inner + 2 * n_group * d_state) * 4)
        conv_x = g.concat(conv, g.transpose(xbc), 0)
        last = g.view_3d(conv_x, d_conv - 1, conv_dim, n_seqs, conv_x.nb[1], conv_x.nb[2], n_st * conv_x.nb[0])
        row = (d_conv - 1) * conv_dim * 4
        self.gf.expand(g.cpy(last, g.view_2d(conv_states, (d_conv - 1) * conv_dim, n_seqs, conv_states.nb[1], 0)))
        xbc = g.ssm_conv(conv_x, self.w(il, d_conv, conv_dim, type_name="f32"))
        xbc = g.unary(g.add(xbc, self.w(il, conv_dim, type_name="f32")))
        x = g.view_4d(xbc, head_dim, n_head, n_st, n_seqs, head_dim * xbc.nb[0], xbc.nb[1], xbc.nb[2], 0)
        b = g.view_4d(xbc, d_state, n_group, n_st, n_seqs, d_state * xbc.nb[0], xbc.nb[1], xbc.nb[2], d_inner * 4)
        c = g.view_4d(xbc, d_state, n_group, n_st, n_seqs, d_state * xbc.nb[0], xbc.nb[1], xbc.nb[2],
                      (d_inner + n_group * d_state) * 4)
        dt = g.add(g.cont(dt), self.w(il, n_head, type_name="f32"))
        a = self.w(il, 1, n_head, type_name="f32")

        def scan(states: Tensor, ids: Tensor) -> Tensor:
            ssm = g.reshape(states, d_state, head_dim, n_head, ssm_states.ne[1])
            result = Tensor("f32", (x.nelements() + d_state * head_dim * n_head * ids.ne[0],), "SSM_SCAN",
                            (ssm, x, dt, a, b, c, ids))
            return result

        y_ssm = self.build_rs(ssm_states, d_state * d_inner, scan)
        size = d_state * d_inner
        row = size * 4
        self.gf.expand(g.cpy(g.view_3d(y_ssm, size, n_seqs, 1, row, row * n_seqs, x.nelements() * 4),
                             g.view_3d(ssm_states, size, n_seqs, 1, ssm_states.nb[1], n_seqs * row, 0)))
        y = g.view_4d(y_ssm, head_dim, n_head, n_st, n_seqs, x.nb[1], n_head * x.nb[1], n_st * n_head * x.nb[1], 0)
        y = g.add(y, g.mul(x, self.w(il, 1, n_head, type_name="f32")))
        y = g.glu(g.cont(z), y)
        if self.spec.has(f"blk.{il}.ssm_norm.weight", True):
            y = g.reshape(y, d_inner // n_group, n_group, n_st, n_seqs)
            y = self.build_norm(y, self.w(il, d_inner // n_group, n_group, type_name="f32"), il)
        y = g.reshape(y, d_inner, n_st * n_seqs)
        return g.mul_mat(self.w(il, d_inner, spec.n_embd), y)


class Mamba2Graph(RecurrentBuilder):
    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        self.build_rs_inp()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            cur = self.build_mamba2_layer(cur, il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_l = g.get_rows(inp_l, out_ids)
            inp_l = g.add(cur, inp_l)
        self.build_output(inp_l)


class GraniteHybridGraph(RecurrentBuilder):
    """granitehybrid: mamba2 layers and attention layers (no RoPE when the file says so), dense FFN."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        self.build_rs_inp()
        self.build_attn_inp_kv()
        out_ids = self.build_inp_out_ids()
        inp_pos = self.build_inp_pos()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            if spec.recurrent_layers[il]:
                cur = self.build_mamba2_layer(cur, il)
            else:
                q, k, v = self.build_qkv(cur, il)
                q, k = g.rope(q, inp_pos), g.rope(k, inp_pos)
                cur = self.build_attn(q, k, v, self.w(il, spec.head_dim_k * spec.n_head[il], spec.n_embd), il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_sa = g.get_rows(inp_sa, out_ids)
            ffn_inp = g.add(cur, inp_sa)
            cur = self.build_norm(ffn_inp, self.norm_w(il), il)
            cur = self.build_ffn_par(cur, il, spec.n_ff[il])
            inp_l = g.add(cur, ffn_inp)
        self.build_output(inp_l)


class Lfm2Graph(RecurrentBuilder):
    """lfm2: short gated convolutions and attention layers with Q/K norms, dense FFN."""

    def build(self) -> None:
        spec = self.spec
        cur = self.build_inp_embd()
        self.build_rs_inp()
        self.build_attn_inp_kv()
        inp_pos = self.build_inp_pos()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            prev = cur
            cur = self.build_norm(cur, self.norm_w(il), il)
            if spec.recurrent_layers[il]:
                cur = self.build_shortconv(cur, il)
            else:
                q, k, v = self.build_qkv(cur, il)
                q = self.build_norm(q, self.norm_w(il, spec.head_dim_k), il)
                k = self.build_norm(k, self.norm_w(il, spec.head_dim_k), il)
                q, k = g.rope(q, inp_pos), g.rope(k, inp_pos)
                cur = self.build_attn(q, k, v, self.w(il, spec.head_dim_k * spec.n_head[il], spec.n_embd), il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                prev = g.get_rows(prev, out_ids)
            cur = g.add(prev, cur)
            ffn = self.build_ffn_par(self.build_norm(cur, self.norm_w(il), il), il, spec.n_ff[il])
            cur = g.add(cur, ffn)
        self.build_output(cur)

    def build_shortconv(self, cur: Tensor, il: int) -> Tensor:
        spec, n_seqs = self.spec, self.res.n_seqs
        n_st, n_embd = self.n_tokens // n_seqs, spec.n_embd
        d_conv = spec.shortconv_l_cache - 1
        cur = g.reshape(cur, n_embd, n_st, n_seqs)
        bcx = g.mul_mat(self.w(il, n_embd, 3 * n_embd), cur)
        chunk = bcx.ne[0] // 3
        b, c, x = (g.view_3d(bcx, chunk, bcx.ne[1], bcx.ne[2], bcx.nb[1], bcx.nb[2], i * chunk * 4) for i in range(3))
        bx = g.transpose(g.mul(b, x))
        state = self.state(il, "r", d_conv * n_embd)
        conv = g.reshape(self.build_rs(state, d_conv * n_embd), d_conv, n_embd, n_seqs)
        bx = g.concat(conv, bx, 0)
        snap = g.view_3d(bx, d_conv, bx.ne[1], bx.ne[2], bx.nb[1], bx.nb[2], (bx.ne[0] - d_conv) * 4)
        self.gf.expand(g.cpy(snap, g.view_2d(state, d_conv * n_embd, n_seqs, state.nb[1], 0)))
        conv_out = g.ssm_conv(bx, self.w(il, spec.shortconv_l_cache, n_embd, type_name="f32"))
        y = g.mul_mat(self.w(il, n_embd, n_embd), g.mul(c, conv_out))
        return g.reshape(y, y.ne[0], n_st * n_seqs)


class Gemma4Graph(Builder):
    """gemma4 (dense, without per-layer embeddings): per-layer head size and KV heads, Q/K norms and an
    unweighted V norm, proportional RoPE (rope_freqs) on full-attention layers, shared-KV layers that
    attend an earlier layer's cache, GELU FFN between post-norms, final logit soft-capping."""

    def build(self) -> None:
        spec = self.spec
        inp_l = g.scale(self.build_inp_embd())
        inp_pos = self.build_inp_pos()
        self.build_attn_inp_kv(False)
        self.build_attn_inp_kv(True)
        out_ids = self.build_inp_out_ids()
        per_layer = self.build_per_layer_inputs(inp_l) if spec.n_embd_per_layer else None
        for il in self.layers:
            hd, _ = spec.hd(il)
            n_head, n_head_kv = spec.n_head[il], spec.n_head_kv[il]
            swa = spec.swa_layers[il]
            factors = None if swa else self.w(il, hd // 2, type_name="f32")
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            q = g.reshape(g.mul_mat(self.w(il, spec.n_embd, hd * n_head), cur), hd, n_head, self.n_tokens)
            q = g.rope(self.build_norm(q, self.norm_w(il, hd), il), inp_pos, factors)
            wo = self.w(il, hd * n_head, spec.n_embd)
            source = spec.kv_source[il] if spec.kv_source else il
            if source == il:
                k = g.reshape(g.mul_mat(self.w(il, spec.n_embd, hd * n_head_kv), cur), hd, n_head_kv, self.n_tokens)
                v = g.reshape(g.mul_mat(self.w(il, spec.n_embd, hd * n_head_kv), cur), hd, n_head_kv, self.n_tokens)
                k = self.build_norm(k, self.norm_w(il, hd), il)
                v = g.rms_norm(v)
                k = g.rope(k, inp_pos, factors)
                cur = self.build_attn(q, k, v, wo, il)
            else:
                cur = self.build_attn_shared(q, wo, il, source)
            cur = self.build_norm(cur, self.norm_w(il), il)
            attn_out = g.add(cur, inp_l)
            cur = self.build_norm(attn_out, self.norm_w(il), il)
            cur = self.build_ffn_par(cur, il, spec.n_ff[il])
            if spec.n_expert:
                cur = g.add(self.build_norm(cur, self.norm_w(il), il), self.build_experts(attn_out, il))
            cur = self.build_norm(cur, self.norm_w(il), -1)
            cur = g.add(cur, attn_out)
            if per_layer is not None:
                cur = self.build_per_layer_embedding(cur, per_layer, il)
            inp_l = cur
        cur = self.build_norm(inp_l, self.norm_w(-1), -1)
        cur = g.get_rows(cur, out_ids)
        cur.flags |= g.FLAG_OUTPUT
        logits = g.mul_mat(self.w(-1, spec.n_embd, spec.n_vocab, type_name=spec.embd_type), cur)
        if spec.final_softcap:
            logits = g.scale(g.unary(g.scale(logits)))
        logits.flags |= g.FLAG_OUTPUT
        self.gf.expand(logits)

    def build_experts(self, attn_out: Tensor, il: int) -> Tensor:
        """The routed branch: its own pre-norm; the router reads a scaled RMS norm of attn_out."""
        spec = self.spec
        cur = self.build_norm(attn_out, self.norm_w(il), il)
        tmp = g.mul(g.scale(g.rms_norm(attn_out)), self.w(il, spec.n_embd, type_name="f32"))
        logits = g.mul_mat(self.w(il, spec.n_embd, spec.n_expert), tmp)
        cur = build_moe_ffn(self, cur, il, spec.n_ff_exp, weights_norm=True, sigmoid=False, logits=logits)
        return self.build_norm(cur, self.norm_w(il), il)

    def build_per_layer_inputs(self, inp: Tensor) -> Tensor:
        """build_inp_per_layer + project_per_layer_inputs: [n_embd_per_layer, n_tokens, n_layer]."""
        spec, n_tokens, ple = self.spec, self.n_tokens, self.spec.n_embd_per_layer
        n_layer = spec.n_layer
        tokens = g.new_input("i32", n_tokens, name="inp_per_layer_tokens")
        table = g.weight(spec.embd_type, ple * n_layer, spec.n_vocab, backend=self.res.cpu_backend)
        per_layer = g.scale(g.reshape(g.get_rows(table, tokens), ple, n_layer, n_tokens))
        self.gf.expand(per_layer)
        proj = g.mul_mat(self.w(0, spec.n_embd, ple * n_layer), inp)
        proj = g.reshape(g.scale(proj), ple, n_layer, n_tokens)
        proj = self.build_norm(proj, self.norm_w(0, ple), -1)
        per_layer = g.scale(g.add(proj, per_layer))
        return g.cont(g.permute(per_layer, 0, 2, 1, 3))

    def build_per_layer_embedding(self, cur: Tensor, per_layer: Tensor, il: int) -> Tensor:
        spec, ple = self.spec, self.spec.n_embd_per_layer
        gate = g.unary(g.mul_mat(self.w(il, spec.n_embd, ple), cur))
        row = g.row_size(per_layer.type, ple)
        this_layer = g.view_2d(per_layer, ple, per_layer.ne[1], row, il * ple * per_layer.ne[1] * 4)
        out = g.mul_mat(self.w(il, ple, spec.n_embd), g.mul(gate, this_layer))
        out = self.build_norm(out, self.norm_w(il), il)
        return g.add(cur, out)

    def build_attn_shared(self, q: Tensor, wo: Tensor, il: int, source: int) -> Tensor:
        """build_attn without K/V of its own: attend the cache of block `source` (the memory's reuse map)."""
        swa = self.spec.swa_layers[il]
        _, _, mask = self.build_attn_inp_kv(swa)
        k_rot, v_rot = self.rot[swa]
        if k_rot is not None:
            q = self.hadamard(q, k_rot)
        self.gf.expand(q)
        cur = self.build_attn_mha(q, self.get_k(source, swa), self.get_v(source, swa), mask, None, False)
        if v_rot is not None:
            cur = self.hadamard(cur, v_rot)
        return g.mul_mat(wo, cur)


class MiniMaxM2Graph(Builder):
    """minimax-m2: RMS norms over the whole Q and K projections (before the per-head reshape), partial
    RoPE, every block MoE with experts as wide as n_ff, sigmoid routing with a selection bias."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        self.build_attn_inp_kv()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            hd, n_head, n_head_kv = spec.head_dim_k, spec.n_head[il], spec.n_head_kv[il]
            q = g.mul_mat(self.w(il, spec.n_embd, hd * n_head), cur)
            k = g.mul_mat(self.w(il, spec.n_embd, hd * n_head_kv), cur)
            v = g.mul_mat(self.w(il, spec.n_embd, hd * n_head_kv), cur)
            q = self.build_norm(q, self.norm_w(il, hd * n_head), il)
            k = self.build_norm(k, self.norm_w(il, hd * n_head_kv), il)
            q = g.reshape(q, hd, n_head, self.n_tokens)
            k = g.reshape(k, hd, n_head_kv, self.n_tokens)
            v = g.reshape(v, hd, n_head_kv, self.n_tokens)
            q, k = g.rope(q, inp_pos), g.rope(k, inp_pos)
            cur = self.build_attn(q, k, v, self.w(il, hd * n_head, spec.n_embd), il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_sa = g.get_rows(inp_sa, out_ids)
            ffn_inp = g.add(cur, inp_sa)
            cur = self.build_norm(ffn_inp, self.norm_w(il), il)
            cur = build_moe_ffn(self, cur, il, spec.n_ff[il], weights_norm=True, sigmoid=spec.expert_gating_sigmoid,
                                probs_bias=True, w_scale=spec.expert_weights_scale)
            inp_l = g.add(cur, ffn_inp)
        self.build_output(inp_l)


class NemotronHGraph(RecurrentBuilder):
    """nemotron_h / nemotron_h_moe: each block is mamba2, attention without RoPE, or an FFN with squared
    ReLU; with experts the FFN is sigmoid-routed up/down experts (selection bias) plus a shared expert."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        self.gf.expand(inp_l)
        self.build_rs_inp()
        self.build_attn_inp_kv()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            if spec.recurrent_layers[il]:
                cur = self.build_mamba2_layer(cur, il)
            elif spec.ffn_layers and spec.ffn_layers[il]:
                cur = self.build_ffn_block(cur, il)
            else:
                q, k, v = self.build_qkv(cur, il)
                wo = self.w(il, spec.head_dim_k * spec.n_head[il], spec.n_embd)
                has_bias = spec.has(f"blk.{il}.attn_output.bias", False)
                wo_b = self.w(il, spec.n_embd, type_name="f32") if has_bias else None
                cur = self.build_attn(q, k, v, wo, il, wo_b=wo_b)
            inp_l = g.add(cur, inp_sa)
        cur = self.build_norm(inp_l, self.norm_w(-1), -1)
        cur = g.get_rows(cur, out_ids)
        cur.flags |= g.FLAG_OUTPUT
        logits = g.mul_mat(self.w(-1, spec.n_embd, spec.n_vocab, type_name=spec.embd_type
                                  if spec.tied_output else None), cur)
        logits.flags |= g.FLAG_OUTPUT
        self.gf.expand(logits)

    def build_relu_sqr_ffn(self, cur: Tensor, il: int, n_ff: int) -> Tensor:
        up = g.mul_mat(self.w(il, self.spec.n_embd, n_ff), cur)
        return g.mul_mat(self.w(il, n_ff, self.spec.n_embd), g.sqr(g.unary(up)))

    def build_ffn_block(self, cur: Tensor, il: int) -> Tensor:
        spec = self.spec
        if not spec.n_expert:
            return self.build_relu_sqr_ffn(cur, il, spec.n_ff[il])
        router = g.mul_mat(self.w(il, spec.n_embd, spec.n_expert), cur)
        moe = build_moe_ffn(self, cur, il, spec.n_ff_exp, spec.expert_weights_norm, sigmoid=True, probs_bias=True,
                            w_scale=spec.expert_weights_scale, gate=False, logits=router, relu_sqr=True)
        return g.add(moe, self.build_relu_sqr_ffn(cur, il, spec.n_ff_shexp or spec.n_ff_exp))


class GatedDeltaNetGraph(RecurrentBuilder):
    """qwen3next / qwen35 / qwen35moe: gated delta net blocks (fused GATED_DELTA_NET op, as CPU and CUDA
    run it) and gated attention on every 4th block; MoE with a sigmoid-gated shared expert, or a dense FFN
    (qwen35). The output rows are taken after the final norm."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        self.build_rs_inp()
        self.build_attn_inp_kv()
        inp_pos = self.build_inp_pos()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            self.gf.expand(cur)
            if spec.recurrent_layers[il]:
                cur = self.build_delta_net_layer(cur, il)
            else:
                cur = self.build_gated_attention(cur, inp_pos, il)
            cur = g.add(cur, inp_sa)
            ffn_residual = cur
            cur = self.build_norm(cur, self.norm_w(il), il)
            cur = self.build_ffn_block(cur, il)
            inp_l = g.add(cur, ffn_residual)
        cur = self.build_norm(inp_l, self.norm_w(-1), -1)
        cur = g.get_rows(cur, out_ids)
        cur.flags |= g.FLAG_OUTPUT
        logits = g.mul_mat(self.w(-1, spec.n_embd, spec.n_vocab, type_name=spec.embd_type
                                  if spec.tied_output else None), cur)
        logits.flags |= g.FLAG_OUTPUT
        self.gf.expand(logits)

    def build_ffn_block(self, cur: Tensor, il: int) -> Tensor:
        spec = self.spec
        if not spec.n_expert:
            return self.build_ffn_par(cur, il, spec.n_ff[il])
        moe_out = build_moe_ffn(self, cur, il, spec.n_ff_exp, weights_norm=True, sigmoid=False)
        shared = self.build_ffn_par(cur, il, spec.n_ff_shexp or spec.n_ff[il])
        shared_gate = g.unary(g.mul_mat(self.w(il, spec.n_embd, type_name="f32"), cur))
        return g.add(moe_out, g.mul(shared, shared_gate))

    def build_gated_attention(self, cur: Tensor, inp_pos: Tensor, il: int) -> Tensor:
        spec, n_tokens = self.spec, self.n_tokens
        hd, n_head, n_head_kv = spec.head_dim_k, spec.n_head[il], spec.n_head_kv[il]
        q_full = g.mul_mat(self.w(il, spec.n_embd, hd * n_head * 2), cur)
        k = g.mul_mat(self.w(il, spec.n_embd, hd * n_head_kv), cur)
        v = g.mul_mat(self.w(il, spec.n_embd, hd * n_head_kv), cur)
        row = g.row_size(q_full.type, hd)
        if spec.arch == "qwen3next":
            q_full = g.reshape(q_full, hd * 2, n_head, n_tokens, 1)
            q = g.view_4d(q_full, hd, n_head, n_tokens, 1, q_full.nb[1], q_full.nb[2], q_full.nb[3], 0)
            gate = g.view_4d(q_full, hd, n_head, n_tokens, 1, q_full.nb[1], q_full.nb[2], q_full.nb[3], row)
            k, v = g.reshape(k, hd, n_head_kv, n_tokens), g.reshape(v, hd, n_head_kv, n_tokens)
            q = self.build_norm(q, self.norm_w(il, hd), il)
            k = self.build_norm(k, self.norm_w(il, hd), il)
            q, k = g.rope(q, inp_pos), g.rope(k, inp_pos)
            cur = self.build_attn(q, k, v, None, il)
            gate = g.unary(g.cont(gate, hd * n_head, n_tokens))
        else:  # qwen35: M-RoPE, the gate made contiguous before attention
            q = g.view_3d(q_full, hd, n_head, n_tokens, row * 2, row * 2 * n_head, 0)
            q = self.build_norm(q, self.norm_w(il, hd), il)
            k = self.build_norm(g.reshape(k, hd, n_head_kv, n_tokens), self.norm_w(il, hd), il)
            gate = g.view_3d(q_full, hd, n_head, n_tokens, row * 2, row * 2 * n_head, row)
            gate = g.cont(gate, hd * n_head, n_tokens)
            v = g.reshape(v, hd, n_head_kv, n_tokens)
            q, k = g.rope(q, inp_pos), g.rope(k, inp_pos)
            cur = self.build_attn(q, k, v, None, il)
            gate = g.unary(gate)
        cur = g.mul(cur, gate)
        return g.mul_mat(self.w(il, hd * n_head, spec.n_embd), cur)

    def build_delta_net_layer(self, cur: Tensor, il: int) -> Tensor:
        spec, n_seqs = self.spec, self.res.n_seqs
        n_st = self.n_tokens // n_seqs
        d_inner, head_k, n_k_heads, n_v_heads = spec.ssm_d_inner, spec.ssm_d_state, spec.ssm_n_group, spec.ssm_dt_rank
        head_v = d_inner // n_v_heads
        qkv_dim = head_k * n_k_heads * 2 + head_v * n_v_heads
        qkv_mixed = g.mul_mat(self.w(il, spec.n_embd, qkv_dim), cur)
        qkv_mixed = g.reshape(qkv_mixed, qkv_dim, n_st, n_seqs)
        z = g.mul_mat(self.w(il, spec.n_embd, head_v * n_v_heads), cur)
        if spec.arch == "qwen3next":
            ba = g.mul_mat(self.w(il, spec.n_embd, 2 * n_v_heads), cur)
            per = n_v_heads // n_k_heads
            ba = g.reshape(ba, 2 * per, n_k_heads, n_st, n_seqs)
            b = g.view_4d(ba, per, n_k_heads, n_st, n_seqs, ba.nb[1], ba.nb[2], ba.nb[3], 0)
            a = g.view_4d(ba, per, n_k_heads, n_st, n_seqs, ba.nb[1], ba.nb[2], ba.nb[3], per * 4)
            beta = g.reshape(g.unary(g.cont(b)), 1, n_v_heads, n_st, n_seqs)
            alpha = g.cont(a, n_v_heads, n_st, n_seqs)
        else:
            beta = g.mul_mat(self.w(il, spec.n_embd, n_v_heads), cur)
            beta = g.unary(g.reshape(beta, 1, n_v_heads, n_st, n_seqs))
            alpha = g.mul_mat(self.w(il, spec.n_embd, n_v_heads), cur)
            alpha = g.reshape(alpha, n_v_heads, n_st, n_seqs)
        alpha = g.unary(g.add(alpha, self.w(il, n_v_heads, type_name="f32")))
        gate = g.mul(alpha, self.w(il, n_v_heads, type_name="f32"))
        gate = g.reshape(gate, 1, n_v_heads, n_st, n_seqs)
        d_conv, channels = spec.ssm_d_conv, d_inner + 2 * n_k_heads * head_k
        conv_states = self.state(il, "r", (d_conv - 1) * channels)
        ssm_states = self.state(il, "s", head_k * d_inner)
        conv = g.reshape(self.build_rs(conv_states, (d_conv - 1) * channels), d_conv - 1, channels, n_seqs)
        conv_input = g.concat(conv, g.transpose(qkv_mixed), 0)
        last = g.view_3d(conv_input, d_conv - 1, channels, n_seqs, conv_input.nb[1], conv_input.nb[2],
                         (conv_input.ne[0] - conv.ne[0]) * 4)
        self.gf.expand(g.cpy(last, g.view_2d(conv_states, (d_conv - 1) * channels, n_seqs, conv_states.nb[1], 0)))
        state = g.reshape(self.build_rs(ssm_states, head_k * d_inner), head_v, head_v, n_v_heads, n_seqs)
        mixed = g.unary(g.ssm_conv(conv_input, self.w(il, d_conv, channels, type_name="f32")))
        nb1 = qkv_dim * 4
        q = g.view_4d(mixed, head_k, n_k_heads, n_st, n_seqs, head_k * 4, nb1, nb1 * n_st, 0)
        k = g.view_4d(mixed, head_k, n_k_heads, n_st, n_seqs, head_k * 4, nb1, nb1 * n_st, head_k * n_k_heads * 4)
        v = g.view_4d(mixed, head_v, n_v_heads, n_st, n_seqs, head_v * 4, nb1, nb1 * n_st, 2 * head_k * n_k_heads * 4)
        q, k = g.scale(g.rms_norm(q)), g.scale(g.rms_norm(k))
        if n_k_heads != n_v_heads and spec.arch == "qwen3next":  # qwen35 leaves it to the fused op
            rep = n_v_heads // n_k_heads
            shape = g.Tensor("f32", (head_k, rep, n_k_heads, n_st * n_seqs))
            q = g.reshape(g.repeat(g.reshape(q, head_k, 1, n_k_heads, n_st * n_seqs), shape),
                          head_k, n_v_heads, n_st, n_seqs)
            k = g.reshape(g.repeat(g.reshape(k, head_k, 1, n_k_heads, n_st * n_seqs), shape),
                          head_k, n_v_heads, n_st, n_seqs)
        result = g.Tensor("f32", (head_v * n_v_heads, n_st * n_seqs + head_v * n_seqs), "GATED_DELTA_NET",
                          (q, k, v, gate, beta, state))
        row = head_v * 4
        output = g.view_4d(result, head_v, n_v_heads, n_st, n_seqs, row, row * n_v_heads, row * n_v_heads * n_st, 0)
        new_state = g.view_4d(result, head_v, head_v, n_v_heads, n_seqs, row, row * head_v, row * head_v * n_v_heads,
                              row * n_v_heads * n_st * n_seqs)
        self.gf.expand(g.cpy(new_state, g.view_2d(ssm_states, head_k * d_inner, n_seqs, ssm_states.nb[1], 0)))
        z = g.reshape(z, head_v, n_v_heads, n_st, n_seqs)
        normed = self.build_norm(output, self.norm_w(il, head_v), il)
        out = g.mul(normed, g.unary(z))
        out = g.reshape(out, head_v * n_v_heads, n_st, n_seqs)
        out = g.mul_mat(self.w(il, head_v * n_v_heads, spec.n_embd), out)
        return g.reshape(out, spec.n_embd, n_st * n_seqs)


BUILDERS: dict[str, Callable[[ModelSpec, Reserve], Builder]] = {
    "llama": LlamaGraph, "qwen2": Qwen2Graph, "qwen3": Qwen3Graph, "qwen3moe": Qwen3Graph,
    "gemma2": GemmaGraph, "gemma3": GemmaGraph, "phi3": Phi3Graph, "deepseek2": DeepSeek2Graph,
    "mamba2": Mamba2Graph, "granitehybrid": GraniteHybridGraph, "lfm2": Lfm2Graph,
    "mistral3": LlamaGraph, "gpt-oss": GptOssGraph, "glm4moe": Glm4MoeGraph, "llama4": Llama4Graph,
    "gemma4": Gemma4Graph, "minimax-m2": MiniMaxM2Graph,
    "qwen3next": GatedDeltaNetGraph, "qwen35": GatedDeltaNetGraph, "qwen35moe": GatedDeltaNetGraph,
    "nemotron_h": NemotronHGraph, "nemotron_h_moe": NemotronHGraph,
}


def kq_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
