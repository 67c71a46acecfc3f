"""Why llama-server stopped before it was ready, from the lines it printed. Pure."""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def classify_failure(lines: Sequence[str], returncode: int, log_path: str | Path | None = None) -> Failure:
    """The first fatal pattern in the child's output, a lost RPC worker, or its exit code and the line that
    says why (a GGML_ASSERT, an error; the last line at worst, never a debugger's backtrace)."""
    for line in lines:
        for pattern, message, hint in _FATAL:
            match = pattern.search(line)
            if match:
                return Failure(message.format(*match.groups()).replace("  ", " "), hint)
    if any(_WORKER_LOST.search(line) for line in lines):
        return Failure("an RPC worker stopped answering while llama-server loaded onto it",
                       "check the workers with `llamalaunch devices --rpc ...` and their logs", worker_lost=True)
    said = _said(lines)
    why = crash_reason(said) or next((line for line in reversed(said) if _SAYS_WHY.search(line)), None)
    why = why or next((line.strip() for line in reversed(said or lines) if line.strip()), "no output")
    log = f"see the server log {log_path}" if log_path else "see the server log"
    return Failure(f"{describe_exit(returncode)} before it was ready: {why[:200]}", f"{log} for the full output")


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
# What ggml_print_backtrace prints after the reason: gdb attaching, its frames ("#3  0x… in f () at x.cpp:12"),
# their source lines ("1362\t    GGML_ASSERT(…);"), detaching; or backtrace_symbols' "lib.so(+0x1722b)[0x7f0c]".
_BACKTRACE = re.compile(r"^(?:\[(?:Inferior \d|New LWP|New Thread|Thread debugging)|Using host libthread_db|#\d+ "
                        r"|0x[0-9a-f]+ in |(?:warning: )?\d+\t)|\(\S*\)\s*\[0x[0-9a-f]+\]$")
_SAYS_WHY = re.compile(r"error|failed", re.IGNORECASE)
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
    said = _said(lines)
    for pattern in _CRASH_LINES[1:]:
        found = next((line for line in reversed(said) if pattern.search(line)), None)
        if found is not None:
            text = _SOURCE_PREFIX.sub("", _LOG_PREFIX.sub("", found))
            return text[:200]
    return None


def _said(lines: Sequence[str]) -> list[str]:
    """The child's non-empty lines, stripped, without a backtrace's: a frame's source line can read
    `GGML_ASSERT(…)` too, but only the line before the backtrace says which one failed."""
    stripped = (line.strip() for line in lines)
    return [line for line in stripped if line and not _BACKTRACE.search(line)]


def crash_lesson(returncode: int, lines: Sequence[str]) -> str:
    """How a ready llama-server ended, with the log's reason: 'llama-server was killed by SIGABRT
    (log: Remote RPC server crashed or returned malformed response)'."""
    reason = crash_reason(lines)
    return f"{describe_exit(returncode)} (log: {reason})" if reason else describe_exit(returncode)
