"""Errors the library raises; the CLI prints each as one line with its hint and exits non-zero."""

from __future__ import annotations


class LaunchError(Exception):
    """Base of every error meant for the user: a message naming the problem and a hint naming the fix."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class NotRunningError(LaunchError):
    """The server asked about is not running (or never ran): exit 3, as an LSB `status` action."""

    exit_code = 3


class BadInputError(LaunchError):
    """Something the user gave us (a file, a value, an option) is wrong."""

    exit_code = 2


class ModelError(BadInputError):
    """The model file cannot be read or is not one we can plan for."""


class ToolchainError(LaunchError):
    """A llama.cpp binary is missing, broken or cannot be built."""


class ProbeError(LaunchError):
    """A device could not be probed (an RPC worker that is down, busy or speaks another version)."""


class PlanError(LaunchError):
    """The request does not fit on the devices; the message says what would fit."""


class ServeError(LaunchError):
    """llama-server failed in a way that retrying will not mend."""
