"""Real loads for `plan --verify` and calibration leave no log folder behind, unless a failure names it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from llamalaunch.errors import ServeError
from llamalaunch.launch.measure import measure_plan
from llamalaunch.model.estimate import Placement, SlotRange
from tests.support import RpcWorker

pytestmark = pytest.mark.llama


def measure_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("llamalaunch-measure-*"))


@pytest.mark.parametrize("how", [["--verify"], ["--calibrate", "--json"]], ids=["verify", "calibrate"])
def test_a_real_load_that_went_well_leaves_no_log_folder(how: list[str], demo_model: Path,
                                                          llama_bin_dir: Path,
                                                          rpc_workers: Callable[..., RpcWorker],
                                                          tmp_path: Path) -> None:
    worker = rpc_workers()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    result = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", str(demo_model), "--ctx", "2k",
                             "--rpc", worker.endpoint, "--budget", "RPC0=300MiB", *how,
                             "--llama-server", str(llama_bin_dir / "llama-server")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    said = "planned vs llama-server" if "--verify" in how else "overhead calibrated"
    assert said in result.stdout
    assert measure_folders(tmp) == []


def test_a_load_that_fails_keeps_the_log_it_names(llama_bin_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ServeError) as failed:
        measure_plan(llama_bin_dir / "llama-server", ["-m", str(missing), "-ngl", "0", "-c", "256"],
                     Placement((SlotRange("CPU", "CPU", 0, 0),)), [])
    [folder] = measure_folders(tmp_path)
    [log] = list(folder.iterdir())
    assert failed.value.hint == f"see {log}"
