"""serve's own failure messages: API key files as llama-server reads them, readiness failures named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llamalaunch.launch.failures import classify_failure, crash_lesson, describe_exit
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


def test_exits_name_their_signal() -> None:
    assert describe_exit(-9) == "llama-server was killed by SIGKILL"
    assert describe_exit(-6) == "llama-server was killed by SIGABRT"
    assert describe_exit(1) == "llama-server exited with code 1"


def test_a_crash_after_ready_says_what_the_log_says() -> None:
    """ggml_abort prints "file:line: message", then a backtrace; the message is the reason."""
    tail = ["0.05.123.456 I srv  log_server_r: request: POST /completion 127.0.0.1 200",
            "/src/ggml/src/ggml-rpc/ggml-rpc.cpp:586: Remote RPC server crashed or returned malformed response",
            "/lib/libggml-base.so.0(+0x1722b)[0x7f0c2c52f22b]", "/lib/libggml-base.so.0(ggml_abort+0x15e)[0x7f0c]"]
    assert crash_lesson(-6, tail) == ("llama-server was killed by SIGABRT "
                                      "(log: Remote RPC server crashed or returned malformed response)")
    assert crash_lesson(-9, ["0.05.123.456 I srv  update_slots: all slots are idle"]) == \
        "llama-server was killed by SIGKILL"
    assert crash_lesson(1, ["0.01.000.000 E srv  operator(): failed to open the chat template"]) == \
        "llama-server exited with code 1 (log: srv  operator(): failed to open the chat template)"


def test_a_model_llama_cpp_refuses_is_said_in_llama_cpp_words() -> None:
    lines = ["0.00.120.000 E llama_model_load: error loading model: missing tensor 'output_norm.weight'",
             "0.00.120.001 E llama_model_load_from_file_impl: failed to load model",
             "0.00.120.002 E srv    load_model: failed to load model, '/m/x.gguf'",
             "0.00.120.003 E srv    operator(): main: exiting due to model loading error"]
    failure = classify_failure(lines, 1)
    assert failure.message == "llama-server could not load the model: missing tensor 'output_norm.weight'"
    assert "llamalaunch plan" not in failure.hint  # not the circular "check the file with plan"
