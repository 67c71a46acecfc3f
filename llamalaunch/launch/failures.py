"""Why llama-server stopped before it was ready, from the lines it printed. Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# (pattern, message, hint): failures that retrying cannot mend.
_FATAL = (
    (re.compile(r"llamalaunch: the one-token completion failed: (.*)"),
     "llama-server loaded but could not answer a one-token completion ({0})",
     "see the server log; with --api-key-file, check the key file"),
    (re.compile(r"(?:invalid|unknown) argument:? ?(\S*)"),
     "llama-server rejected the argument {0}", "check the arguments after -- (llama-server --help lists them)"),
    (re.compile(r"couldn't bind HTTP server socket.*port: (\d+)"),
     "port {0} is already in use", "choose another with --port, or stop what listens there"),
    (re.compile(r"failed to load model|error loading model|exiting due to model loading error"),
     "llama-server could not load the model", "check the file with `llamalaunch plan MODEL`; re-download if corrupt"),
    (re.compile(r"Failed to connect to (\S+)"),
     "RPC worker {0} is unreachable", "start ggml-rpc-server there (`llamalaunch worker`) or drop it from --rpc"),
)

# ggml-rpc aborts llama-server when a worker vanishes in the middle of a command; the line names no worker.
_WORKER_LOST = re.compile(r"Remote RPC server crashed or returned malformed response")


@dataclass(frozen=True)
class Failure:
    message: str
    hint: str
    worker_lost: bool = False  # not fatal as such: probing the workers tells which one, and if it is back


def classify_failure(lines: Sequence[str], returncode: int) -> Failure:
    """The first fatal pattern in the child's output, a lost RPC worker, or its exit code and last line."""
    for line in lines:
        for pattern, message, hint in _FATAL:
            match = pattern.search(line)
            if match:
                return Failure(message.format(*match.groups()).replace("  ", " "), hint)
    if any(_WORKER_LOST.search(line) for line in lines):
        return Failure("an RPC worker stopped answering while llama-server loaded onto it",
                       "check the workers with `llamalaunch devices --rpc ...` and their logs", worker_lost=True)
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    return Failure(f"llama-server exited with code {returncode} before it was ready: {last[:200]}",
                   "see the server log for the full output")
