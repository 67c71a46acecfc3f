"""Recurrent-state graphs: build_rs_inp / build_rs (src/llama-graph.cpp) and the mamba2 layer
(src/models/mamba-base.cpp), shared by the hybrid families.
"""

from __future__ import annotations

from collections.abc import Callable

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import Builder
from llamalaunch.model.ggml.sim import Tensor


class RecurrentBuilder(Builder):
    """Recurrent-state helpers: build_rs_inp and build_rs (llama-graph.cpp) over the state tensors."""

    def build_rs_inp(self) -> None:
        n_rs = self.res.n_seqs  # full-memory reservation: n_rs = the state size = max(1, n_seq_max)
        self.s_copy = g.new_input("i32", n_rs, name="rs_s_copy")
        self.s_copy_main = g.view_1d(self.s_copy, self.res.n_seqs, 0)
        self.s_copy_extra = g.view_1d(self.s_copy, n_rs - self.res.n_seqs, self.res.n_seqs * 4)

    def state(self, il: int, which: str, width: int) -> Tensor:
        key = (il, which)
        if key not in self.caches:
            self.caches[key] = g.cache("f32", width, self.res.n_seqs, backend=self.res.layer_backend[il])
        return self.caches[key]

    def build_rs(self, s: Tensor, state_size: int,
                 get_rows: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        n_seqs = self.res.n_seqs
        states = g.reshape(s, state_size, s.ne[1])
        zero = g.view_1d(states, state_size, 0)
        self.gf.expand(g.view_tensor(zero, "SCALE", (zero,)))
        out = (get_rows or g.get_rows)(states, self.s_copy_main)
        self.gf.expand(out)
        extra = g.get_rows(states, self.s_copy_extra)
        self.gf.expand(g.cpy(extra, g.view_2d(s, state_size, s.ne[1] - n_seqs, s.nb[1], n_seqs * s.nb[1])))
        return out

    def build_mamba2_layer(self, cur: Tensor, il: int) -> Tensor:
        spec, n_seqs = self.spec, self.res.n_seqs
        n_st = self.n_tokens // n_seqs
        d_conv, d_inner, d_state, n_group = spec.ssm_d_conv, spec.ssm_d_inner, spec.ssm_d_state, spec.ssm_n_group
        n_head = spec.ssm_dt_rank
        head_dim = d_inner // n_head
        conv_dim = d_inner + 2 * n_group * d_state
        conv_states = self.state(il, "r", (d_conv - 1) * conv_dim)
        ssm_states = self.state(il, "s", d_state * d_inner)
        conv = self.build_rs(conv_states, (d_conv - 1) * conv_dim)
        conv = g.reshape(conv, d_conv - 1, conv_dim, n_seqs)
        zx = g.mul_mat(self.w(il, spec.n_embd, 2 * d_inner + 2 * n_group * d_state + n_head), cur)
        zx = g.reshape(zx, zx.ne[0], n_st, n_seqs)
        z = g.view_4d(zx, head_dim, n_head, n_st, n_seqs, head_dim * zx.nb[0], zx.nb[1], zx.nb[2], 0)
        xbc = g.view_3d(zx, conv_dim, n_st, n_seqs, zx.nb[1], zx.nb[2], d_inner * 4)
        dt = g.view_3d(zx, n_head, n_st, n_seqs, zx.nb[1], zx.nb[2], (2 * d_inner + 2 * n_group * d_state) * 4)
        conv_x = g.concat(conv, g.transpose(xbc), 0)
        last = g.view_3d(conv_x, d_conv - 1, conv_dim, n_seqs, conv_x.nb[1], conv_x.nb[2], n_st * conv_x.nb[0])
        row = (d_conv - 1) * conv_dim * 4
        self.gf.expand(g.cpy(last, g.view_2d(conv_states, (d_conv - 1) * conv_dim, n_seqs, conv_states.nb[1], 0)))
        xbc = g.ssm_conv(conv_x, self.w(il, d_conv, conv_dim, type_name="f32"))
        xbc = g.unary(g.add(xbc, self.w(il, conv_dim, type_name="f32")))
        x = g.view_4d(xbc, head_dim, n_head, n_st, n_seqs, head_dim * xbc.nb[0], xbc.nb[1], xbc.nb[2], 0)
        b = g.view_4d(xbc, d_state, n_group, n_st, n_seqs, d_state * xbc.nb[0], xbc.nb[1], xbc.nb[2], d_inner * 4)
        c = g.view_4d(xbc, d_state, n_group, n_st, n_seqs, d_state * xbc.nb[0], xbc.nb[1], xbc.nb[2],
                      (d_inner + n_group * d_state) * 4)
        dt = g.add(g.cont(dt), self.w(il, n_head, type_name="f32"))
        a = self.w(il, 1, n_head, type_name="f32")

        def scan(states: Tensor, ids: Tensor) -> Tensor:
            ssm = g.reshape(states, d_state, head_dim, n_head, ssm_states.ne[1])
            result = Tensor("f32", (x.nelements() + d_state * head_dim * n_head * ids.ne[0],), "SSM_SCAN",
                            (ssm, x, dt, a, b, c, ids))
            return result

        y_ssm = self.build_rs(ssm_states, d_state * d_inner, scan)
        size = d_state * d_inner
        row = size * 4
        self.gf.expand(g.cpy(g.view_3d(y_ssm, size, n_seqs, 1, row, row * n_seqs, x.nelements() * 4),
                             g.view_3d(ssm_states, size, n_seqs, 1, ssm_states.nb[1], n_seqs * row, 0)))
        y = g.view_4d(y_ssm, head_dim, n_head, n_st, n_seqs, x.nb[1], n_head * x.nb[1], n_st * n_head * x.nb[1], 0)
        y = g.add(y, g.mul(x, self.w(il, 1, n_head, type_name="f32")))
        y = g.glu(g.cont(z), y)
        if self.spec.has(f"blk.{il}.ssm_norm.weight", True):
            y = g.reshape(y, d_inner // n_group, n_group, n_st, n_seqs)
            y = self.build_norm(y, self.w(il, d_inner // n_group, n_group, type_name="f32"), il)
        y = g.reshape(y, d_inner, n_st * n_seqs)
        return g.mul_mat(self.w(il, d_inner, spec.n_embd), y)
