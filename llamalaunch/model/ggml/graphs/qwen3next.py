"""qwen3next, qwen35, qwen35moe (src/models/qwen3next.cpp, qwen35.cpp, qwen35moe.cpp,
delta-net-base.cpp): gated delta net blocks with gated attention on every 4th.
"""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import build_moe_ffn
from llamalaunch.model.ggml.graphs.recurrent import RecurrentBuilder
from llamalaunch.model.ggml.sim import Tensor
from llamalaunch.model.ggml.types import row_size


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
        row = row_size(q_full.type, hd)
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
