"""serve's observers from this stage: /metrics (Prometheus) on the snapshots `status` shows.

launch/serve.py runs them (`run_serve(..., observers=SERVE_OBSERVERS)`); they import launch/, never the
reverse.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from llamalaunch.launch.serve import ObservedRun, RunObserver, StateRecorder

if TYPE_CHECKING:  # the rest only with --metrics-port: a plain serve loads no prometheus_client, psutil
    from llamalaunch.launch.supervisor import Supervisor
    from llamalaunch.observe.snapshot import StatusSnapshot


@contextlib.contextmanager
def serve_metrics(run: ObservedRun) -> Iterator[None]:
    """--metrics-port: /metrics while the run lasts (the port is bound before llama-server starts)."""
    if run.request.metrics_port is None:
        yield
        return
    from llamalaunch.launch.supervisor import SupervisorEvent
    from llamalaunch.observe.metrics import MetricsServer, ServeMetrics, SnapshotCache

    metrics = MetricsServer(run.request.metrics_host, run.request.metrics_port)
    try:
        snapshots = serve_snapshots(run.request.name, run.supervisor, run.recorder)
        metrics.start(ServeMetrics(SnapshotCache(snapshots)))
        run.on_event(SupervisorEvent("note", f"Prometheus metrics on {metrics.url}"))
        yield
    finally:
        metrics.close()


SERVE_OBSERVERS: tuple[RunObserver, ...] = (serve_metrics,)


def serve_snapshots(name: str, supervisor: Supervisor,
                    recorder: StateRecorder) -> Callable[[], StatusSnapshot]:
    """Snapshots of this run for /metrics: the collector `status` uses, on the state file this run keeps.

    Its workers are never probed (the collector sees this launcher running): llama-server holds them, or
    the next plan is about to probe them, and a probe of ours could make that one find them busy."""
    from llamalaunch.launch.state import state_path
    from llamalaunch.observe.collector import StatusCollector
    from llamalaunch.observe.snapshot import StatusSnapshot
    from llamalaunch.observe.target import StatusTarget

    collector = StatusCollector(StatusTarget(state_path(name), None), api_key=supervisor.api_key())

    def collect() -> StatusSnapshot:
        state = recorder.state
        if not state.plan:  # nothing written yet (an earlier run's file may still be there): the first plan
            return StatusSnapshot(taken_at=time.time(), source="state", name=name, url=recorder.url,
                                  running=True, gone_reason=None, phase=supervisor.phase,
                                  launcher_pid=state.launcher_pid, started_at=state.started_at,
                                  model_path=state.model_path)
        return collector.collect()

    return collect
