"""Our copy of ggml's type table equals the gguf package's (the reader avoids importing gguf: numpy),
and it is the one table every part of the package reads."""

from __future__ import annotations

import subprocess
import sys
import tarfile

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from llamalaunch.model.ggml import LLAMA_CPP_COMMIT, sim
from llamalaunch.model.ggml.sched import Backend
from llamalaunch.model.ggml.types import (
    FILE_TYPES,
    GGML_TYPES,
    NEWER_THAN_GGUF,
    is_quantized,
    row_size,
    type_block,
)
from llamalaunch.model.kv import tensor_alloc_bytes
from llamalaunch.paths import cache_dir
from llamalaunch.toolchain.pin import LLAMA_CPP_SDIST


def test_type_sizes_and_names_match_gguf() -> None:
    expected = {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
    assert {type_id: GGML_TYPES[type_id] for type_id in expected} == expected
    assert set(GGML_TYPES) - set(expected) == NEWER_THAN_GGUF


def test_file_type_names_match_gguf() -> None:
    assert FILE_TYPES == {int(f): f.name for f in LlamaFileType}


def test_one_block_size_by_id_and_by_name() -> None:
    for type_id, (name, block, size) in GGML_TYPES.items():
        assert type_block(type_id) == type_block(name) == type_block(name.lower()) == (block, size)
        assert is_quantized(type_id) == (name not in {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})


def test_a_type_newer_than_gguf_is_known_everywhere() -> None:
    """Q2_0 (64 elements in 18 bytes) was known to the GGUF reader only; the cache and the graph replay
    raised KeyError on it. With one table, every reader sizes it the same way."""
    assert row_size("q2_0", 128) == row_size(42, 128) == 36
    assert sim.new("q2_0", 128, 4).nbytes() == 4 * 36
    assert tensor_alloc_bytes("q2_0", 128, 4, "CPU") == 4 * 36 + 16  # padded to 32
    cuda = Backend("CUDA0", "CUDA", "CUDA0", 128)
    assert cuda.alloc_size(sim.new("q2_0", 128, 4)) == 4 * 36 + row_size("q2_0", 512 - 128)


def test_the_replay_names_the_llama_cpp_it_mirrors() -> None:
    """model/ggml says which llama.cpp it follows: the commit vendored in the pinned sdist. A new pin
    fails here until the replay is checked against the new tree and the commit updated."""
    archive = cache_dir() / "downloads" / LLAMA_CPP_SDIST.filename
    if not archive.exists():
        pytest.skip("the pinned sdist is not downloaded (scripts/setup fetches it)")
    root = LLAMA_CPP_SDIST.tree_in_archive.split("/")[0]
    with tarfile.open(archive) as tar:
        head = tar.extractfile(f"{root}/.git/modules/vendor/llama.cpp/HEAD")
        assert head is not None
        assert head.read().decode().strip() == LLAMA_CPP_COMMIT


def test_planning_never_imports_gguf_or_numpy() -> None:
    code = ("import sys; from llamalaunch.plan.pipeline import PlanInputs; "
            "print('gguf' in sys.modules, 'numpy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
