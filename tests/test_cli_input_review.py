"""Inputs a new user's review found taken silently or explained badly: each is now one `error:` line naming the
problem and the fix, exit 2 (3 for a server that is not there), no traceback, nothing started or written.

Every case runs the real `python -m llamalaunch`, as a user does, and checks the exact output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_HINT = "(drop it to serve on the devices probed here)"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Narrow pipes (80 columns): a long message must still come out as one line."""
    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "80", **(env or {})})


def assert_refused(done: subprocess.CompletedProcess[str], stderr: str, code: int = 2) -> None:
    assert (done.returncode, done.stdout, done.stderr) == (code, "", f"error: {stderr}\n")


def assert_nothing_written(home: Path) -> None:
    written = [p for p in home.rglob("*") if p.is_file() and "cache" not in p.relative_to(home).parts]
    assert not written, written


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    path = tmp_path / "what-if.toml"
    path.write_text('assume = { CUDA0 = "8GiB" }\n', encoding="utf-8")
    return path


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    path = tmp_path / "box.txt"
    path.write_text("CUDA0=8GiB\n", encoding="utf-8")
    return path


# --- 1. what-if devices are for plans: serve would load on memory that is not there ----------------------


def test_serve_refuses_what_if_devices_wherever_they_come_from(profile: Path, inventory: Path, tmp_path: Path,
                                                                home: Path) -> None:
    """`serve --demo --assume CUDA0=8GiB` planned -ngl 31 and started llama-server on a CPU build. The missing
    binary makes a serve that takes the what-if devices fail (exit 1) instead of starting anything."""
    missing = str(tmp_path / "no" / "llama-server")
    serve = ("serve", "--demo", "--no-tui", "--llama-server", missing)
    assert_refused(run_cli(*serve, "--assume", "CUDA0=8GiB"), f"--assume gives what-if devices, for plans only "
                   f"{SERVE_HINT}")
    assert_refused(run_cli(*serve, "--inventory", str(inventory)), "--inventory gives what-if devices, for plans "
                   f"only {SERVE_HINT}")
    assert_refused(run_cli(*serve, env={"LLAMALAUNCH_ASSUME": "CUDA0=8GiB"}),
                   f"LLAMALAUNCH_ASSUME gives what-if devices, for plans only {SERVE_HINT}")
    assert_refused(run_cli("--config", str(profile), *serve), "the config file's assume gives what-if devices, "
                   f"for plans only {SERVE_HINT}")
    assert_nothing_written(home)


def test_the_systemd_unit_refuses_what_if_devices_now_not_at_boot(profile: Path, inventory: Path) -> None:
    """They went into ExecStart, where serve refuses them at every boot."""
    assert_refused(run_cli("systemd", "server", "--demo", "--assume", "CUDA0=8GiB"),
                   f"--assume gives what-if devices, for plans only {SERVE_HINT}")
    assert_refused(run_cli("systemd", "server", "--demo", f"--inventory={inventory}"),
                   f"--inventory gives what-if devices, for plans only {SERVE_HINT}")
    assert_refused(run_cli("systemd", "server", "--demo", "--config", str(profile)),
                   f"{profile}: assume gives what-if devices, for plans only {SERVE_HINT}")


# --- 2. a size without a unit was a byte count: --assume CUDA0=24 planned for 0 MiB --------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--assume", "CUDA0=24"], "--assume CUDA0 free size '24' has no unit (write 24GiB or 24MiB)"),
    (["--assume", "CUDA0=8GiB/24"], "--assume CUDA0 total size '24' has no unit (write 24GiB or 24MiB)"),
    (["--assume", "CUDA0=8GiB", "--budget", "CUDA0=6"], "--budget CUDA0 '6' has no unit (write 6GiB or 6MiB)"),
    (["--assume", "CUDA0=8GiB", "--reserve", "CUDA0=1.5"],
     "--reserve CUDA0 '1.5' has no unit (write 1.5GiB or 1.5MiB)"),
    (["--assume", "CUDA0=8GiB", "--overhead", "CUDA=600"], "--overhead CUDA '600' has no unit (write 600GiB or "
                                                           "600MiB)"),
    (["--assume", "CUDA0=8GiB", "--margin", "64"], "--margin '64' has no unit (write 64GiB or 64MiB)"),
])
def test_a_size_needs_its_unit(args: list[str], message: str) -> None:
    assert_refused(run_cli("plan", "--demo", *args), message)


def test_an_inventory_size_needs_its_unit_and_names_its_line(tmp_path: Path) -> None:
    box = tmp_path / "box.txt"
    box.write_text("# the box\nCUDA0=24\n", encoding="utf-8")
    assert_refused(run_cli("devices", "--inventory", str(box)),
                   f"the inventory {box}, line 2: CUDA0 free size '24' has no unit (write 24GiB or 24MiB)")


def test_counts_and_explicit_bytes_keep_working() -> None:
    """A context is a token count, not a size: 16384 stays 16384 tokens; 'B' says bytes on purpose."""
    done = run_cli("plan", "--demo", "--assume", f"CUDA0={8 * 2**30}B", "--ctx", "16384", "--ctx-min", "2k",
                   "--margin", "0", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["ctx"] == 16384 and plan["devices"][0]["free_bytes"] == 8 * 2**30


# --- 3, 5. speed figures and links ---------------------------------------------------------------------------

SPEED_HINT = "give FLOP/s with a unit, like --device-speed RPC0=20GB:500GFLOPS or RPC0=20GB:2TFLOPS"
LINK_HINT = "write it like --link RPC0=1Gbit/0.3ms: a rate in bit or B per second, a round trip in s, ms or us"


@pytest.mark.parametrize(("args", "message"), [
    (["--assume", "CUDA0=8GiB", "--device-speed", "CUDA0=20GB:500"],
     f"--device-speed CUDA0: '500' is not a FLOP/s figure ({SPEED_HINT})"),
    (["--assume", "CUDA0=8GiB", "--device-speed", "CUDA0=20GB:0TFLOPS"],
     f"--device-speed CUDA0: the FLOP/s figure '0TFLOPS' must be positive ({SPEED_HINT})"),
    (["--link", "RPC0=1Gbit/0.3ms"], "--link RPC0: no such device here (devices here: none) (add it with --rpc "
                                     "HOST:PORT or --assume RPC0=SIZE, or drop --link RPC0)"),
    (["--assume", "CUDA0=8GiB", "--device-speed", "CUDA1=20GB"],
     "--device-speed CUDA1: no such device here (devices here: CUDA0) (add it with --assume CUDA1=SIZE, or drop "
     "--device-speed CUDA1)"),
    (["--assume", "RPC0=8GiB", "--link", "RPC0=1Gbit/0.3ms/2"],
     f"--link value 'RPC0=1Gbit/0.3ms/2' is not NAME=RATE/ROUNDTRIP ({LINK_HINT})"),
    (["--assume", "RPC0=8GiB", "--link", "RPC0=0Gbit/0.3ms"],
     f"--link RPC0: the rate '0Gbit' must be positive ({LINK_HINT})"),
])
def test_speed_figures_name_the_option_and_the_form(args: list[str], message: str) -> None:
    assert_refused(run_cli("plan", "--demo", *args), message)


def test_a_rate_per_second_still_reads_before_its_round_trip() -> None:
    done = run_cli("plan", "--demo", "--assume", "RPC0=8GiB", "--link", "RPC0=1Gbit/s/0.3ms", "--device-speed",
                   "RPC0=20GB:2TFLOP/s", "--json")
    assert done.returncode == 0, done.stderr


# --- 5. numbers: the fix, not pydantic's parse failure ---------------------------------------------------------


def test_a_malformed_number_says_what_to_write() -> None:
    assert_refused(run_cli("plan", "--demo", "--assume", "CUDA0=8GiB", "--cpu-experts", "x"),
                   "Invalid value for '--cpu-experts': 'x' is not a whole number (see `python -m llamalaunch plan "
                   "--help`)")
    assert_refused(run_cli("serve", "--demo", "--backoff", "x"),
                   "Invalid value for '--backoff': 'x' is not a number (see `python -m llamalaunch serve --help`)")


# --- 6, 7. status of nothing, calibration of nothing -----------------------------------------------------------


def test_status_of_a_url_where_nothing_answers_is_one_line() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    assert_refused(run_cli("status", "--url", url, "--once"), f"nothing answers at {url} (is the server running? "
                   "`llamalaunch status --name NAME` for a local run)", code=3)
    secure = url.replace("http://", "https://")  # llama-server without SSL: the scheme is what is wrong
    assert_refused(run_cli("status", "--url", secure, "--once"), f"nothing answers at {secure} (llama-server speaks "
                   f"plain HTTP unless built with SSL: try --url {url})", code=3)


def test_calibrating_what_if_devices_says_why_there_is_nothing_to_do() -> None:
    done = run_cli("devices", "--assume", "CUDA0=8GiB", "--calibrate")
    assert done.returncode == 0
    assert done.stderr.splitlines()[0] == ("note: nothing to calibrate: only probed GPUs and idle RPC workers are "
                                           "measured, not what-if devices, busy workers or the CPU")


# --- 4, 5. a size for a device that is not here names its option ------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--reserve", "CUDA1=1GiB"], "--reserve CUDA1: no such device here (devices here: CUDA0) (add it with --assume "
                                  "CUDA1=SIZE, or drop --reserve CUDA1)"),
    (["--budget", "CUDA1=1GiB"], "--budget CUDA1: no such device here (devices here: CUDA0) (add it with --assume "
                                 "CUDA1=SIZE, or drop --budget CUDA1)"),
    (["--overhead", "CUDA7=1GiB"], "--overhead CUDA7: no such device here (devices here: CUDA0) (add it with "
                                   "--assume CUDA7=SIZE, or drop --overhead CUDA7)"),
    (["--overhead", "ROCm=1GiB"], "--overhead ROCm: no ROCm device here (devices here: CUDA0) (drop --overhead ROCm)"),
    (["--overhead", "FOO=1GiB"], "--overhead: 'FOO' is not a llama.cpp device name (use llama.cpp's names: CUDA0, "
                                 "ROCm0, Vulkan0, SYCL0, MTL0, CANN0, RPC0, or CPU for host RAM)"),
])
def test_a_size_for_a_device_not_here_names_its_option(args: list[str], message: str) -> None:
    assert_refused(run_cli("plan", "--demo", "--assume", "CUDA0=8GiB", *args), message)


def test_an_overhead_names_a_backend_or_a_device_in_any_case(tmp_path: Path) -> None:
    """`--overhead cuda=700MiB` went unused (the backend is CUDA); a profile's backend overhead was refused."""
    for args in (["--overhead", "cuda=700MiB"], ["--overhead", "cuda0=700MiB"]):
        done = run_cli("plan", "--demo", "--assume", "CUDA0=8GiB", *args, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["devices"][0]["overhead_bytes"] == 700 * 2**20
    path = tmp_path / "p.toml"
    path.write_text('overhead = { CUDA = "700MiB" }\n', encoding="utf-8")
    done = run_cli("--config", str(path), "plan", "--demo", "--assume", "CUDA0=8GiB", "--json")
    assert done.returncode == 0, done.stderr


# --- 8. status with no --name when none is running -----------------------------------------------------------


def test_status_says_none_is_running_and_names_the_past_runs(home: Path) -> None:
    from llamalaunch.launch.state import RunState, write_state

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in ("a", "b"):
        write_state(RunState(name=name, launcher_pid=gone.pid, launcher_started_at=0.0, url="http://127.0.0.1:9",
                             model_path="m.gguf", log_path="", phase="stopped"))
    assert_refused(run_cli("status", "--once"), "no server is running here (past runs: a, b) (start one with "
                   "`llamalaunch serve`, or see how one ended with --name NAME)", code=3)
