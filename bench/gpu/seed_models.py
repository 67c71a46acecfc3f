"""Synthetic models of the seed's shapes (sparse files): Devstral-Small ~24B, gemma-3-27b, R1-Distill-70B."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.synthetic import SyntheticShape, write_preset, write_synthetic

folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
write_synthetic(folder / "devstral-24b-q5_k.gguf", "llama",
                SyntheticShape(40, 5120, 32768, 32, 8, 131072, head_dim=128, n_ctx_train=131072), "Q5_K")
write_synthetic(folder / "gemma3-27b-q4_0.gguf", "gemma3",
                SyntheticShape(62, 5376, 21504, 32, 16, 262144, head_dim=128, n_ctx_train=131072, tied=True,
                               n_swa=1024), "Q4_0")
write_preset(folder / "r1-distill-70b-q4_k.gguf", "llama-70b", file_type="Q4_K")
write_preset(folder / "llama-8b.gguf", "llama-8b")
print("written", *sorted(p.name for p in folder.iterdir()))
