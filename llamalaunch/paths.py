"""Every on-disk location, resolved in one place; LLAMALAUNCH_HOME moves them all (tests use it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def home_dir() -> Path | None:
    value = os.environ.get("LLAMALAUNCH_HOME")
    return Path(value) if value else None


def cache_dir() -> Path:
    """Builds and the demo model; LLAMALAUNCH_CACHE overrides so tests can share one build."""
    if value := os.environ.get("LLAMALAUNCH_CACHE"):
        return Path(value)
    if home := home_dir():
        return home / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamalaunch"


def config_dir() -> Path:
    if home := home_dir():
        return home / "config"
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "llamalaunch"


SYSTEM_HOME = Path("/var/lib/llamalaunch")  # a system unit's LLAMALAUNCH_HOME (`llamalaunch systemd server`)


def state_dirs() -> list[Path]:
    """Where `status` and `stop` look for runs: this user's state, then a system unit's (readable when the
    unit runs as this user, its default): a service started at boot is a run here too."""
    system = SYSTEM_HOME / "state"
    return [state_dir()] + ([system] if system != state_dir() else [])


def state_dir() -> Path:
    """Run state files and child logs (private to the user)."""
    if home := home_dir():
        return home / "state"
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "llamalaunch"
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "llamalaunch"


def read_json_dict(path: Path) -> dict[str, Any]:
    """A JSON object from a small record file; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: object) -> bool:
    """Write through a temporary file and a rename, so a reader never sees half a record; False on OSError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(data, indent=1))
        os.replace(temp, path)
    except OSError:
        return False
    return True
