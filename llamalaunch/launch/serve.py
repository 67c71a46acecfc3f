"""The plan-and-serve pipeline: probe → model → plan → argv → supervised llama-server."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from types import MappingProxyType
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamalaunch.errors import BadInputError, PlanError, ServeError, ToolchainError
from llamalaunch.launch.lessons import Lessons
from llamalaunch.launch.ports import pick_port
from llamalaunch.launch.process import stop_on_signals
from llamalaunch.launch.state import (RunState, launcher_alive, process_started_at, read_state, state_path,
                                     write_state)
from llamalaunch.model.estimate import Estimate, Placement, SlotRange
from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.observe.calibration import (RunCalibration, calibratable, calibrate_new, load_calibrations,
                                             load_overheads, overhead_note, overheads_for, sources_for)
from llamalaunch.options import DEFAULTS
from llamalaunch.paths import cache_dir, state_dir
from llamalaunch.plan.argv import ArgvOptions, child_names
from llamalaunch.plan.companions import (Companion, check_companion_file, draft_companion, mmproj_companion,
                                         pin_device, with_reservations)
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.plan.schema import plan_to_dict
from llamalaunch.units import format_bytes, parse_size
from llamalaunch.plan.types import Plan
from llamalaunch.plan.speed_args import SpeedArgs
from llamalaunch.probe.device import Device, HostMemory
from llamalaunch.probe.inventory import BUSY_NOTE, fill_unknown_memory, probe_devices, refuse_busy_workers
from llamalaunch.probe.rpc import WorkerBusyError
from llamalaunch.toolchain.demo import demo_model_path
from llamalaunch.toolchain.discover import INSTALL_HINT, Toolchain, find_toolchain

if TYPE_CHECKING:  # the rest is imported where used: `plan --json` needs none of it (nor prometheus, psutil)
    from llamalaunch.launch.supervisor import Supervisor, SupervisorEvent
    from llamalaunch.model.compare import ComponentRow
    from llamalaunch.observe.snapshot import StatusSnapshot


@dataclass
class PlanInputs:
    """Everything one plan needs; `plan()` re-probes live devices each time it is called."""

    model_path: str
    profile: ModelProfile
    request: Request
    rpc: tuple[str, ...]
    assume: tuple[str, ...]
    overhead: Mapping[str, int]
    toolchain: Toolchain | None
    problems: list[str] = field(default_factory=list)
    devices: tuple[Device, ...] = ()
    mmproj: str | None = None
    draft: str | None = None
    host_free_bytes: int | None = None
    speed_args: SpeedArgs = field(default_factory=lambda: SpeedArgs())
    host: HostMemory | None = None
    calibrate: bool = False  # measure the overhead of devices seen for the first time before planning
    calibration_tried: set[str] = field(default_factory=set)

    @classmethod
    def gather(cls, *, model: str | None, demo: bool, llama_server: str | None, rpc: Sequence[str],
               assume: Sequence[str], overhead: Sequence[str], request: Request,
               need_toolchain: bool = False, mmproj: str | None = None, draft: str | None = None,
               generic_arch: bool = False, speed_args: SpeedArgs | None = None,
               calibrate: bool = False) -> PlanInputs:
        model_path = str(demo_model_path(cache_dir())) if demo or model is None else model
        profile = load_profile(model_path, allow_unknown_arch=generic_arch)
        for path, option in ((mmproj, "--mmproj"), (draft, "--draft")):
            if path:  # checked now: companions are sized only once a device is chosen
                check_companion_file(path, option)
        problems: list[str] = []
        try:
            toolchain: Toolchain | None = find_toolchain(llama_server)
        except ToolchainError as error:
            if need_toolchain:
                raise
            toolchain = None
            problems.append(f"{error}; the command line assumes a current llama-server")
        overheads = parse_overheads(overhead)
        return cls(model_path, profile, request, tuple(rpc), tuple(assume), overheads, toolchain, problems,
                   mmproj=mmproj, draft=draft, speed_args=speed_args or SpeedArgs(), calibrate=calibrate)

    def probe(self, serving: bool = False) -> tuple[Device, ...]:
        inventory = probe_devices(rpc=self.rpc, assume=self.assume)
        if serving:
            refuse_busy_workers(inventory)
        inventory = fill_unknown_memory(inventory, self.request.budget_bytes)
        self.problems.extend(p for p in inventory.problems if p not in self.problems)
        self.devices = inventory.devices
        self.host_free_bytes = inventory.host.free_bytes
        self.host = inventory.host
        return inventory.devices

    def plan(self, lessons: Lessons | None = None, serving: bool = False) -> Plan:
        """The plan for the devices as probed now; `serving` refuses busy workers (see refuse_busy_workers)."""
        request = lessons.apply(self.request) if lessons is not None else self.request
        devices = self.probe(serving)
        notes = self.calibrate_new(devices) if self.calibrate else []
        if self.draft and request.ctx_tokens is None:
            plan = self.largest_with_draft(request, devices)
        else:
            plan = self.plan_at(request, devices)
        sources = sources_for(devices, load_calibrations(), self.overhead)
        if note := overhead_note(sources):
            notes.append(note)
        if self.host_free_bytes is not None and plan.host.total_bytes > self.host_free_bytes:
            notes.append(f"host: the plan needs {format_bytes(plan.host.total_bytes)} of host memory but "
                         f"{format_bytes(self.host_free_bytes)} is available: lower --ctx, or add devices")
        if self.profile.generic_estimate:
            notes.append(f"{self.profile.arch} is not a known architecture: a generic, conservative estimate")
        return dataclasses.replace(plan, notes=(*plan.notes, *notes),
                                   overhead_sources=tuple((name, s.describe()) for name, s in sources.items()))

    def calibrate_new(self, devices: Sequence[Device]) -> list[str]:
        """Calibrate devices seen for the first time (DESIGN.md §3: the overhead differs per GPU and
        driver), each tried at most once per run; what-if devices never. One line per calibration."""
        fresh = [d for d in devices if calibratable(d) and d.name not in self.calibration_tried]
        self.calibration_tried.update(d.name for d in fresh)
        server = self.toolchain.server.path if self.toolchain is not None else None
        return calibrate_new(fresh, server, cache_dir())

    def plan_at(self, request: Request, devices: Sequence[Device]) -> Plan:
        """One plan, the companions reserved for this request's context on the device they are pinned to."""
        capabilities = self.toolchain.server.capabilities if self.toolchain is not None else None
        pinned = pin_device(devices, request)
        companions = self.companions(request, pinned) if pinned is not None else []
        if companions and pinned is not None:
            request = with_reservations(request, pinned, companions)
        options = ArgvOptions(self.model_path, capabilities,
                              tuple((c, pinned.name) for c in companions) if pinned is not None else ())
        plan = make_plan(self.profile, devices, request, options, self.overheads(devices),
                         host_free_bytes=self.host_free_bytes, speed=self.speed_args.figures(devices, self.host),
                         compare=self.speed_args.compare)
        notes = [f"{c.kind} {c.path}: {format_bytes(c.reserve_bytes)} reserved on {pinned.name} (estimate)"
                 for c in companions if pinned is not None]
        return dataclasses.replace(plan, notes=(*plan.notes, *notes))

    def largest_with_draft(self, request: Request, devices: Sequence[Device]) -> Plan:
        """--ctx max with a draft model: the draft shares the context, so its reservation grows with it."""
        step = 256
        low = -(-max(request.ctx_min_tokens, step) // step) * step
        high = max(low, (self.profile.n_ctx_train or low) // step * step)
        best = self.plan_at(dataclasses.replace(request, ctx_tokens=low), devices)  # raises what would fit
        while high > low:
            middle = (low + high + step) // 2 // step * step
            try:
                best = self.plan_at(dataclasses.replace(request, ctx_tokens=middle), devices)
                low = middle
            except PlanError:
                high = middle - step
        return best

    def companions(self, request: Request, pinned: Device) -> list[Companion]:
        found = [mmproj_companion(self.mmproj)] if self.mmproj else []
        if self.draft:
            ctx = request.ctx_tokens or self.profile.n_ctx_train or 4096
            # llama-server gives the draft the same -c, with its own cache types (-ctkd/-ctvd, f16)
            draft_request = dataclasses.replace(request, cache_type_k="f16", cache_type_v="f16")
            found.append(draft_companion(self.draft, draft_request, ctx, pinned.backend))
        return found

    def overheads(self, devices: Sequence[Device]) -> dict[str, int]:
        """What calibration measured for these GPUs, then the user's --overhead on top."""
        calibrated = overheads_for(devices, load_overheads())
        by_backend = {key for key in self.overhead if not key[-1].isdigit()}
        calibrated = {name: size for name, size in calibrated.items()
                      if not any(d.name == name and d.backend in by_backend for d in devices)}
        return {**calibrated, **self.overhead}  # the cost model puts the defaults under these

    def verify(self, plan: Plan) -> list[ComponentRow]:
        """Load the plan's argv in the real llama-server and compare, per device and component."""
        from llamalaunch.launch.measure import measure_plan
        from llamalaunch.model.compare import compare

        if self.toolchain is None:
            raise ToolchainError("--verify needs llama-server", INSTALL_HINT)
        busy = next((d for d in self.devices if d.note and d.note.startswith(BUSY_NOTE)), None)
        if busy is not None and busy.endpoint is not None:
            raise WorkerBusyError(busy.endpoint, f"{busy.name} is {busy.note}: --verify does not start "
                                  "llama-server on a busy worker", "stop that client first, or plan without "
                                  "--verify", None)
        argv = list(plan.argv)
        endpoints = argv[argv.index("--rpc") + 1].split(",") if "--rpc" in argv else []
        names = child_names(self.devices, endpoints)
        ranges = tuple(SlotRange(names[p.device.name], p.device.backend, p.first_slot or 0, p.n_layers)
                       for p in plan.devices if not p.excluded)
        placement = Placement(ranges)
        per_worker = {endpoint: sum(1 for d in self.devices if d.endpoint == endpoint) for endpoint in endpoints}
        measured = measure_plan(self.toolchain.server.path, argv, placement, endpoints, per_worker)
        planned = Estimate(MappingProxyType({names[p.device.name]: p.memory for p in plan.devices if not p.excluded}),
                           plan.host)
        return compare(planned, measured.estimate)

    def server_name(self) -> str:
        return str(self.toolchain.server.path) if self.toolchain is not None else "llama-server"


def parse_overheads(values: Sequence[str]) -> dict[str, int]:
    """--overhead CUDA=600MiB (a backend) or CUDA1=700MiB (one device)."""
    sizes: dict[str, int] = {}
    for value in values:
        for item in value.split(","):
            name, sep, size = item.partition("=")
            if not sep or not name.strip():
                raise BadInputError(f"--overhead {item!r} is not NAME=SIZE", "write it like --overhead CUDA=600MiB")
            sizes[name.strip()] = parse_size(size, f"--overhead {name.strip()}") if size.strip() not in ("0", "0B") \
                else 0
    return sizes


# Options whose value the plan decides: passing them after -- would contradict it.
PLANNED_FLAGS = frozenset({
    "-m", "--model", "-c", "--ctx-size", "-ngl", "--gpu-layers", "--n-gpu-layers", "-ts", "--tensor-split",
    "-dev", "--device", "--rpc", "--host", "--port", "-np", "--parallel", "-fit", "--fit", "--api-key",
    "-b", "--batch-size", "-ub", "--ubatch-size", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v",
    "-fa", "--flash-attn", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified", "--swa-full",
    "-mm", "--mmproj", "-mmdev", "--mmproj-device", "-md", "--model-draft", "-devd", "--device-draft",
    "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft", "-ot", "--override-tensor",
    "-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe",  # expert placement is the plan's (--cpu-experts N forces it)
})


@dataclass(frozen=True)
class ServeRequest:
    """serve's own options; the defaults are the option table's (options.py)."""

    name: str = DEFAULTS["name"]
    host: str = DEFAULTS["host"]
    port: int = DEFAULTS["port"]
    extra_args: tuple[str, ...] = DEFAULTS["extra_args"]
    force: bool = False
    api_key_file: Path | None = DEFAULTS["api_key_file"]
    max_attempts: int = DEFAULTS["max_attempts"]
    max_restarts: int = DEFAULTS["max_restarts"]
    backoff_initial_s: float = DEFAULTS["backoff"]
    load_timeout_s: float = DEFAULTS["load_timeout"]
    health_interval_s: float = DEFAULTS["health_interval"]
    health_misses: int = DEFAULTS["health_misses"]
    metrics_port: int | None = DEFAULTS["metrics_port"]  # serve /metrics (Prometheus) there
    metrics_host: str = DEFAULTS["metrics_host"]


def check_extra_args(extra_args: Sequence[str], force: bool) -> None:
    clashes = [arg.split("=", 1)[0] for arg in extra_args if arg.split("=", 1)[0] in PLANNED_FLAGS]
    if "--api-key" in clashes:
        raise BadInputError("--api-key on the command line would show the key in `ps` and the logs",
                            "put the key in a file and pass --api-key-file FILE")
    if clashes and not force:
        raise BadInputError(f"{', '.join(clashes)} after -- would contradict the plan",
                            "use llamalaunch's own options (--ctx, -dev, --budget ...) or add --force")


def default_alias(model_path: str, extra_args: Sequence[str]) -> str | None:
    """The model's name in the API: the file's stem (shard suffix dropped) rather than llama-server's full
    path; None when the user names it (-a/--alias after --, or llama-server's LLAMA_ARG_ALIAS)."""
    if "LLAMA_ARG_ALIAS" in os.environ or any(arg in ("-a", "--alias") or arg.startswith("--alias=")
                                               for arg in extra_args):
        return None
    return re.sub(r"-\d{5}-of-\d{5}$", "", Path(model_path).stem) or None


def check_not_running(name: str) -> None:
    path = state_path(name)
    if path.exists():
        try:
            state = read_state(path)
        except BadInputError:
            return  # damaged or another version's: it names nothing we can check, and this run replaces it
        if launcher_alive(state) and state.phase not in ("stopped", "failed"):
            raise ServeError(f"a server named {name!r} is already running (pid {state.launcher_pid}, {state.url})",
                             "stop it first, or give this one another --name")


def run_serve(inputs: PlanInputs, serve: ServeRequest, on_event: Callable[[SupervisorEvent], None],
              on_supervisor: Callable[[Supervisor], None] | None = None) -> int:
    """Serve until a signal; returns the exit code (128 + signal after a clean stop, 0 after `q`).

    `on_supervisor` gets the supervisor before it starts (the view's `q` asks it to stop)."""
    from llamalaunch.launch.supervisor import ServeOptions, Supervisor, SupervisorEvent

    assert inputs.toolchain is not None
    check_extra_args(serve.extra_args, serve.force)
    check_not_running(serve.name)
    if serve.host not in ("127.0.0.1", "localhost", "::1"):
        on_event(SupervisorEvent("warning", f"llama-server will listen on {serve.host}: reachable from the "
                                            "network" + ("" if serve.api_key_file else " without an API key")))
    port = pick_port(serve.host, serve.port, reuse_port="--reuse-port" in serve.extra_args)
    if serve.metrics_port is not None:
        from llamalaunch.observe.metrics import MetricsServer, ServeMetrics, SnapshotCache
    metrics = MetricsServer(serve.metrics_host, serve.metrics_port) if serve.metrics_port is not None else None
    log_path = state_dir() / f"{serve.name}.log"
    options = ServeOptions(name=serve.name, server=inputs.toolchain.server.path, host=serve.host, port=port,
                           extra_args=serve.extra_args, max_attempts=serve.max_attempts,
                           max_restarts=serve.max_restarts, load_timeout_s=serve.load_timeout_s,
                           backoff_initial_s=serve.backoff_initial_s,
                           api_key_file=serve.api_key_file, log_path=log_path,
                           alias=default_alias(inputs.model_path, serve.extra_args), model=model_label(inputs),
                           health_interval_s=serve.health_interval_s, health_misses=serve.health_misses)
    recorder = StateRecorder(serve.name, inputs.model_path, str(log_path))

    calibration = RunCalibration()
    noted: set[str] = set()

    def record_and_show(event: SupervisorEvent) -> None:
        problem = recorder.record(event, supervisor)
        calibration.on_event(event)
        on_event(event)
        if problem is not None:
            on_event(SupervisorEvent("warning", problem))
        for note in event.plan.notes if event.plan is not None else ():
            if note not in noted:  # once: a restart re-plans the same way
                noted.add(note)
                on_event(SupervisorEvent("note", note))

    supervisor = Supervisor(options, lambda lessons: inputs.plan(lessons, serving=True), record_and_show)
    recorder.url = supervisor.base_url
    if on_supervisor is not None:
        on_supervisor(supervisor)
    if metrics is not None:
        metrics.start(ServeMetrics(SnapshotCache(serve_snapshots(serve.name, supervisor, recorder))))
        on_event(SupervisorEvent("note", f"Prometheus metrics on {metrics.url}"))
    try:
        with stop_on_signals(supervisor.request_stop):
            return supervisor.run()
    finally:
        if metrics is not None:
            metrics.close()


def serve_snapshots(name: str, supervisor: Supervisor, recorder: StateRecorder) -> Callable[[], StatusSnapshot]:
    """Snapshots of this run for /metrics: the collector `status` uses, on the state file this run keeps.

    Its workers are never probed (the collector sees this launcher running): llama-server holds them, or
    the next plan is about to probe them, and a probe of ours could make that one find them busy."""
    from llamalaunch.observe.collector import StatusCollector
    from llamalaunch.observe.snapshot import StatusSnapshot
    from llamalaunch.observe.target import StatusTarget

    collector = StatusCollector(StatusTarget(state_path(name), None), api_key=supervisor.api_key())

    def collect() -> StatusSnapshot:
        state = recorder.state
        if not state.plan:  # nothing written yet (an earlier run's file may still be there): the first plan
            return StatusSnapshot(taken_at=time.time(), source="state", name=name, url=recorder.url, running=True,
                                  gone_reason=None, phase=supervisor.phase, launcher_pid=state.launcher_pid,
                                  started_at=state.started_at, model_path=state.model_path)
        return collector.collect()

    return collect


def model_label(inputs: PlanInputs) -> str:
    """'SmolLM2 135M Instruct (/models/smollm2.gguf)': the model's own name and the file served."""
    name = inputs.profile.name.strip()
    return f"{name} ({inputs.model_path})" if name and name != inputs.model_path else inputs.model_path


class StateRecorder:
    """Keeps the run state file in step with the supervisor's events, for `status`."""

    def __init__(self, name: str, model_path: str, log_path: str) -> None:
        pid = os.getpid()
        started_at = process_started_at(pid) or time.time()
        self.state = RunState(name=name, launcher_pid=pid, launcher_started_at=started_at, url="",
                              model_path=model_path, log_path=log_path, phase="starting", started_at=time.time())
        self.url = ""
        self.write_error: str | None = None

    def record(self, event: SupervisorEvent, supervisor: Supervisor) -> str | None:
        """Update the state file; a message the first time it cannot be written (serving goes on)."""
        if event.kind == "line" or (event.plan is None and not self.state.plan):
            return None  # nothing is written before there is a plan: bad input leaves no trace
        changes: dict[str, Any] = {"url": self.url, "phase": supervisor.phase, "restarts": supervisor.restarts,
                                   "last_exit_code": supervisor.last_exit_code,
                                   "updated_at": time.time(),
                                   "attempts": [dataclasses.asdict(a) for a in supervisor.attempts]}
        if event.kind == "phase":
            changes["phase_detail"] = event.message
            if event.phase == "ready":
                changes["ready_at"] = time.time()
        if event.plan is not None:
            changes["plan"] = plan_to_dict(event.plan)
            # What really ran: the plan's argv plus host/port/-lv and the pass-through after --.
            changes["argv"] = list(supervisor.child.argv) if supervisor.child is not None \
                else [str(supervisor.options.server), *event.plan.argv]
        if supervisor.child is not None:
            changes["child_pid"] = supervisor.child.pid
        self.state = dataclasses.replace(self.state, **changes)
        try:
            write_state(self.state)
        except OSError as error:
            if self.write_error is None:
                self.write_error = f"cannot write the run state file: {error.strerror}; `status` will lag"
                return self.write_error
        return None
