"""Calibration of the memory a GPU backend uses outside llama.cpp's accounting, from real logs."""

from __future__ import annotations

from pathlib import Path

from llamalaunch.launch.supervisor import SupervisorEvent
from llamalaunch.observe.calibration import Calibrator, RunCalibration, load_overheads, overheads_for
from llamalaunch.probe.device import Device
from llamalaunch.units import MIB

FIXTURES = Path(__file__).parent / "fixtures" / "llama-server-logs"
FIXTURE = FIXTURES / "cuda-h100-excerpts-8b.log"


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
