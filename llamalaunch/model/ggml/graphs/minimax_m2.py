"""minimax-m2 (src/models/minimax-m2.cpp)."""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import Builder, build_moe_ffn


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
