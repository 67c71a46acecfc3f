"""llama.cpp's worst-case graphs, rebuilt op for op on sim.py tensors, one module per model family.

Each builder follows its src/models/<arch>.cpp and the shared helpers of src/llama-graph.cpp (base.py),
with the same ggml_build_forward_expand calls, so the node order — which decides what ggml-alloc can
reuse — is llama.cpp's. Only shapes matter: weights are pre-allocated leafs on the backend of their layer.

A new family: a module here with its Builder subclass, and its architecture names in BUILDERS.
"""

from __future__ import annotations

from collections.abc import Callable

from llamalaunch.model.ggml.graphs.base import Builder, ModelSpec, Reserve
from llamalaunch.model.ggml.graphs.deepseek2 import DeepSeek2Graph
from llamalaunch.model.ggml.graphs.deepseek4 import DeepSeek4Graph
from llamalaunch.model.ggml.graphs.gemma import Gemma4Graph, GemmaGraph
from llamalaunch.model.ggml.graphs.glm4moe import Glm4MoeGraph
from llamalaunch.model.ggml.graphs.gpt_oss import GptOssGraph
from llamalaunch.model.ggml.graphs.lfm2 import Lfm2Graph
from llamalaunch.model.ggml.graphs.llama import LlamaGraph, Qwen2Graph, Qwen3Graph
from llamalaunch.model.ggml.graphs.llama4 import Llama4Graph
from llamalaunch.model.ggml.graphs.mamba import GraniteHybridGraph, Mamba2Graph, NemotronHGraph
from llamalaunch.model.ggml.graphs.minimax_m2 import MiniMaxM2Graph
from llamalaunch.model.ggml.graphs.phi3 import Phi3Graph
from llamalaunch.model.ggml.graphs.qwen3next import GatedDeltaNetGraph

GraphBuilder = Callable[[ModelSpec, Reserve], Builder]

# general.architecture -> the graph llama.cpp builds for it (llama_model::build_graph)
BUILDERS: dict[str, GraphBuilder] = {
    "deepseek2": DeepSeek2Graph,
    "deepseek4": DeepSeek4Graph,
    "gemma2": GemmaGraph,
    "gemma3": GemmaGraph,
    "gemma4": Gemma4Graph,
    "glm4moe": Glm4MoeGraph,
    "gpt-oss": GptOssGraph,
    "granitehybrid": GraniteHybridGraph,
    "lfm2": Lfm2Graph,
    "llama": LlamaGraph,
    "llama4": Llama4Graph,
    "mamba2": Mamba2Graph,
    "minimax-m2": MiniMaxM2Graph,
    "mistral3": LlamaGraph,
    "nemotron_h": NemotronHGraph,
    "nemotron_h_moe": NemotronHGraph,
    "phi3": Phi3Graph,
    "qwen2": Qwen2Graph,
    "qwen3": Qwen3Graph,
    "qwen3moe": Qwen3Graph,
    "qwen35": GatedDeltaNetGraph,
    "qwen35moe": GatedDeltaNetGraph,
    "qwen3next": GatedDeltaNetGraph,
}

__all__ = ["BUILDERS", "Builder", "GraphBuilder", "ModelSpec", "Reserve"]
