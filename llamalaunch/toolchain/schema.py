"""The JSON form of a Toolchain (`toolchain --json`)."""

from __future__ import annotations

from typing import Any

from llamalaunch.toolchain.discover import Binary, Toolchain


def binary_to_dict(binary: Binary | None) -> dict[str, Any] | None:
    if binary is None:
        return None
    return {"path": str(binary.path), "version": binary.version, "backend": binary.backend,
            "capabilities": sorted(binary.capabilities)}


def toolchain_to_dict(toolchain: Toolchain) -> dict[str, Any]:
    return {"schema": 1, "source": toolchain.source, "llama_server": binary_to_dict(toolchain.server),
            "ggml_rpc_server": binary_to_dict(toolchain.rpc_server),
            "llama_fit_params": binary_to_dict(toolchain.fit_params)}
