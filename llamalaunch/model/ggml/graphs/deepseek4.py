"""deepseek4's worst-case graph (src/models/deepseek4.cpp, llama-graph.cpp build_inp_dsv4), op for op.

DeepSeek V4 keeps `hc` copies of the residual stream (hyper-connections, mixed by fused HC ops around
every sub-block), attends a K-only sliding-window cache on every block, and on blocks with a compress
ratio also a compressed cache: ratio 128 (HCA) rows built from compressor state, ratio 4 (CSA) rows
picked per query by a lightning indexer's top-k. The compressed caches are written from compressor
states by the graph itself; their sizes follow the reserve plan (dsv4_build_reserve_comp_plan).
CPU and CUDA run the fused HC, HC-comb and lightning-indexer ops, so those are the ones replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import Builder, build_moe_ffn
from llamalaunch.model.ggml.sim import Tensor
from llamalaunch.model.ggml.types import row_size, type_block
from llamalaunch.model.kv import DSV4_CSA_RATIO, DSV4_HCA_RATIO, dsv4_comp_cells


@dataclass(frozen=True)
class _Comp:
    """The inputs of one compressed store (csa, hca or lid) for the reserve ubatch."""

    ratio: int
    state_pos: Tensor
    persist_src: Tensor
    persist_dst: Tensor
    read_idxs: Tensor
    write_idxs: Tensor
    write_pos: Tensor
    kq_mask: Tensor
    n_kv: int  # cells per stream of its cache
    k_rot: Tensor | None = None


def _n_rot(head: int) -> int:
    """llama_kv_cache::build_input_k_rot: the largest 64·2^k that divides the head size."""
    nrot = 64
    while head % (nrot * 2) == 0:
        nrot *= 2
    return nrot


class DeepSeek4Graph(Builder):
    """llama_model_deepseek4::graph with the fused HC ops and the fused lightning indexer."""

    def build(self) -> None:
        spec, res = self.spec, self.res
        hc, n_embd = spec.hc_mult, spec.n_embd
        self.n_seq = res.n_seqs  # the cache keeps one stream per sequence, so does the reserve graph
        inp = self.build_inp_embd()
        tokens = inp.src[1]  # get_rows(tok_embd, inp_tokens): the hash-routed blocks read the token ids
        assert tokens is not None
        self.tokens_in: Tensor = tokens
        inp_pos = self.build_inp_pos()
        out_ids = self.build_inp_out_ids()
        self._build_inp_dsv4()
        self.gf.expand(self.raw_mask)
        inp_l = g.repeat(g.reshape(inp, n_embd, 1, self.n_tokens), g.Tensor("f32", (n_embd, hc, self.n_tokens)))
        for il in self.layers:
            residual = inp_l
            cur, post, comb = self._hc_pre(inp_l, il)
            cur = self.build_norm(cur, self.norm_w(il), il)
            cur = self._attention(cur, inp_pos, il)
            inp_l = self._hc_post(cur, residual, post, comb)
            residual = inp_l
            cur, post, comb = self._hc_pre(inp_l, il)
            for tensor in (residual, post, comb):
                self.gf.expand(tensor)
            cur = self.build_norm(cur, self.norm_w(il), il)
            cur = g.add(self._moe(cur, il), self.build_ffn_par(cur, il, spec.n_ff_exp * max(spec.n_expert_shared, 1)))
            inp_l = self._hc_post(cur, residual, post, comb)
        flat = g.get_rows(g.reshape(inp_l, n_embd * hc, self.n_tokens), out_ids)
        inp_l = g.reshape(flat, n_embd, hc, res.n_outputs)
        self.build_output(self._hc_head(inp_l))

    # -- inputs (build_inp_dsv4 with the reserve plans) --
    def _build_inp_dsv4(self) -> None:
        spec, res = self.spec, self.res
        self.k_idxs = g.new_input("i64", self.n_tokens, name="attn_inp_k_idxs")
        self.n_raw = res.n_kv_swa  # the sliding-window cache's cells per stream (kv.swa_cells)
        self.raw_mask = self._mask(self.n_raw, "f16" if res.flash_attn else "f32")
        head = spec.head_dim_k
        self.raw_rot = self._rot(head)
        self.comp = {name: self._comp_inputs(ratio, name) for name, ratio in
                     (("csa", DSV4_CSA_RATIO), ("hca", DSV4_HCA_RATIO), ("lid", DSV4_CSA_RATIO))}
        for name, width in (("csa", head), ("hca", head), ("lid", spec.indexer_head_dim)):
            self.comp[name] = replace(self.comp[name], k_rot=self._rot(width, forced=name == "lid"))

    def _rot(self, head: int, forced: bool = False) -> Tensor | None:
        """The cache's Hadamard input: always for the indexer (and for any cache whose head size equals the
        indexer's), else for a quantized K cache whose head size is a multiple of 64."""
        quantized = type_block(self.res.type_k)[0] > 1
        if forced or head == self.spec.indexer_head_dim or (quantized and head % 64 == 0):
            n = _n_rot(head)
            return g.new_input("f32", n, n, name="attn_inp_k_rot")
        return None

    def _mask(self, n_kv: int, type_name: str) -> Tensor:
        n_stream = self.n_seq
        return g.new_input(type_name, n_kv, self.n_tokens // n_stream, 1, n_stream, name="kq_mask")

    def _comp_inputs(self, ratio: int, name: str) -> _Comp:
        n_tokens, n_seq = self.n_tokens, self.n_seq
        n_blocks = n_tokens // ratio + n_seq
        state_size = ratio if ratio == DSV4_HCA_RATIO else 2 * ratio
        n_persist = min(n_tokens, state_size * n_seq)
        overlap = 2 if ratio == DSV4_CSA_RATIO else 1
        n_kv = dsv4_comp_cells(self.res.n_kv, ratio)

        def i32(n: int) -> Tensor:
            return g.new_input("i32", n, name=f"dsv4_{name}")

        fused_f16 = self.res.flash_attn if name != "lid" else True  # the fused indexer reads an f16 mask
        return _Comp(ratio, state_pos=i32(n_tokens), persist_src=i32(n_persist), persist_dst=i32(n_persist),
                     read_idxs=i32(overlap * ratio * n_blocks), write_idxs=g.new_input("i64", n_blocks),
                     write_pos=i32(n_blocks), kq_mask=self._mask(n_kv, "f16" if fused_f16 else "f32"), n_kv=n_kv)

    # -- hyper-connections --
    def _hc_weights(self, il: int) -> tuple[Tensor, Tensor, Tensor]:
        hc = self.spec.hc_mult
        mix = (2 + hc) * hc
        return (self.w(il, hc * self.spec.n_embd, mix, type_name="f32"), self.w(il, 3, type_name="f32"),
                self.w(il, mix, type_name="f32"))

    def _hc_pre(self, x: Tensor, il: int) -> tuple[Tensor, Tensor, Tensor]:
        """build_hc_pre: the mixes, pre and post gates, the fused Sinkhorn comb, the fused weighted sum."""
        hc, nt = self.spec.hc_mult, x.ne[2]
        fn, scale, base = self._hc_weights(il)
        mixes = g.mul_mat(fn, g.rms_norm(g.reshape(x, hc * self.spec.n_embd, nt)))
        gates = []
        for index in (0, 1):
            gate = g.view_2d(mixes, hc, nt, mixes.nb[1], row_size("f32", index * hc))
            gate = g.add(g.mul(gate, g.view_1d(scale, 1, 4 * index)), g.view_1d(base, hc, 4 * index * hc))
            gates.append(g.scale(g.unary(gate)))
        comb = g.Tensor("f32", (hc, hc, nt), "DSV4_HC_COMB", (mixes, scale, base))
        result = g.Tensor("f32", (self.spec.n_embd, nt), "DSV4_HC_PRE", (x, gates[0]))
        return result, gates[1], comb

    def _hc_post(self, x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        return g.Tensor("f32", (self.spec.n_embd, self.spec.hc_mult, x.ne[1]), "DSV4_HC_POST",
                        (x, residual, post, comb))

    def _hc_head(self, x: Tensor) -> Tensor:
        """build_hc_head: the head's gates, then the unfused weighted sum (il = -1 is never fused)."""
        hc, nt, n_embd = self.spec.hc_mult, x.ne[2], self.spec.n_embd
        mixes = g.mul_mat(self.w(-1, hc * n_embd, hc, type_name="f32"), g.rms_norm(g.reshape(x, hc * n_embd, nt)))
        pre = g.add(g.mul(mixes, self.w(-1, 1, type_name="f32")), self.w(-1, hc, type_name="f32"))
        pre = g.scale(g.unary(pre))
        result: Tensor | None = None
        for ih in range(hc):
            xh = g.view_2d(x, n_embd, nt, x.nb[2], ih * x.nb[1])
            wh = g.view_2d(pre, 1, nt, pre.nb[1], ih * pre.nb[0])
            cur = g.mul(xh, wh)
            result = cur if result is None else g.add(result, cur)
        assert result is not None
        return result

    # -- attention --
    def _cache(self, il: int, which: str, width: int, rows: int, type_name: str = "") -> Tensor:
        """A cache (type_k) or compressor state (f32) of block `il`: [width, rows, one stream per sequence]."""
        key = (il, which)
        if key not in self.caches:
            self.caches[key] = g.cache(type_name or self.res.type_k, width, rows, self.n_seq,
                                       backend=self.res.layer_backend[il])
        return self.caches[key]

    @staticmethod
    def _cpy_k(cache: Tensor, k_cur: Tensor, idxs: Tensor) -> Tensor:
        """llama_kv_cache::cpy_k for a K-only cache."""
        width = k_cur.ne[0] * k_cur.ne[1]
        k_cur = g.view_2d(k_cur, width, k_cur.ne[2], k_cur.nb[2], 0)
        if cache.ne[2] > 1:
            cache = g.reshape(cache, width, cache.ne[1] * cache.ne[2])
        return g.set_rows(cache, k_cur, idxs)

    @staticmethod
    def _get_k(cache: Tensor, n_kv: int) -> Tensor:
        width, kv_size = cache.ne[0], cache.ne[1]
        row = row_size(cache.type, width)
        return g.view_4d(cache, width, 1, n_kv, cache.ne[2], row, row, row * kv_size, 0)

    def _attention(self, cur: Tensor, inp_pos: Tensor, il: int) -> Tensor:
        spec = self.spec
        head, n_head, nt = spec.head_dim_k, spec.n_head[il], self.n_tokens
        qr = g.mul_mat(self.w(il, spec.n_embd, spec.q_lora_rank), cur)
        qr = self.build_norm(qr, self.norm_w(il, spec.q_lora_rank), il)
        q = g.mul_mat(self.w(il, spec.q_lora_rank, n_head * head), qr)
        q = g.rope(g.rms_norm(g.reshape(q, head, n_head, nt)), inp_pos)
        kv = g.mul_mat(self.w(il, spec.n_embd, head), cur)
        kv = self.build_norm(kv, self.norm_w(il, head), il)
        kv = g.rope(g.reshape(kv, head, 1, nt), inp_pos)
        ratio = spec.compress_ratios[il]
        if ratio == DSV4_HCA_RATIO:
            self._compress(cur, il, "hca", head)
        elif ratio == DSV4_CSA_RATIO:
            self._compress(cur, il, "csa", head)
            self._compress(cur, il, "lid", spec.indexer_head_dim)
        sinks = self.w(il, n_head, type_name="f32")
        out = self._attend(q, kv, qr, cur, inp_pos, sinks, il)
        out = g.Tensor(out.type, (head, n_head, nt), "ROPE_BACK", (g.reshape(out, head, n_head, nt), inp_pos))
        groups, rank = spec.o_groups, spec.o_lora_rank
        out = g.permute(g.reshape(out, n_head * head // groups, groups, nt), 0, 2, 1, 3)
        oa = g.mul_mat(self.w(il, n_head * head // groups, rank, groups), out)
        oa = g.cont(g.permute(oa, 0, 2, 1, 3), rank * groups, nt)
        return g.mul_mat(self.w(il, groups * rank, spec.n_embd), oa)

    def _compress(self, cur: Tensor, il: int, name: str, head: int) -> None:
        """The compressor of one store: state rows from this ubatch, the compressed rows written to the cache,
        and the last rows persisted into the state (state-backed commits of the reserve plan)."""
        inp = self.comp[name]
        overlap = inp.ratio == DSV4_CSA_RATIO
        width, state_size = (2 * head, 2 * inp.ratio) if overlap else (head, inp.ratio)
        state_kv = g.mul_mat(self.w(il, self.spec.n_embd, width), cur)
        state_score = g.mul_mat(self.w(il, self.spec.n_embd, width), cur)
        state_score = g.add(state_score, g.get_rows(self.w(il, width, inp.ratio, type_name="f32"), inp.state_pos))
        states = []
        for which, current in (("kv", state_kv), ("score", state_score)):
            stored = self._cache(il, f"{name}_{which}", width, state_size, "f32")
            all_rows = g.view_2d(stored, width, state_size * self.n_seq, stored.nb[1], 0)
            base = g.view_2d(all_rows, width, state_size * self.n_seq, all_rows.nb[1], 0)
            states.append((all_rows, g.concat(base, current, 1)))
        comp = self._compressed(states[0][1], states[1][1], inp, head, il, name) if overlap else \
            self._compressed_hca(states[0][1], states[1][1], inp, head, il)
        if inp.k_rot is not None:
            comp = self.hadamard(comp, inp.k_rot)
        cache = self._cache(il, name, head, inp.n_kv)
        self.gf.expand(self._cpy_k(cache, comp, inp.write_idxs))
        for (all_rows, _), current in zip(states, (state_kv, state_score)):
            self.gf.expand(g.set_rows(all_rows, g.get_rows(current, inp.persist_src), inp.persist_dst))

    def _compressed(self, kv_state: Tensor, score_state: Tensor, inp: _Comp, head: int, il: int,
                    name: str) -> Tensor:
        """build_overlap_compressed_kv_from_state: two halves of 2·ratio rows per block, softmax-pooled."""
        ratio, n_blocks = inp.ratio, inp.write_pos.ne[0]
        n_read = ratio * n_blocks
        halves = []
        for state in (kv_state, score_state):
            row = g.reshape(g.scale(g.view_1d(state, state.ne[0], 0)), state.ne[0], 1)
            rows = g.get_rows(g.concat(state, row, 1), inp.read_idxs)
            prev = g.reshape(g.cont(g.view_2d(rows, head, n_read, rows.nb[1], 0)), head, ratio, n_blocks)
            halves.append((rows, prev))
        currents = []
        for rows, _ in halves:
            offset = n_read * rows.nb[1] + row_size(rows.type, head)
            currents.append(g.reshape(g.cont(g.view_2d(rows, head, n_read, rows.nb[1], offset)), head, ratio,
                                      n_blocks))
        values = g.concat(halves[0][1], currents[0], 1)
        scores = g.concat(halves[1][1], currents[1], 1)
        return self._pool(values, scores, inp, head, il)

    def _compressed_hca(self, kv_state: Tensor, score_state: Tensor, inp: _Comp, head: int, il: int) -> Tensor:
        """build_hca_compressed_kv_from_state: 128 rows per block, softmax-pooled."""
        n_blocks = inp.write_pos.ne[0]
        kv = g.reshape(g.get_rows(kv_state, inp.read_idxs), head, inp.ratio, n_blocks)
        score = g.reshape(g.get_rows(score_state, inp.read_idxs), head, inp.ratio, n_blocks)
        return self._pool(kv, score, inp, head, il)

    def _pool(self, values: Tensor, scores: Tensor, inp: _Comp, head: int, il: int) -> Tensor:
        values = g.cont(g.permute(values, 1, 0, 2, 3))
        scores = g.cont(g.permute(scores, 1, 0, 2, 3))
        comp = g.sum_rows(g.mul(values, g.soft_max(scores)))
        comp = g.cont(g.permute(comp, 1, 0, 2, 3))
        comp = self.build_norm(comp, self.norm_w(il, head), il)
        return g.rope(comp, inp.write_pos)

    def _attend(self, q: Tensor, kv: Tensor, qr: Tensor, cur: Tensor, inp_pos: Tensor, sinks: Tensor,
                il: int) -> Tensor:
        """build_raw_attention / build_hca_attention / build_csa_lid_attention."""
        ratio = self.spec.compress_ratios[il]
        top_k = self._lid_top_k(qr, cur, inp_pos, il) if ratio == DSV4_CSA_RATIO else None
        if self.raw_rot is not None:
            q, kv = self.hadamard(q, self.raw_rot), self.hadamard(kv, self.raw_rot)
        self.gf.expand(q)
        self.gf.expand(kv)
        raw = self._cache(il, "raw", self.spec.head_dim_k, self.n_raw)
        self.gf.expand(self._cpy_k(raw, kv, self.k_idxs))
        k = self._get_k(raw, self.n_raw)
        mask = self.raw_mask
        if ratio:
            name = "csa" if ratio == DSV4_CSA_RATIO else "hca"
            inp = self.comp[name]
            comp_k = self._get_k(self._cache(il, name, self.spec.head_dim_k, inp.n_kv), inp.n_kv)
            k = g.concat(k, comp_k, 2)
            comp_mask = inp.kq_mask if top_k is None else self._top_k_mask(inp.kq_mask, top_k)
            mask = g.concat(mask, comp_mask, 0)
        out = self.build_attn_mha(q, k, k, mask, None, False, sinks)
        return self.hadamard(out, self.raw_rot) if self.raw_rot is not None else out

    def _lid_top_k(self, qr: Tensor, cur: Tensor, inp_pos: Tensor, il: int) -> Tensor:
        spec, inp = self.spec, self.comp["lid"]
        ihd, n_ih, nt, ns = spec.indexer_head_dim, spec.indexer_n_head, self.n_tokens, self.n_seq
        q = g.reshape(g.mul_mat(self.w(il, spec.q_lora_rank, n_ih * ihd), qr), ihd, n_ih, nt)
        q = g.rope(q, inp_pos)
        assert inp.k_rot is not None
        q = self.hadamard(q, inp.k_rot)
        weights = g.scale(g.mul_mat(self.w(il, spec.n_embd, n_ih), cur))
        k = self._get_k(self._cache(il, "lid", ihd, inp.n_kv), inp.n_kv)
        q = g.view_4d(q, q.ne[0], q.ne[1], q.ne[2] // ns, ns, q.nb[1], q.nb[2], q.nb[3] // ns, 0)
        weights = g.view_4d(weights, weights.ne[0], weights.ne[1] // ns, weights.ne[2], ns, weights.nb[1],
                            weights.nb[2] // ns, weights.nb[3] // ns, 0)
        score = g.Tensor("f32", (k.ne[2], q.ne[2], 1, q.ne[3]), "LIGHTNING_INDEXER", (q, k, weights, inp.kq_mask))
        return g.cont(g.top_k(score, min(score.ne[0], spec.indexer_top_k)))

    def _top_k_mask(self, kq_mask: Tensor, top_k: Tensor) -> Tensor:
        """build_top_k_mask: -inf everywhere, 0 at the indexer's picks, plus the causal mask."""
        filled = g.Tensor(kq_mask.type, kq_mask.ne, "FILL", (kq_mask,))
        filled = g.view_4d(filled, 1, filled.ne[0], filled.ne[1], filled.ne[3], filled.nb[0], filled.nb[1],
                           filled.nb[2], 0)
        picks = g.view_4d(top_k, top_k.ne[0], top_k.ne[1], top_k.ne[3], 1, top_k.nb[1], top_k.nb[2],
                          top_k.ne[3] * top_k.nb[3], 0)
        zeros = g.Tensor("f16" if self.res.flash_attn else "f32", (1, picks.ne[0], picks.ne[1], picks.ne[2]))
        zeros = g.Tensor(zeros.type, zeros.ne, "FILL", (zeros,))
        masked = g.set_rows(filled, zeros, picks)
        masked = g.view_4d(masked, masked.ne[1], masked.ne[2], 1, masked.ne[3], masked.nb[2], masked.nb[3],
                           masked.nb[3], 0)
        return g.add(masked, kq_mask)

    # -- feed-forward --
    def _moe(self, cur: Tensor, il: int) -> Tensor:
        """Routed experts: sqrt(softplus) router; the first `hash_layer_count` blocks pick by token id."""
        spec = self.spec
        hashed = il < spec.n_hash_layers
        selected = g.get_rows(self.w(il, spec.n_expert_used, spec.n_vocab, type_name="i32"), self.tokens_in) \
            if hashed else None
        return build_moe_ffn(self, cur, il, spec.n_ff_exp, spec.expert_weights_norm, False,
                             probs_bias=not hashed, w_scale=spec.expert_weights_scale, sqrt_softplus=True,
                             selected_in=selected)
