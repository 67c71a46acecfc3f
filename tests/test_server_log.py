"""The server log serve keeps (size-capped, a few rotated files) and what `status` reads from it."""

from __future__ import annotations

from pathlib import Path

from llamalaunch.launch.logparse import READINESS_MARK
from llamalaunch.launch.process import LOG_BACKUPS, LOG_MAX_BYTES, LogSink
from llamalaunch.observe.log_follower import LogFollower

RELEASE = "0.00.614.375 I slot      release: id  2 | task {} | stop processing: n_tokens = 20, truncated = 0"


def test_the_log_rotates_at_its_cap_and_keeps_a_few_files(tmp_path: Path) -> None:
    path = tmp_path / "state" / "t.log"
    sink = LogSink(path, max_bytes=1000, backups=3)
    for number in range(200):  # 200 lines of 100 bytes: 20 times the cap
        sink.write(f"{number:04d} " + "x" * 94)
    sink.close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.log", "t.log.1", "t.log.2", "t.log.3"]
    assert all(p.stat().st_size <= 1000 + 100 for p in path.parent.iterdir())
    assert path.read_text().splitlines()[-1].startswith("0199 ")  # the newest lines in the live file
    oldest_kept = int(sink.backup(3).read_text().split(" ", 1)[0])
    assert 150 < oldest_kept < 170  # what is older than the last three files is gone
    assert sink.write_error is None


def test_the_default_cap_bounds_the_log_at_tens_of_mebibytes() -> None:
    """-lv 5 wrote ~50 KB a short request: the log and its copies stay under 40 MiB whatever the uptime."""
    assert LOG_MAX_BYTES * (1 + LOG_BACKUPS) <= 40 * 1024 * 1024 and LOG_BACKUPS >= 2


def test_a_run_read_across_a_rotation_still_counts(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    sink = LogSink(path, max_bytes=300, backups=2)
    sink.write("0.00.000.001 I srv  llama_server: initializing")
    sink.write(RELEASE.format(1))
    sink.write(READINESS_MARK)
    for task in range(2, 6):
        sink.write(RELEASE.format(task))
    sink.close()
    assert sink.backup(1).exists()
    follower = LogFollower(path)
    follower.update()
    assert follower.requests_served >= 1  # the rotated file's start is read too


def test_the_readiness_completion_is_not_a_served_request(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    debug = "0.00.378.390 D srv  update_slots: run slots completed"  # at -lv 5, the line before the mark
    log.write_text(f"{RELEASE.format(1)}\n{debug}\n{READINESS_MARK}\n")
    follower = LogFollower(log)
    follower.update()
    assert follower.requests_served == 0
    with log.open("a") as handle:
        handle.write(RELEASE.format(2) + "\n")
    follower.update()
    assert follower.requests_served == 1


def test_the_mark_may_reach_the_log_before_the_readiness_line(tmp_path: Path) -> None:
    """serve writes the mark when the completion answers; llama-server's own line comes through a pipe."""
    log = tmp_path / "t.log"
    log.write_text(f"{READINESS_MARK}\n{RELEASE.format(1)}\n")
    follower = LogFollower(log)
    follower.update()
    assert follower.requests_served == 0
