"""llama-shaped graphs: llama and mistral3 (src/models/llama.cpp, mistral3.cpp), qwen2 (qwen2.cpp: QKV
biases), qwen3 and qwen3moe (qwen3.cpp, qwen3moe.cpp: Q/K norms); also the superset graph replayed for
architectures without a graph of their own.
"""

from __future__ import annotations

from llamalaunch.model.ggml import sim as g
from llamalaunch.model.ggml.graphs.base import Builder, build_moe_ffn
from llamalaunch.model.ggml.sim import Tensor


class LlamaGraph(Builder):
    """llama_model_llama::graph (also mistral-style MoE with ffn_gate_inp)."""

    qkv_bias = False
    qk_norm = False

    def build(self) -> None:
        spec = self.spec
        inp_l = self.build_inp_embd()
        inp_pos = self.build_inp_pos()
        self.build_attn_inp_kv()
        if spec.generic_iswa:  # an unknown arch with a sliding window may hold a second mask (kv_iswa)
            self.build_attn_inp_kv(True)
        out_ids = self.build_inp_out_ids()
        for il in self.layers:
            inp_sa = inp_l
            cur = self.build_norm(inp_l, self.norm_w(il), il)
            q, k, v = self.build_qkv(cur, il, bias=self.qkv_bias)
            if self.qk_norm:
                q = self.build_norm(q, self.norm_w(il, spec.head_dim_k), il)
                k = self.build_norm(k, self.norm_w(il, spec.head_dim_k), il)
            q = g.rope(q, inp_pos)
            k = g.rope(k, inp_pos)
            cur = self.build_attn(q, k, v, self.w(il, spec.head_dim_k * spec.n_head[il], spec.n_embd), il)
            if il == spec.n_layer - 1:
                cur = g.get_rows(cur, out_ids)
                inp_sa = g.get_rows(inp_sa, out_ids)
            ffn_inp = g.add(cur, inp_sa)
            cur = self.build_norm(ffn_inp, self.norm_w(il), il)
            if spec.n_expert and spec.generic and spec.n_ff[il]:
                # an unknown MoE arch may mix dense, routed and shared FFNs: plan for all of them
                cur = g.add(self.build_moe(cur, il), self.build_ffn_par(cur, il, spec.n_ff[il]))
            else:
                cur = self.build_moe(cur, il) if spec.n_expert else self.build_ffn_par(cur, il, spec.n_ff[il])
            inp_l = g.add(cur, ffn_inp)
        self.build_output(inp_l)

    def build_moe(self, cur: Tensor, il: int, n_ff_exp: int | None = None, weights_norm: bool = True,
                  sigmoid: bool = False) -> Tensor:
        return build_moe_ffn(self, cur, il, n_ff_exp or self.spec.n_ff_exp or self.spec.n_ff[il],
                             weights_norm, sigmoid)


class Qwen2Graph(LlamaGraph):
    qkv_bias = True


class Qwen3Graph(LlamaGraph):
    qk_norm = True
