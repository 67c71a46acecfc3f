"""llama4 (src/models/llama4.cpp): chunked attention layers, MoE on every `step`-th block."""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import Builder, build_moe_ffn


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
