"""The package imports only downward: each stage uses its own folder and the stages below it (STYLE.md).

Every `import llamalaunch…` / `from llamalaunch… import` in every module counts, lazy and TYPE_CHECKING
imports included, since each one ties the lower stage to the upper one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llamalaunch

PACKAGE = Path(llamalaunch.__file__).parent

# Lowest first; stages on one line may use each other.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"__init__", "units", "errors", "paths", "options"}),
    frozenset({"toolchain", "probe", "model"}),
    frozenset({"plan"}),
    frozenset({"config"}),  # profiles and settings: reads plan's choices, read by launch/ and the CLI
    frozenset({"launch"}),
    frozenset({"observe"}),
    frozenset({"api"}),  # the public API: re-exports entry points of the stages below (scripts, bench/)
    frozenset({"cli", "cli_common", "cli_ops", "cli_status", "cli_values", "__main__"}),
)

# Upward edges that remain, (importer, imported) as module names. Each is a debt: remove the line when
# the edge goes; a new upward edge fails the test.
KNOWN_UPWARD: frozenset[tuple[str, str]] = frozenset()



def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, importer: str, is_package: bool = False) -> set[str]:
    """The llamalaunch modules that module `importer` (its text: `source`) imports, relative ones resolved."""
    found: set[str] = set()
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from llamalaunch.model import compute` imports a module: count the submodule
            found.update(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base
                         for alias in node.names)
    return {name for name in found if name == "llamalaunch" or name.startswith("llamalaunch.")}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def stage(module: str) -> str:
    """The top-level part of the package a module belongs to: `plan`, `cli`, `__init__` for the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    for index, stages in enumerate(LAYERS):
        if stage(module) in stages:
            return index
    raise AssertionError(f"{module}: its stage {stage(module)!r} is in no layer of LAYERS; add it")


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports."""
    return {module_name(path): imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")
            for path in sorted(PACKAGE.rglob("*.py"))}


def upward_edges() -> set[tuple[str, str]]:
    return {(importer, imported) for importer, imports in import_graph().items() for imported in imports
            if layer(imported) > layer(importer)}


def test_no_module_imports_a_higher_stage() -> None:
    new = sorted(upward_edges() - KNOWN_UPWARD)
    assert not new, "upward imports (see STYLE.md's layer order): " + ", ".join(f"{a} -> {b}" for a, b in new)


def test_known_exceptions_still_exist() -> None:
    """An exception whose edge is gone is stale: remove it so the edge cannot come back unnoticed."""
    assert sorted(KNOWN_UPWARD - upward_edges()) == []


def test_an_upward_import_is_caught() -> None:
    importer = "llamalaunch.model.example"
    imported = imported_modules("from llamalaunch.plan.request import Request\n"
                                "def f() -> None:\n    from ..launch import logparse\n", importer)
    assert imported == {"llamalaunch.plan.request", "llamalaunch.launch.logparse"}
    assert all(layer(name) > layer(importer) for name in imported)
