"""Our copy of ggml's type table equals the gguf package's (the reader avoids importing gguf: numpy)."""

from __future__ import annotations

import subprocess
import sys

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from llamalaunch.model.ggml_types import FILE_TYPES, GGML_TYPES


def test_type_sizes_and_names_match_gguf() -> None:
    expected = {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
    assert GGML_TYPES == expected


def test_file_type_names_match_gguf() -> None:
    assert FILE_TYPES == {int(f): f.name for f in LlamaFileType}


def test_planning_never_imports_gguf_or_numpy() -> None:
    code = ("import sys; from llamalaunch.plan.pipeline import PlanInputs; "
            "print('gguf' in sys.modules, 'numpy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
