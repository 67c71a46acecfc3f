"""Layer order: probe/ sits below the stages that use it and imports none of them (issue 16)."""

from __future__ import annotations

import ast
from pathlib import Path

import llamalaunch

PACKAGE = Path(llamalaunch.__file__).parent
ABOVE_PROBE = ("model", "plan", "launch", "observe", "cli", "cli_ops", "cli_status")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_probe_imports_nothing_above_it() -> None:
    upward = sorted(f"{path.relative_to(PACKAGE)} imports {name}"
                    for path in (PACKAGE / "probe").glob("*.py")
                    for name in imported_modules(path)
                    if name.split(".")[:2] in (["llamalaunch", stage] for stage in ABOVE_PROBE))
    assert upward == []
