"""gpt-oss (src/models/openai-moe.cpp): attention sinks, biased experts, softmax over the selected."""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import Builder, build_moe_ffn


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
