"""ggml's graph building, backend scheduling and graph allocation, replayed on shapes to size compute buffers.

Mirrors the llama.cpp vendored in the pinned llama-cpp-python 0.3.36 sdist (toolchain/pin.py): llama.cpp
commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (no release tag recorded; ggml 0.25.3, libllama 0.5.0).
Re-check these files against that tree when the pin moves:

- types.py — ggml.c's type_traits: block size and bytes of every tensor type (the package's one table)
- sim.py — tensors and the ops the model graphs use, shapes and strides as ggml.c's constructors give them
- sched.py — ggml-backend.cpp's scheduler: backend per node, splits, input copies, pipeline copies
- alloc.py — ggml-alloc.c's graph allocator: allocation order, in-place reuse, best-fit free blocks
- graphs/ — src/llama-graph.cpp and src/models/*.cpp: the worst-case graph of each model family
"""

LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
