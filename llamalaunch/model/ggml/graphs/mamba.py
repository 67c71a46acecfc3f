"""mamba2 (src/models/mamba2.cpp) and the mamba2 hybrids granitehybrid (granite-hybrid.cpp) and
nemotron_h / nemotron_h_moe (nemotron-h.cpp, nemotron-h-moe.cpp).
"""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import build_moe_ffn
from llamalaunch.model.ggml.graphs.recurrent import RecurrentBuilder
from llamalaunch.model.ggml.sim import Tensor


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
