"""README.md and docs/ name files that exist: modules move (observe/calibration.py became launch/calibrate.py,
model/synthetic.py tests/synthetic.py), and a newcomer follows the text to the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llamalaunch"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STAGES = ("toolchain", "probe", "model", "plan", "launch", "observe")
# A path from the repository's root, or a module path inside the package (`plan/pipeline.py`).
ROOTED = re.compile(r"(?<![\w/.])(?:llamalaunch|tests|bench|scripts|configs|docs)/[\w./@-]*[\w/]")
IN_PACKAGE = re.compile(rf"(?<![\w/.])(?:{'|'.join(STAGES)})/[\w/]+\.py\b")


def named_paths(text: str) -> set[str]:
    return set(ROOTED.findall(text)) | {f"llamalaunch/{path}" for path in IN_PACKAGE.findall(text)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_path_a_document_names_exists(document: Path) -> None:
    missing = sorted(path for path in named_paths(document.read_text(encoding="utf-8"))
                     if not (ROOT / path).exists())
    assert missing == [], f"{document.name} names files that do not exist: {missing}"


def layout_modules(readme: str) -> list[str]:
    """Every `name.py` of the README's layout block, as a path: a line starting `folder/` sets the folder
    (indented lines below continue it), a `sub/` later on a line (model/'s `ggml/`) a subfolder for the
    names after it."""
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    paths: list[str] = []
    folder = ""
    for line in block.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line.startswith("   "):  # a top-level line: a folder, or modules of the package's root
            folder = words[0] if line.startswith("  ") and words[0].endswith("/") else ""
        current = folder
        for word in words:
            if word.endswith("/") and word != folder and not word.startswith("llamalaunch"):
                current = folder + word
            elif word.endswith(".py") and "<" not in word:
                paths.append(word if "/" in word else f"llamalaunch/{current}{word}")
    return paths


def test_the_readme_layout_lists_modules_that_exist() -> None:
    paths = layout_modules((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "llamalaunch/plan/pipeline.py" in paths and "llamalaunch/model/ggml/sim.py" in paths
    assert [path for path in paths if not (ROOT / path).is_file()] == []


def test_the_readme_layout_names_every_folder_of_the_package() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    folders = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists())
    assert [name for name in folders if f"  {name}/" not in block] == []


def test_the_first_example_s_model_is_written_at_the_clone_s_root_and_ignored_by_git() -> None:
    """`from tests.synthetic import ...` works only from the clone's root, and the 4.5 GB sparse model it
    writes there must not show in `git status` (the test corpus's small .gguf files stay tracked)."""
    import subprocess

    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    written = re.search(r"""run from the clone's root \([^)]*\), `\.venv/bin/python -c 'from tests\.synthetic import """
                        r"""write_preset; write_preset\("([^"]+)", "llama-8b"\)'` writes it there""", readme)
    assert written is not None, "the README's first example must say to write its model from the clone's root"
    model = written.group(1)
    assert f"$ llamalaunch plan {model} " in readme
    ignored = subprocess.run(["git", "check-ignore", "--no-index", model, "tests/fuzz_corpus/tiny-llama-header.gguf"],
                             cwd=ROOT, capture_output=True, text=True, check=False)
    assert ignored.stdout.splitlines() == [model]
