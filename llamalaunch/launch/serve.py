"""Serve: the plan's llama-server, supervised, with the run state `status` reads and the calibrations
it feeds.

Planning is plan/pipeline.py's (`PlanInputs`, re-planned at every launch); what watches the run from above
(the /metrics endpoint, the live view) comes in as observers and callbacks from the CLI layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalaunch.errors import BadInputError, ServeError
from llamalaunch.launch.calibrate import RunCalibration, RunSpeedCalibration
from llamalaunch.launch.ports import pick_port
from llamalaunch.launch.process import stop_on_signals
from llamalaunch.launch.state import (
    RunState,
    launcher_alive,
    process_started_at,
    read_state,
    state_path,
    write_state,
)
from llamalaunch.launch.supervisor import ServeOptions, Supervisor, SupervisorEvent
from llamalaunch.options import DEFAULTS, OPTIONS
from llamalaunch.paths import state_dir
from llamalaunch.plan.pipeline import PlanInputs
from llamalaunch.plan.schema import plan_to_dict

EXPERT_FLAGS = frozenset({"-ot", "--override-tensor", "-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe"})
# Options whose value the plan decides: passing them after -- would contradict it.
# Away from llama.cpp's defaults, which the plan's memory figures assume (KV cache and host weights' batches
# on the devices, layers split by layer): no option of ours sets them, only --force passes them.
LAYOUT_FLAGS = frozenset({"-nkvo", "--no-kv-offload", "-sm", "--split-mode", "-mg", "--main-gpu",
                          "--no-op-offload"})
PLANNED_FLAGS = frozenset({
    "-m", "--model", "-c", "--ctx-size", "-ngl", "--gpu-layers", "--n-gpu-layers", "-ts", "--tensor-split",
    "-dev", "--device", "--rpc", "--host", "--port", "-np", "--parallel", "-fit", "--fit", "--api-key",
    "-b", "--batch-size", "-ub", "--ubatch-size", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v",
    "-fa", "--flash-attn", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified", "--swa-full",
    "-mm", "--mmproj", "-mmdev", "--mmproj-device", "-md", "--model-draft", "-devd", "--device-draft",
    "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft",
    *LAYOUT_FLAGS,
    "-otd", "--override-tensor-draft", "--spec-draft-override-tensor", "-cmoed", "--cpu-moe-draft",
    "--spec-draft-cpu-moe", "-ncmoed", "--n-cpu-moe-draft", "--spec-draft-n-cpu-moe", "--spec-draft-ncmoe",
    *EXPERT_FLAGS,  # expert placement is the plan's (--cpu-experts N forces it)
})
# How host-held weights are loaded is the plan's too (--host-weights); older builds' spellings included.
LOAD_FLAGS = frozenset({"-lm", "--load-mode", "--mmap", "--no-mmap", "--mlock", "--no-host",
                        "-nr", "--repack", "--no-repack"})


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


def planned_clashes(extra_args: Sequence[str]) -> list[str]:
    """The flags after -- whose value the plan decides."""
    return [arg.split("=", 1)[0] for arg in extra_args if arg.split("=", 1)[0] in PLANNED_FLAGS | LOAD_FLAGS]


def check_extra_args(extra_args: Sequence[str], force: bool) -> None:
    clashes = planned_clashes(extra_args)
    if "--api-key" in clashes:
        raise BadInputError("--api-key on the command line would show the key in `ps` and the logs",
                            "put the key in a file and pass --api-key-file FILE")
    if clashes and not force:
        raise BadInputError(f"{', '.join(clashes)} after -- would contradict the plan",
                            f"use llamalaunch's own options ({'; '.join(own_options(clashes))}) or add --force")


def own_options(clashes: Sequence[str]) -> list[str]:
    """What llamalaunch takes instead of the llama-server flags given after --."""
    own_flags = {flag for option in OPTIONS for flag in option.flags}
    same = [flag for flag in clashes if flag in own_flags]
    rest = set(clashes) - own_flags - EXPERT_FLAGS - LOAD_FLAGS - LAYOUT_FLAGS
    return [*([f"{', '.join(same)} before --"] if same else []),
            *(["--cpu-experts N"] if set(clashes) & EXPERT_FLAGS else []),
            *(["--host-weights auto, pinned, mapped or repacked"] if set(clashes) & LOAD_FLAGS else []),
            *(["none for the KV cache and the split: the plan assumes llama.cpp's defaults"]
              if set(clashes) & LAYOUT_FLAGS else []),
            *(["--ctx, -dev, --budget ..."] if rest else [])]


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


@dataclass(frozen=True)
class ObservedRun:
    """What an observer of a serve run is given before the run starts."""

    request: ServeRequest
    supervisor: Supervisor
    recorder: StateRecorder  # the run state file's contents as this run keeps it
    on_event: Callable[[SupervisorEvent], None]  # the caller's own sink: notes and warnings for the user


# Entered before the supervisor runs and left when it is done (e.g. observe/serve_metrics.py's /metrics).
RunObserver = Callable[[ObservedRun], AbstractContextManager[Any]]


def run_serve(inputs: PlanInputs, serve: ServeRequest, on_event: Callable[[SupervisorEvent], None],
              on_supervisor: Callable[[Supervisor], None] | None = None,
              observers: Sequence[RunObserver] = ()) -> int:
    """Serve until a signal; returns the exit code (128 + signal after a clean stop, 0 after `q`).

    `on_supervisor` gets the supervisor before it starts (the view's `q` asks it to stop)."""
    from llamalaunch.launch.supervisor import Supervisor, SupervisorEvent

    assert inputs.toolchain is not None
    check_extra_args(serve.extra_args, serve.force)
    check_not_running(serve.name)
    forced = planned_clashes(serve.extra_args)
    if forced:
        on_event(SupervisorEvent("warning", f"--force: {', '.join(forced)} after -- override the plan: llama-server "
                                            "may place and size things unlike the plan and status show"))
    if serve.host not in ("127.0.0.1", "localhost", "::1"):
        on_event(SupervisorEvent("warning", f"llama-server will listen on {serve.host}: reachable from the "
                                            "network" + ("" if serve.api_key_file else " without an API key")))
    port = pick_port(serve.host, serve.port, reuse_port="--reuse-port" in serve.extra_args)
    log_path = state_dir() / f"{serve.name}.log"
    options = ServeOptions(name=serve.name, server=inputs.toolchain.server.path, host=serve.host, port=port,
                           extra_args=serve.extra_args, max_attempts=serve.max_attempts,
                           max_restarts=serve.max_restarts, load_timeout_s=serve.load_timeout_s,
                           backoff_initial_s=serve.backoff_initial_s,
                           api_key_file=serve.api_key_file, log_path=log_path,
                           alias=default_alias(inputs.model_path, serve.extra_args),
                           model=inputs.model_label(),
                           health_interval_s=serve.health_interval_s, health_misses=serve.health_misses)
    recorder = StateRecorder(serve.name, inputs.model_path, str(log_path))
    # what this run measures sharpens the next plans: the memory overhead, the speed
    calibrations = (RunCalibration(), RunSpeedCalibration(inputs.speed_at))
    noted: set[str] = set()

    def record_and_show(event: SupervisorEvent) -> None:
        problem = recorder.record(event, supervisor)
        for calibration in calibrations:
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
    with contextlib.ExitStack() as running:
        for observer in observers:
            running.enter_context(observer(ObservedRun(serve, supervisor, recorder, on_event)))
        with stop_on_signals(supervisor.request_stop):
            return supervisor.run()


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
                                   "restarts_total": supervisor.restarts_total,
                                   "last_exit_code": supervisor.last_exit_code,
                                   "last_restart_reason": supervisor.last_restart_reason,
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
