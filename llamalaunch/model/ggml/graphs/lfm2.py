"""lfm2 (src/models/lfm2.cpp): short-convolution blocks beside attention blocks."""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.recurrent import RecurrentBuilder
from llamalaunch.model.ggml.sim import Tensor


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
