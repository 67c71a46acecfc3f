"""Why llama-server stopped before it was ready, from the lines it printed. Pure."""

from __future__ import annotations

import re
import signal
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
    # llama.cpp's own reason (a bad header, a missing key, an unknown arch) says more than any hint of ours.
    (re.compile(r"error loading model: (.+)"),
     "llama-server could not load the model: {0}",
     "llama.cpp refused the file: re-download it if it is damaged, or use a llama.cpp that knows this model"),
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
    return Failure(f"{describe_exit(returncode)} before it was ready: {last[:200]}",
                   "see the server log for the full output")


def describe_exit(returncode: int, program: str = "llama-server") -> str:
    """'llama-server exited with code 1', or 'llama-server was killed by SIGABRT' (Popen's -6)."""
    if returncode >= 0:
        return f"{program} exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"{program} was killed by {name}"


_LOG_PREFIX = re.compile(r"^\d+\.\d{2}\.\d{3}\.\d{3} [IWED] ")
_SOURCE_PREFIX = re.compile(r"^\S+\.(?:c|cc|cpp|cu|h):\d+: ")  # ggml_abort's "file.cpp:123: "
# What a dying llama-server prints, most telling first; a GGML_ABORT is followed by a backtrace.
_CRASH_LINES = (_WORKER_LOST, re.compile(r"GGML_ASSERT|CUDA error|out of memory|terminate called"),
                re.compile(r"^\d+\.\d{2}\.\d{3}\.\d{3} E "))


def crash_reason(lines: Sequence[str]) -> str | None:
    """The line in the child's last output that says why it died, without its prefixes; None if none does.

    A lost worker is said in llama.cpp's own words alone: threads dying together print over each other,
    so the rest of that line can be another thread's half line."""
    lost = next((m for line in reversed(lines) if (m := _WORKER_LOST.search(line))), None)
    if lost is not None:
        return lost.group(0)
    for pattern in _CRASH_LINES[1:]:
        found = next((line for line in reversed(lines) if pattern.search(line)), None)
        if found is not None:
            text = _SOURCE_PREFIX.sub("", _LOG_PREFIX.sub("", found.strip()))
            return text[:200]
    return None


def crash_lesson(returncode: int, lines: Sequence[str]) -> str:
    """How a ready llama-server ended, with the log's reason: 'llama-server was killed by SIGABRT
    (log: Remote RPC server crashed or returned malformed response)'."""
    reason = crash_reason(lines)
    return f"{describe_exit(returncode)} (log: {reason})" if reason else describe_exit(returncode)
