"""One table of options (options.py): the command line, a profile and the environment accept the same bounds
and give the same defaults, and serve's and worker's own dataclasses default to the table's values.

Every bounded key is tried just outside its bounds in all three places, through the real CLI, with the exact
error line; and at its bounds, where all three accept it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from llamalaunch.cli import app
from llamalaunch.config import environment_settings, load_profile
from llamalaunch.launch.serve import ServeRequest
from llamalaunch.launch.supervisor import ServeOptions
from llamalaunch.launch.worker import WorkerRequest
from llamalaunch.options import OPTIONS, Option, check_params, show_number

BOUNDED = [option for option in OPTIONS if option.bounds is not None]
CLI_OPTIONS = [(option, command) for option in OPTIONS if option.flags for command in option.commands]
# ServeRequest/ServeOptions/WorkerRequest fields whose names are not the option's
FIELD_NAMES = {"backoff": "backoff_initial_s", "load_timeout": "load_timeout_s",
               "health_interval": "health_interval_s"}


def _id(option: Option) -> str:
    return option.name


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, args, env=env, catch_exceptions=False)


def command_of(option: Option) -> str:
    return option.commands[-1] if option.commands[-1] != "toolchain" else option.commands[0]


def outside(option: Option) -> list[float]:
    """A value just below and one just above the bounds, of the option's type."""
    assert option.bounds is not None
    low, high = option.bounds
    step = 0.05 if option.kind == "float" and low > 0 and low < 1 else 1
    values = [low - step, high + 1]
    return [float(value) if option.kind == "float" else int(value) for value in values]


def in_toml(option: Option, value: float) -> str:
    line = f"{option.param} = {value!r}\n"
    return f"[{option.section}]\n{line}" if option.section else line


# --- defaults ------------------------------------------------------------------------------------------


def click_params(command: str) -> dict[str, Any]:
    target = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {param.name: param for param in target.params}


def as_shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize(("option", "command"), CLI_OPTIONS, ids=lambda x: x if isinstance(x, str) else x.name)
def test_the_command_line_declares_each_option_from_the_table(option: Option, command: str) -> None:
    param = click_params(command)[option.param]
    assert param.default == as_shown(option.default)
    assert param.help == option.help
    spellings = [*param.opts, *param.secondary_opts]
    assert sorted(spellings) == sorted(s for flag in option.flags for s in flag.split("/")), spellings


@pytest.mark.parametrize("command", ["plan", "serve", "devices", "toolchain", "worker"])
def test_profile_and_environment_defaults_are_the_command_lines(command: str) -> None:
    """`config show` with no profile and no variables: every key at the table's default, which is the
    default the command line itself has."""
    result = invoke(["config", "show", "--for", command, "--json"], env={"LLAMALAUNCH_CALIBRATE": ""})  # conftest's
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["options"]
    params = click_params(command)
    for row in rows:
        assert row["source"] == "default"
        param = row["key"].rpartition(".")[2]
        expected = params[param].default if param in params else []  # extra_args: the words after --
        assert row["value"] == expected, row


@pytest.mark.parametrize("cls", [ServeRequest, ServeOptions, WorkerRequest], ids=lambda cls: cls.__name__)
def test_serve_and_worker_dataclasses_default_to_the_table(cls: type) -> None:
    section = "worker" if cls is WorkerRequest else ""
    command = "worker" if cls is WorkerRequest else "serve"
    checked = 0
    for field in dataclasses.fields(cls):
        option = next((o for o in OPTIONS if command in o.commands and FIELD_NAMES.get(o.param, o.param) == field.name
                       and o.section in (section, "")), None)
        if option is None or field.default is dataclasses.MISSING or field.name == "model":  # ServeOptions': a label
            continue
        assert field.default == option.default, field.name
        checked += 1
    assert checked >= 6


# --- bounds --------------------------------------------------------------------------------------------


def test_the_error_lines_read_as_written() -> None:
    """Two keys written out, so the generated expectations below cannot drift unnoticed."""
    port = invoke(["serve", "--port", "70000"])
    assert (port.exit_code, port.output) == (2, ("error: --port 70000 is out of range (give a value from 0 to "
                                                 "65535)\n"))
    timeout = invoke(["serve", "--load-timeout", "0.05"])
    assert timeout.output == "error: --load-timeout 0.05 is out of range (give seconds from 0.1 to 604800)\n"
    env = invoke(["serve"], env={"LLAMALAUNCH_PORT": "70000"})
    assert (env.exit_code, env.output) == (2, ("error: environment variable LLAMALAUNCH_PORT: port = '70000' is "
                                               "not allowed: out of range (port must be a port from 0 to 65535)\n"))


def test_a_profile_error_line_reads_as_written(tmp_path: Path) -> None:
    (profile := tmp_path / "p.toml").write_text("load_timeout = 0.05\n", encoding="utf-8")
    result = invoke(["--config", str(profile), "serve"])
    assert (result.exit_code, result.output) == (2, (f"error: {profile}: load_timeout = 0.05 is not allowed: out of "
                                                     "range (load_timeout must be seconds from 0.1 to 604800)\n"))


@pytest.mark.parametrize("option", BOUNDED, ids=_id)
def test_the_command_line_refuses_out_of_bounds(option: Option) -> None:
    assert option.bounds is not None
    low, high = (show_number(bound) for bound in option.bounds)
    unit = "seconds" if option.kind == "float" else "a value"
    for value in outside(option):
        result = invoke([command_of(option), option.flags[-1].split("/")[0], str(value)])
        assert (result.exit_code, result.output) == (
            2, f"error: {option.label} {show_number(value)} is out of range (give {unit} from {low} to {high})\n")


@pytest.mark.parametrize("option", BOUNDED, ids=_id)
def test_a_profile_refuses_out_of_bounds(option: Option, tmp_path: Path) -> None:
    profile = tmp_path / "profile.toml"
    for value in outside(option):
        profile.write_text(in_toml(option, value), encoding="utf-8")
        result = invoke(["--config", str(profile), command_of(option)])
        assert (result.exit_code, result.output) == (
            2, (f"error: {profile}: {option.name} = {value!r} is not allowed: out of range ({option.name} must be "
                f"{option.description})\n"))


@pytest.mark.parametrize("option", BOUNDED, ids=_id)
def test_the_environment_refuses_out_of_bounds(option: Option) -> None:
    for value in outside(option):
        result = invoke([command_of(option)], env={option.env_var: str(value)})
        assert (result.exit_code, result.output) == (
            2, (f"error: environment variable {option.env_var}: {option.name} = '{value}' is not allowed: out of "
                f"range ({option.name} must be {option.description})\n"))


@pytest.mark.parametrize("option", BOUNDED, ids=_id)
def test_all_three_accept_the_bounds(option: Option, tmp_path: Path) -> None:
    assert option.bounds is not None
    profile = tmp_path / "profile.toml"
    for bound in option.bounds:
        value = float(bound) if option.kind == "float" else int(bound)
        check_params(command_of(option), {option.param: value})  # what the command runs first
        profile.write_text(in_toml(option, value), encoding="utf-8")
        assert load_profile(profile).settings[option.name].value == value
        assert environment_settings({option.env_var: str(value)})[option.name].value == value


def test_zero_is_any_free_port_everywhere(tmp_path: Path) -> None:
    (profile := tmp_path / "p.toml").write_text("port = 0\n", encoding="utf-8")
    assert load_profile(profile).settings["port"].value == 0
    assert environment_settings({"LLAMALAUNCH_PORT": "0"})["port"].value == 0
    check_params("serve", {"port": 0})
