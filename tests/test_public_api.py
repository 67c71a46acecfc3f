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
from llamalaunch import api
from llamalaunch.launch.calibrate import CALIBRATION_MODEL
from tests.synthetic import write_preset

PACKAGE = Path(llamalaunch.__file__).parent
ROOT = PACKAGE.parent
BENCH = ROOT / "bench"


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


def test_the_package_data_covers_the_calibration_model_header() -> None:
    """calibration on first sight writes its model from this header; a wheel without it could not."""
    shipped = {path for pattern in pyproject()["tool"]["setuptools"]["package-data"]["llamalaunch"]
               for path in PACKAGE.glob(pattern)}
    assert PACKAGE / "launch" / (CALIBRATION_MODEL + ".xz") in shipped


def test_bench_uses_the_package_through_its_public_api_only() -> None:
    internal = {str(path.relative_to(ROOT)): sorted(names) for path in sorted(BENCH.rglob("*.py"))
                if (names := {n for n in imports(path) if n.split(".")[0] == "llamalaunch" and n != "llamalaunch.api"})}
    assert internal == {}


def test_bench_scripts_find_the_repository_without_editing_sys_path() -> None:
    """They run as `python -m bench.NAME` from the repository root (bench/gpu/*.sh too)."""
    edits = [str(path.relative_to(ROOT)) for path in sorted(BENCH.rglob("*"))
             if path.suffix in (".py", ".sh") and "sys.path" in path.read_text()]
    assert edits == []


def test_every_public_name_exists() -> None:
    assert [name for name in api.__all__ if not hasattr(api, name)] == []
    assert len(set(api.__all__)) == len(api.__all__)


def test_the_api_docstring_example_plans_a_model_for_what_if_devices(tmp_path: Path) -> None:
    model = write_preset(tmp_path / "llama-8b.gguf", "llama-8b")
    request = api.build_request(ctx="max")
    inputs = api.PlanInputs.gather(model=str(model), demo=False, llama_server=None, rpc=[],
                                   assume=["CUDA0=24GiB"], overhead=[], request=request)
    plan = inputs.plan()
    assert plan.ctx_tokens == 131072 and [d.device.name for d in plan.devices] == ["CUDA0"]
    assert plan.argv[:4] == ("-m", str(model), "-c", "131072")
