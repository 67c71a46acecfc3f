"""glm4moe (src/models/glm4-moe.cpp): a dense prefix, then sigmoid-gated MoE with a shared expert."""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import build_moe_ffn
from llamalaunch.model.ggml.graphs.llama import LlamaGraph


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
