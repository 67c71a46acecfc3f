"""Supervise llama-server: plan, start, wait for real readiness, recover from OOM, restart, stop.

Everything that happens arrives on one queue (child lines, child exit, readiness results, stop
requests); the loop turns it into SupervisorEvents for whoever renders them.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from llamalaunch.errors import LaunchError, ServeError
from llamalaunch.launch import http
from llamalaunch.launch.failures import classify_failure, crash_lesson, describe_exit
from llamalaunch.launch.lessons import Lessons
from llamalaunch.launch.logparse import READINESS_MARK
from llamalaunch.launch.notify import Notifier
from llamalaunch.launch.oom import OomTracker, OutOfMemory
from llamalaunch.launch.process import (
    Child,
    ChildEvent,
    ChildEvents,
    ChildExit,
    ChildLine,
    LogSink,
    rpc_endpoints,
)
from llamalaunch.launch.restart import RestartPolicy, Restarts
from llamalaunch.launch.worker_links import WorkerLinks
from llamalaunch.options import DEFAULTS
from llamalaunch.plan.types import Plan
from llamalaunch.probe.inventory import held_elsewhere
from llamalaunch.probe.rpc import RpcProbeError, stopped_worker

PHASES = ("starting", "loading", "ready", "restarting", "stopping", "stopped", "failed")


@dataclass(frozen=True)
class ServeOptions:
    name: str
    server: Path
    host: str = DEFAULTS["host"]
    port: int = DEFAULTS["port"]
    extra_args: tuple[str, ...] = DEFAULTS["extra_args"]
    max_attempts: int = DEFAULTS["max_attempts"]  # OOM ladder: loads tried before giving up
    max_restarts: int = DEFAULTS["max_restarts"]  # crashes after ready before giving up
    backoff_initial_s: float = DEFAULTS["backoff"]
    backoff_max_s: float = 30.0
    load_timeout_s: float = DEFAULTS["load_timeout"]  # no progress this long while loading: a stalled load
    api_key_file: Path | None = DEFAULTS["api_key_file"]
    log_path: Path | None = None
    alias: str | None = None  # the model's name in the API (/v1/models); None: llama-server's own choice
    model: str = ""  # what the start line names: "SmolLM2 135M (/models/smollm2.gguf)"
    # once ready, /health every this often (and this long to answer); 0: off
    health_interval_s: float = DEFAULTS["health_interval"]
    health_misses: int = DEFAULTS["health_misses"]  # unanswered /health in a row: a ready server is hung


@dataclass(frozen=True)
class Attempt:
    number: int
    ctx_tokens: int
    n_gpu_layers: int
    layers: str  # "RPC0=8 RPC1=23"
    outcome: str = ""


@dataclass(frozen=True)
class SupervisorEvent:
    kind: str  # "phase", "plan", "attempt", "line", "warning"
    message: str
    phase: str | None = None
    plan: Plan | None = None
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class _Ready:
    ok: bool
    detail: str
    pid: int  # the child it is about: a late answer about an earlier child must not judge this one


@dataclass(frozen=True)
class _StopRequest:
    signum: int | None  # None: the user asked in the view (q), not by a signal
    reason: str = ""


@dataclass(frozen=True)
class _Broken:
    """A ready llama-server that cannot serve: it stopped answering /health, or one of its RPC workers is gone."""

    pid: int
    reason: str


@dataclass(frozen=True)
class _WorkerStopped:
    """A worker of a ready llama-server is stopped (SIGSTOP) on this machine: its requests wait, nothing to
    restart (a new llama-server would wait on the same worker); said once until it resumes."""

    pid: int
    message: str


_Item = ChildEvent | _Ready | _StopRequest | _Broken | _WorkerStopped
READINESS_FAILED = "llamalaunch: the one-token completion failed"
HEALTHY_RESET_S = 600.0  # ready this long: the restart count starts again


class ServeFailed(ServeError):
    pass


class _WorkerNotBack(Exception):
    """Re-planning after a crash found a worker refused, unreachable or busy: try again after a backoff."""

    def __init__(self, error: RpcProbeError) -> None:
        super().__init__(error.message)
        self.error = error


class SupervisedChild(Protocol):
    """What the supervisor uses of a started child (process.Child, or a test's scripted stand-in)."""

    pid: int
    argv: list[str]  # as started: the run state records it

    def running(self) -> bool: ...

    def stop(self) -> int: ...

    def signal_group(self, signum: int) -> None: ...

    def reset_worker_connections(self) -> int: ...


# Starts a child: (argv, env, the queue its ChildEvents go to, the log sink) → the child.
ChildFactory = Callable[[Sequence[str], dict[str, str], ChildEvents, LogSink | None],
                        SupervisedChild]


class Supervisor:
    """The child factory and the clock are parameters, as honcho's manager takes `_process_ctor` and
    `_clock`: tests replay scripted children through the real loop without processes or waiting."""

    def __init__(self, options: ServeOptions, make_plan: Callable[[Lessons], Plan],
                 on_event: Callable[[SupervisorEvent], None], notifier: Notifier | None = None,
                 child_factory: ChildFactory = Child, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.child_factory = child_factory
        self.clock = clock
        self.make_plan = make_plan
        self.on_event = on_event
        self.notifier = notifier or Notifier()
        # SimpleQueue: request_stop puts into it from a signal handler, and only its put is reentrant (a
        # queue.Queue's lock may be held by the very thread the signal interrupted: a serve that never stops)
        self.queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self.lessons = Lessons()
        self.attempts: list[Attempt] = []
        self._restarts = Restarts(RestartPolicy(options.backoff_initial_s, options.backoff_max_s, HEALTHY_RESET_S,
                                                options.max_restarts), clock)
        self.last_exit_code: int | None = None  # llama-server's last exit status (negative: a signal)
        self.last_restart_reason = ""  # why llama-server was last restarted (a -9 may be our own kill)
        self._restart_waits_after: str | None = None  # the reason of a restart now waiting out its backoff
        self.phase = "starting"
        self.child: SupervisedChild | None = None
        self.plan: Plan | None = None
        self.recent: deque[str] = deque(maxlen=200)
        self.sink = LogSink(options.log_path) if options.log_path else None
        self._stop_signal: int | None = None
        self._replanning_after: str | None = None  # the OOM lesson the next plan must honour
        self._watchdog_sent_at = float("-inf")
        self._log_error_told = False

    @property
    def restarts(self) -> int:
        """Restarts in the current streak (back to 0 after ten minutes ready)."""
        return self._restarts.streak

    @property
    def restarts_total(self) -> int:
        """Every restart of this run."""
        return self._restarts.total

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "::", "") else self.options.host
        return f"http://{host}:{self.options.port}"

    # --- public --------------------------------------------------------------------------------

    def request_stop(self, signum: int) -> None:
        """Safe from a signal handler: the loop does the stopping."""
        self.queue.put(_StopRequest(signum))

    def request_quit(self, reason: str) -> None:
        """A stop the user asked for in the view (`q`): said as `reason`, and the exit status is 0."""
        self.queue.put(_StopRequest(None, reason))

    def run(self) -> int:
        """Serve until stopped; the exit code is 128 + the signal after a clean stop (0 after `q`),
        non-zero on failure."""
        try:
            return self._run()
        finally:
            if self.child is not None and self.child.running():
                self.child.stop()
            if self.sink is not None:
                self.sink.close()

    # --- loop ----------------------------------------------------------------------------------

    def _run(self) -> int:
        while True:
            outcome = self._one_launch()
            if outcome is not None:
                return outcome

    def _one_launch(self) -> int | None:
        """Plan, start, and watch one llama-server; None means: launch again."""
        self._set_phase("starting", f"planning {self.options.model}" if self.options.model else "planning")
        try:
            plan = self._make_plan()
        except _WorkerNotBack as waiting:
            return self._restart_later(waiting.error.message, waiting.error.hint)
        self.plan = plan
        self._start(plan)
        ready = False
        oom = OomTracker()
        lines: list[str] = []
        tail: deque[str] = deque(maxlen=50)  # this child's last lines: why it died, when it dies after ready
        hung: str | None = None
        last_progress = self.clock()
        while True:
            item = self._next_item(0.5)
            if item is None:
                if not ready and self.clock() - last_progress > self.options.load_timeout_s:
                    held = held_elsewhere([p.device for p in plan.devices], [self.child.pid] if self.child else [])
                    self._stop_child()
                    message = f"llama-server made no progress for {self.options.load_timeout_s:g} s while loading" \
                              + (f": {held}" if held else "")
                    self._fail(message)
                    raise ServeFailed(message, "stop that client, then serve again" if held else
                                      "raise --load-timeout, or check the workers and the log")
                continue
            if isinstance(item, _StopRequest):
                return self._stop(item)
            if isinstance(item, _Broken):
                if self.child is not None and item.pid == self.child.pid and hung is None:
                    hung = item.reason
                    self.on_event(SupervisorEvent("warning", f"{hung}: killing pid {item.pid} to restart it"))
                    self.child.signal_group(signal.SIGKILL)  # hung: a graceful stop would wait for nothing
                continue
            if isinstance(item, _WorkerStopped):
                if self.child is not None and item.pid == self.child.pid:
                    self.on_event(SupervisorEvent("warning", item.message))
                continue
            if isinstance(item, ChildLine):
                last_progress = self.clock()
                if not ready:  # kept to explain a failed load; a server up for days prints millions of lines
                    lines.append(item.text)
                tail.append(item.text)
                self.recent.append(item.text)
                self.on_event(SupervisorEvent("line", item.text))
                self._tell_log_error()
                oom.feed(item.text)
                if not ready and "listening on" in item.text:
                    self._check_ready_in_background()
                continue
            if isinstance(item, _Ready):
                if self.child is None or item.pid != self.child.pid:
                    continue
                if item.ok and not ready:
                    ready = True
                    self._mark_ready(plan)
                elif not item.ok and self.child is not None and self.child.running():
                    # /health can say ok after a failed allocation (#27309): the completion decides.
                    lines.append(f"{READINESS_FAILED}: {item.detail or 'no answer'}")
                    self._stop_child()
                continue
            assert isinstance(item, ChildExit)
            self.last_exit_code = item.returncode
            why = hung or (crash_lesson(item.returncode, tail) if ready and oom.found is None else None)
            return self._after_exit(item.returncode, ready, oom.found, lines, plan, why)

    def _make_plan(self) -> Plan:
        """A plan that cannot be made ends the run as failed; after an OOM, it is the ladder running out."""
        try:
            plan = self.make_plan(self.lessons)
        except LaunchError as error:
            if isinstance(error, RpcProbeError) and self.restarts > 0 and self._replanning_after is None:
                # Relaunching after a crash: a worker that went down with it may be restarting, or busy.
                raise _WorkerNotBack(error) from None
            if self._replanning_after is None:
                self._fail(error.message)
                raise
            message = f"attempt {len(self.attempts)} failed ({self._replanning_after}); no smaller plan fits: " \
                      f"{error.message}"
            self._fail(message)
            raise ServeFailed(message, error.hint) from None
        self._replanning_after = None
        return plan

    def _after_exit(self, returncode: int, ready: bool, oom: OutOfMemory | None,
                    lines: Sequence[str], plan: Plan, why: str | None = None) -> int | None:
        if oom is not None and not ready:
            return self._oom_retry(oom, plan)
        if not ready:
            failure = classify_failure(lines, returncode, self.options.log_path)
            if not failure.worker_lost:
                self._fail(failure.message)
                raise ServeFailed(failure.message, failure.hint)
            # Launched again like a crash: the next plan's probe names the lost worker, or finds it back.
            lesson = failure.message
        else:
            lesson = self.lessons.learn_runtime_oom() if oom else why or describe_exit(returncode)
        return self._restart_later(lesson)

    def _restart_later(self, lesson: str, hint: str | None = None) -> int | None:
        """Count one restart and back off before the next launch; give up past --max-restarts."""
        restart = self._restarts.died()
        if restart.delay_s is None:
            message = (f"llama-server crashed {restart.number} times; giving up ({lesson})" if hint is None else
                       f"{lesson}; giving up after {restart.number - 1} restarts")
            self._fail(message)
            log = f"see the server log {self.options.log_path}" if self.options.log_path else "see the server log"
            raise ServeFailed(message, f"{hint or log}; raise --max-restarts to keep trying")
        self.last_restart_reason = lesson
        self._set_phase("restarting", f"{lesson}; restart {restart.number} of {self.options.max_restarts} "
                                      f"in {restart.delay_s:g} s")
        self._restart_waits_after = lesson
        try:
            return self._wait_backoff(restart.delay_s)
        finally:
            self._restart_waits_after = None

    def _wait_backoff(self, delay_s: float) -> int | None:
        """Sleep out the backoff unless a stop request comes; stale items (a late readiness answer) wait too."""
        deadline = self.clock() + delay_s
        while (left := deadline - self.clock()) > 0:
            item = self._next_item(left)
            if isinstance(item, _StopRequest):
                return self._stop(item)
        return None

    def _oom_retry(self, oom: OutOfMemory, plan: Plan) -> int | None:
        if oom.kind == "runtime":
            lesson = self.lessons.learn_runtime_oom()
        else:
            lesson = self.lessons.learn_allocation_failure(plan, oom.device_name(plan), oom.kind, oom.size_bytes)
        self._record_attempt(plan, lesson)
        if len(self.attempts) >= self.options.max_attempts:
            tried = len(self.attempts)
            message = f"out of memory on {tried} attempt{'s' if tried != 1 else ''} (--max-attempts); last: {lesson}"
            self._fail(message)
            raise ServeFailed(message, "free memory on the devices, lower --ctx, or add --budget/--reserve")
        self.on_event(SupervisorEvent("attempt", f"attempt {len(self.attempts)} failed: {lesson}; re-planning"))
        self._replanning_after = lesson
        return None

    # --- helpers -------------------------------------------------------------------------------

    def _start(self, plan: Plan) -> None:
        argv = [str(self.options.server), *plan.argv, *self._runtime_args(), *self.options.extra_args]
        env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        try:
            self.child = self.child_factory(argv, env, self.queue, self.sink)  # type: ignore[arg-type]
        except OSError as error:  # checked at serve's start: changed since (a rebuild, a reinstall)
            message = f"cannot start {argv[0]}: {error.strerror}"
            self._fail(message)
            moved = isinstance(error, (FileNotFoundError, PermissionError))
            raise ServeFailed(message, "it was moved or removed while serving: put it back, or serve again with "
                                       "--llama-server PATH" if moved else "check that file (and this machine's "
                                       "free memory and open files), then serve again") from None
        self.on_event(SupervisorEvent("plan", f"attempt {len(self.attempts) + 1}: ctx {plan.ctx_tokens}, "
                                              f"{describe_layers(plan)}{describe_left_out(plan)}", plan=plan))
        self._set_phase("loading", f"pid {self.child.pid}, ctx {plan.ctx_tokens}")

    def _runtime_args(self) -> list[str]:
        args = ["--host", self.options.host, "--port", str(self.options.port), "-lv", "5", "--metrics"]
        if self.options.api_key_file is not None:
            args += ["--api-key-file", str(self.options.api_key_file)]
        if self.options.alias is not None:
            args += ["--alias", self.options.alias]
        return args

    def _check_ready_in_background(self) -> None:
        threading.Thread(target=self._check_ready, daemon=True, name="readiness").start()

    def _check_ready(self) -> None:
        child = self.child  # this thread judges this child only, not one started after it died
        if child is None:
            return
        api_key = self.api_key()
        deadline = self.clock() + self.options.load_timeout_s
        while self.clock() < deadline and child.running():
            if http.health(self.base_url, api_key).status == 200:
                result = http.complete_one_token(self.base_url, api_key=api_key, prompt=self._readiness_prompt())
                ok = result.status == 200
                self.queue.put(_Ready(ok, result.error or "", child.pid))
                return
            time.sleep(0.1)

    def _readiness_prompt(self) -> str | list[int]:
        """With experts in host memory, a prompt of a whole ubatch: large batches stream host weights to
        the GPU and allocate there at run time, which a one-token answer never does (issue 17)."""
        plan = self.plan
        if plan is None or not (plan.host_expert_layers or plan.host_expert_parts):
            return "Hi"
        token = min(100, plan.model.n_vocab - 1)
        return [token] * min(plan.request.n_ubatch, plan.ctx_tokens // 2)

    def api_key(self) -> str | None:
        """The key llama-server was given (see http.read_api_key)."""
        return None if self.options.api_key_file is None else http.read_api_key(self.options.api_key_file)

    def _mark_ready(self, plan: Plan) -> None:
        if self.child is not None:  # its worker connections are made: they close with a reset even if
            self.child.reset_worker_connections()  # it dies with us (PDEATHSIG) in the middle of a request
        self._restarts.up()  # ready HEALTHY_RESET_S before a crash: the restart count starts again
        if self.sink is not None:
            self.sink.write(READINESS_MARK)
        self._set_phase("ready", f"{self.base_url} ctx {plan.ctx_tokens}")
        self.notifier.ready(f"ready: {self.base_url} ctx {plan.ctx_tokens}")
        if self.child is not None and self.options.health_interval_s > 0 and self.options.health_misses > 0:
            threading.Thread(target=self._watch_health, args=(self.child,), daemon=True, name="liveness").start()

    def _watch_health(self, child: SupervisedChild) -> None:
        """While `child` runs: /health every interval; `health_misses` unanswered in a row report it hung; a
        worker of its plan whose connection llama-server lost reports it broken (llama-server would abort on
        the next request, while /health still says ok).

        /health is answered by llama-server's HTTP threads (more of them than slots), so a busy server still
        answers it; one stopped (SIGSTOP), deadlocked or swapped to death does not.
        """
        interval_s, needed = self.options.health_interval_s, self.options.health_misses
        api_key = self.api_key()
        links = WorkerLinks(child.pid, rpc_endpoints(self.plan.argv) if self.plan is not None else [])
        stopped: set[str] = set()
        misses = 0
        while child.running():
            started = self.clock()
            result = http.health(self.base_url, api_key, timeout_s=interval_s)
            misses = 0 if result.status == 200 else misses + 1
            if misses >= needed:
                last = result.error or f"HTTP {result.status}"
                self.queue.put(_Broken(child.pid, f"llama-server stopped answering ({misses} /health checks in a "
                                                  f"row unanswered within {interval_s:g} s; last: {last})"))
                return
            gone = links.lost() if links.endpoints else None
            if gone is not None and child.running():  # /health stays ok: its next request would abort on it
                self.queue.put(_Broken(child.pid, f"RPC worker {gone} is gone (llama-server's connection to it "
                                                  "closed)"))
                return
            self._say_stopped_workers(child, links.endpoints, stopped)
            time.sleep(max(0.0, interval_s - (self.clock() - started)))

    def _say_stopped_workers(self, child: SupervisedChild, endpoints: Sequence[str], said: set[str]) -> None:
        """A worker stopped on this machine (Ctrl-Z, SIGSTOP) keeps its connection: /health and the links stay
        fine while every request hangs. Said once per stop."""
        for endpoint in endpoints:
            pid = stopped_worker(endpoint)
            if pid is None:
                said.discard(endpoint)
            elif endpoint not in said:
                said.add(endpoint)
                self.queue.put(_WorkerStopped(child.pid, f"RPC worker {endpoint}: its ggml-rpc-server (pid {pid}) "
                                                         f"is stopped; requests wait until `kill -CONT {pid}` "
                                                         "resumes it"))

    def _record_attempt(self, plan: Plan, outcome: str) -> None:
        self.attempts.append(Attempt(len(self.attempts) + 1, plan.ctx_tokens, plan.n_gpu_layers,
                                     describe_layers(plan), outcome))

    def _set_phase(self, phase: str, detail: str) -> None:
        self.phase = phase
        self.on_event(SupervisorEvent("phase", detail, phase=phase))
        self.notifier.status(f"{phase}: {detail}")

    def _fail(self, message: str) -> None:
        self._set_phase("failed", message)

    def _next_item(self, timeout_s: float) -> _Item | None:
        """The next item within `timeout_s`, None if none came; feeds the systemd watchdog meanwhile.

        Fed on every call, not only when the queue is idle: a busy server at -lv 5 prints lines
        without pause, and a long backoff must not look like a hang either.
        """
        deadline = self.clock() + timeout_s
        while True:
            self._watchdog()
            left = deadline - self.clock()
            if left <= 0:
                return None
            try:
                return self.queue.get(timeout=min(left, self.notifier.watchdog_interval_s or left))
            except queue.Empty:
                continue

    def _tell_log_error(self) -> None:
        """A log that cannot be written (disk full) does not stop the server; it is said once."""
        if self.sink is not None and self.sink.write_error and not self._log_error_told:
            self._log_error_told = True
            self.on_event(SupervisorEvent("warning", f"{self.sink.write_error}; llama-server keeps running, "
                                                     "its output is no longer logged"))

    def _watchdog(self) -> None:
        interval_s = self.notifier.watchdog_interval_s
        if interval_s is not None and self.clock() - self._watchdog_sent_at >= interval_s:
            self.notifier.watchdog()
            self._watchdog_sent_at = self.clock()

    def _stop_child(self) -> int | None:
        return self.child.stop() if self.child is not None else None

    def _stop(self, request: _StopRequest) -> int:
        """A clean stop: 128 + the signal that asked for it, or 0 when the user asked in the view (q)."""
        self._set_phase("stopping", request.reason or f"signal {signal.Signals(request.signum or 0).name}")
        self.notifier.stopping()
        returncode = self._stop_child()
        self.last_exit_code = returncode if returncode is not None else self.last_exit_code
        self._pass_on_last_lines()
        self._set_phase("stopped", self._how_it_stopped(returncode))
        return 0 if request.signum is None else 128 + request.signum

    def _how_it_stopped(self, returncode: int | None) -> str:
        """How llama-server ended; a stop between a crash and its restart says so: the crash is not how this
        stop went (it read as a SIGKILL)."""
        if self._restart_waits_after:
            return f"llama-server was not running (a restart was waiting after: {self._restart_waits_after})"
        return describe_exit(returncode) if returncode is not None else "llama-server was not running"

    def _pass_on_last_lines(self) -> None:
        """What the child printed while stopping (its memory breakdown) still reaches the listeners."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, ChildLine):
                self.on_event(SupervisorEvent("line", item.text))


def describe_layers(plan: Plan) -> str:
    used = [f"{p.device.name}={p.n_layers}" for p in plan.devices if not p.excluded]
    spilled = plan.model.n_slots - plan.n_gpu_layers
    return " ".join(used + ([f"CPU={spilled}"] if spilled else [])) or "all on CPU"


def describe_left_out(plan: Plan) -> str:
    """'; RPC1 left out: named by --exclude (down: ...)': serve's log says which devices the plan left out, and why,
    as plan's table does."""
    return "".join(f"; {p.device.name} left out: {p.reason}" for p in plan.devices if p.excluded)

