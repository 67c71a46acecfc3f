"""`llamalaunch stop`: end a serve run from another shell, as Ctrl-C ends it in its own."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from llamalaunch.errors import NotRunningError, ServeError
from llamalaunch.launch.state import ENDED_PHASES, RunState, launcher_alive, read_state


def stop_run(path: Path, timeout_s: float) -> RunState:
    """SIGTERM to the run's launcher (it stops llama-server and its workers' links, then exits), then wait for it
    to go; the run's state as it was. A launcher that is gone, or a pid now someone else's, is not signalled."""
    state = read_state(path)
    if not launcher_alive(state) or state.phase in ENDED_PHASES:
        raise NotRunningError(f"server {state.name!r} is not running (last phase: {state.phase})",
                              f"see how it ended with `llamalaunch status --name {state.name}`")
    try:
        os.kill(state.launcher_pid, signal.SIGTERM)
    except ProcessLookupError:
        return state
    deadline = time.monotonic() + timeout_s
    while timeout_s > 0 and launcher_alive(state) and not _exited(state.launcher_pid):
        if time.monotonic() > deadline:
            raise ServeError(f"server {state.name!r} (launcher pid {state.launcher_pid}) did not stop within "
                             f"{timeout_s:g} s", f"wait and run `llamalaunch stop --name {state.name}` again, or "
                             f"kill it with `kill -9 {state.launcher_pid}`")
        time.sleep(0.1)
    return state


def _exited(pid: int) -> bool:
    """An exited launcher its parent (the shell that started it) has not reaped yet: a zombie, gone for us."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
