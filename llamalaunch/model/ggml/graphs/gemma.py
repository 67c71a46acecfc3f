"""gemma2 / gemma3 (src/models/gemma2.cpp, gemma3.cpp) and gemma4 (gemma4.cpp)."""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import Builder, build_moe_ffn
from llamalaunch.model.ggml.sim import Tensor
from llamalaunch.model.ggml.types import row_size


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
        row = row_size(per_layer.type, ple)
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
