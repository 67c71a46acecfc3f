"""`serve --metrics-port` and `worker --metrics-port`: Prometheus /metrics, read back by prometheus-client's own
parser, from a real serve (the demo model, CPU llama-server, a real worker under `prlimit --as` for an OOM
re-plan), through a crash and restart, under concurrent scrapes; the Grafana dashboard's queries checked
against what a real scrape holds."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamalaunch.errors import LaunchError
from llamalaunch.observe.metrics import SnapshotCache, relayed_families, snapshot_families
from llamalaunch.observe.snapshot import AttemptStatus, DeviceStatus, ServerStats, StatusSnapshot
from tests.serve_support import StartServe, wait_gone
from tests.support import RpcWorker, free_port
from tests.test_serve_e2e import small_worker
from tests.test_status import _nvml, _write_run, cuda_plan  # noqa: F401  # the fixture
from tests.test_worker import (
    WorkerCommand,
    start_worker,  # noqa: F401  # the fixture
)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "configs" / "grafana-llamalaunch.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and sorted labels; prometheus-client's parser fails on bad text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    return found[0] if len(found) == 1 else None


def scrape(port: int, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
        assert response.status == 200
        return str(response.read().decode())


def phase(samples: Samples) -> str | None:
    return next((dict(ls)["phase"] for (n, ls), v in samples.items() if n == "llamalaunch_phase" and v == 1), None)


# --- rendering, without processes ---------------------------------------------------------------------


def _device(name: str, backend: str, **fields: object) -> DeviceStatus:
    base: dict[str, object] = {
        "name": name, "backend": backend, "description": "", "endpoint": None, "excluded": False, "reason": None, "n_layers": 25,
        "first_slot": 0, "planned_weights_bytes": 3 << 30, "planned_kv_bytes": 1 << 30, "planned_compute_bytes": 300 << 20,
        "planned_overhead_bytes": 600 << 20, "planned_bytes": 5 << 30, "free_at_plan_bytes": 10 << 30,
        "total_bytes": 80 << 30, "actual_weights_bytes": None, "actual_kv_bytes": None, "actual_compute_bytes": None,
        "used_bytes": 6 << 30, "free_bytes": 74 << 30, "memory_source": "nvml"}
    return DeviceStatus(**{**base, **fields})  # type: ignore[arg-type]


def test_experts_per_device_oom_reasons_and_labels_render_and_parse() -> None:
    snapshot = StatusSnapshot(
        taken_at=0.0, source="state", name="moe", url="http://127.0.0.1:8080", running=True, gone_reason=None,
        phase="ready", ready_at=1000.0, restarts=1, last_exit_code=-9, ctx_tokens=16384, n_gpu_layers=49,
        host_expert_layers=30,
        attempts=(AttemptStatus(1, 32768, 49, "CUDA0=49", "out of memory on CUDA0 allocating kv: budget there "
                                                          "now 9000 MiB"),),
        devices=(_device("CUDA0", "CUDA", uuid="GPU-1234", moe_layers=48, expert_layers=18, actual_kv_bytes=5),
                 _device("RPC0", "RPC", endpoint="10.0.0.5:50052", memory_source="log")))
    samples = parse(_render(snapshot))
    assert value(samples, "llamalaunch_device_expert_layers", device="CUDA0", backend="CUDA", id="GPU-1234") == 18
    assert value(samples, "llamalaunch_device_moe_layers", device="CUDA0") == 48
    assert value(samples, "llamalaunch_device_expert_layers", device="RPC0", id="10.0.0.5:50052") == 0
    assert value(samples, "llamalaunch_host_expert_layers") == 30
    assert value(samples, "llamalaunch_device_planned_bytes", device="CUDA0", component="overhead") == 600 << 20
    assert value(samples, "llamalaunch_device_allocated_bytes", device="CUDA0", component="kv") == 5
    assert value(samples, "llamalaunch_device_allocated_bytes", device="RPC0", component="kv") is None
    assert value(samples, "llamalaunch_device_memory_source", device="RPC0", source="log") == 1
    assert value(samples, "llamalaunch_oom_replans_total", device="CUDA0", buffer="kv") == 1
    assert "budget there now 9000 MiB" in dict(next(ls for (n, ls) in samples
                                                    if n == "llamalaunch_last_oom_replan_info"))["reason"]
    assert value(samples, "llamalaunch_last_exit_code") == -9
    assert value(samples, "llamalaunch_ready_since_timestamp_seconds") == 1000.0
    assert phase(samples) == "ready" and value(samples, "llamalaunch_phase", phase="planning") == 0


def test_starting_is_reported_as_planning() -> None:
    snapshot = StatusSnapshot(taken_at=0.0, source="state", name="x", url="", running=True, gone_reason=None,
                              phase="starting")
    assert phase(parse(_render(snapshot))) == "planning"


def _render(snapshot: StatusSnapshot) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self) -> object:
            return snapshot_families(snapshot)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_relayed_llama_server_metrics_keep_their_type_under_our_prefix() -> None:
    text = ("# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
            "# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total 42\n"
            "# HELP llamacpp:requests_processing Number of requests processing.\n"
            "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n")
    families = {f.name: f for f in relayed_families(text)}
    assert families["llamalaunch_server_prompt_tokens"].type == "counter"
    assert families["llamalaunch_server_prompt_tokens"].samples[0].name == "llamalaunch_server_prompt_tokens_total"
    assert families["llamalaunch_server_requests_processing"].samples[0].value == 2
    assert list(relayed_families("this is { not the text format")) == []
    assert list(relayed_families(None)) == []


def test_concurrent_scrapes_share_one_collection_a_second() -> None:
    calls: list[float] = []

    def collect() -> int:
        calls.append(time.monotonic())
        time.sleep(0.2)  # a slow collection: the others wait for it, they do not start their own
        return len(calls)

    cache = SnapshotCache(collect, max_age_s=1.0)
    results: list[int | None] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get()[0])) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls and len(calls) == 1 and results == [1] * 20


def test_a_failing_collection_is_retried_once_a_second_not_at_every_scrape() -> None:
    now = [100.0]
    calls: list[float] = []

    def collect() -> int:
        calls.append(now[0])
        if len(calls) > 1:
            raise LaunchError("the state file vanished")  # as between a child's death and its restart
        return 1

    cache = SnapshotCache(collect, max_age_s=1.0, clock=lambda: now[0])
    for _ in range(8):  # scrapes every 0.25 s for two seconds
        now[0] += 0.25
        cache.get()
    assert calls == [100.25, 101.25]
    assert cache.errors == 1 and cache.get() == (1, 1.75)  # the last good snapshot, aging


def test_a_scrape_behind_a_stuck_collection_gets_the_last_snapshot_in_bounded_time() -> None:
    release = threading.Event()
    answers = iter([1, 2])

    def collect() -> int:
        answer = next(answers)
        if answer == 2:
            release.wait(10)
        return answer

    cache = SnapshotCache(collect, max_age_s=0.0, wait_s=0.3)
    assert cache.get()[0] == 1
    stuck = threading.Thread(target=cache.get)
    stuck.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert cache.get()[0] == 1  # the previous snapshot, not a wait for the stuck one
    assert time.monotonic() - started < 1.0
    release.set()
    stuck.join()


def test_status_json_leaves_the_relayed_text_out() -> None:
    from llamalaunch.observe.snapshot import snapshot_to_dict

    snapshot = StatusSnapshot(taken_at=0.0, source="url", name=None, url="", running=True, gone_reason=None,
                              phase="ready", stats=ServerStats("ok", metrics_text="llamacpp:x 1\n"))
    data = snapshot_to_dict(snapshot)
    assert "metrics_text" not in data["stats"] and data["last_exit_code"] is None


def test_a_worker_with_a_client_is_never_probed_and_keeps_its_last_idle_figures() -> None:
    from llamalaunch.launch.worker import WorkerState
    from llamalaunch.observe.metrics import WorkerProbe
    from llamalaunch.probe.rpc import WorkerDevice, WorkerReport

    probed: list[str] = []
    client = {"held": False}
    now = {"t": 100.0}

    def probe(endpoint: str) -> WorkerReport:
        probed.append(endpoint)
        return WorkerReport(endpoint, "7.0.0", (WorkerDevice(0, 5 << 30, 8 << 30),), 0.002)

    state = WorkerState("CUDA0", "RTX 4090", "127.0.0.1:50052", "127.0.0.1", 50052, 4242, True, 0)
    rows = WorkerProbe(lambda: [state], probe, lambda pid, port: client["held"], lambda: now["t"])
    (idle,) = rows.rows()
    assert probed == ["127.0.0.1:50052"] and idle.memory[0].free_bytes == 5 << 30 and not idle.busy
    client["held"] = True
    now["t"] = 130.0
    (busy,) = rows.rows()
    assert probed == ["127.0.0.1:50052"]  # not asked again while a client holds it
    assert busy.busy and busy.memory == idle.memory and busy.memory_age_s == 30.0


def test_nvml_is_read_at_most_once_a_second_under_concurrent_scrapes(
        cuda_plan: dict[str, Any]) -> None:  # noqa: F811
    """The real collector and HTTP endpoint on a CUDA plan; NVML (injected: no GPU here) counts its reads."""
    from llamalaunch.observe.collector import StatusCollector
    from llamalaunch.observe.live_memory import MemoryReader
    from llamalaunch.observe.metrics import MetricsServer, ServeMetrics
    from llamalaunch.observe.target import StatusTarget

    me = psutil.Process()
    path = _write_run(cuda_plan, pid=me.pid, started=me.create_time(), url="")
    nvml = _nvml((61 << 30, 75 << 30))
    reads: list[float] = []

    def read_gpus() -> list[Any]:
        reads.append(time.monotonic())
        return nvml()

    collector = StatusCollector(StatusTarget(path, None), memory=MemoryReader(read_gpus=read_gpus))
    server = MetricsServer("127.0.0.1", free_port())
    server.start(ServeMetrics(SnapshotCache(collector.collect)))
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    try:
        scrapers = Scrapers(port, count=8)
        time.sleep(2.5)
        scrapers.finish()
    finally:
        server.close()
    assert not scrapers.failures and len(scrapers.scrapes) > 10
    assert 1 <= len(reads) <= 4, len(reads)  # 2.5 s: at most one read a second (plus the first)
    last = scrapers.scrapes[-1]
    assert value(last, "llamalaunch_device_used_bytes", device="CUDA1", backend="CUDA", id="GPU-1") == 75 << 30
    assert value(last, "llamalaunch_device_memory_source", device="CUDA0", id="GPU-0", source="nvml") == 1


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["0", "70000"])
def test_metrics_port_out_of_range_is_one_line_exit_2(port: str) -> None:
    from typer.testing import CliRunner

    from llamalaunch.cli import app

    for command in (["serve", "--demo"], ["worker", "--gpus", "cpu"]):
        result = CliRunner().invoke(app, [*command, "--metrics-port", port])
        assert result.exit_code == 2, result.output
        assert result.output == f"error: --metrics-port {port} is out of range (give a value from 1 to 65535)\n"


@pytest.mark.llama
def test_serve_with_the_metrics_port_taken_is_one_line_and_starts_nothing(
        serve: StartServe, demo_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve(demo_model, "--ctx", "2k", "--metrics-port", str(port))
        assert run.wait_exit() == 2
    assert run.stderr == [(f"error: cannot listen on 127.0.0.1:{port} for --metrics-port: port {port} is in use "
                          "(stop what listens there, or pass another --metrics-port)")]
    assert not run.servers_seen and not run.state_path.exists()


@pytest.mark.llama
def test_worker_with_the_metrics_port_taken_is_one_line(
        start_worker: Callable[..., WorkerCommand], llama_bin_dir: Path) -> None:  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = start_worker(["--gpus", "cpu", "--port-base", str(free_port()), "--metrics-port", str(port),
                               "--rpc-server", str(llama_bin_dir / "ggml-rpc-server")])
        assert worker.process.wait(30) == 2
    assert worker.process.stdout is not None
    time.sleep(0.2)
    lines = []
    while not worker.lines.empty():
        lines.append(worker.lines.get())
    assert lines == [(f"error: cannot listen on 127.0.0.1:{port} for --metrics-port: port {port} is in use "
                     "(stop what listens there, or pass another --metrics-port)")]


# --- a real serve --------------------------------------------------------------------------------------


class Scrapers:
    """`count` threads scraping as fast as they can until stopped; every answer parsed."""

    def __init__(self, port: int, count: int = 6) -> None:
        self.port = port
        self.stop = threading.Event()
        self.scrapes: list[Samples] = []
        self.failures: list[str] = []
        self.names: set[str] = set()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                samples = parse(scrape(self.port))
            except (OSError, ValueError) as error:  # the endpoint is not up yet at the very start
                self.failures.append(str(error))
                time.sleep(0.05)
                continue
            self.scrapes.append(samples)
            self.names.update(name for name, _ in samples)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def wait_for(port: int, check: Callable[[Samples], bool], timeout_s: float = 60.0) -> Samples:
    deadline = time.monotonic() + timeout_s
    samples: Samples = {}
    while time.monotonic() < deadline:
        try:
            samples = parse(scrape(port))
        except OSError:
            samples = {}
        if samples and check(samples):
            return samples
        time.sleep(0.2)
    raise AssertionError(f"no scrape matched in {timeout_s} s; last: {sorted(samples)[:80]}")


@pytest.mark.llama
def test_a_real_serve_through_an_oom_replan_and_a_restart_under_concurrent_scrapes(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path, llama_bin_dir: Path) -> None:
    worker = small_worker(rpc_workers, llama_bin_dir)
    port = free_port()
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "8k", "--max-attempts", "3", "--backoff", "0.5",
                "--metrics-port", str(port))
    scrapers = Scrapers(port)
    started = time.monotonic()
    try:
        _, url, ctx = run.wait_ready(timeout_s=90)
        assert ctx < 8192  # re-planned after the OOM
        ready = wait_for(port, lambda s: phase(s) == "ready" and value(s, "llamalaunch_up") == 1)
        labels = {"device": "RPC0", "backend": "RPC", "id": worker.endpoint}
        assert value(ready, "llamalaunch_oom_replans_total", device="RPC0", buffer="kv") == 1
        reason = dict(next(ls for (n, ls) in ready if n == "llamalaunch_last_oom_replan_info"))["reason"]
        assert reason.startswith("out of memory on RPC0 allocating kv")
        assert value(ready, "llamalaunch_context_tokens") == ctx
        assert value(ready, "llamalaunch_estimated_tokens_per_second", kind="generation") > 0  # type: ignore[operator]
        assert value(ready, "llamalaunch_device_layers", **labels) == run.state()["plan"]["devices"][0]["n_layers"]
        assert value(ready, "llamalaunch_device_expert_layers", **labels) == 0
        for component in ("weights", "kv", "compute", "overhead"):
            assert value(ready, "llamalaunch_device_planned_bytes", component=component, **labels) is not None
        assert value(ready, "llamalaunch_device_allocated_bytes", component="kv", **labels) > 0  # type: ignore[operator]
        # The worker is busy serving our llama-server: never probed, the log's figures stand in.
        assert value(ready, "llamalaunch_device_memory_source", source="log", **labels) == 1
        assert value(ready, "llamalaunch_device_used_bytes", **labels) is not None
        assert value(ready, "llamalaunch_host_total_bytes") is not None

        from tests.serve_support import complete
        assert complete(url, n_predict=3)["tokens_predicted"] == 3
        relayed = wait_for(port, lambda s: (value(s, "llamalaunch_server_tokens_predicted_total") or 0) >= 4)
        assert value(relayed, "llamalaunch_server_prompt_tokens_total") is not None

        victim = run.server()
        victim.kill()
        assert wait_gone(victim.pid, 5)
        wait_for(port, lambda s: phase(s) in ("restarting", "planning", "loading"), timeout_s=20)
        after = wait_for(port, lambda s: phase(s) == "ready" and value(s, "llamalaunch_restarts") == 1)
        assert value(after, "llamalaunch_last_exit_code") == -signal.SIGKILL
        assert value(after, "llamalaunch_restarts_made_total") == 1  # a counter a dashboard can rate()
        assert worker.process.poll() is None  # never probed while busy: a stray HELLO could kill it (SIGPIPE)
    finally:
        scrapers.finish()
    elapsed_s = time.monotonic() - started
    last = scrapers.scrapes[-1]
    collections = value(last, "llamalaunch_collections_total") or 0
    assert len(scrapers.scrapes) > 2 * collections, (len(scrapers.scrapes), collections)
    assert collections <= elapsed_s / 1.0 + 2  # at most one collection (NVML, llama-server) a second
    phases_seen = {phase(s) for s in scrapers.scrapes}
    assert {"loading", "ready"} <= phases_seen, phases_seen
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM
    assert not run.leftover_servers()
    check_dashboard(scrapers.names, prefix_ok=("llamalaunch_worker_",))


def check_dashboard(names_seen: set[str], prefix_ok: tuple[str, ...] = ()) -> None:
    """Every metric the dashboard queries exists in a real scrape (those of `prefix_ok` are checked elsewhere)."""
    queried = _queried()
    assert queried
    missing = {name for name in queried if name not in names_seen and not name.startswith(prefix_ok)}
    assert not missing, missing


# --- a real `llamalaunch worker` -------------------------------------------------------------------


@pytest.mark.llama
def test_worker_metrics_alive_restarts_and_memory_only_when_idle(
        start_worker: Callable[..., WorkerCommand], llama_bin_dir: Path) -> None:  # noqa: F811
    port_base, port = free_port(), free_port()
    worker = start_worker(["--gpus", "cpu", "--port-base", str(port_base), "--metrics-port", str(port),
                           "--rpc-server", str(llama_bin_dir / "ggml-rpc-server")])
    worker.wait_for("ready; on the main host pass")
    labels = {"worker": "CPU", "endpoint": f"127.0.0.1:{port_base}"}
    idle = wait_for(port, lambda s: value(s, "llamalaunch_worker_free_bytes", **labels) is not None, 20)
    assert value(idle, "llamalaunch_worker_alive", **labels) == 1
    assert value(idle, "llamalaunch_worker_busy", **labels) == 0
    assert value(idle, "llamalaunch_worker_total_bytes", device="0", **labels) > 0  # type: ignore[operator]
    names = {name for name, _ in idle}

    with socket.create_connection(("127.0.0.1", port_base)):  # a client that holds it (sends nothing)
        busy = wait_for(port, lambda s: value(s, "llamalaunch_worker_busy", **labels) == 1, 20)
        time.sleep(1.5)
        still = wait_for(port, lambda s: (value(s, "llamalaunch_worker_memory_age_seconds", **labels) or 0) > 1, 20)
        assert value(still, "llamalaunch_worker_free_bytes", **labels) is not None  # the last idle figures
        names |= {name for name, _ in busy}
    (rpc_server,) = worker.rpc_servers()
    assert rpc_server.is_running()  # nothing was sent to it while it was busy

    rpc_server.kill()
    wait_for(port, lambda s: value(s, "llamalaunch_worker_restarts_total", **labels) == 1
             and value(s, "llamalaunch_worker_alive", **labels) == 1, 30)
    # The dashboard's worker panels: every metric they query is in a real scrape (the rest: the serve test).
    dashboard_worker = {n for n in _queried() if n.startswith("llamalaunch_worker_")}
    assert dashboard_worker <= names, dashboard_worker - names
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(20) == 128 + signal.SIGTERM


def _queried() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {name for panel in dashboard["panels"] for target in panel.get("targets", [])
            for name in re.findall(r"\b(llamalaunch_[a-z0-9_]+)", target["expr"])}


def test_the_dashboard_is_valid_json_and_queries_only_our_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"]
    assert all(name.startswith("llamalaunch_") for name in _queried())


# --- profile keys -------------------------------------------------------------------------------------


def test_metrics_port_and_host_are_profile_keys_for_serve_and_worker(tmp_path: Path) -> None:
    from llamalaunch.config import default_map, load_profile, merged_settings
    from llamalaunch.errors import BadInputError

    profile = tmp_path / "p.toml"
    profile.write_text('metrics_port = 9464\nmetrics_host = "0.0.0.0"\n[worker]\nmetrics_port = 9465\n')
    commands = default_map(merged_settings(load_profile(profile), environ={}))
    assert commands["serve"]["metrics_port"] == 9464 and commands["serve"]["metrics_host"] == "0.0.0.0"
    assert commands["worker"]["metrics_port"] == 9465
    profile.write_text("metrics_port = 70000\n")
    with pytest.raises(BadInputError, match="metrics_port = 70000 is not allowed: out of range"):
        load_profile(profile)
