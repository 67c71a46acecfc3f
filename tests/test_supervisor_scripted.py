"""The supervisor's loop with scripted children and a virtual clock: no processes, no waiting (issue 16).

As honcho's tests do (FakeProcess, FakeClock): each fake child replays its script onto the supervisor's
queue when started; the queue advances the clock by its timeout when empty, so backoffs take no time.
The real-process tests of the same behaviour are in test_serve_e2e.py and test_faults.py.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from llamalaunch.launch.lessons import Lessons
from llamalaunch.launch.notify import Notifier
from llamalaunch.launch.process import ChildEvent, ChildExit, ChildLine, LogSink
from llamalaunch.launch.supervisor import (
    HEALTHY_RESET_S,
    ServeFailed,
    ServeOptions,
    Supervisor,
    SupervisorEvent,
    _Ready,
)
from llamalaunch.model.load import load_profile
from llamalaunch.plan.argv import ArgvOptions
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.plan.types import Plan
from llamalaunch.probe.device import Device
from llamalaunch.units import GIB
from tests.synthetic import write_preset

LOGS = Path(__file__).parent / "fixtures" / "llama-server-logs"


@dataclass(frozen=True)
class Ready:
    """The readiness check's answer: the one-token completion worked."""


@dataclass(frozen=True)
class Exit:
    returncode: int


@dataclass(frozen=True)
class Advance:
    """Time passes (the virtual clock jumps) before the next step."""

    seconds: float


Step = str | Ready | Exit | Advance


@dataclass(frozen=True)
class LineLater(ChildLine):
    """A line that comes `seconds` after the one before: the clock jumps as the supervisor takes it."""

    seconds: float = 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class VirtualQueue(queue.Queue):  # type: ignore[type-arg]
    """Never blocks: a wait on an empty queue is time passing on the clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        try:
            item = super().get(block=False)
        except queue.Empty:
            if block and timeout:
                self.clock.advance(timeout)
            raise
        if isinstance(item, LineLater):
            self.clock.advance(item.seconds)
        return item


class FakeChild:
    """A started llama-server stand-in: its whole script goes onto the queue at once."""

    def __init__(self, pid: int, script: Sequence[Step], events: queue.Queue[object]) -> None:
        self.pid = pid
        self.returncode: int | None = None
        for step in script:
            if isinstance(step, Advance):
                events.put(LineLater(f"(after {step.seconds:g} s)", 0.0, step.seconds))
            elif isinstance(step, Ready):
                events.put(_Ready(True, "", pid))
            elif isinstance(step, Exit):
                self.returncode = step.returncode
                events.put(ChildExit(step.returncode, 0.0))
            else:
                events.put(ChildLine(step, 0.0))

    def running(self) -> bool:
        return self.returncode is None

    def stop(self, timeout_s: float = 0.0) -> int:
        self.returncode = -15 if self.returncode is None else self.returncode
        return self.returncode

    def signal_group(self, signum: int) -> None:
        self.returncode = -signum

    def reset_worker_connections(self) -> int:
        return 0


class Scripted:
    """A supervisor whose n-th child plays scripts[n]; the last script should end with the user quitting."""

    def __init__(self, tmp_path: Path, scripts: Sequence[Sequence[Step]], **options: object) -> None:
        self.clock = FakeClock()
        self.scripts = list(scripts)
        self.events: list[SupervisorEvent] = []
        self.plans: list[Plan] = []
        self.argvs: list[list[str]] = []
        profile = load_profile(write_preset(tmp_path / "m.gguf", "llama-8b"))
        device = Device("CUDA0", "CUDA", "H100", 10 * GIB, 80 * GIB, 0)

        def plan(lessons: Lessons) -> Plan:
            self.plans.append(make_plan(profile, [device], lessons.apply(Request(ctx_tokens=None)),
                                        ArgvOptions("m.gguf")))
            return self.plans[-1]

        serve_options = ServeOptions(name="t", server=Path("llama-server"), health_interval_s=0.0,
                                     **options)  # type: ignore[arg-type]
        self.supervisor = Supervisor(serve_options, plan, self.events.append, Notifier({}),
                                     child_factory=self.start_child, clock=self.clock)
        self.supervisor.queue = VirtualQueue(self.clock)

    def start_child(self, argv: Sequence[str], env: dict[str, str], events: queue.Queue[ChildEvent],
                    sink: LogSink | None) -> FakeChild:
        self.argvs.append(list(argv))
        script = self.scripts[len(self.argvs) - 1]
        quits = bool(script) and script[-1] == "quit"
        child = FakeChild(100 + len(self.argvs), script[:-1] if quits else script, events)  # type: ignore[arg-type]
        if quits:  # after the child's script: the user presses q
            self.supervisor.request_quit("done")
        return child

    def phases(self) -> list[tuple[str | None, str]]:
        return [(e.phase, e.message) for e in self.events if e.kind == "phase"]


def kv_oom_lines() -> list[str]:
    """llama.cpp's own lines for a KV cache that did not fit on CUDA0 (from the H100 excerpts)."""
    lines = (LOGS / "cuda-h100-excerpts-8b.log").read_text().splitlines()
    start = lines.index("===== bisect fail ctx=67584")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("====="))
    return lines[start + 1:end]


def test_an_oom_while_loading_re_plans_smaller_and_the_next_load_is_ready(tmp_path: Path) -> None:
    run = Scripted(tmp_path, [[*kv_oom_lines(), Exit(1)], ["loading", Ready(), "quit"]])
    assert run.supervisor.run() == 0
    first, second = run.plans
    assert second.ctx_tokens < first.ctx_tokens
    assert run.argvs[1][run.argvs[1].index("-c") + 1] == str(second.ctx_tokens)
    attempts = [e.message for e in run.events if e.kind == "attempt"]
    assert len(attempts) == 1 and attempts[0].startswith("attempt 1 failed: ")
    assert attempts[0].endswith("; re-planning")
    assert [p for p, _ in run.phases()] == ["starting", "loading", "starting", "loading", "ready", "stopping",
                                            "stopped"]
    assert run.supervisor.restarts == 0
    assert run.clock.now == 1000.0  # no backoff before re-planning


def test_ooms_past_max_attempts_give_up(tmp_path: Path) -> None:
    run = Scripted(tmp_path, [[*kv_oom_lines(), Exit(1)]] * 2, max_attempts=2)
    with pytest.raises(ServeFailed, match=r"^out of memory on 2 attempts \(--max-attempts\); last: "):
        run.supervisor.run()
    assert len(run.plans) == 2


def test_a_crash_loop_backs_off_doubling_to_the_cap_then_gives_up(tmp_path: Path) -> None:
    crash: list[Step] = ["loading", Ready(), "serving", Exit(-11)]
    log = tmp_path / "server.log"
    run = Scripted(tmp_path, [crash] * 5, max_restarts=4, backoff_initial_s=1.0, backoff_max_s=5.0, log_path=log)
    with pytest.raises(ServeFailed) as failed:
        run.supervisor.run()
    assert failed.value.message == "llama-server crashed 5 times; giving up (llama-server was killed by SIGSEGV)"
    assert failed.value.hint == f"see the server log {log}; raise --max-restarts to keep trying"  # which log
    assert (run.supervisor.restarts, run.supervisor.restarts_total) == (4, 4)
    restarting = [message for phase, message in run.phases() if phase == "restarting"]
    assert restarting == [f"llama-server was killed by SIGSEGV; restart {n} of 4 in {delay} s"
                          for n, delay in ((1, 1), (2, 2), (3, 4), (4, 5))]
    assert run.clock.now == pytest.approx(1000.0 + 1 + 2 + 4 + 5)  # each backoff waited out, no more
    assert len(run.argvs) == 5


def test_ready_for_ten_minutes_resets_the_restart_count(tmp_path: Path) -> None:
    crash_soon: list[Step] = ["loading", Ready(), Advance(HEALTHY_RESET_S - 1), Exit(-11)]
    crash_late: list[Step] = ["loading", Ready(), Advance(HEALTHY_RESET_S + 1), Exit(-11)]
    # Two quick crashes use up --max-restarts 2; a crash after 10 minutes ready starts the count again.
    run = Scripted(tmp_path, [crash_soon, crash_soon, crash_late, crash_soon, ["loading", Ready(), "quit"]],
                   max_restarts=2, backoff_initial_s=1.0)
    assert run.supervisor.run() == 0
    restarting = [message for phase, message in run.phases() if phase == "restarting"]
    assert [message.split("; ")[1] for message in restarting] == [
        "restart 1 of 2 in 1 s", "restart 2 of 2 in 2 s", "restart 1 of 2 in 1 s", "restart 2 of 2 in 2 s"]
    assert (run.supervisor.restarts, run.supervisor.restarts_total) == (2, 4)  # the streak resets, the total not


def test_without_the_reset_the_same_crashes_give_up(tmp_path: Path) -> None:
    crash_soon: list[Step] = ["loading", Ready(), Advance(HEALTHY_RESET_S - 1), Exit(-11)]
    run = Scripted(tmp_path, [crash_soon] * 3, max_restarts=2, backoff_initial_s=1.0)
    with pytest.raises(ServeFailed, match="crashed 3 times; giving up"):
        run.supervisor.run()



def test_an_abort_while_loading_quotes_the_assert_and_names_the_log(tmp_path: Path) -> None:
    """llama.cpp's real output for a header it asserts on: the GGML_ASSERT line, not gdb's last line."""
    lines = (LOGS / "cpu-qwen3moe-expert-used-99-abort.log").read_text().splitlines()
    log = tmp_path / "t.log"
    run = Scripted(tmp_path, [[*lines, Exit(-6)]], log_path=log)
    with pytest.raises(ServeFailed) as failed:
        run.supervisor.run()
    assert failed.value.message == ("llama-server was killed by SIGABRT before it was ready: "
                                    "GGML_ASSERT(n_expert_used_max <= hparams.n_expert) failed")
    assert failed.value.hint == f"see the server log {log} for the full output"


# A stop asked for by a signal while the main thread is inside the supervisor's queue (or the worker pool's
# stop flag): with queue.Queue / threading.Event the handler could block on a lock its own thread held, and
# serve never stopped. Signals every 0.2 ms for 2 s; a deadlock or a nested-handler crash fails the run.
SIGNAL_STORM = """
import signal, sys, time
from pathlib import Path
from llamalaunch.launch.notify import Notifier
from llamalaunch.launch.process import StopFlag
from llamalaunch.launch.supervisor import ServeOptions, Supervisor

supervisor = Supervisor(ServeOptions(name="t", server=Path("llama-server")), lambda lessons: None, print,
                        Notifier({}))
flag = StopFlag()
asked = 0
def handler(signum, frame):
    global asked
    asked += 1
    supervisor.request_stop(signum)
    flag.set()
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
got, end = 0, time.monotonic() + 2
while time.monotonic() < end:
    got += supervisor._next_item(0.0003) is not None
    flag.wait(0.0001)
signal.setitimer(signal.ITIMER_REAL, 0, 0)
time.sleep(0.05)  # a signal already pending runs its handler now, not after the drain below
while supervisor._next_item(0) is not None:
    got += 1
print(asked == got and flag.is_set())
"""


def test_a_stop_asked_by_a_signal_never_deadlocks_the_loop() -> None:
    import subprocess
    import sys

    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", SIGNAL_STORM], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr[-500:]


def test_a_stop_while_a_restart_waits_does_not_pass_the_crash_off_as_how_it_stopped(tmp_path: Path) -> None:
    """`stop` during the backoff after a kill -9 said "stopped: llama-server was killed by SIGKILL"."""
    run = Scripted(tmp_path, [["loading", Ready(), "serving", Exit(-9), "quit"]], backoff_initial_s=20.0)
    assert run.supervisor.run() == 0
    assert run.phases()[-1] == ("stopped", "llama-server was not running (a restart was waiting after: llama-server "
                                           "was killed by SIGKILL)")
