"""The child runner: its lines and its exit always arrive, whatever happens to the log file."""

from __future__ import annotations

import queue
import sys
import time
from pathlib import Path

from llamalaunch.launch.process import Child, ChildEvent, ChildExit, ChildLine, LogSink


def drain(events: queue.Queue[ChildEvent], timeout_s: float = 30.0) -> tuple[int, int | None]:
    lines, deadline = 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = events.get(timeout=timeout_s)
        if isinstance(event, ChildLine):
            lines += 1
        elif isinstance(event, ChildExit):
            return lines, event.returncode
    return lines, None


def test_a_log_deleted_while_rotating_does_not_lose_the_child(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    sink = LogSink(log, max_bytes=4096)
    events: queue.Queue[ChildEvent] = queue.Queue()
    script = "import sys, time\nfor i in range(3000):\n    print('line', i, flush=True)\n    " \
             "time.sleep(0.0005 if i < 200 else 0)\n"
    child = Child([sys.executable, "-c", script], {}, events, sink)
    time.sleep(0.05)
    log.unlink(missing_ok=True)
    lines, returncode = drain(events)
    assert (lines, returncode) == (3000, 0)
    assert child.stop() == 0
    assert log.exists()  # reopened after the rename failed


def test_the_log_file_is_created_only_by_the_first_line(tmp_path: Path) -> None:
    sink = LogSink(tmp_path / "state" / "server.log")
    assert not (tmp_path / "state").exists()
    sink.write("hello")
    assert (tmp_path / "state" / "server.log").read_text() == "hello\n"
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
