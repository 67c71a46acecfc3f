"""What the installed package is: its dependencies are what it imports, it carries no test tools, and
bench/ uses it through llamalaunch.api only (issue 16)."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

import llamalaunch

PACKAGE = Path(llamalaunch.__file__).parent
ROOT = PACKAGE.parent


def imports(path: Path) -> Iterator[str]:
    """Every absolute module name a file imports, lazy and TYPE_CHECKING imports included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module


def package_imports() -> dict[str, set[Path]]:
    """Top-level name -> the package files that import it."""
    found: dict[str, set[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in imports(path):
            found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT))
    return found


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalized(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]) for line in requirements}


def test_the_package_declares_every_third_party_module_it_imports_and_no_more() -> None:
    third_party = {name: paths for name, paths in package_imports().items()
                   if name not in sys.stdlib_module_names and name != "llamalaunch"}
    distributions = metadata.packages_distributions()
    needed = {normalized(dist): paths for name, paths in third_party.items()
              for dist in distributions.get(name, [name])}
    declared = requirement_names(pyproject()["project"]["dependencies"])
    assert {name: sorted(map(str, paths)) for name, paths in needed.items() if name not in declared} == {}
    assert declared - set(needed) == set()


def test_gguf_is_a_test_dependency_only() -> None:
    assert "gguf" not in requirement_names(pyproject()["project"]["dependencies"])
    assert "gguf" in requirement_names(pyproject()["project"]["optional-dependencies"]["test"])


def test_the_package_carries_no_test_or_bench_code() -> None:
    assert not (PACKAGE / "model" / "synthetic.py").exists()
    assert {name: paths for name, paths in package_imports().items() if name in ("tests", "bench")} == {}
