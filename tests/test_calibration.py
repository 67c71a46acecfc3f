"""Calibration of the memory a GPU backend uses outside llama.cpp's accounting, from real logs."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import lzma
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import llamalaunch.launch.calibrate as calibration_module
from bench.llama_runs import worker_baseline_vsz
from llamalaunch.launch.calibrate import (
    CALIBRATION_MODEL,
    CALIBRATION_MODEL_BYTES,
    CalibrationError,
    Calibrator,
    RunCalibration,
    calibration_overhead,
    write_calibration_model,
)
from llamalaunch.launch.logparse import BreakdownRow
from llamalaunch.launch.supervisor import SupervisorEvent
from llamalaunch.model.gguf_header import read_header
from llamalaunch.plan.overheads import (
    Calibration,
    OverheadSource,
    calibration_for,
    identity_key,
    load_calibrations,
    load_overheads,
    overheads_for,
    record_overhead,
    sources_for,
)
from llamalaunch.probe.device import Device
from llamalaunch.units import MIB
from tests.serve_support import ServeRun
from tests.support import RpcWorker
from tests.synthetic import SyntheticShape, write_synthetic

FIXTURES = Path(__file__).parent / "fixtures" / "llama-server-logs"
FIXTURE = FIXTURES / "cuda-h100-excerpts-8b.log"
# The demo model's shape (SmolLM2-135M), zero weights: the calibration model where the demo was never fetched.
DEMO_SHAPE = SyntheticShape(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, n_vocab=49152,
                            n_ctx_train=8192)
SHIPPED_HEADER = Path(calibration_module.__file__).parent / (CALIBRATION_MODEL + ".xz")


def h100(free_mib: int) -> Device:
    return Device("CUDA0", "CUDA", "NVIDIA H100 80GB HBM3", free_mib * MIB, 81079 * MIB, 0)


def first_run_lines() -> list[str]:
    """The ctx=4096 run: `81079 = 75822 + (4658 = 4026 + 512 + 120) + 597`."""
    lines = FIXTURE.read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("===== m8 ctx=4096")))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("====="))
    return lines[start:end]


def test_overhead_is_free_before_less_free_after_less_llama_cpps_own(tmp_path: Path) -> None:
    calibrator = Calibrator([h100(75822 + 4658 + 597)])
    for line in first_run_lines():
        calibrator.feed(line)
    assert calibrator.record(tmp_path / "c.json") == {"CUDA0": 597 * MIB}
    assert load_overheads(tmp_path / "c.json") == {"CUDA:NVIDIA H100 80GB HBM3": 597 * MIB}
    other = Device("CUDA1", "CUDA", "NVIDIA H100 80GB HBM3", 0, 0, 1)
    assert overheads_for([other], load_overheads(tmp_path / "c.json")) == {"CUDA1": 597 * MIB}


def test_implausible_figures_are_not_recorded(tmp_path: Path) -> None:
    """Another process freeing memory during the run would make the figure negative: ignored."""
    calibrator = Calibrator([h100(70000)])
    for line in first_run_lines():
        calibrator.feed(line)
    assert calibrator.record(tmp_path / "c.json") == {}
    assert load_overheads(tmp_path / "c.json") == {}


def test_rpc_and_what_if_devices_are_not_calibrated(tmp_path: Path) -> None:
    run = RunCalibration(tmp_path / "c.json")
    worker = Device("RPC0", "RPC", "127.0.0.1:50052", 1 << 34, 1 << 34, 0, endpoint="127.0.0.1:50052")
    assert Calibrator([worker]).devices == {}
    run.on_event(SupervisorEvent("phase", "stopped", phase="stopped"))
    assert run.recorded == {}


def test_a_real_h100_run_that_filled_its_context(tmp_path: Path) -> None:
    """H100 squeezed to 10,238 MiB free, 8B at ctx 42752, a 42720-token prompt, then SIGTERM (seen)."""
    calibrator = Calibrator([h100(10238)])
    for line in (FIXTURES / "cuda-h100-8b-ctx42752-filled.log").read_text().splitlines():
        calibrator.feed(line)
    recorded = calibrator.record(tmp_path / "c.json")
    assert recorded == {"CUDA0": (10238 - 112 - 9520) * MIB}


# --- calibration on first sight (issue 19) -------------------------------------------------------------

def test_a_device_whose_free_memory_does_not_track_allocations_has_no_overhead() -> None:
    """A CPU worker reports its host's RAM, unchanged by the load (seen: `24105 = 24105 + (123 = ...)`)."""
    worker = Device("RPC0", "RPC", "127.0.0.1:50061", 24105 * MIB, 24105 * MIB, 0, endpoint="127.0.0.1:50061")
    row = BreakdownRow("RPC0", "127.0.0.1:50061", 24105, 24105, 123, 16, 48, 59, -123)
    assert calibration_overhead(worker, row) == 0


def test_a_calibrating_load_on_a_gpu_reads_free_before_less_free_after_less_its_own() -> None:
    row = BreakdownRow("CUDA0", "NVIDIA H100 80GB HBM3", 81079, 75822, 4658, 4026, 512, 120, 597)
    assert calibration_overhead(h100(75822 + 4658 + 607), row) == 607 * MIB
    with pytest.raises(CalibrationError, match="implausible overhead"):
        calibration_overhead(h100(75822 + 4658 + 5000), row)


def test_each_gpu_and_worker_is_its_own_calibration(tmp_path: Path) -> None:
    """A GPU by UUID and driver, a worker by endpoint and device; a GPU without its own figure still
    plans with one of its kind, a worker never with another worker's."""
    gpu = dataclasses.replace(h100(80000), uuid="GPU-1234")
    assert identity_key(gpu, lambda: "580.65") == "CUDA:GPU-1234:driver 580.65"
    worker = Device("RPC1", "RPC", "CPU", 1 << 34, 1 << 34, 1, endpoint="10.0.0.5:50052", worker_index=1)
    assert identity_key(worker) == "RPC:10.0.0.5:50052#1:CPU"
    record_overhead(h100(80000), 600 * MIB, tmp_path / "c.json")
    known = load_calibrations(tmp_path / "c.json")
    assert calibration_for(h100(1), known) == Calibration(600 * MIB, known["CUDA:NVIDIA H100 80GB HBM3"].measured_at)
    assert calibration_for(worker, known) is None
    assert sources_for([worker, h100(1)], known, given=["RPC"]) == {
        "RPC1": OverheadSource("given"), "CUDA0": OverheadSource("measured", known["CUDA:NVIDIA H100 80GB HBM3"]
                                                                  .measured_at)}


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "COLUMNS": "200", **env})


def stored(home: Path) -> dict[str, Any]:
    return dict(json.loads((home / "calibration.json").read_text()))


@pytest.mark.llama
def test_the_first_plan_calibrates_each_new_worker_once_and_says_so(
        demo_model: Path, llama_bin_dir: Path, rpc_workers: Callable[..., RpcWorker], home: Path) -> None:
    workers = ",".join(rpc_workers().endpoint for _ in range(2))
    server = str(llama_bin_dir / "llama-server")
    args = ("plan", str(demo_model), "--rpc", workers, "--ctx", "2k", "--llama-server", server)
    first = run_cli(*args, "--json", LLAMALAUNCH_CALIBRATE="true")
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    calibrated = [n for n in data["notes"] if "overhead calibrated" in n]
    assert [n.split(":")[0] for n in calibrated] == ["RPC0", "RPC1"]
    assert all("0.0 MiB" in n and "load of a small model, once per device" in n for n in calibrated)
    assert set(data["overhead_sources"]) == {"RPC0", "RPC1"}
    assert all(s.startswith("measured 20") for s in data["overhead_sources"].values())
    before = stored(home)
    assert len(before) == 2 and all(v["overhead_bytes"] == 0 for v in before.values())

    second = run_cli(*args, LLAMALAUNCH_CALIBRATE="true")  # seen before: no load, the plan says measured
    assert second.returncode == 0, second.stderr
    assert "calibrated" not in second.stdout + second.stderr
    assert "overhead outside llama.cpp's accounting: RPC0 measured 20" in second.stdout
    assert stored(home) == before

    again = run_cli("devices", "--rpc", workers, "--calibrate", LLAMALAUNCH_LLAMA_SERVER=server)
    assert again.returncode == 0, again.stderr
    found = re.findall(r"^(RPC\d): overhead calibrated: 0\.0 MiB \(", again.stderr, re.MULTILINE)
    assert found == ["RPC0", "RPC1"]
    assert all(stored(home)[key]["measured_at"] > before[key]["measured_at"] for key in before)


@pytest.mark.llama
def test_no_calibrate_and_what_if_devices_plan_with_the_default(
        demo_model: Path, llama_bin_dir: Path, rpc_workers: Callable[..., RpcWorker], home: Path) -> None:
    server = str(llama_bin_dir / "llama-server")
    worker = rpc_workers().endpoint
    skipped = run_cli("plan", str(demo_model), "--rpc", worker, "--ctx", "2k", "--llama-server", server,
                      "--no-calibrate", LLAMALAUNCH_CALIBRATE="true")
    assert skipped.returncode == 0, skipped.stderr
    assert ("overhead outside llama.cpp's accounting: RPC0 assumed (assumed = the default; `llamalaunch devices "
            "--calibrate` with the same --rpc measures it)") in skipped.stdout  # bare, it has no worker to measure
    what_if = run_cli("plan", str(demo_model), "--assume", "CUDA0=8GiB", "--ctx", "2k", "--json",
                      LLAMALAUNCH_CALIBRATE="true")
    assert what_if.returncode == 0, what_if.stderr
    assert json.loads(what_if.stdout)["overhead_sources"] == {}
    assert not (home / "calibration.json").exists()


@pytest.mark.llama
def test_a_calibration_that_fails_to_load_is_one_line_and_the_plan_goes_on(
        demo_model: Path, llama_bin_dir: Path, rpc_workers: Callable[..., RpcWorker], home: Path) -> None:
    """A worker that cannot hold even the small model (held by `prlimit --as`): the default is planned."""
    worker = rpc_workers(address_space_bytes=worker_baseline_vsz(llama_bin_dir) + 32 * MIB)
    result = run_cli("plan", str(demo_model), "--rpc", worker.endpoint, "--ctx", "2k",
                     "--llama-server", str(llama_bin_dir / "llama-server"), LLAMALAUNCH_CALIBRATE="true")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^RPC0: overhead not calibrated \(llama-server did not load the model: .*\); planned with "
                     r"the default$", result.stdout, re.MULTILINE), result.stdout
    assert "RPC0 assumed" in result.stdout and "-c 2048" in result.stdout
    assert not (home / "calibration.json").exists()


@pytest.mark.llama
def test_a_machine_without_the_demo_model_calibrates_with_a_synthetic_one(
        demo_model: Path, llama_bin_dir: Path, rpc_workers: Callable[..., RpcWorker], home: Path,
        tmp_path: Path) -> None:
    """The GPU machine cannot fetch the demo model: a zero-weight model of its shape is written instead."""
    cache = tmp_path / "empty-cache"
    result = run_cli("plan", str(demo_model), "--rpc", rpc_workers().endpoint, "--ctx", "2k",
                     "--llama-server", str(llama_bin_dir / "llama-server"), LLAMALAUNCH_CALIBRATE="true",
                     LLAMALAUNCH_CACHE=str(cache))
    assert result.returncode == 0, result.stderr
    assert "RPC0: overhead calibrated: 0.0 MiB (" in result.stdout
    assert (cache / "models" / CALIBRATION_MODEL).exists() and not (cache / "models" / demo_model.name).exists()


@pytest.mark.llama
def test_the_first_serve_calibrates_each_worker_once_the_second_does_not(
        demo_model: Path, rpc_workers: Callable[..., RpcWorker], serve: Callable[..., ServeRun], home: Path) -> None:
    workers = ",".join(rpc_workers().endpoint for _ in range(2))
    first = serve(demo_model, "--rpc", workers, "--ctx", "2k", env={"LLAMALAUNCH_CALIBRATE": "true"})
    first.wait_ready(timeout_s=120)
    first.send(signal.SIGTERM)
    first.wait_exit()
    assert len(re.findall(r"RPC\d: overhead calibrated: ", first.output)) == 2, first.output
    before = stored(home)
    second = serve(demo_model, "--rpc", workers, "--ctx", "2k", name="t2", env={"LLAMALAUNCH_CALIBRATE": "true"})
    second.wait_ready(timeout_s=120)
    second.send(signal.SIGTERM)
    second.wait_exit()
    assert "overhead calibrated" not in second.output
    assert "RPC0 measured 20" in second.output and "RPC1 measured 20" in second.output
    assert stored(home) == before


def test_the_shipped_calibration_model_is_the_demo_shape_from_the_synthetic_writer(tmp_path: Path) -> None:
    """The package ships the header only (the writer is a test tool); regenerate: python -m tests.test_calibration"""
    shipped = write_calibration_model(tmp_path / "models" / CALIBRATION_MODEL)
    written = write_synthetic(tmp_path / "written.gguf", "llama", DEMO_SHAPE, "Q4_0")
    assert filecmp.cmp(shipped, written, shallow=False), "regenerate: .venv/bin/python -m tests.test_calibration"
    assert shipped.stat().st_blocks * 512 < shipped.stat().st_size // 10  # sparse: the weights take no disk
    assert [p.name for p in shipped.parent.iterdir()] == [CALIBRATION_MODEL]  # no partial file left


def regenerate_calibration_model(folder: Path) -> None:
    """Write the shipped header and print the size for CALIBRATION_MODEL_BYTES."""
    written = write_synthetic(folder / "demo-shape.gguf", "llama", DEMO_SHAPE, "Q4_0")
    header = read_header(written)
    with open(written, "rb") as stream:
        SHIPPED_HEADER.write_bytes(lzma.compress(stream.read(header.data_offset), preset=9))
    print(f"{SHIPPED_HEADER}: written; CALIBRATION_MODEL_BYTES = {header.file_size:_}"
          f" (now {CALIBRATION_MODEL_BYTES:_})")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        regenerate_calibration_model(Path(folder))
