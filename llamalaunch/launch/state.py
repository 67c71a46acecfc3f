"""The run state file `serve` keeps for `status`: pid, port, plan, log path, phase (mode 0600)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamalaunch.errors import BadInputError
from llamalaunch.paths import state_dir, state_dirs


@dataclass(frozen=True)
class RunState:
    name: str
    launcher_pid: int
    launcher_started_at: float  # psutil create_time: tells a reused pid from ours
    url: str
    model_path: str
    log_path: str
    phase: str
    phase_detail: str = ""
    child_pid: int | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    restarts: int = 0
    restarts_total: int = 0  # every restart of this run, the streak's reset notwithstanding
    last_exit_code: int | None = None  # llama-server's last exit status (negative: killed by a signal)
    last_restart_reason: str = ""  # why it was last restarted: a -9 above may be llamalaunch's own kill
    plan: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    updated_at: float = 0.0


ENDED_PHASES = ("stopped", "failed")  # a run in these phases has no server, whatever its launcher does
MAX_NAME_BYTES = 128  # the state file, the log and its rotated copies must stay under NAME_MAX (255)


def state_path(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise BadInputError(f"run name {name!r} is not usable as a file name", "use letters, digits, - and _")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise BadInputError(f"run name {name[:16]!r}... is {len(name)} characters long",
                            f"use at most {MAX_NAME_BYTES} letters, digits, - and _")
    return state_dir() / f"{name}.json"


def write_state(state: RunState) -> Path:
    """Atomic write (temp file + rename) so `status` never reads half a file."""
    path = state_path(state.name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{state.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(state), handle)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def read_state(path: Path) -> RunState:
    try:
        data = json.loads(path.read_text())
        return RunState(**data)
    except (OSError, ValueError, TypeError) as error:
        raise BadInputError(f"run state {path} is unreadable: {error}", "remove it; `serve` writes a new one") \
            from None


def list_states() -> list[Path]:
    """Every run's state file: this user's, then a system unit's (paths.state_dirs)."""
    found: list[Path] = []
    for folder in state_dirs():
        try:
            found += sorted(folder.glob("*.json"))
        except OSError:  # another user's unit: not ours to read
            continue
    return found


def find_state(name: str) -> Path | None:
    """The state file of run `name`: the live one of this user's and a system unit's (both default to the name
    "default"), else this user's, else the unit's; None when neither exists."""
    mine = state_path(name)
    found = [path for path in (mine, *(d / mine.name for d in state_dirs()[1:])) if _exists(path)]
    return next((path for path in found if is_live(path)), found[0] if found else None)


def is_live(path: Path) -> bool:
    """Whether the run of this state file is going on: its launcher alive, its phase not an ended one."""
    try:
        state = read_state(path)
    except BadInputError:
        return False
    return launcher_alive(state) and state.phase not in ENDED_PHASES


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def is_system_run(path: Path) -> bool:
    """Whether a run is a system unit's (`systemctl` starts and stops it), not this user's."""
    return path.parent != state_dir()


def launcher_alive(state: RunState) -> bool:
    """True only if the pid is alive AND is the same process (a reused pid is not ours)."""
    started_at = process_started_at(state.launcher_pid)
    return started_at is not None and abs(started_at - state.launcher_started_at) < 1.0


def process_started_at(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch; psutil's create_time), None if there is none.

    On Linux from /proc, as psutil computes it (boot time + start ticks): importing psutil costs every
    `serve` 20 ms before llama-server starts. Elsewhere through psutil."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None  # Linux: no such process
        return _psutil_started_at(pid)
    except (OSError, IndexError, StopIteration):
        return _psutil_started_at(pid)
    return float(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime


def _psutil_started_at(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
