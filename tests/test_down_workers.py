"""A worker that is down (a second box switched off today): `--exclude` plans and serves without it, and
`devices` lists it as down, with real ggml-rpc-server workers, a free port with nothing listening as the dead
one, and the real CLI.

llama.cpp numbers RPC devices across the workers it is given; a dead worker is not given, so the live ones
after it are renumbered on llama-server's command line (`-dev`), while our names (and the user's --exclude,
--budget) keep counting it as one device.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llamalaunch.errors import ProbeError
from llamalaunch.probe import inventory as probe_inventory
from llamalaunch.probe import rpc
from llamalaunch.probe.inventory import list_devices_from_binary, probe_devices
from tests.serve_support import REPO_ROOT, StartServe, complete
from tests.support import RpcWorker, free_port

REFUSED = "connection refused: nothing listens on that port"


def run_cli(*args: str, timeout_s: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "200", **env})


def dead_endpoint() -> str:
    return f"127.0.0.1:{free_port()}"


def refused_error(endpoint: str, name: str) -> str:
    port = endpoint.rpartition(":")[2]
    return (f"error: RPC worker {endpoint}: {REFUSED} (start one with `llamalaunch worker --port-base {port}` "
            f"(on loopback), or fix the port in --rpc, or plan/serve --exclude {name} to go without it)")


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("│")[1:-1]]


def row(text: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`."""
    found = [cells(line) for line in text.splitlines() if line.startswith("│") and cells(line)[0] == first_cell]
    assert len(found) == 1, text
    return found[0]


def command_line(stdout: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if " -m " in line and " -ngl " in line)
    return line.split()


# --- plan --exclude -------------------------------------------------------------------------------------


def test_plan_excludes_a_down_worker_and_says_why(demo_model: Path) -> None:
    """The only worker is down: --exclude plans on the host; its memory is unknown ("?", null), the row says
    both why it is left out and why it is down, and first-sight calibration does not try to load on it."""
    dead = dead_endpoint()
    args = ("plan", str(demo_model), "--rpc", dead, "--exclude", "RPC0", "--ctx", "4k")
    table = run_cli(*args, LLAMALAUNCH_CALIBRATE="true")
    assert table.returncode == 0, table.stderr
    assert row(table.stdout, "RPC0") == ["RPC0", "?", "-", "0", "-", "-", "-", "-", "-", "-"]
    lines = table.stdout.splitlines()
    assert f"RPC0 left out: named by --exclude (down: {REFUSED})" in lines
    assert "calibrat" not in table.stdout + table.stderr and "overhead outside" not in table.stdout
    assert "--rpc" not in command_line(table.stdout)
    assert table.stderr == ""

    as_json = run_cli(*args, "--json")
    assert as_json.returncode == 0, as_json.stderr
    device = json.loads(as_json.stdout)["devices"][0]
    assert {key: device[key] for key in ("name", "endpoint", "free_bytes", "total_bytes", "limit_bytes", "error",
                                         "excluded", "reason", "n_layers")} == {
        "name": "RPC0", "endpoint": dead, "free_bytes": None, "total_bytes": None, "limit_bytes": None,
        "error": REFUSED, "excluded": True, "reason": f"named by --exclude (down: {REFUSED})", "n_layers": 0}
    assert "--rpc" not in json.loads(as_json.stdout)["argv"]


@pytest.mark.llama
def test_a_down_worker_without_exclude_is_one_error_naming_the_lever(
        rpc_workers: Callable[..., RpcWorker], serve: StartServe, demo_model: Path) -> None:
    """Behind a live worker the dead one is RPC1: plan and serve fail in one line that names --exclude RPC1."""
    live, dead = rpc_workers(), dead_endpoint()
    done = run_cli("plan", str(demo_model), "--rpc", f"{live.endpoint},{dead}", "--ctx", "4k")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == refused_error(dead, "RPC1") + "\n"

    run = serve(demo_model, "--rpc", f"{live.endpoint},{dead}", "--ctx", "2k")
    assert run.wait_exit(30) == 1
    assert run.stderr == [refused_error(dead, "RPC1")]
    assert "loading:" not in run.output and "Traceback" not in run.output


@pytest.mark.llama
def test_plan_without_a_down_worker_between_two_live_ones_renames_as_llama_server_does(
        rpc_workers: Callable[..., RpcWorker], demo_model: Path, llama_bin_dir: Path) -> None:
    """RPC0 live, RPC1 down, RPC2 live: --rpc holds the live two only, so llama-server calls our RPC2 its RPC1;
    `-dev` says so, and a real load of the plan's argv (--verify) puts every layer where the plan does. (Neither
    budget holds the whole model at 4k, 215 MiB: both workers are used.)"""
    first, second, dead = rpc_workers(), rpc_workers(), dead_endpoint()
    server = llama_bin_dir / "llama-server"
    args = ("plan", str(demo_model), "--rpc", f"{first.endpoint},{dead},{second.endpoint}", "--exclude", "RPC1",
            "-dev", "RPC2,RPC0", "--budget", "RPC0=150MiB", "--budget", "RPC2=180MiB", "--ctx", "4k",
            "--llama-server", str(server))
    table = run_cli(*args)
    assert table.returncode == 0, table.stderr
    assert table.stderr == (f"note: RPC1 {dead} is down: its device count is unknown; later RPC names assume it "
                            "has one device\n")
    assert row(table.stdout, "RPC1")[:4] == ["RPC1", "?", "-", "0"]
    assert f"RPC1 left out: named by --exclude (down: {REFUSED})" in table.stdout.splitlines()
    assert ("llama-server numbers only the workers on its --rpc: in the command line RPC1 is this plan's RPC2 "
            f"({second.endpoint})") in table.stdout.splitlines()  # the table's RPC1 is the down worker

    verified = run_cli(*args, "--verify", "--json")
    assert verified.returncode == 0, verified.stderr
    data = json.loads(verified.stdout)
    assert data["problems"] == [f"RPC1 {dead} is down: its device count is unknown; later RPC names assume it has "
                                "one device"]
    argv = data["argv"]
    assert argv[argv.index("--rpc") + 1] == f"{first.endpoint},{second.endpoint}"
    # the planner may also try the roomier worker last (the output layer's device), llama-server's own order:
    # then no -dev at all; which it picks depends on the workers' measured round trips
    assert "-dev" not in argv or argv[argv.index("-dev") + 1] == "RPC1,RPC0"
    theirs = {item.name: item.description for item in
              list_devices_from_binary(server, [first.endpoint, second.endpoint])}
    assert theirs == {"RPC0": first.endpoint, "RPC1": second.endpoint}  # llama-server's own numbering
    ours = {d["name"]: d for d in data["devices"]}
    assert (ours["RPC2"]["endpoint"], ours["RPC0"]["endpoint"]) == (second.endpoint, first.endpoint)
    assert ours["RPC2"]["n_layers"] > 0 and ours["RPC0"]["n_layers"] > 0
    weights = {row["device"]: row for row in data["verify"] if row["component"] == "weights"}
    # llama-server's RPC1 is our RPC2: the rows use the plan table's names, the planned figures are its own
    assert set(weights) == {"RPC0", "RPC2", "host"}
    assert weights["RPC2"]["planned_bytes"] == ours["RPC2"]["weights_bytes"]
    assert weights["RPC0"]["planned_bytes"] == ours["RPC0"]["weights_bytes"]
    assert all(row["within_tolerance"] for row in data["verify"]), data["verify"]


def test_a_down_worker_not_listed_in_dev_is_left_out_too(rpc_workers: Callable[..., RpcWorker],
                                                          demo_model: Path) -> None:
    """-dev that names only the live worker leaves the dead one out as --exclude does (it was an error naming
    --exclude); its row says both."""
    live, dead = rpc_workers(), dead_endpoint()
    table = run_cli("plan", str(demo_model), "--rpc", f"{dead},{live.endpoint}", "-dev", "RPC1", "--ctx", "2k")
    assert table.returncode == 0, table.stderr
    assert f"RPC0 left out: not listed in -dev (down: {REFUSED})" in table.stdout.splitlines()
    line = command_line(table.stdout)
    assert line[line.index("--rpc") + 1] == live.endpoint


# --- devices ----------------------------------------------------------------------------------------------


@pytest.mark.llama
def test_devices_lists_a_down_worker_and_exits_1(rpc_workers: Callable[..., RpcWorker]) -> None:
    live, dead = rpc_workers(), dead_endpoint()
    endpoints = f"{live.endpoint},{dead}"
    table = run_cli("devices", "--rpc", endpoints)
    assert table.returncode == 1
    assert row(table.stdout, "1") == ["1", "RPC1", "RPC", f"{dead} (down: {REFUSED})", "?", "?", dead]
    assert row(table.stdout, "0")[1:4] == ["RPC0", "RPC", live.endpoint]
    assert table.stderr.splitlines()[-1] == refused_error(dead, "RPC1")
    assert "Traceback" not in table.stderr

    as_json = run_cli("devices", "--rpc", endpoints, "--json")
    assert as_json.returncode == 1
    assert as_json.stderr.splitlines()[-1] == refused_error(dead, "RPC1")
    data = json.loads(as_json.stdout)
    first, second = data["devices"][:2]
    assert (first["name"], first["error"]) == ("RPC0", None) and first["free_bytes"] > 0
    assert {key: second[key] for key in ("name", "endpoint", "free_bytes", "total_bytes", "error")} == {
        "name": "RPC1", "endpoint": dead, "free_bytes": None, "total_bytes": None, "error": REFUSED}
    assert data["unknown_memory"] == ["RPC1"] and data["problems"] == [refused_error(dead, "RPC1")[len("error: "):]]


# --- serve, status and metrics --------------------------------------------------------------------------


# Neither live worker holds the demo model alone at 2k (162 MiB), so both are used whatever the speed estimate
# prefers (one device saves a hop: on a loaded machine it can win).
BOTH_NEEDED = ("--budget", "RPC0=120MiB", "--budget", "RPC2=120MiB")


def _metrics(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode().splitlines()


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("status", "--name", "t", *args, timeout_s=60)


@pytest.mark.llama
def test_serve_without_a_down_worker_then_status_and_metrics(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    first, second, dead = rpc_workers(), rpc_workers(), dead_endpoint()
    metrics_port = free_port()
    run = serve(demo_model, "--rpc", f"{first.endpoint},{dead},{second.endpoint}", "--exclude", "RPC1",
                *BOTH_NEEDED, "--ctx", "2k", "--metrics-port", str(metrics_port))
    _, url, _ = run.wait_ready(timeout_s=60)
    assert complete(url, n_predict=4)["tokens_predicted"] == 4
    state: dict[str, Any] = run.state()
    argv = state["argv"]
    assert argv[argv.index("--rpc") + 1] == f"{first.endpoint},{second.endpoint}"
    down = next(d for d in state["plan"]["devices"] if d["name"] == "RPC1")
    assert (down["excluded"], down["free_bytes"], down["error"]) == (True, None, REFUSED)
    assert re.search(rf" attempt 1: ctx 2048, RPC0=\d+ RPC2=\d+; RPC1 left out: named by --exclude \(down: "
                     rf"{re.escape(REFUSED)}\)$", run.output, re.MULTILINE), run.output  # serve's log says it too

    once = _status("--once")
    assert once.returncode == 0, once.stderr
    line = next(line for line in once.stdout.splitlines() if line.startswith("RPC1 "))
    assert line.rstrip().split(maxsplit=9) == ["RPC1", "0", *["-"] * 7,
                                               f"left out: named by --exclude (down: {REFUSED})"]
    devices = {d["name"]: d for d in json.loads(_status("--json").stdout)["devices"]}
    assert (devices["RPC1"]["free_at_plan_bytes"], devices["RPC1"]["total_bytes"]) == (None, None)
    assert devices["RPC0"]["n_layers"] + devices["RPC2"]["n_layers"] == state["plan"]["model"]["n_slots"]

    labels = f'backend="RPC",device="RPC1",id="{dead}"'
    scraped = _metrics(metrics_port)
    assert f"llamalaunch_device_excluded{{{labels}}} 1.0" in scraped
    assert not [m for m in scraped if m.startswith("llamalaunch_device_total_bytes{") and labels in m]


# --- the inventory --------------------------------------------------------------------------------------


@pytest.mark.llama
def test_inventory_keeps_a_down_worker_as_one_device_of_unknown_memory(
        rpc_workers: Callable[..., RpcWorker]) -> None:
    live, dead, last = rpc_workers(), dead_endpoint(), rpc_workers()
    endpoints = [live.endpoint, dead, last.endpoint]
    inventory = probe_devices(endpoints, local_gpus=False, keep_down=True)
    assert [(d.name, d.endpoint, d.error) for d in inventory.devices] == [
        ("RPC0", live.endpoint, None), ("RPC1", dead, REFUSED), ("RPC2", last.endpoint, None)]
    assert [(w.name, w.endpoint) for w in inventory.down] == [("RPC1", dead)]
    assert inventory.unknown_memory == ("RPC1",) and inventory.busy == ()
    probe_inventory.refuse_down_workers(inventory, exclude=["RPC1"])  # left out: no error
    with pytest.raises(rpc.WorkerRefusedError) as caught:
        probe_inventory.refuse_down_workers(inventory, exclude=["RPC2"])
    assert str(caught.value.hint).endswith(", or plan/serve --exclude RPC1 to go without it")
    with pytest.raises(ProbeError, match=REFUSED):  # without keep_down, as before: the probe's own error
        probe_devices(endpoints, local_gpus=False)


@pytest.mark.llama
def test_a_stopped_worker_is_down_and_named_so(rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    """A ggml-rpc-server stopped with SIGSTOP (Ctrl-Z) accepts connections and answers nothing: it was called
    'serving another client (a llama-server?)', with a fix (stop that client) for a client there was not."""
    import signal

    worker = rpc_workers()
    pid = worker.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        listed = run_cli("devices", "--rpc", worker.endpoint)
        planned = run_cli("plan", str(demo_model), "--rpc", worker.endpoint, "--ctx", "1k")
    finally:
        os.kill(pid, signal.SIGCONT)
    said = (f"error: RPC worker {worker.endpoint}: does not answer: its ggml-rpc-server (pid {pid}) is stopped "
            f"(`kill -CONT {pid}` resumes it, or restart it, or plan/serve --exclude RPC0 to go without it)")
    assert listed.returncode == 1 and listed.stderr.splitlines()[-1] == said, listed.stderr
    assert f"(down: does not answer: its ggml-rpc-server (pid {pid}) is stopped)" in listed.stdout
    assert planned.returncode != 0 and planned.stderr.splitlines()[-1] == said, planned.stderr
    # resumed, it answers the probes queued meanwhile, then ours: nothing was broken (probed by the CLI: a
    # busy answer in this process would leave its keepers to the next tests)
    deadline = time.monotonic() + 20
    while run_cli("devices", "--rpc", worker.endpoint).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
