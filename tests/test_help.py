"""`--help` renders for every command and sub-command, found from the typer app itself (a new command is
covered without touching this file), `--version` prints the package's version, and the README gives each
command only options it has."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import llamalaunch
from llamalaunch.cli import app


def command_paths(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path below `command`, itself included: (), ("plan",), ("toolchain", "install"), ...
    (typer ships its own copy of click, so groups are known by their `commands`, not by class)"""
    found = [path]
    for name, sub in getattr(command, "commands", {}).items():
        found += command_paths(sub, (*path, name))
    return found


PATHS = command_paths(typer.main.get_command(app))


def test_the_walk_finds_nested_commands() -> None:
    assert {(), ("serve",), ("plan",), ("devices",), ("toolchain",), ("toolchain", "install")} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "llamalaunch")
def test_help_renders(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120"}, prog_name="llamalaunch")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output, result.output
    assert f"llamalaunch {' '.join(path)}".rstrip() in " ".join(result.output.split())


def test_assume_help_shows_the_optional_total() -> None:
    result = CliRunner().invoke(app, ["devices", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "NAME=FREE or NAME=FREE/TOTAL" in " ".join(result.output.split())


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert (result.exit_code, result.output) == (0, f"llamalaunch {version('llamalaunch')}\n")
    assert llamalaunch.__version__ == version("llamalaunch")


# Flags a README bullet names that belong to something else: llama-server's (after --), systemd-analyze's,
# the `--rpc` string `worker` prints for the main host, serve's `--no-tui` beside the status view.
FOREIGN = {"serve": {"--alias"}, "systemd": {"--offline"}, "worker": {"--rpc"}, "status": {"--no-tui"}}


def readme_bullets() -> dict[str, str]:
    """The README's command list: command name ("" for the root) -> its bullet's text."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    bullets: dict[str, str] = {}
    for bullet in re.split(r"\n- (?=`llamalaunch)", section)[1:]:
        first = bullet.split("`")[1].split()[1]
        name = "" if first.startswith("-") else first
        bullets[name] = bullets.get(name, "") + bullet
    return bullets


def options_of(command: Any) -> set[str]:
    """Every option of a command and of the commands below it."""
    found = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for sub in getattr(command, "commands", {}).values():
        found |= options_of(sub)
    return found


def test_every_option_the_readme_gives_a_command_is_one_of_its_own() -> None:
    root = typer.main.get_command(app)
    bullets = readme_bullets()
    assert {"", "plan", "serve", "devices", "status", "worker", "systemd", "toolchain"} <= bullets.keys()
    wrong = {}
    for name, bullet in bullets.items():
        known = options_of(root.commands[name]) if name else set()  # type: ignore[attr-defined]
        known |= {opt for param in root.params for opt in param.opts} | FOREIGN.get(name, set())
        codes = re.findall(r"`([^`]+)`", bullet)
        flags = {flag for code in codes for flag in re.findall(r"(?<!\S)--[a-z][\w-]*", code)}
        if flags - known:
            wrong[name] = sorted(flags - known)
    assert wrong == {}


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "llamalaunch")
def test_help_in_80_columns_cuts_nothing(path: tuple[str, ...]) -> None:
    """A terminal of 80 columns or a pipe: every option's value named (no typer <str>/<list[str]>), no name or
    text cut with "…", each command's whole first sentence in a group's list (click would end it "...")."""
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, prog_name="llamalaunch")
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "╭" not in result.output, result.output
    names = [re.split(r"\s{2,}", line.strip())[0] for line in result.output.splitlines()
             if line.lstrip().startswith("-")]
    assert names and not [name for name in names if "<" in name], names
    assert not [line for line in result.output.splitlines()
                if line.endswith("...") and not line.startswith("Usage:")], result.output


def test_options_show_the_tables_value_names() -> None:
    result = CliRunner().invoke(app, ["plan", "--help"], env={"COLUMNS": "80"}, prog_name="llamalaunch")
    text = " ".join(result.output.split())
    for shown in ("--budget NAME=SIZE", "-ngl, --gpu-layers N|all|auto", "--rpc HOST:PORT", "-c, --ctx-size, --ctx "
                  "TOKENS|max", "--host-weights auto|pinned|mapped|repacked", "--assume NAME=FREE[/TOTAL]"):
        assert shown in text, shown


def test_every_valued_option_has_a_value_name_that_says_more_than_text() -> None:
    from llamalaunch.options import OPTIONS

    assert [option.name for option in OPTIONS if option.flags and option.kind != "bool"
            and option.metavar == "TEXT"] == []


def test_serve_help_leaves_out_the_what_if_options_it_refuses() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}, prog_name="llamalaunch")
    assert "--assume" not in result.output and "--inventory" not in result.output
    refused = CliRunner().invoke(app, ["serve", "--demo", "--assume", "CUDA0=8GiB"])
    assert refused.exit_code == 2 and "--assume gives what-if devices, for plans only" in refused.output
