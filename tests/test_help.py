"""`--help` renders for every command and sub-command, found from the typer app itself (a new command is
covered without touching this file), and `--version` prints the package's version."""

from __future__ import annotations

from importlib.metadata import version

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
