"""deepseek2 (src/models/deepseek2.cpp): multi-head latent attention, with or without the MLA cache."""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import build_moe_ffn
from llamalaunch.model.ggml.graphs.llama import LlamaGraph
from llamalaunch.model.ggml.sim import Tensor
from llamalaunch.model.ggml.types import row_size


class DeepSeek2Graph(LlamaGraph):
    """deepseek2: low-rank Q, compressed KV (MLA: cache the latent, absorb wk_b/wv_b), MoE with shared experts."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            cur = self.build_mla_attention(cur, inp_pos, il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_sa = g.get_rows(inp_sa, out_ids)
            ffn_inp = g.add(cur, inp_sa)
            cur = self.build_norm(ffn_inp, self.norm_w(il), il)
            if il < spec.n_layer_dense_lead:
                cur = self.build_ffn_par(cur, il, spec.n_ff[il])
            else:
                moe_out = build_moe_ffn(self, cur, il, spec.n_ff_exp, spec.expert_weights_norm,
                                        spec.expert_gating_sigmoid,
                                        probs_bias=spec.has(f"blk.{il}.exp_probs_b.bias", spec.expert_gating_sigmoid),
                                        w_scale=spec.expert_weights_scale)
                shared = self.build_ffn_par(cur, il, spec.n_ff_exp * max(spec.n_expert_shared, 1))
                cur = g.add(moe_out, shared)
            inp_l = g.add(cur, ffn_inp)
        self.build_output(inp_l)

    def build_mla_attention(self, cur: Tensor, inp_pos: Tensor, il: int) -> Tensor:
        spec, n_tokens = self.spec, self.n_tokens
        n_head, rope, rank = spec.n_head[il], spec.n_rot, spec.n_lora_kv
        head_k, head_v = spec.head_dim_k_mla, spec.head_dim_v_mla
        nope = head_k - rope
        if spec.q_lora_rank:
            q = g.mul_mat(self.w(il, spec.n_embd, spec.q_lora_rank), cur)
            q = self.build_norm(q, self.norm_w(il, spec.q_lora_rank), il)
            q = g.mul_mat(self.w(il, spec.q_lora_rank, n_head * head_k), q)
        else:
            q = g.mul_mat(self.w(il, spec.n_embd, n_head * head_k), cur)
        q = g.reshape(q, head_k, n_head, n_tokens)
        kv_pe = g.mul_mat(self.w(il, spec.n_embd, rank + rope), cur)
        stride = row_size(kv_pe.type, rank + rope)
        kv_cmpr = g.view_2d(kv_pe, rank, n_tokens, stride, 0)
        k_pe = g.view_3d(kv_pe, rope, 1, n_tokens, stride, stride, row_size(kv_pe.type, rank))
        k_pe = g.rope(k_pe, inp_pos)
        kv_cmpr = self.build_norm(kv_cmpr, self.norm_w(il, rank), il)
        wo = self.w(il, n_head * head_v, spec.n_embd)
        if spec.kv_lora_rank:  # MLA
            q_nope = g.view_3d(q, nope, n_head, n_tokens, q.nb[1], q.nb[2], 0)
            q_pe = g.view_3d(q, rope, n_head, n_tokens, q.nb[1], q.nb[2], row_size(q.type, nope))
            q_pe = g.rope(q_pe, inp_pos)
            q_nope = g.permute(q_nope, 0, 2, 1, 3)
            absorbed = g.permute(g.mul_mat(self.w(il, nope, rank, n_head), q_nope), 0, 2, 1, 3)
            q_cur = g.concat(absorbed, q_pe, 0)
            kv_cmpr = g.reshape(kv_cmpr, rank, 1, n_tokens)
            k_cur = g.concat(kv_cmpr, k_pe, 0)
            return self.build_attn_k(q_cur, k_cur, kv_cmpr, wo, il, self.w(il, rank, head_v, n_head))
        kv = g.mul_mat(self.w(il, rank, n_head * (nope + head_v)), kv_cmpr)
        row = row_size(kv.type, nope + head_v)
        k_nope = g.view_3d(kv, nope, n_head, n_tokens, row, row * n_head, 0)
        v_cur = g.cont(g.view_3d(kv, head_v, n_head, n_tokens, row, row * n_head, row_size(kv.type, nope)))
        q_cur = g.rope(q, inp_pos)
        k_cur = g.concat(k_nope, g.repeat(k_pe, g.Tensor("f32", (rope, n_head, n_tokens))), 0)
        return self.build_attn(q_cur, k_cur, v_cur, wo, il)

    def build_attn_k(self, q: Tensor, k: Tensor, v: Tensor, wo: Tensor, il: int, v_mla: Tensor) -> Tensor:
        """build_attn(llm_graph_input_attn_k*): only K is cached; V is a view of its first rank columns."""
        k_idxs, _, mask = self.build_attn_inp_kv(False)
        for tensor in (q, v, k):
            self.gf.expand(tensor)
        self.gf.expand(self.cpy_k(k, k_idxs, il, False))
        k_view = self.get_k(il, False)
        v_view = g.view_4d(k_view, v.ne[0], k_view.ne[1], k_view.ne[2], k_view.ne[3], k_view.nb[1], k_view.nb[2],
                           k_view.nb[3], 0)
        cur = self.build_attn_mha(q, k_view, v_view, mask, v_mla, False)
        return g.mul_mat(wo, cur)
