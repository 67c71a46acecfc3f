"""systemd units for `serve` and for RPC workers: rendered by pure functions, written by `install`.

Both units are Type=notify (serve and worker send READY=1 over $NOTIFY_SOCKET once they really serve),
restart on failure, log to the journal and run sandboxed without losing the GPUs (no PrivateDevices;
DeviceAllow for the NVIDIA/AMD device classes). A system unit keeps its run state in
/var/lib/llamalaunch (StateDirectory); a user unit shares the user's state and cache folders.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from llamalaunch.errors import BadInputError, LaunchError
from llamalaunch.paths import SYSTEM_HOME, cache_dir, home_dir, state_dir

SERVER_UNIT = "llamalaunch-server.service"
WORKER_UNIT = "llamalaunch-worker@.service"
UNIT_DIR_ENV = "LLAMALAUNCH_SYSTEMD_DIR"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_STATE_DIR = str(SYSTEM_HOME)
INSTANCE = "%i"  # the worker template's instance: a GPU index or "cpu"
# A user manager cannot attach device filters or drop capabilities it does not hold.
_SYSTEM_ONLY = ("DevicePolicy=", "DeviceAllow=", "CapabilityBoundingSet=", "AmbientCapabilities=")
_BARE_WORD = re.compile(r"^[A-Za-z0-9_@%$+=:,./-]+$")


@dataclass(frozen=True)
class UnitFile:
    name: str
    content: str


@dataclass(frozen=True)
class UnitOptions:
    """Everything a unit depends on; `render_*` turn it into text and touch nothing."""

    launcher: tuple[str, ...]  # how to run llamalaunch, e.g. (sys.executable, "-m", "llamalaunch")
    args: tuple[str, ...]  # after the launcher: ("--config", F, "serve", "--ctx", "16k")
    user_unit: bool = False
    run_as: str | None = None  # User= of a system unit; None: root
    environment: tuple[tuple[str, str], ...] = ()
    read_write_paths: tuple[str, ...] = ()
    working_directory: str = "/"
    description: str = "llamalaunch"
    port_base: int = 50052


def quote_word(word: str) -> str:
    """One ExecStart word: `%` and `$` escaped (specifiers, variables), quoted when it needs it."""
    if word == INSTANCE:
        return word
    escaped = word.replace("%", "%%").replace("$", "$$")
    if _BARE_WORD.match(escaped) and escaped != ";":
        return escaped
    inner = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{inner}"'


def exec_line(argv: Sequence[str]) -> str:
    return " ".join(quote_word(word) for word in argv)


def environment_line(name: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise BadInputError(f"environment variable name {name!r} is not valid", "use letters, digits and _")
    text = f"{name}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'Environment="{text}"'


def _read_write_line(path: str) -> str:
    if any(char.isspace() for char in path):
        raise BadInputError(f"{path!r} has white space, which ReadWritePaths= cannot take",
                            "move the cache or state folder (LLAMALAUNCH_HOME, LLAMALAUNCH_CACHE)")
    return f"ReadWritePaths=-{path.replace('%', '%%')}"  # "-": a folder not made yet is no error


def _render(template_name: str, unit_name: str, options: UnitOptions, exec_argv: Sequence[str]) -> UnitFile:
    service_extra = [environment_line(name, value) for name, value in options.environment]
    if not options.user_unit:
        service_extra += [f"User={options.run_as}"] if options.run_as else []
        service_extra.append("StateDirectory=llamalaunch")
    text = Template(resources.files("llamalaunch.launch").joinpath("templates", template_name)
                    .read_text(encoding="utf-8")).substitute(
        description=options.description.replace("%", "%%"),
        unit_extra="" if options.user_unit else "After=network-online.target\nWants=network-online.target\n",
        exec_start=exec_line(exec_argv),
        working_directory=options.working_directory.replace("%", "%%"),
        service_extra="\n".join(service_extra),
        read_write_paths="\n".join(_read_write_line(path) for path in options.read_write_paths),
        wanted_by="default.target" if options.user_unit else "multi-user.target",
        port_base=options.port_base,
    )
    lines = text.splitlines()
    if options.user_unit:
        lines = [line for line in lines if not line.startswith(_SYSTEM_ONLY)]
    return UnitFile(unit_name, "\n".join(_squeeze_blank(lines)) + "\n")


def _squeeze_blank(lines: Sequence[str]) -> list[str]:
    """One blank line at most in a row (an empty placeholder leaves one)."""
    kept: list[str] = []
    for line in lines:
        if line.strip() or (kept and kept[-1].strip()):
            kept.append(line)
    return kept


def render_server(options: UnitOptions) -> UnitFile:
    """The unit running `llamalaunch [--config F] serve ...`."""
    return _render(SERVER_UNIT, SERVER_UNIT, options, (*options.launcher, *options.args))


def render_worker(options: UnitOptions) -> UnitFile:
    """The template unit llamalaunch-worker@.service; `options.args` holds `%i` where the GPU goes."""
    if INSTANCE not in options.args:
        raise ValueError("worker unit arguments must contain %i (the GPU index or cpu)")
    return _render(WORKER_UNIT, WORKER_UNIT, options, (*options.launcher, *options.args))


def render(kind: str, options: UnitOptions) -> UnitFile:
    if kind == "server":
        return render_server(options)
    if kind == "worker":
        return render_worker(options)
    raise BadInputError(f"unit kind {kind!r} is not known",
                        "use `llamalaunch systemd server` or `... worker`")


# --- paths on the unit's command line -------------------------------------------------------------

PRIVATE_TMP = ("/tmp", "/var/tmp")  # PrivateTmp=yes: the unit sees empty ones of its own


@dataclass(frozen=True)
class PathOptions:
    """Which words of a command's arguments are file paths, read from its option table."""

    takes_value: Mapping[str, str]  # every option spelling that takes a value → its parameter's name
    paths: frozenset[str]  # parameters whose value is a path
    programs: frozenset[str] = frozenset()  # a path, or a bare command name looked up on PATH
    positional: str | None = None  # the parameter of a positional argument that is a path


def absolute_paths(args: Sequence[str], options: PathOptions, cwd: Path) -> tuple[list[str], list[str]]:
    """`args` with every path made absolute, and notes on paths the sandbox hides.

    A unit starts at boot, from its own folder, in its own /tmp: a relative or missing path given now
    would fail there, so it is resolved and checked here. Words after `--` are llama-server's, untouched.

    Raises:
        BadInputError: a path does not exist.
    """
    result: list[str] = []
    notes: list[str] = []
    words = list(args)
    index = 0
    while index < len(words):
        word = words[index]
        spelling, equals, inline = word.partition("=")
        if word == "--":
            result += words[index:]
            break
        if word.startswith("-") and equals and spelling in options.takes_value:
            value = _unit_path(inline, spelling, options.takes_value[spelling], options, cwd, notes)
            result.append(f"{spelling}={value}")
        elif word in options.takes_value and index + 1 < len(words):
            value = _unit_path(words[index + 1], word, options.takes_value[word], options, cwd, notes)
            result += [word, value]
            index += 1
        elif not word.startswith("-") and options.positional is not None:
            result.append(_unit_path(word, options.positional.upper(), options.positional, options, cwd, notes))
        else:
            result.append(word)
        index += 1
    return result, notes


def _unit_path(value: str, option: str, param: str, options: PathOptions, cwd: Path, notes: list[str]) -> str:
    if param not in options.paths and param not in options.programs:
        return value
    if param in options.programs and "/" not in value and not value.startswith("~"):
        return value  # a command name, found on the unit's PATH (or pinned with Environment=)
    path, note = unit_path(value, option, cwd)
    notes += [note] if note else []
    return str(path)


def unit_path(value: str, what: str, cwd: Path) -> tuple[Path, str | None]:
    """`value` as an absolute path that exists, and a note when the unit's private /tmp hides it.

    Raises:
        BadInputError: it does not exist.
    """
    path = Path(os.path.normpath(cwd / Path(value).expanduser()))
    if not path.exists():
        shown = str(path) if value == str(path) else f"{value} ({path})"
        raise BadInputError(f"{what} {shown} does not exist",
                            "give the unit a path that exists; a relative one is taken from this folder")
    return path, private_tmp_note(what, path)


def private_tmp_note(option: str, path: Path) -> str | None:
    hidden = next((folder for folder in PRIVATE_TMP if path.is_relative_to(folder)), None)
    if hidden is None:
        return None
    return f"{option} {path} is under {hidden}, which the unit cannot see (PrivateTmp=yes): move it elsewhere"


# --- gathering the inputs from this machine --------------------------------------------------------


def launcher_argv() -> tuple[str, ...]:
    """This very interpreter running the package: works for venvs and needs no PATH under systemd."""
    return (sys.executable, "-m", "llamalaunch")


def default_run_as() -> str | None:
    """A system unit runs as the user who writes it (their cache holds the build); root runs as root."""
    if os.geteuid() == 0:
        return None
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def unknown_user_note(name: str | None) -> str | None:
    """A User= this machine does not know: systemd refuses to start the unit (status 217/USER)."""
    import pwd

    if not name:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        return (f"--run-as {name}: no such user on this machine; the unit will not start until it exists "
                f"(create it: useradd --system --create-home {name})")
    return None


def unit_environment(kind: str, user_unit: bool, environ: Mapping[str, str], pinned: Mapping[str, str],
                     extra: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Environment= lines: the LLAMALAUNCH_* options in force now, pinned binaries, then --env.

    Option variables (LLAMALAUNCH_CTX, ...) are options too (command line > env > config), so the
    unit gets the ones set here. A system unit keeps its state in /var/lib/llamalaunch.
    """
    from llamalaunch.config import CONFIG_ENV, env_names
    from llamalaunch.options import OPTIONS

    names = [name for key in OPTIONS for name in env_names(key)] + [CONFIG_ENV]  # aliases too (LLAMALAUNCH_CTX_SIZE)
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1", "LLAMALAUNCH_CACHE": str(cache_dir())}
    if not user_unit:
        env["LLAMALAUNCH_HOME"] = SYSTEM_STATE_DIR
    elif home := home_dir():
        env["LLAMALAUNCH_HOME"] = str(home)
    env.update({name: environ[name] for name in names if environ.get(name)})
    env.update(pinned)
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep:
            raise BadInputError(f"--env {item!r} is not NAME=VALUE",
                                "write it like --env CUDA_VISIBLE_DEVICES=0,1")
        env[name] = value
    return tuple(env.items())


def read_write_paths(kind: str, user_unit: bool) -> tuple[str, ...]:
    """What the sandbox must leave writable: the cache (demo model, builds) and, for a user unit, state."""
    if kind == "worker":
        return ()
    paths = [str(cache_dir())]
    if user_unit:
        paths.append(str(state_dir()))
    return tuple(paths)


def unit_dir(user_unit: bool, environ: Mapping[str, str] | None = None) -> Path:
    """$LLAMALAUNCH_SYSTEMD_DIR, else $LLAMALAUNCH_HOME/systemd/... (tests), else systemd's own folder."""
    env = os.environ if environ is None else environ
    if value := env.get(UNIT_DIR_ENV):
        return Path(value)
    if home := env.get("LLAMALAUNCH_HOME"):
        return Path(home) / "systemd" / ("user" if user_unit else "system")
    return standard_unit_dir(user_unit, env)


def standard_unit_dir(user_unit: bool, environ: Mapping[str, str] | None = None) -> Path:
    """Where systemd looks for units written by an administrator (or by the user, for --user)."""
    env = os.environ if environ is None else environ
    if user_unit:
        return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
    return SYSTEM_UNIT_DIR


def install(units: Sequence[UnitFile], folder: Path) -> list[Path]:
    """Write the units (mode 0644); returns their paths.

    Raises:
        LaunchError: the folder cannot be written (e.g. /etc/systemd/system without root).
    """
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for unit in units:
            path = folder / unit.name
            path.write_text(unit.content, encoding="utf-8")
            path.chmod(0o644)
            written.append(path)
    except PermissionError:
        raise LaunchError(f"cannot write units to {folder}: permission denied",
                          "run it with sudo for a system unit, or add --user for a user unit") from None
    except OSError as error:
        raise LaunchError(f"cannot write units to {folder}: {error.strerror}",
                          "give --unit-dir a folder you can write to, or leave it out for systemd's") from None
    return written


def next_steps(unit: UnitFile, user_unit: bool, folder: Path, instances: Sequence[str] = ()) -> list[str]:
    """The systemctl commands to run after installing `unit`."""
    systemctl = "systemctl --user" if user_unit else "systemctl"
    journal = "journalctl --user" if user_unit else "journalctl"
    standard = folder == standard_unit_dir(user_unit)  # elsewhere, systemd must be told where it is
    names = [unit.name.replace("@.", f"@{instance}.") for instance in instances] if "@." in unit.name \
        else [unit.name]
    steps = [f"{systemctl} daemon-reload" if standard else f"{systemctl} link {folder / unit.name}"]
    steps.append(f"{systemctl} enable --now {' '.join(names)}")
    steps.append(f"{journal} -u {names[0].removesuffix('.service')} -f")
    if user_unit:
        steps.append(f"loginctl enable-linger {getpass.getuser()}   # start at boot, without a login")
    return steps
