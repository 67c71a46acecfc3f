"""What a tensor takes in a backend's buffer: the buffer type's alignment and alloc size (ggml-backend).

The weights (load.py), the KV cache (kv.py) and the compute-buffer replay (sched.py) all size with these.
"""

from __future__ import annotations

from llamalaunch.model.ggml.types import is_quantized, row_size

CPU_ALIGNMENT = 32  # TENSOR_ALIGNMENT (ggml-impl.h): CPU buffers, and RPC workers that run on the CPU
CUDA_ALIGNMENT = 128  # ggml_backend_cuda_buffer_type_get_alignment
MATRIX_ROW_PADDING = 512  # ggml-cuda/common.cuh: CUDA pads quantized rows to a multiple of this


def alignment(backend: str) -> int:
    """The buffer alignment of a backend kind ("CUDA", "RPC", "CPU")."""
    return CUDA_ALIGNMENT if backend == "CUDA" else CPU_ALIGNMENT


def cuda_alloc_size(ggml_type: int | str, ne0: int, nbytes: int) -> int:
    """ggml_backend_cuda_buffer_type_get_alloc_size: a quantized tensor whose rows are not a multiple of
    MATRIX_ROW_PADDING elements gets room for the rest of one padded row."""
    if is_quantized(ggml_type) and ne0 % MATRIX_ROW_PADDING:
        return nbytes + row_size(ggml_type, MATRIX_ROW_PADDING - ne0 % MATRIX_ROW_PADDING)
    return nbytes
