"""phi3 (src/models/phi3.cpp): fused QKV, fused gate/up FFN."""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import Builder
from llamalaunch.model.ggml.sim import Tensor
from llamalaunch.model.ggml.types import row_size


class Phi3Graph(Builder):
    """phi3: fused QKV, fused gate+up (SWIGLU over one 2*n_ff matrix), Q scaled after RoPE."""

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            residual = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            q, k, v = self.build_qkv_fused(cur, il)
            q = g.scale(g.rope(q, inp_pos))
            k = g.rope(k, inp_pos)
            cur = self.build_attn(q, k, v, self.w(il, spec.n_embd, spec.n_embd), il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                residual = g.get_rows(residual, out_ids)
            cur = g.add(cur, residual)
            residual = cur
            cur = self.build_norm(cur, self.norm_w(il), il)
            up = g.mul_mat(self.w(il, spec.n_embd, 2 * spec.n_ff[il]), cur)
            cur = g.mul_mat(self.w(il, spec.n_ff[il], spec.n_embd), g.glu(up))
            inp_l = g.add(residual, cur)
        self.build_output(inp_l)

    def build_qkv_fused(self, cur: Tensor, il: int) -> tuple[Tensor, Tensor, Tensor]:
        spec = self.spec
        hd, n_head, n_kv = spec.head_dim_k, spec.n_head[il], spec.n_head_kv[il]
        qkv = g.mul_mat(self.w(il, spec.n_embd, hd * (n_head + 2 * n_kv)), cur)
        row = row_size(qkv.type, hd)
        q = g.view_3d(qkv, hd, n_head, self.n_tokens, row, qkv.nb[1], 0)
        k = g.view_3d(qkv, hd, n_kv, self.n_tokens, row, qkv.nb[1], row_size(qkv.type, hd * n_head))
        v = g.view_3d(qkv, hd, n_kv, self.n_tokens, row, qkv.nb[1], row_size(qkv.type, hd * (n_head + n_kv)))
        return q, k, v
