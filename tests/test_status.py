"""`llamalaunch status`: the snapshot, the frame and --once/--json, against a real `serve` where it matters.

The llama tests run `python -m llamalaunch serve --demo --no-tui` as a subprocess with two real
ggml-rpc-server workers, do a completion, and read the status the way a user would (the `status`
command in process, with the same LLAMALAUNCH_HOME as the serve run).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from llamalaunch import cli_status
from llamalaunch.errors import BadInputError
from llamalaunch.launch.state import RunState, write_state
from llamalaunch.model.load import load_profile
from llamalaunch.observe.collector import StatusCollector
from llamalaunch.observe.live_memory import MemoryReader
from llamalaunch.observe.log_follower import LogFollower
from llamalaunch.observe.server_stats import parse_metrics, with_recent_rates
from llamalaunch.observe.snapshot import snapshot_to_dict
from llamalaunch.observe.target import NoServerError, StatusTarget, normalize_url, resolve_target
from llamalaunch.observe.view import memory_bar, status_view
from llamalaunch.plan.argv import ArgvOptions
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.plan.schema import plan_to_dict
from llamalaunch.probe.device import Device
from llamalaunch.probe.nvml import NvmlGpu
from llamalaunch.units import GIB, MIB
from tests.serve_support import REPO_ROOT, ServeRun, complete, start_serve, wait_gone
from tests.support import RpcWorker, free_port
from tests.synthetic import write_preset

FIXTURE_LOG = Path(__file__).parent / "fixtures" / "llama-server-logs" / "cpu-2rpc-smollm2-ts1-3-verbose.log"

# /metrics of a real llama-server (this build) after the readiness check and one 16-token completion.
METRICS_TEXT = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 3
llamacpp:prompt_seconds_total 0.027654
llamacpp:tokens_predicted_total 17
llamacpp:tokens_predicted_seconds_total 0.110878
llamacpp:prompt_tokens_seconds 108.483
llamacpp:predicted_tokens_seconds 135.284
llamacpp:requests_processing 0
llamacpp:requests_deferred 0
"""


def status_app() -> typer.Typer:
    """The llamalaunch app with `status` (registered here until cli.py does it itself)."""
    from llamalaunch.cli import app

    if not any(command.name == "status" for command in app.registered_commands):
        cli_status.register(app)
    return app


def run_status(*args: str) -> Any:
    return CliRunner().invoke(status_app(), ["status", *args], catch_exceptions=False)


def run_stop(*args: str) -> Any:
    return CliRunner().invoke(status_app(), ["stop", *args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "150")  # rich sizes its console from COLUMNS when output is not a terminal


# --- pieces -------------------------------------------------------------------------------------------


def test_metrics_rates_come_from_counters_not_the_scrape_window_gauges() -> None:
    metrics = parse_metrics(METRICS_TEXT)
    assert metrics["llamacpp:tokens_predicted_total"] == 17
    from llamalaunch.observe.server_stats import _rate
    from llamalaunch.observe.snapshot import ServerStats

    assert _rate(metrics, "tokens_predicted_total", "tokens_predicted_seconds_total") == pytest.approx(153.3, 0.01)
    before = ServerStats("ok", counters=(3, 0.027654, 17, 0.110878))
    after = ServerStats("ok", counters=(3, 0.027654, 117, 0.810878))
    recent = with_recent_rates(after, before.counters)
    assert recent.recent_generation_tokens_per_s == pytest.approx(100 / 0.7)
    assert recent.recent_prompt_tokens_per_s is None  # no prompt tokens since: no rate, not 0


def test_log_follower_reads_llama_cpp_buffers_from_a_real_log(tmp_path: Path) -> None:
    """The real load's sizes win over the fit dry run's; read in pieces gives what one read gives."""
    log = tmp_path / "t.log"
    text = FIXTURE_LOG.read_text()
    cut = len(text) // 2 + 17  # mid-line on purpose
    log.write_text(text[:cut])
    follower = LogFollower(log)
    follower.update()
    with log.open("a") as handle:
        handle.write(text[cut:])
    follower.update()
    found = follower.device_bytes(["127.0.0.1:50061", "127.0.0.1:50062"], {})
    assert round(found["RPC0"]["model"] / MIB, 2) == 16.91 and found["RPC0"]["kv"] == 48 * MIB
    assert round(found["RPC1"]["model"] / MIB, 2) == 75.19 and found["RPC1"]["kv"] == 132 * MIB
    assert round(found["RPC1"]["compute"] / MIB, 2) == 48.91  # not the dry run's 53.41
    assert follower.warnings == 1 and follower.errors == 0
    assert all(entry.level != "D" for entry in follower.lines)

    log.write_text("0.00.000.001 I srv  llama_server: initializing ...\n")  # a new, shorter file: read afresh
    follower.update()
    assert follower.buffers == {} and follower.lines[-1].text.endswith("initializing ...")


def test_a_line_glued_to_a_debug_line_still_counts(tmp_path: Path) -> None:
    """Seen in this build's log: a debug line without its newline, the request's release line glued on."""
    log = tmp_path / "t.log"
    log.write_text("0.00.614.364 D No parser definition detected, assuming pure content parser.0.00.614.375 I slot"
                   "      release: id  2 | task 2 | stop processing: n_tokens = 20, truncated = 0\n")
    follower = LogFollower(log)
    follower.update()
    assert follower.requests_served == 1 and follower.lines[-1].text.startswith("slot      release")


def test_repeated_log_lines_collapse(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    log.write_text("".join(f"0.00.00{i}.000 I srv  update_slots: all slots are idle\n" for i in range(5)))
    follower = LogFollower(log)
    follower.update()
    assert len(follower.lines) == 1 and follower.lines[0].repeat == 5


def test_memory_bar_shows_our_share_other_use_and_free() -> None:
    bar = memory_bar(ours_bytes=2 * GIB, used_bytes=6 * GIB, total_bytes=12 * GIB, width=12).plain
    assert bar.startswith("██▒▒▒▒░░░░░░") and bar.endswith("50%")
    assert memory_bar(1, None, 24 * GIB, width=12).plain.startswith("█░")  # a tiny share still shows


# --- snapshots from a state file, without processes ----------------------------------------------------


def _cuda(index: int, free: int, total: int) -> Device:
    return Device(f"CUDA{index}", "CUDA", "NVIDIA H100 80GB HBM3", free, total, index)


@pytest.fixture(scope="module")
def cuda_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    profile = load_profile(write_preset(tmp_path_factory.mktemp("m") / "8b.gguf", "llama-8b"))
    devices = (_cuda(0, 20 * GIB, 80 * GIB), _cuda(1, 6 * GIB, 80 * GIB))
    plan = make_plan(profile, devices, Request(ctx_tokens=16384), ArgvOptions(profile.path))
    return plan_to_dict(plan)


def _write_run(plan: dict[str, Any], *, pid: int, started: float, phase: str = "ready",
               url: str = "http://127.0.0.1:9", log: Path | None = None, attempts: list[dict[str, Any]] | None = None,
               name: str = "gpu") -> Path:
    return write_state(RunState(name=name, launcher_pid=pid, launcher_started_at=started, url=url,
                                model_path=plan["model"]["path"], log_path=str(log or ""), phase=phase,
                                phase_detail="ready", started_at=1.0, ready_at=2.0, plan=plan,
                                attempts=attempts or [], argv=["llama-server", *plan["argv"]], updated_at=3.0))


def _nvml(used_bytes: tuple[int, int]) -> Callable[[], list[NvmlGpu]]:
    return lambda: [NvmlGpu(i, "NVIDIA H100 80GB HBM3", f"GPU-{i}", f"0000:0{i + 1}:00.0", 80 * GIB - used, 80 * GIB)
                    for i, used in enumerate(used_bytes)]


def test_cuda_devices_show_plan_and_nvml_and_the_oom_ladder(cuda_plan: dict[str, Any], tmp_path: Path) -> None:
    me = psutil.Process()
    attempts = [{"number": 1, "ctx_tokens": 32768, "n_gpu_layers": 33, "layers": "CUDA0=24 CUDA1=9",
                 "outcome": "CUDA1 KV allocation failed: 512 MiB less there"}]
    path = _write_run(cuda_plan, pid=me.pid, started=me.create_time(), log=tmp_path / "none.log", attempts=attempts)
    collector = StatusCollector(StatusTarget(path, None), memory=MemoryReader(read_gpus=_nvml((61 * GIB, 75 * GIB))))
    snapshot = collector.collect()

    assert snapshot.running and snapshot.stats.health == "unreachable"
    layers = {d["name"]: d["n_layers"] for d in cuda_plan["devices"]}
    assert {d.name: d.n_layers for d in snapshot.devices} == layers
    assert {d.name: (d.memory_source, d.used_bytes) for d in snapshot.devices} == {
        "CUDA0": ("nvml", 61 * GIB), "CUDA1": ("nvml", 75 * GIB)}
    console = Console(width=130, record=True)
    console.print(status_view(snapshot))
    text = console.export_text()
    for name, count in layers.items():
        assert re.search(rf"^{name}\s+{count}\s", text, re.MULTILINE), text
    assert "OOM ladder" in text and "512 MiB less there" in text and "attempt 2" in text
    assert "no answer from http://127.0.0.1:9" in text


def test_gone_launcher_shows_the_last_state(cuda_plan: dict[str, Any]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = _write_run(cuda_plan, pid=dead.pid, started=0.0)
    snapshot = StatusCollector(StatusTarget(path, None), memory=MemoryReader(read_gpus=_nvml((0, 0)))).collect()
    assert not snapshot.running and "is not running" in (snapshot.gone_reason or "")
    assert snapshot.stats.health == "not asked"  # nobody asked a dead server
    # a script reading "ready" would take it for a live one: gone, with what the state file last said kept
    assert (snapshot.phase, snapshot.recorded_phase) == ("gone", "ready")
    data = snapshot_to_dict(snapshot)
    assert data["running"] is False and {d["name"] for d in data["devices"]} == {"CUDA0", "CUDA1"}
    result = run_status("--once")
    assert result.exit_code == cli_status.EXIT_GONE
    assert "server gone" in result.output and "phase ready" in result.output and "CUDA1" in result.output


def test_status_says_why_llama_server_last_restarted(cuda_plan: dict[str, Any], tmp_path: Path) -> None:
    """After a restart status shows its reason beside the count (the exit code alone, -9, read like the kernel's
    out-of-memory killer where llamalaunch had killed llama-server itself for a worker that was gone)."""
    me = psutil.Process()
    path = _write_run(cuda_plan, pid=me.pid, started=me.create_time(), log=tmp_path / "none.log")
    reason = "RPC worker 127.0.0.1:50052 is gone (llama-server's connection to it closed)"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "restarts": 1, "last_exit_code": -9, "last_restart_reason": reason}))
    snapshot = StatusCollector(StatusTarget(path, None), memory=MemoryReader(read_gpus=_nvml((0, 0)))).collect()
    assert snapshot_to_dict(snapshot)["last_restart_reason"] == reason
    console = Console(width=200, record=True)
    console.print(status_view(snapshot))
    assert f"restarts 1 (last: {reason})" in console.export_text()


def test_which_run_errors_name_the_fix(cuda_plan: dict[str, Any]) -> None:
    with pytest.raises(NoServerError, match="no server has run here") as caught:
        resolve_target()
    assert "llamalaunch serve" in (caught.value.hint or "")
    with pytest.raises(BadInputError, match="not a server address"):
        resolve_target(url="http://127.0.0.1:8080/v1")
    assert [normalize_url(url) for url in ("127.0.0.1:8080", "http://127.0.0.1:8080/", " https://h:1 ")] == \
        ["http://127.0.0.1:8080", "http://127.0.0.1:8080", "https://h:1"]  # llama-server speaks HTTP
    me = psutil.Process()
    for name in ("a", "b"):
        _write_run(cuda_plan, pid=me.pid, started=me.create_time(), name=name)
    with pytest.raises(BadInputError, match="several servers are running here: a, b"):
        resolve_target()
    assert resolve_target(name="b").state_path is not None
    result = run_status("--name", "nope", "--once")
    assert result.exit_code == 3 and "no server named 'nope'" in result.output and "Traceback" not in result.output


@pytest.fixture
def not_llama_server(http_server: str) -> str:
    """The URL of a real HTTP server that is not llama-server (its /health is a 404)."""
    return f"http://{http_server}"


def assert_url_refused(url: str, mode: tuple[str, ...], message: str) -> None:
    """status --url URL: exit 1 and one error line; with --json the error as JSON on stdout too (a script reading
    it gets JSON either way), else nothing there."""
    result = run_status("--url", url, *mode)
    assert result.exit_code == 1
    if "--json" in mode:
        assert json.loads(result.stdout)["exit_code"] == result.exit_code
    else:
        assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"


@pytest.mark.parametrize("mode", [(), ("--once",), ("--json",)])
def test_url_of_something_else_is_an_error_in_one_line(not_llama_server: str, mode: tuple[str, ...]) -> None:
    assert_url_refused(not_llama_server, mode, f"{not_llama_server} is not a llama-server: /health answered HTTP "
                       "404 (check the address and port: llama-server answers /health with HTTP 200, or 503 while "
                       "loading)")


@pytest.fixture
def metrics_port_url() -> Iterator[str]:
    """The URL of llamalaunch's own --metrics-port: it answers /health with HTTP 200 and Prometheus text."""
    from llamalaunch.observe.metrics import MetricsServer

    class Nothing:
        def collect(self) -> Iterator[Any]:
            yield from ()

    server = MetricsServer("127.0.0.1", 0)
    server.start(Nothing())  # type: ignore[arg-type]
    yield server.url.removesuffix("/metrics")
    server.close()


@pytest.mark.parametrize("mode", [("--once",), ("--json",)])
def test_url_of_a_metrics_port_says_the_answer_was_not_llama_servers(metrics_port_url: str,
                                                                      mode: tuple[str, ...]) -> None:
    assert_url_refused(metrics_port_url, mode, f"{metrics_port_url} is not a llama-server: /health answered HTTP "
                       '200, but not with llama-server\'s {"status": "ok"} (give llama-server\'s own URL, on serve\'s '
                       "--port (8080 unless set): not another server's, such as llamalaunch's --metrics-port)")


def _status_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """The real `llamalaunch status`, its stdout a pipe (no terminal, no COLUMNS: rich would take 80)."""
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    return subprocess.run([sys.executable, "-m", "llamalaunch", "status", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL,
                          timeout=timeout_s)


def test_status_into_a_pipe_prints_one_whole_frame_and_exits(cuda_plan: dict[str, Any], tmp_path: Path) -> None:
    """Without a terminal there is no live view to run: one frame, as --once, nothing cut at 80 columns."""
    me = psutil.Process()
    long_name = "a-server-with-a-rather-long-name-for-its-run"
    _write_run(cuda_plan, pid=me.pid, started=me.create_time(), log=tmp_path / "none.log", name=long_name)
    done = _status_cli("--name", long_name, timeout_s=30)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "…" not in done.stdout  # no live view's escapes, nothing cut
    assert max(len(line) for line in done.stdout.splitlines()) < 300  # and nothing padded to a huge width
    assert long_name in done.stdout
    for device in cuda_plan["devices"]:
        assert re.search(rf"^{device['name']}\s+{device['n_layers']}\s", done.stdout, re.MULTILINE), done.stdout
    argv = " ".join(cuda_plan["argv"])
    assert argv in done.stdout.replace("\n", " ")  # the whole command line, unwrapped


def test_url_with_nothing_there_is_gone() -> None:
    result = run_status("--url", f"http://127.0.0.1:{free_port()}", "--json")
    assert result.exit_code == cli_status.EXIT_GONE
    data = json.loads(result.output)
    assert data["source"] == "url" and data["running"] is False and data["stats"]["health"] == "unreachable"


# --- against a real serve ------------------------------------------------------------------------------


@pytest.fixture
def serve_run(llama_bin_dir: Path) -> Iterator[Callable[..., ServeRun]]:
    runs: list[ServeRun] = []

    def start(*args: str) -> ServeRun:
        run = start_serve("--demo", *args, home=Path(os.environ["LLAMALAUNCH_HOME"]), name="st",
                          llama_server=llama_bin_dir / "llama-server")
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


def _json_when(condition: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        data: dict[str, Any] = json.loads(run_status("--json").output)
        if condition(data) or time.monotonic() > deadline:
            return data
        time.sleep(0.1)


def _plan_layers(run: ServeRun) -> dict[str, int]:
    return {d["name"]: d["n_layers"] for d in run.state()["plan"]["devices"] if not d["excluded"]}


@pytest.mark.llama
def test_once_and_json_against_a_real_serve_then_after_sigkill(
        serve_run: Callable[..., ServeRun], rpc_workers: Callable[..., RpcWorker]) -> None:
    first, second = rpc_workers(), rpc_workers()
    run = serve_run("--rpc", f"{first.endpoint},{second.endpoint}", "--ctx", "4k")
    _, url, _ = run.wait_ready()
    answer = complete(url, n_predict=16)
    assert answer["tokens_predicted"] == 16
    layers = _plan_layers(run)
    assert set(layers) == {"RPC0", "RPC1"}

    result = run_status("--once")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "● ready" in text and "tok/s" in text
    for name, count in layers.items():
        assert re.search(rf"^{name}\s+{count}\s", text, re.MULTILINE), text
    assert re.search(r"average [\d.,]+ / [\d.,]+", text), text  # prompt and generation tokens/s
    assert "worker busy serving our llama-server: not probed" in text

    data = _json_when(lambda d: d["stats"]["requests_served"] >= 1)  # the log lags the HTTP answer a little
    assert data["running"] and data["phase"] == "ready" and data["uptime_s"] >= 0
    assert {d["name"]: d["n_layers"] for d in data["devices"]} == layers
    assert all(d["memory_source"] == "log" and d["actual_bytes"] > 0 for d in data["devices"])
    stats = data["stats"]
    assert stats["health"] == "ok" and stats["slots_total"] == 4 and stats["slots_busy"] == 0
    assert stats["generation_tokens_per_s"] > 0 and stats["last_generation_tokens_per_s"] > 0
    assert stats["generated_tokens_total"] >= 16 and stats["requests_served"] == 1  # ours; not the readiness check
    assert data["host"]["server_rss_bytes"] > 0 and data["argv"][0].endswith("llama-server")
    assert json.loads(run_status("--url", url, "--json").output)["name"] == "st"  # the URL finds the run

    piped = _status_cli("--name", "st")  # into a pipe, as `status --name st > file` would: one whole frame
    assert piped.returncode == 0 and "● ready" in piped.stdout and "…" not in piped.stdout, piped.stdout
    for name, count in layers.items():
        assert re.search(rf"^{name}\s+{count}\s", piped.stdout, re.MULTILINE), piped.stdout
    assert f"--rpc {first.endpoint},{second.endpoint}" in piped.stdout  # the argv whole, ports and all

    server = run.server()
    run.send(signal.SIGKILL)
    server.kill()  # serve's child dies with it anyway (PR_SET_PDEATHSIG); do not rely on it here
    run.wait_exit()
    assert wait_gone(server.pid, 5)

    result = run_status("--once")
    assert result.exit_code == cli_status.EXIT_GONE
    text = result.output
    assert "server gone" in text and f"pid {run.process.pid}) is not running" in text
    assert "phase ready" in text  # the last state
    for name, count in layers.items():
        assert re.search(rf"^{name}\s+{count}\s", text, re.MULTILINE), text
    data = json.loads(run_status("--json").output)
    assert data["running"] is False and (data["phase"], data["recorded_phase"]) == ("gone", "ready")
    assert all(d["memory_source"] == "rpc probe" for d in data["devices"])  # workers free again: asked live


@pytest.mark.llama
def test_a_stopped_llama_server_is_not_shown_as_ready(serve_run: Callable[..., ServeRun]) -> None:
    """SIGSTOP: the process is there, /health never answers. The state file still says ready; status must not."""
    run = serve_run("--ctx", "2k", "--health-interval", "0")  # no liveness restarts: this test looks at status
    run.wait_ready()
    server = run.server()
    server.suspend()
    try:
        result = run_status("--once")
        assert result.exit_code == 0, result.output
        assert "● not answering" in result.output and "● ready" not in result.output, result.output
        assert "health unreachable" in result.output
        assert json.loads(run_status("--json").output)["phase"] == "not answering"
    finally:
        server.resume()
    assert "● ready" in run_status("--once").output


@pytest.mark.llama
def test_devices_and_plan_into_a_pipe_are_not_cut(rpc_workers: Callable[..., RpcWorker]) -> None:
    """Two workers on loopback: at 80 columns both showed as `127.0.0.1:501…` and the sizes as `23.54…`."""
    first, second = rpc_workers(), rpc_workers()
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    rpc = f"{first.endpoint},{second.endpoint}"
    for args in (["devices", "--rpc", rpc], ["plan", "--demo", "--rpc", rpc, "--ctx", "4k"]):
        done = subprocess.run([sys.executable, "-m", "llamalaunch", *args], cwd=REPO_ROOT, env=env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "…" not in done.stdout, done.stdout
        assert "RPC0" in done.stdout and "RPC1" in done.stdout, done.stdout
        if args[0] == "devices":
            assert first.endpoint in done.stdout and second.endpoint in done.stdout, done.stdout


def test_status_shows_the_experts_each_device_holds(tmp_path: Path) -> None:
    """A MoE plan with experts in host memory: the view says how many of each device's MoE blocks keep theirs."""
    from tests.synthetic import SyntheticShape, write_synthetic

    shape = SyntheticShape(n_layer=24, n_embd=1024, n_ff=2048, n_head=16, n_head_kv=4, n_vocab=32000, head_dim=64,
                           n_expert=32, n_expert_used=4, n_ff_exp=512)
    profile = load_profile(write_synthetic(tmp_path / "moe.gguf", "qwen3moe", shape))
    full = make_plan(profile, [_cuda(0, 40 * GIB, 80 * GIB)], Request(ctx_tokens=4096), ArgvOptions(profile.path))
    squeezed = _cuda(0, full.devices[0].planned_bytes * 2 // 3, 80 * GIB)
    plan = plan_to_dict(make_plan(profile, [squeezed], Request(ctx_tokens=4096), ArgvOptions(profile.path)))
    held = plan["devices"][0]["expert_layers"]
    assert 0 < held < 24 and plan["host_expert_layers"]
    me = psutil.Process()
    path = _write_run(plan, pid=me.pid, started=me.create_time(), log=tmp_path / "none.log", name="moe")
    snapshot = StatusCollector(StatusTarget(path, None), memory=MemoryReader(read_gpus=_nvml((61 * GIB,)))).collect()
    console = Console(width=150, record=True)
    console.print(status_view(snapshot))
    assert re.search(rf"^CUDA0\s+25 \({held}/24 experts\)", console.export_text(), re.MULTILINE)


@pytest.mark.llama
def test_the_tokens_of_a_request_still_running_move(serve_run: Callable[..., ServeRun]) -> None:
    """A long request: status showed "1 generated" and no rate for all of it (llama-server's counters move only
    when a request ends); now the running request's tokens and the rate they come at."""
    import contextlib
    import threading
    import urllib.request

    run = serve_run("--ctx", "2k")
    _, url, _ = run.wait_ready()
    body = json.dumps({"prompt": "Tell me a story", "n_predict": 1500, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
    def ask() -> None:
        with contextlib.suppress(OSError):  # cut when the run stops at the end
            urllib.request.urlopen(request, timeout=120).read()

    threading.Thread(target=ask, daemon=True).start()
    collector = StatusCollector(resolve_target("st"))
    deadline = time.monotonic() + 30
    first = collector.collect().stats
    while not first.decoding_tokens and time.monotonic() < deadline:
        time.sleep(0.3)
        first = collector.collect().stats
    time.sleep(1.0)
    snapshot = collector.collect()
    second = snapshot.stats
    assert first.decoding_tokens and second.decoding_tokens and second.decoding_tokens > first.decoding_tokens
    assert second.recent_generation_tokens_per_s is not None and second.recent_generation_tokens_per_s > 0
    console = Console(width=200, record=True)
    console.print(status_view(snapshot, log_lines=0))
    assert f"(+{second.decoding_tokens} in the requests running)" in console.export_text()


def test_stop_ends_a_serve_from_another_shell(serve_run: Callable[..., ServeRun]) -> None:
    """`stop` is Ctrl-C from elsewhere: llama-server and the launcher exit, the state says stopped; a second
    stop finds nothing running (exit 3, as status)."""
    run = serve_run("--ctx", "2k")
    _, url, _ = run.wait_ready()
    server = run.server()
    stopped = CliRunner().invoke(status_app(), ["stop", "--name", "st"], catch_exceptions=False)
    assert (stopped.exit_code, stopped.output) == (0, f"stopped st ({url}, launcher pid {run.process.pid})\n")
    assert run.wait_exit() == 128 + signal.SIGTERM
    assert not server.is_running() and run.leftover_servers() == []
    assert run.state()["phase"] == "stopped"
    again = CliRunner().invoke(status_app(), ["stop"], catch_exceptions=False)
    assert again.exit_code == cli_status.EXIT_GONE
    assert again.stderr == "error: server 'st' is not running (last phase: stopped) (see how it ended with " \
        "`llamalaunch status --name st`)\n"


def test_stop_a_name_that_never_ran_says_so() -> None:
    """Not status's hint (it offered --url, which stop does not take)."""
    result = CliRunner().invoke(status_app(), ["stop", "--name", "nope"], catch_exceptions=False)
    assert (result.exit_code, result.stderr) == (cli_status.EXIT_GONE, "error: no server named 'nope' has run here "
                                                 "(`llamalaunch status` shows the run there is, if any)\n")


def test_stop_with_timeout_0_sends_and_returns(tmp_path: Path) -> None:
    """--timeout 0: SIGTERM sent, exit 0 at once (it said "did not stop within 0 s", exit 1, and advised kill -9)."""
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(launcher.pid).create_time()
        write_state(RunState(name="idle", launcher_pid=launcher.pid, launcher_started_at=started,
                             url="http://127.0.0.1:1", model_path="m.gguf", log_path=str(tmp_path / "l"),
                             phase="ready"))
        result = CliRunner().invoke(status_app(), ["stop", "--timeout", "0"], catch_exceptions=False)
        assert (result.exit_code, result.output) == (
            0, f"asked to stop (SIGTERM sent, not waited for) idle (http://127.0.0.1:1, launcher pid {launcher.pid})\n")
        assert launcher.wait(timeout=5) == -signal.SIGTERM
    finally:
        launcher.kill()
        launcher.wait()


def test_a_system_unit_s_run_is_found_by_status_and_left_to_systemctl_by_stop(
        cuda_plan: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit keeps its state in /var/lib/llamalaunch: `status` in a shell said 'no server' (or showed an old
    run of its own) while the service served, and `stop` said 'not running'."""
    from llamalaunch import paths

    monkeypatch.setattr(paths, "SYSTEM_HOME", tmp_path / "var-lib-llamalaunch")
    me = psutil.Process()
    with monkeypatch.context() as unit:  # as the unit writes it
        unit.setenv("LLAMALAUNCH_HOME", str(paths.SYSTEM_HOME))
        _write_run(cuda_plan, pid=me.pid, started=me.create_time(), log=tmp_path / "none.log", name="default")
    _write_run(cuda_plan, pid=me.pid, started=me.create_time(), phase="stopped", name="old")  # this user's own
    shown = run_status("--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["name"] == "default"
    stopped = run_stop()
    assert stopped.exit_code == 2
    assert stopped.stderr == ("error: server 'default' runs as the systemd service llamalaunch-server (stop it with "
                              "`sudo systemctl stop llamalaunch-server`)\n")
    # this user's own "default" ended, the unit's serves: --name default is the live one
    _write_run(cuda_plan, pid=me.pid, started=me.create_time(), phase="stopped", name="default")
    assert json.loads(run_status("--name", "default", "--json").stdout)["running"] is True
    with monkeypatch.context() as unit:  # the unit's run ended: stop says not running, not "use systemctl"
        unit.setenv("LLAMALAUNCH_HOME", str(paths.SYSTEM_HOME))
        _write_run(cuda_plan, pid=me.pid, started=me.create_time(), phase="stopped", name="default")
    assert run_stop("--name", "default").exit_code == 3


def test_a_negative_log_line_count_is_refused() -> None:
    """--log-lines -5 printed an empty log box and exit 0."""
    result = run_status("--once", "--log-lines", "-5")
    assert result.exit_code == 2 and "--log-lines" in result.stderr
