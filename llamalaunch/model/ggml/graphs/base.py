"""What every graph builder shares: the hparams (ModelSpec), one reservation (Reserve), and
llm_graph_context's helpers of src/llama-graph.cpp (build_inp_embd, build_norm, build_qkv, build_attn,
build_attn_mha, build_ffn, build_moe_ffn) in Builder; the families' build() lives beside this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.sim import Tensor
from llamalaunch.model.ggml.types import row_size, type_block
from llamalaunch.model.profile import GraphDetails


@dataclass(frozen=True, kw_only=True)
class ModelSpec(GraphDetails):
    """The hparams the graph builders read (llama_hparams), per arch: the profile's header facts for the
    replay (GraphDetails, defined once there) and what follows from the profile's own fields."""

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
    kv_lora_rank: int = 0
    tied_output: bool = False
    weight_type: str = "q8_0"  # matmul weights (only their size matters, when op offload copies them)
    embd_type: str = "q8_0"
    head_dim_k_swa: int = 0  # gemma4: sliding-window layers have their own head size
    head_dim_v_swa: int = 0
    kv_source: tuple[int, ...] = ()  # gemma4 shared KV: the block whose cache each block attends
    compress_ratios: tuple[int, ...] = ()  # deepseek4 (graphs/deepseek4.py): compressed caches per block
    indexer_head_dim: int = 0
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
        if type_block(res.type_k)[0] > 1 and k_all > 0 and spec.head_dim_k % 64 == 0 and not spec.kv_lora_rank:
            nrot = 64
            while k_all % (nrot * 2) == 0:
                nrot *= 2
            k_rot = g.new_input("f32", nrot, nrot, name="attn_inp_k_rot")
        if type_block(res.type_v)[0] > 1 and v_all > 0 and spec.head_dim_v % 64 == 0 and not spec.kv_lora_rank:
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
        if row_size(v_cur.type, n_embd_gqa) == v_cur.nb[2]:
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
        return g.view_4d(cache, head, n_head, n_kv, cache.ne[2], row_size(cache.type, head),
                         row_size(cache.type, width), row_size(cache.type, width * kv_size), 0)

    def get_v(self, il: int, swa: bool) -> Tensor:
        cache = self.cache(il, "v", swa)
        spec = self.spec
        kv_size, width = cache.ne[1], cache.ne[0]
        n_kv = self.res.n_kv_swa if swa else self.res.n_kv
        hd, n_head = spec.hd(il)[1], spec.n_head_kv[il]
        if self.res.flash_attn:
            return g.view_4d(cache, hd, n_head, n_kv, cache.ne[2], row_size(cache.type, hd),
                             row_size(cache.type, width), row_size(cache.type, width * kv_size), 0)
        return g.view_4d(cache, n_kv, n_head, hd, cache.ne[2], row_size(cache.type, kv_size * hd),
                         row_size(cache.type, kv_size), row_size(cache.type, kv_size * width), 0)

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
    block, size = type_block(t.type)
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
        probs = g.sqrt(g.unary(logits))
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
