"""TOML profiles: every option of plan, serve, devices and worker, storable in a file.

Precedence: command line > environment (`LLAMALAUNCH_<KEY>`, `LLAMALAUNCH_WORKER_<KEY>`) > profile >
the command's own defaults. The profile and the environment both feed click's `default_map`, which
the command line always overrides; the environment simply replaces profile entries first.

A profile is flat: `ctx = "16k"`, `rpc = ["10.0.0.5:50052"]`, `[reserve] CUDA1 = "1GiB"`; the options
of `llamalaunch worker` live in a `[worker]` table. Keys are the long option names with `_` (a `-`
is accepted too), from the one table of options (options.py: kinds, bounds, defaults); every value is
checked here, so a typo fails at once, naming the file and the key.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalaunch.errors import BadInputError, LaunchError
from llamalaunch.options import (
    ENV_PREFIX,
    OPTIONS,
    OPTIONS_BY_NAME,
    OTHER_ENV_VARS,
    WORKER_SECTION,
    Option,
    check_params,
    options_of,
)
from llamalaunch.paths import config_dir

CONFIG_ENV = "LLAMALAUNCH_CONFIG"
DEFAULT_PROFILE = "config.toml"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _check_choice(allowed: Sequence[str]) -> Callable[[Any], object]:
    def check(value: Any) -> None:  # in any case, as the command line takes it (plan/parse.py's parse_choice)
        if not isinstance(value, str) or value.strip().lower() not in {choice.lower() for choice in allowed}:
            raise BadInputError(f"{value!r} is not one of {', '.join(allowed)}")
    return check


def _check_device_names(value: Any) -> None:
    from llamalaunch.probe.assume import canonical_device_name

    names = value.split(",") if isinstance(value, str) else value
    for name in names:
        canonical_device_name(name, "device name")


def _check_gpus(value: Any) -> None:
    if value in ("all", "cpu"):
        return
    parts = [part.strip() for part in str(value).split(",")]
    if not parts or not all(part.isdigit() for part in parts) or len(set(parts)) != len(parts):
        raise BadInputError(f"{value!r} is not all, cpu or a list of GPU indices like 0,2")


@functools.cache
def checks() -> Mapping[str, Callable[[Any], object]]:
    """How a value is checked beyond its kind and bounds: each raises BadInputError for a bad value.
    Built when a profile or a LLAMALAUNCH_* option is first read: the parsers are not imported for nothing."""
    from llamalaunch.model.kv import CACHE_TYPES
    from llamalaunch.plan.overheads import parse_overheads
    from llamalaunch.plan.parse import parse_ctx, parse_gpu_layers, parse_margin, split_names
    from llamalaunch.plan.request import FLASH_ATTN, HOST_WEIGHTS
    from llamalaunch.plan.speed_args import parse_device_speeds, parse_fill, parse_links
    from llamalaunch.probe.assume import parse_assumptions, parse_device_sizes
    from llamalaunch.probe.inventory import split_endpoints
    from llamalaunch.units import parse_tokens

    return {
        "ctx": parse_ctx,
        "ctx_min": parse_tokens,
        "cache_type_k": _check_choice(CACHE_TYPES),
        "cache_type_v": _check_choice(CACHE_TYPES),
        "flash_attn": _check_choice(FLASH_ATTN),
        "rpc": split_endpoints,
        "assume": lambda values: parse_assumptions(values),
        "device": lambda value: _check_device_names(split_names(value) or ()),
        "exclude": _check_device_names,
        "reserve": lambda values: parse_device_sizes(values, "reserve"),
        "budget": lambda values: parse_device_sizes(values, "budget"),
        "margin": parse_margin,
        "gpu_layers": parse_gpu_layers,
        "prefer": _check_choice(("context", "speed")),
        "host_weights": _check_choice(HOST_WEIGHTS),
        "link": lambda values: parse_links(values),
        "device_speed": lambda values: parse_device_speeds(values),
        "fill": parse_fill,
        "overhead": parse_overheads,  # a backend (CUDA) or a device (CUDA1), as the command line takes them
        "worker.gpus": _check_gpus,
    }


def check_values(command: str, params: Mapping[str, Any]) -> None:
    """`command`'s parsed options as the command itself would check them when it runs: bounds, then each
    value's own check (a context, a size, a device name). For `systemd`, whose unit runs them at boot.

    Raises:
        BadInputError: the first bad value, in the command's own words ("context '0' is out of range").
    """
    check_params(command, params)
    for option in options_of(command):
        value = params.get(option.param)
        check = checks().get(option.name)
        if check is not None and value not in (None, option.default, [], ()):
            check(value)


# Spellings people will type for a key: llama-server's long option names.
ALIASES = {"ctx_size": "ctx", "batch_size": "batch", "ubatch_size": "ubatch", "n_gpu_layers": "gpu_layers",
           "devices": "device", "gpu_layers_count": "gpu_layers", "parallel_slots": "parallel"}


@dataclass(frozen=True)
class Setting:
    """One value the profile or the environment gives, already in the command line's form."""

    key: str  # "ctx", "worker.port_base"
    value: Any
    source: str  # "config" or "env"
    origin: str  # the profile's path or the variable's name


@dataclass(frozen=True)
class Profile:
    path: Path
    settings: Mapping[str, Setting]


@dataclass(frozen=True)
class Resolved:
    """What one option of one command ends up as, and where that came from (for `config show`)."""

    key: str
    value: Any
    source: str  # "default", "config" or "env"
    origin: str  # "" for a default


def profile_path(option: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """--config, else $LLAMALAUNCH_CONFIG, else <config dir>/config.toml when it exists."""
    env = os.environ if environ is None else environ
    if option is not None:
        return option
    if value := env.get(CONFIG_ENV):
        return Path(value)
    default = config_dir() / DEFAULT_PROFILE
    return default if default.is_file() else None


def load_profile(path: Path) -> Profile:
    """Read and check a profile.

    Raises:
        BadInputError: the file is missing or not TOML, or a key is unknown or has a bad value; the
            message names the file and the key, the hint what is allowed.
    """
    if sys.version_info >= (3, 11):  # here: no profile, no TOML parser imported
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"config file {path} does not exist",
                            f"check the path given with --config or {CONFIG_ENV}") from None
    except OSError as error:
        raise BadInputError(f"cannot read config file {path}: {error.strerror}",
                            f"give --config or {CONFIG_ENV} a TOML file (examples in configs/)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise BadInputError(f"{path} is not valid TOML: {error}", "see the examples in configs/") from None
    base = path.expanduser().resolve().parent
    settings: dict[str, Setting] = {}
    for name, raw in _flatten(data, str(path)):
        key = _known_key(name, str(path))
        _check_swallowed(key, raw, str(path))
        settings[key.name] = Setting(key.name, _convert(key, raw, str(path), base, from_env=False),
                                     "config", str(path))
    return Profile(path, settings)


def _flatten(data: Mapping[str, Any], where: str) -> list[tuple[str, Any]]:
    """("ctx", v), ("worker.port_base", v): only [worker] is a section; other tables are values."""
    items: list[tuple[str, Any]] = []
    for name, value in data.items():
        if name == WORKER_SECTION:
            if not isinstance(value, dict):
                raise BadInputError(f"{where}: {WORKER_SECTION} must be a table",
                                    "write the worker table's header line, then its keys")
            items.extend((f"{WORKER_SECTION}.{sub}", sub_value) for sub, sub_value in value.items())
        else:
            items.append((name, value))
    return items


def _check_swallowed(key: Option, raw: Any, where: str) -> None:
    """TOML's classic trap: every key after a [reserve] header belongs to the reserve table."""
    if not isinstance(raw, dict):
        return
    stray = [name for name in raw if name.replace("-", "_") in OPTIONS_BY_NAME or name == WORKER_SECTION]
    if stray:
        raise BadInputError(f"{where}: the {key.name} table holds {', '.join(stray)}: in TOML every key "
                            "below a table's header line belongs to that table",
                            f"move those keys above the {key.name} table's header, or write {key.name} = "
                            "{ NAME = \"SIZE\" } on one line")


COMMAND_TABLES = ("serve", "plan", "devices", "status")


def _known_key(name: str, where: str) -> Option:
    section, _dot, bare = name.rpartition(".")
    bare = bare.replace("-", "_")
    bare = ALIASES.get(bare, bare) if not section else bare
    full = f"{section}.{bare}" if section else bare
    if full in OPTIONS_BY_NAME:
        return OPTIONS_BY_NAME[full]
    if not section and bare in COMMAND_TABLES:  # [worker] exists, so users try [serve] too
        raise BadInputError(f"{where}: there is no [{bare}] table",
                            f"plan and serve read the keys at the top of the file, before any table; only "
                            f"{WORKER_SECTION} has a table of its own ([{WORKER_SECTION}])")
    choices = [key.param for key in OPTIONS if key.section == section]
    import difflib

    close = difflib.get_close_matches(bare, choices, n=1)
    where_keys = f" in the {section} table" if section else ""
    hint = f"did you mean {close[0]!r}?" if close else f"allowed keys{where_keys}: " + ", ".join(choices)
    raise BadInputError(f"{where}: unknown key {name!r}", hint)


def _bad(key: Option, raw: Any, where: str, why: str = "") -> BadInputError:
    return BadInputError(f"{where}: {key.name} = {raw!r} is not allowed{': ' + why if why else ''}",
                         f"{key.name} must be {key.description}")


def _convert(key: Option, raw: Any, where: str, base: Path | None, from_env: bool) -> Any:
    """The value in the form the command line gives it (str, int, bool, list[str]), checked."""
    try:
        value = _CONVERTERS[key.kind](raw, from_env, base)
    except (TypeError, ValueError):
        unquoted = None if from_env else _unquoted(key, raw)
        if unquoted is not None:
            raise BadInputError(f"{where}: {key.name} = {json.dumps(raw)} is a string: write it without quotes",
                                f"{key.param} = {unquoted}") from None
        raise _bad(key, raw, where) from None
    if key.bounds is not None and key.out_of_bounds(value):
        raise _bad(key, raw, where, "out of range")
    check = checks().get(key.name)
    if check is not None:
        try:
            check(value)
        except LaunchError as error:
            raise _bad(key, raw, where, error.message) from None
    return value


def _unquoted(key: Option, raw: Any) -> str | None:
    """How a TOML string that holds a good value for a number or a flag key is written bare ("8080" → 8080);
    None where it holds none (then the key's usual "is not allowed" message says what is)."""
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    if key.kind == "bool":
        return text.lower() if text.lower() in ("true", "false") else None
    if key.kind not in ("int", "float"):
        return None
    try:
        value: float = int(text) if key.kind == "int" else float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or key.out_of_bounds(value):
        return None
    return str(int(value)) if float(value).is_integer() else repr(value)


def _text(raw: Any, from_env: bool, base: Path | None) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise TypeError("a non-empty string")
    return raw.strip()


def _text_or_number(raw: Any, from_env: bool, base: Path | None) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    return _text(raw, from_env, base)


def _integer(raw: Any, from_env: bool, base: Path | None) -> int:
    if from_env:
        return int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TypeError("an integer")
    return raw


def _number(raw: Any, from_env: bool, base: Path | None) -> float:
    if from_env:
        return float(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise TypeError("a number")
    return float(raw)


def _boolean(raw: Any, from_env: bool, base: Path | None) -> bool:
    if from_env and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE
    if not isinstance(raw, bool):
        raise TypeError("true or false")
    return raw


def _switch(raw: Any, from_env: bool, base: Path | None) -> str:
    """flash_attn: "on"/"off"/"auto"; a TOML boolean reads as on/off."""
    if isinstance(raw, bool):
        return "on" if raw else "off"
    return _text(raw, from_env, base).lower()


def _string_list(raw: Any, from_env: bool, base: Path | None) -> list[str]:
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise TypeError("a list of strings")
    return [item.strip() for item in items if item.strip()]


def _device_names(raw: Any, from_env: bool, base: Path | None) -> str:
    return ",".join(_string_list(raw, from_env, base))


def _size_items(raw: Any, from_env: bool, base: Path | None) -> list[str]:
    """{CUDA1 = "1GiB"} (or ["CUDA1=1GiB"], or "CUDA1=1GiB,RPC0=2GiB") → ["CUDA1=1GiB", ...]."""
    if isinstance(raw, dict):
        if not all(isinstance(size, (str, int)) and not isinstance(size, bool) for size in raw.values()):
            raise TypeError("sizes")
        return [f"{name}={size}" for name, size in raw.items()]
    return _string_list(raw, from_env, base)


def _path(raw: Any, from_env: bool, base: Path | None) -> str:
    """A file path; a relative one in a profile is relative to the profile's folder."""
    path = Path(_text(raw, from_env, base)).expanduser()
    return str(base / path if base is not None and not path.is_absolute() else path)


def _program(raw: Any, from_env: bool, base: Path | None) -> str:
    """A path (resolved like _path) or a bare command name looked up on PATH later."""
    text = _text(raw, from_env, base)
    return _path(text, from_env, base) if "/" in text or text.startswith("~") else text


def _arguments(raw: Any, from_env: bool, base: Path | None) -> list[str]:
    if from_env:
        return shlex.split(raw)
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise TypeError("a list of strings")
    return list(raw)


def _gpus(raw: Any, from_env: bool, base: Path | None) -> str:
    if isinstance(raw, list):
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in raw):
            raise TypeError("GPU indices")
        return ",".join(str(item) for item in raw)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    return _text(raw, from_env, base).lower().replace(" ", "")


_CONVERTERS: dict[str, Callable[[Any, bool, Path | None], Any]] = {
    "str": _text, "tokens": _text_or_number, "size": _text_or_number, "layers": _text_or_number,
    "int": _integer, "float": _number,
    "bool": _boolean, "switch": _switch, "list": _string_list, "names": _device_names, "sizes": _size_items,
    "path": _path, "program": _program, "args": _arguments, "gpus": _gpus,
}


def environment_settings(environ: Mapping[str, str] | None = None) -> dict[str, Setting]:
    """LLAMALAUNCH_<KEY> variables that name a key (others, like LLAMALAUNCH_HOME, are not options).

    Raises:
        BadInputError: a value is bad, or a LLAMALAUNCH_ variable's name is a near miss of one we read
            (LLAMALAUNCH_CTXX would otherwise be ignored without a word)."""
    env = os.environ if environ is None else environ
    _check_env_names(env)
    settings: dict[str, Setting] = {}
    for key in OPTIONS:
        given = [name for name in env_names(key) if (env.get(name) or "").strip()]
        if len(given) > 1:
            raise BadInputError(f"environment variables {' and '.join(given)} both set {key.name}",
                                "unset one of them")
        if given:
            where = f"environment variable {given[0]}"
            settings[key.name] = Setting(key.name, _convert(key, env[given[0]], where, None, from_env=True), "env",
                                         given[0])
    return settings


def env_names(key: Option) -> list[str]:
    """LLAMALAUNCH_CTX, and the profile's aliases in the same form (LLAMALAUNCH_CTX_SIZE)."""
    aliases = [alias for alias, name in ALIASES.items() if name == key.name and not key.section]
    return [key.env_var, *(ENV_PREFIX + alias.upper() for alias in aliases)]


def _check_env_names(env: Mapping[str, str]) -> None:
    known = {name for key in OPTIONS for name in env_names(key)} | OTHER_ENV_VARS
    unknown = sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)
    if not unknown:
        return
    import difflib

    suffixes = sorted(known_name[len(ENV_PREFIX):] for known_name in known)
    for name in unknown:
        # only near misses of what follows the prefix (CTXX, PARALEL, HOMR); other programs' (and our
        # tests') own LLAMALAUNCH_ variables stay allowed (DEBUG, MODEL_DIR, DATA)
        close = difflib.get_close_matches(name[len(ENV_PREFIX):], suffixes, n=1, cutoff=0.75)
        if close:
            raise BadInputError(f"environment variable {name} is not a llamalaunch setting",
                                f"did you mean {ENV_PREFIX}{close[0]}? Rename it, or unset {name}")


def merged_settings(profile: Profile | None, environ: Mapping[str, str] | None = None) -> dict[str, Setting]:
    """The profile's settings with the environment's on top."""
    return {**(profile.settings if profile is not None else {}), **environment_settings(environ)}


def load_settings(option: Path | None, environ: Mapping[str, str] | None = None
                  ) -> tuple[Profile | None, dict[str, Setting]]:
    """The profile that applies (see profile_path) and the merged settings; what the CLI calls."""
    path = profile_path(option, environ)
    profile = load_profile(path) if path is not None else None
    return profile, merged_settings(profile, environ)


def default_map(settings: Mapping[str, Setting]) -> dict[str, dict[str, Any]]:
    """click's default_map: {"plan": {"ctx": "16k", ...}, "serve": {...}, "worker": {...}}."""
    commands: dict[str, dict[str, Any]] = {}
    for name, setting in settings.items():
        key = OPTIONS_BY_NAME[name]
        for command in key.commands:
            commands.setdefault(command, {})[key.param] = setting.value
    return commands


def resolve(command: str, settings: Mapping[str, Setting]) -> list[Resolved]:
    """Every storable option of `command`: its value and whether default, profile or environment gave it."""
    rows: list[Resolved] = []
    for key in options_of(command):
        setting = settings.get(key.name)
        if setting is not None:
            rows.append(Resolved(key.name, setting.value, setting.source, setting.origin))
        else:
            rows.append(Resolved(key.name, _shown_default(key.default), "default", ""))
    return rows


def _shown_default(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # click gives a repeatable option's as a list
