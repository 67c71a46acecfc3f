"""Which server `status` looks at: a serve run's state file (by --name, by --url, or the only one), or a bare URL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llamalaunch.errors import BadInputError, NotRunningError
from llamalaunch.launch.state import (
    find_state,
    is_live,
    is_system_run,
    list_states,
    read_state,
    state_path,
)
from llamalaunch.paths import state_dir


class NoServerError(NotRunningError):
    """No run state to show, or no server running."""


@dataclass(frozen=True)
class StatusTarget:
    state_path: Path | None  # a serve run's state file
    url: str | None  # a llama-server by URL (with no state file: HTTP only)


def normalize_url(url: str) -> str:
    """`http://HOST:PORT` from that, a trailing slash or HOST:PORT alone (llama-server speaks HTTP)."""
    text = url.strip().rstrip("/")
    if not re.match(r"^[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):
        text = f"http://{text}"
    if not re.match(r"^https?://[^/\s]+$", text):
        raise BadInputError(f"--url {url!r} is not a server address",
                            "write it like http://127.0.0.1:8080 (scheme, host and port, no path)")
    return text


def resolve_target(name: str | None = None, url: str | None = None, takes_url: bool = True) -> StatusTarget:
    """Which run to show: --name, else the run whose URL is --url, else the only (or only live) run.
    `takes_url`: whether the command has --url (status does, stop does not), for the hints."""
    if name is not None:
        found = find_state(name)
        if found is None:
            path = state_path(name)
            raise NoServerError(f"no server named {name!r} has run here ({path} does not exist)",
                                f"start one with `llamalaunch serve --name {name}`" + (", or pass --url" * takes_url))
        return StatusTarget(found, normalize_url(url) if url else None)
    if url is not None:
        wanted = normalize_url(url)
        for path in list_states():
            try:
                if read_state(path).url.rstrip("/") == wanted:
                    return StatusTarget(path, wanted)
            except BadInputError:
                continue
        return StatusTarget(None, wanted)
    return StatusTarget(_only_run(takes_url), None)


def _only_run(takes_url: bool) -> Path:
    paths = list_states()
    if not paths:
        raise NoServerError(f"no server has run here (no run state in {state_dir()})",
                            "start one with `llamalaunch serve`" + (", or pass --url http://HOST:PORT" * takes_url))
    if len(paths) == 1:
        return paths[0]
    live = [p for p in paths if is_live(p)]
    if len(live) == 1:
        return live[0]
    if not live:
        raise NoServerError(f"no server is running here (past runs: {', '.join(map(run_label, paths))})",
                            "start one with `llamalaunch serve`, or see how one ended with --name NAME")
    raise BadInputError(f"several servers are running here: {', '.join(map(run_label, live))}",
                        "choose one with --name NAME")


def run_label(path: Path) -> str:
    """A run's name as lists show it: "default", or "default (system unit)" for one of the unit's."""
    return f"{path.stem} (system unit)" if is_system_run(path) else path.stem
