"""serve's own failure messages: API key files as llama-server reads them, readiness failures named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llamalaunch.launch.failures import classify_failure
from llamalaunch.launch.supervisor import READINESS_FAILED


def test_a_key_file_with_windows_line_endings_is_refused_before_anything_starts(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"secret\r\n")
    result = subprocess.run([sys.executable, "-m", "llamalaunch", "serve", "--demo", "--api-key-file", str(key),
                             "--no-tui"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: a key in {key} has spaces or a carriage return around it")


def test_a_failed_readiness_completion_is_said_as_such() -> None:
    failure = classify_failure(["load_tensors: ...", f"{READINESS_FAILED}: HTTP 401"], 0)
    assert failure.message == "llama-server loaded but could not answer a one-token completion (HTTP 401)"
