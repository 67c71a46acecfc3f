"""serve's own failure messages: API key files as llama-server reads them, readiness failures named."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llamalaunch.launch.failures import classify_failure, crash_lesson, describe_exit
from llamalaunch.launch.supervisor import READINESS_FAILED
from tests.serve_support import StartServe, complete, wait_gone
from tests.support import RpcWorker
from tests.synthetic import write_preset


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



ABORT_LOG = Path(__file__).parent / "fixtures" / "llama-server-logs" / "cpu-qwen3moe-expert-used-99-abort.log"


def test_an_abort_before_ready_quotes_the_assert_not_the_debugger_and_names_the_log() -> None:
    """A GGML_ASSERT is followed by gdb's backtrace, whose last line was quoted: "[Inferior 1 (process 24324)
    detached]". The real output of llama-server on a header that says 99 experts are used, of 8."""
    lines = ABORT_LOG.read_text().splitlines()
    assert lines[-1].startswith("[Inferior 1 (process ")
    failure = classify_failure(lines, -6, "/home/me/.local/state/llamalaunch/default.log")
    assert failure.message == ("llama-server was killed by SIGABRT before it was ready: "
                               "GGML_ASSERT(n_expert_used_max <= hparams.n_expert) failed")
    assert failure.hint == "see the server log /home/me/.local/state/llamalaunch/default.log for the full output"
    assert classify_failure(lines, -6).hint == "see the server log for the full output"


def test_a_backtrace_frame_s_source_line_is_not_the_reason() -> None:
    """With debug info gdb prints each frame's source line; the frame of the assert reads GGML_ASSERT too."""
    from llamalaunch.launch.failures import crash_reason

    lines = ["0.00.009.339 I srv    load_model: loading model 'm.gguf'",
             "/src/llama.cpp/src/llama-model.cpp:1364: GGML_ASSERT(n_expert_used_max > 0) failed",
             "[New LWP 27485]", "[Thread debugging using libthread_db enabled]",
             "#3  0x00007f87794b2d4a in llama_model_base::load_hparams (this=0x55f1, ml=...) at "
             "/src/llama.cpp/src/llama-model.cpp:1364",
             "1364\t        GGML_ASSERT(n_expert_used_max > 0);",
             "[Inferior 1 (process 27468) detached]"]
    assert crash_reason(lines) == "GGML_ASSERT(n_expert_used_max > 0) failed"
    symbols = [*lines[:2], "/lib/libggml-base.so.0(+0x1722b)[0x7f0c2c52f22b]",
               "/lib/libggml-base.so.0(ggml_abort+0x15e)[0x7f0c2c52f5de]"]
    assert classify_failure(symbols, -6).message.endswith(": GGML_ASSERT(n_expert_used_max > 0) failed")


def test_an_error_line_is_quoted_before_the_lines_after_it() -> None:
    """Without a log prefix to go by (no "E"), a line saying "failed" still beats the clean-up after it."""
    lines = ["srv    load_model: loading model 'm.gguf'",
             "common_init_from_params: failed to create context with model 'm.gguf'",
             "srv    operator(): cleaning up before exit..."]
    assert classify_failure(lines, 1).message == ("llama-server exited with code 1 before it was ready: "
                                                  "common_init_from_params: failed to create context with model "
                                                  "'m.gguf'")


# --- against a real llama-server ------------------------------------------------------------------------


@pytest.mark.llama
def test_a_hung_server_is_restarted_and_each_end_is_named(serve: StartServe, demo_model: Path) -> None:
    """SIGSTOP: the process lives, /health never answers. Three misses of 0.5 s: killed, counted as a
    restart, said as such. Then SIGKILL: said as SIGKILL, not -9. The model is named at the start."""
    run = serve(demo_model, "--ctx", "2k", "--health-interval", "0.5", "--health-misses", "3", "--backoff", "0.2")
    ready_index, _, _ = run.wait_ready()
    assert re.search(r" starting: planning .*\(" + re.escape(str(demo_model)) + r"\)$", run.stdout[0]), run.stdout
    hung = run.server()
    hung.suspend()
    stopped_at = time.monotonic()
    index, _ = run.wait_for_line(rf" warning: llama-server stopped answering \(3 /health checks in a row "
                                 rf"unanswered within 0.5 s; last: .+\): killing pid {hung.pid} to restart it$",
                                 after=ready_index, timeout_s=20)
    assert time.monotonic() - stopped_at < 10
    index, _ = run.wait_for_line(r" restarting: llama-server stopped answering \(.+\); restart 1 of 5 in [\d.]+ s$",
                                 after=index)
    ready_index, _, _ = run.wait_ready(after=index)
    assert wait_gone(hung.pid, 5)
    assert run.state()["restarts"] == 1

    run.server().kill()
    index, _ = run.wait_for_line(r" restarting: llama-server was killed by SIGKILL; restart 2 of 5 in [\d.]+ s$",
                                 after=ready_index)
    ready_index, _, _ = run.wait_ready(after=index)
    run.send(signal.SIGTERM)
    assert run.wait_exit() == 128 + signal.SIGTERM
    assert run.stdout[-2].endswith(" stopping: signal SIGTERM")
    assert run.stdout[-1].endswith(" stopped: llama-server exited with code 0"), run.stdout
    assert not run.leftover_servers()


@pytest.fixture(scope="module")
def refused_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A header llamalaunch plans but llama.cpp refuses: a tensor renamed (same length, the header stays valid)."""
    path = write_preset(tmp_path_factory.mktemp("model") / "refused.gguf", "tiny-llama")
    data = bytearray(path.read_bytes())
    at = data.index(b"output_norm.weight")
    data[at:at + len(b"output_norm")] = b"outpux_norm"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.llama
def test_a_failed_load_says_llama_cpp_reason_once(serve: StartServe, refused_model: Path) -> None:
    run = serve(refused_model, "--ctx", "512")
    assert run.wait_exit(timeout_s=60) == 1
    assert run.stderr == ["error: llama-server could not load the model: check_tensor_dims: tensor "
                          "'output_norm.weight' not found (llama.cpp refused the file: re-download it if it is "
                          "damaged, or use a llama.cpp that knows this model)"], run.output
    assert not any(" failed: " in line for line in run.stdout), run.output  # said once, on stderr
    assert run.state()["phase"] == "failed"


@pytest.mark.llama
def test_a_crash_after_ready_is_said_with_the_log_reason(
        serve: StartServe, rpc_workers: Callable[..., RpcWorker], demo_model: Path) -> None:
    """The worker dies; the next request makes llama-server abort (-6). Said: SIGABRT and the log's own line."""
    worker = rpc_workers()
    run = serve(demo_model, "--rpc", worker.endpoint, "--ctx", "2k", "--backoff", "0.2")
    ready_index, url, _ = run.wait_ready()
    worker.process.kill()
    worker.process.wait(5)
    with contextlib.suppress(OSError):  # the answer never comes: llama-server aborts mid-request
        complete(url, n_predict=2, timeout_s=10)
    run.wait_for_line(r" restarting: llama-server was killed by SIGABRT \(log: Remote RPC server crashed or "
                      r"returned malformed response\); restart 1 of 5", after=ready_index)


def test_a_lost_worker_is_said_in_llama_cpp_words_even_when_another_thread_prints_over_it() -> None:
    from llamalaunch.launch.failures import crash_reason

    glued = ("0.10.751.337 E /src/ggml-rpc.cpp:612: Remote RPC server crashed or returned malformed responsesrv  "
             "update_slots: id  0 | task 3 | n_past = 1")
    assert crash_reason([glued, "0.10.751.400 E recv failed (bytes_recv=0)"]) == \
        "Remote RPC server crashed or returned malformed response"
