"""The unit `llamalaunch systemd server|worker ARGS` writes: its arguments checked, paths made absolute,
binaries pinned, the profile's paths checked, then rendered (systemd.py).

The command line's own knowledge comes in as two callables, so this module needs no CLI: `check_options`
parses the unit's arguments with the real command (a typo fails now, not at boot), `path_options` says
which of a command's options take a value and which are paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalaunch.errors import BadInputError, ToolchainError
from llamalaunch.launch import systemd
from llamalaunch.options import DEFAULTS, OPTIONS_BY_NAME

# serve's and worker's options that name files: a unit gets them absolute, checked to exist.
UNIT_PATH_OPTIONS = frozenset({"model", "api_key_file", "inventory", "mmproj", "draft"})
UNIT_PROGRAM_OPTIONS = frozenset({"llama_server", "rpc_server"})  # a path, or a command name on PATH

# (command, its arguments, whether serve's model-or-demo rule applies) → the parsed parameters
CheckOptions = Callable[[str, list[str], bool], Mapping[str, Any]]


@dataclass(frozen=True)
class UnitRequest:
    kind: str  # "server" or "worker"
    args: tuple[str, ...]  # serve's or worker's arguments, with the `--` where the user wrote it
    user: bool = False
    run_as: str | None = None
    env: tuple[str, ...] = ()
    config: Path | None = None  # the profile the unit runs with


@dataclass(frozen=True)
class Unit:
    file: systemd.UnitFile
    instances: tuple[str, ...]  # worker template instances to enable: GPU indices, or "cpu"


def build_unit(request: UnitRequest, check_options: CheckOptions,
               path_options: Callable[[str], systemd.PathOptions], on_note: Callable[[str], None]) -> Unit:
    """The unit for `request`; notes (paths the sandbox hides, binaries not found) go to `on_note`.

    Raises:
        BadInputError: an unknown kind, options that contradict each other or the unit, a path that
            does not exist, or an option the command would refuse.
    """
    kind, args = request.kind, list(request.args)
    if kind not in ("server", "worker"):
        raise BadInputError(f"unit kind {kind!r} is not known", "use `llamalaunch systemd server` or `... worker`")
    if request.user and request.run_as:
        raise BadInputError("--run-as is for system units", "drop --run-as, or drop --user")
    profile_args, profile_keys, notes = _profile(request.config)
    command = "serve" if kind == "server" else "worker"
    if kind == "worker" and "--" in args:
        raise BadInputError("worker takes no arguments after --", "give worker options only")
    if kind == "worker" and any(arg == "--gpus" or arg.startswith("--gpus=") for arg in args):
        raise BadInputError("--gpus is the unit's instance name", "enable llamalaunch-worker@0 (GPU 0), "
                                                                  "@1, ... or @cpu instead")
    # A profile given here is not in the parse below: then its model or demo key decides at start.
    parsed = check_options(command, (["--gpus", "all"] if kind == "worker" else []) + args,
                           kind == "server" and not {"model", "demo"} & profile_keys)
    args, path_notes = systemd.absolute_paths(args, path_options(command), Path(os.getcwd()))
    launcher = systemd.launcher_argv()
    interpreter = systemd.private_tmp_note("the Python that runs llamalaunch", Path(launcher[0]))
    for note in [*notes, *path_notes, interpreter, systemd.unknown_user_note(request.run_as)]:
        if note:
            on_note(note)
    pinned = _pinned_binaries(kind, args, profile_keys, on_note)
    environment = systemd.unit_environment(kind, request.user, os.environ, pinned, request.env)
    for name, value in environment:  # LLAMALAUNCH_LLAMA_SERVER=/tmp/... from this shell, say
        if value.startswith("/") and (note := systemd.private_tmp_note(name, Path(value))):
            on_note(note)
    options = systemd.UnitOptions(
        launcher=launcher,
        args=(*profile_args, command, *(("--gpus", systemd.INSTANCE) if kind == "worker" else ()), *args),
        user_unit=request.user, run_as=None if request.user else (request.run_as or systemd.default_run_as()),
        environment=environment,
        read_write_paths=systemd.read_write_paths(kind, request.user), working_directory=os.getcwd(),
        description=f"llamalaunch: {'llama-server' if kind == 'server' else 'ggml-rpc-server worker'}",
        port_base=int(parsed.get("port_base") or DEFAULTS["worker.port_base"]))
    instances = _worker_instances() if kind == "worker" else ()
    return Unit(systemd.render(kind, options), instances)


def _profile(config: Path | None) -> tuple[list[str], set[str], list[str]]:
    """(--config argument, the profile's keys, notes on its paths) for a unit that runs with a profile."""
    if config is None:
        return [], set(), []
    from llamalaunch.config import load_profile

    profile = load_profile(config.expanduser().resolve())
    notes = list(filter(None, [systemd.private_tmp_note("--config", profile.path)]))
    notes += filter(None, [systemd.unit_path(str(setting.value), f"{profile.path}: {setting.key} =", Path("/"))[1]
                           for setting in profile.settings.values() if OPTIONS_BY_NAME[setting.key].kind == "path"])
    return ["--config", str(profile.path)], set(profile.settings), notes


def _pinned_binaries(kind: str, args: Sequence[str], profile_keys: set[str],
                     on_note: Callable[[str], None]) -> dict[str, str]:
    """Binaries found now, pinned with Environment=: the service's PATH is not the user's shell's."""
    given = {arg.split("=", 1)[0] for arg in args}
    try:
        if kind == "server":
            if "--llama-server" in given or "llama_server" in profile_keys:
                return {}
            from llamalaunch.toolchain.discover import SERVER_ENV, find_toolchain

            return {SERVER_ENV: str(find_toolchain(None).server.path)}
        if {"--rpc-server", "--llama-server"} & given or {"worker.rpc_server", "llama_server"} & profile_keys:
            return {}
        from llamalaunch.launch.worker import RPC_SERVER_ENV, find_rpc_server

        return {RPC_SERVER_ENV: str(find_rpc_server())}
    except ToolchainError as error:
        on_note(f"{error}; the unit will search its own PATH")
        return {}


def _worker_instances() -> tuple[str, ...]:
    from llamalaunch.probe.gpus import probe_local_gpus

    gpus = probe_local_gpus().devices
    return tuple(str(gpu.order) for gpu in gpus) or ("cpu",)
