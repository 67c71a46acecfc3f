"""llama.cpp's worst-case graphs, rebuilt op for op on sim.py tensors, one module per model family.

Each builder follows its src/models/<arch>.cpp and the shared helpers of src/llama-graph.cpp (base.py),
with the same ggml_build_forward_expand calls, so the node order — which decides what ggml-alloc can
reuse — is llama.cpp's. Only shapes matter: weights are pre-allocated leafs on the backend of their layer.

A new family: a module here with its Builder subclass, and its architecture names in WHERE.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping

from llamalaunch.model.ggml.graphs.base import Builder, ModelSpec, Reserve

GraphBuilder = Callable[[ModelSpec, Reserve], Builder]

# general.architecture -> the graph llama.cpp builds for it (llama_model::build_graph): (module here, class)
WHERE: dict[str, tuple[str, str]] = {
    "deepseek2": ("deepseek2", "DeepSeek2Graph"),
    "deepseek4": ("deepseek4", "DeepSeek4Graph"),
    "gemma2": ("gemma", "GemmaGraph"),
    "gemma3": ("gemma", "GemmaGraph"),
    "gemma4": ("gemma", "Gemma4Graph"),
    "glm4moe": ("glm4moe", "Glm4MoeGraph"),
    "gpt-oss": ("gpt_oss", "GptOssGraph"),
    "granitehybrid": ("mamba", "GraniteHybridGraph"),
    "lfm2": ("lfm2", "Lfm2Graph"),
    "llama": ("llama", "LlamaGraph"),
    "llama4": ("llama4", "Llama4Graph"),
    "mamba2": ("mamba", "Mamba2Graph"),
    "minimax-m2": ("minimax_m2", "MiniMaxM2Graph"),
    "mistral3": ("llama", "LlamaGraph"),
    "nemotron_h": ("mamba", "NemotronHGraph"),
    "nemotron_h_moe": ("mamba", "NemotronHGraph"),
    "phi3": ("phi3", "Phi3Graph"),
    "qwen2": ("llama", "Qwen2Graph"),
    "qwen3": ("llama", "Qwen3Graph"),
    "qwen3moe": ("llama", "Qwen3Graph"),
    "qwen35": ("qwen3next", "GatedDeltaNetGraph"),
    "qwen35moe": ("qwen3next", "GatedDeltaNetGraph"),
    "qwen3next": ("qwen3next", "GatedDeltaNetGraph"),
}


class _Builders(Mapping[str, GraphBuilder]):
    """WHERE as a mapping to the classes; a family's module is imported when its graph is first asked
    for, so a plan imports one family, not all (start-up)."""

    def __getitem__(self, arch: str) -> GraphBuilder:
        module, name = WHERE[arch]
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return iter(WHERE)

    def __len__(self) -> int:
        return len(WHERE)


BUILDERS: Mapping[str, GraphBuilder] = _Builders()

__all__ = ["BUILDERS", "Builder", "GraphBuilder", "ModelSpec", "Reserve"]
