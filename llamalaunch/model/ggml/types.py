"""The one table of ggml tensor types (ggml.c type_traits) and GGUF file types, without importing gguf (numpy).

Every size in the package comes from here: the GGUF reader, the KV cache, the weights, the graph replay.
Checked against the gguf package by tests/test_ggml_types.py.
"""

from __future__ import annotations

# type id: (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}
NEWER_THAN_GGUF = frozenset({42})  # types the pinned gguf package does not know yet (sizes from ggml.c)
GGML_TYPE_IDS: dict[str, int] = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}
# (elements per block, bytes per block) by type id and by name, upper and lower case ("Q8_0", "q8_0")
_BLOCKS: dict[int | str, tuple[int, int]] = {
    key: (block, size) for type_id, (name, block, size) in GGML_TYPES.items() for key in (type_id, name, name.lower())}

# general.file_type: the name llama.cpp prints for it
FILE_TYPES: dict[int, str] = {
    0: "ALL_F32",
    1: "MOSTLY_F16",
    2: "MOSTLY_Q4_0",
    3: "MOSTLY_Q4_1",
    7: "MOSTLY_Q8_0",
    8: "MOSTLY_Q5_0",
    9: "MOSTLY_Q5_1",
    10: "MOSTLY_Q2_K",
    11: "MOSTLY_Q3_K_S",
    12: "MOSTLY_Q3_K_M",
    13: "MOSTLY_Q3_K_L",
    14: "MOSTLY_Q4_K_S",
    15: "MOSTLY_Q4_K_M",
    16: "MOSTLY_Q5_K_S",
    17: "MOSTLY_Q5_K_M",
    18: "MOSTLY_Q6_K",
    19: "MOSTLY_IQ2_XXS",
    20: "MOSTLY_IQ2_XS",
    21: "MOSTLY_Q2_K_S",
    22: "MOSTLY_IQ3_XS",
    23: "MOSTLY_IQ3_XXS",
    24: "MOSTLY_IQ1_S",
    25: "MOSTLY_IQ4_NL",
    26: "MOSTLY_IQ3_S",
    27: "MOSTLY_IQ3_M",
    28: "MOSTLY_IQ2_S",
    29: "MOSTLY_IQ2_M",
    30: "MOSTLY_IQ4_XS",
    31: "MOSTLY_IQ1_M",
    32: "MOSTLY_BF16",
    36: "MOSTLY_TQ1_0",
    37: "MOSTLY_TQ2_0",
    38: "MOSTLY_MXFP4_MOE",
    39: "MOSTLY_NVFP4",
    40: "MOSTLY_Q1_0",
    1024: "GUESSED",
}


def type_block(ggml_type: int | str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type, by id or name; KeyError for an unknown one."""
    return _BLOCKS[ggml_type]


def is_known(ggml_type: int | str) -> bool:
    return ggml_type in _BLOCKS


def type_name(ggml_type: int) -> str:
    """The name ggml gives a type id: 'Q4_K', 'F16'."""
    return GGML_TYPES[ggml_type][0]


def row_size(ggml_type: int | str, n_elements: int) -> int:
    """ggml_row_size: bytes of `n_elements` consecutive elements of one row."""
    block_size, type_size = _BLOCKS[ggml_type]
    return type_size * n_elements // block_size


def is_quantized(ggml_type: int | str) -> bool:
    """ggml_is_quantized: every quantized type packs several elements per block, no plain type does."""
    return _BLOCKS[ggml_type][0] > 1
