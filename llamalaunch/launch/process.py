"""Run one child (llama-server, ggml-rpc-server) in its own process group, streaming its lines.

The child gets the kernel's parent-death signal, so it cannot outlive the launcher even when the
launcher is killed with SIGKILL; stopping signals the whole group and escalates TERM → KILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

STOP_TIMEOUT_S = 10.0
# llama-server runs at -lv 5 (the layer lines are debug level): ~50 KB a short request. The log and its
# rotated copies stay under LOG_MAX_BYTES × (1 + LOG_BACKUPS) whatever the uptime and however many runs.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildLine:
    text: str
    time: float


@dataclass(frozen=True)
class ChildExit:
    returncode: int
    time: float


ChildEvent = ChildLine | ChildExit


class ChildEvents(Protocol):
    """Where a child's events go: a queue.SimpleQueue (the supervisor's, which a signal handler also puts
    into) or a queue.Queue."""

    def put(self, item: ChildEvent, /) -> None: ...


class StopFlag:
    """A stop asked for from a signal handler. threading.Event.set() takes a lock that the interrupted
    main thread may be holding (inside Event.wait): a deadlock; SimpleQueue.put is reentrant."""

    def __init__(self) -> None:
        self._asked: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._set = False

    def set(self) -> None:
        self._asked.put(True)

    def wait(self, timeout_s: float) -> bool:
        """True once a stop was asked for; waits up to `timeout_s` for one."""
        if not self._set:
            try:
                self._set = self._asked.get(timeout=timeout_s)
            except queue.Empty:
                pass
        return self._set

    def is_set(self) -> bool:
        return self.wait(0)


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None  # not Linux: the child is only stopped by us


# Looked up once, before any fork: dlopen in the forked child of a threaded launcher can deadlock.
_PRCTL = _load_prctl()


def _die_with_parent(launcher_pid: int) -> None:
    """In the child before exec: SIGKILL when the launcher dies (Linux prctl)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != launcher_pid:
            # The launcher died between fork and prctl: the signal it set up will never come.
            os.kill(os.getpid(), signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class LogSink:
    """Appends child lines to a file, rotating at `max_bytes` to NAME.1 … NAME.<backups> (oldest dropped).

    A full disk must not stop the server: write errors are counted and reported once. The file is
    opened at the first line, so a launch refused before the child starts leaves nothing behind.
    Safe from several threads (the child's reader, the supervisor's own marks).
    """

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = max(1, backups)
        self.write_error: str | None = None
        self._file: TextIO | None = None
        self._lock = threading.Lock()

    def _open(self) -> TextIO:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # private, as write_state makes it
        return open(self.path, "a", encoding="utf-8", opener=_private_opener)

    def write(self, line: str) -> None:
        with self._lock:
            try:
                if self._file is None:
                    self._file = self._open()
                self._file.write(line + "\n")
                self._file.flush()
                if self._file.tell() > self.max_bytes:
                    self._rotate()
            except (OSError, ValueError) as error:
                reason = getattr(error, "strerror", None) or error
                self.write_error = self.write_error or f"cannot write the server log {self.path}: {reason}"

    def backup(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None  # reopened by the next write, even if a rename below fails
        for number in range(self.backups - 1, 0, -1):
            if self.backup(number).exists():
                os.replace(self.backup(number), self.backup(number + 1))
        os.replace(self.path, self.backup(1))

    def close(self) -> None:
        with self._lock:
            try:
                if self._file is not None:
                    self._file.close()
            except OSError:
                pass


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


PopenFactory = Callable[..., "subprocess.Popen[bytes]"]


class Child:
    """A started child; its lines and its exit arrive as ChildEvents on `events`."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], events: ChildEvents,
                 sink: LogSink | None = None, popen: PopenFactory = subprocess.Popen) -> None:
        self.argv = list(argv)
        self.events = events
        self.sink = sink
        self.process = popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True,
                             preexec_fn=functools.partial(_die_with_parent, os.getpid()))
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, name=f"child-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Drain the child's output until it closes; its exit is always reported, whatever happens here."""
        assert self.process.stdout is not None
        try:
            for raw in self.process.stdout:
                text = raw.decode("utf-8", "replace").rstrip("\n")
                if self.sink is not None:
                    self.sink.write(text)
                self.events.put(ChildLine(text, time.time()))
        finally:
            self.events.put(ChildExit(self.process.wait(), time.time()))

    def running(self) -> bool:
        return self.process.poll() is None

    def reset_worker_connections(self) -> int:
        from llamalaunch.probe.rpc import reset_when_closed

        endpoints = rpc_endpoints(self.argv)
        return reset_when_closed(self.pid, endpoints) if endpoints else 0

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM to the group, wait, then SIGKILL; returns the exit code (negative: signal).

        Its connections to RPC workers are switched to close with a reset first: killed with a request
        pending (a load stuck behind a busy worker), a plain close would kill the worker (SIGPIPE).
        """
        if self.running():
            self.reset_worker_connections()
            self.signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
        returncode = self.process.wait()
        self._reader.join(timeout=2)
        return returncode


def rpc_endpoints(argv: Sequence[str]) -> list[str]:
    """The workers a llama-server argv names (`--rpc A,B`)."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--rpc"]
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[int], None]) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ask for a clean stop (the supervising loop does the work)."""
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    for signum in handled:
        signal.signal(signum, lambda number, _frame: request_stop(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
