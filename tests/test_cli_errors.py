"""Bad input on the command line (issue 11): one `error:` line naming the problem and the fix, exit code 2,
no traceback, nothing written.

Most cases run in-process through typer's CliRunner on the real app (fast); a few run the real
`python -m llamalaunch` to prove the entry point behaves the same. `--assume` devices stand in for a
probe, and `--llama-server` points at the built binary, so nothing but the bad value can fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamalaunch.cli import app

REPO_ROOT = Path(__file__).resolve().parent.parent
ONE_ERROR_LINE = re.compile(r"^error: \S.* \(.+\)$")  # "error: PROBLEM (FIX)"


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


Invoke = Callable[..., Outcome]


@pytest.fixture
def home() -> Path:
    return Path(os.environ["LLAMALAUNCH_HOME"])


@pytest.fixture
def files(tmp_path: Path, demo_model: Path) -> dict[str, Path]:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"these are my notes, not a model\n" * 64)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(demo_model.read_bytes()[:3000])  # the header of a real model, cut
    empty_key, no_key = tmp_path / "empty.key", tmp_path / "comments.key"
    empty_key.write_text("")
    no_key.write_text("# the key goes below\n\n")
    bad_inventory, twice_inventory = tmp_path / "box.txt", tmp_path / "twice.txt"
    bad_inventory.write_text("# the box\nCUDA0=24GiB\ngarbage line\n")
    twice_inventory.write_text("CUDA0=24GiB\n\ncuda0=6GiB  # again\n")
    return {"MODEL": demo_model, "NOT_GGUF": not_gguf, "TRUNCATED": truncated, "EMPTY_KEY": empty_key,
            "NO_KEY": no_key, "MISSING": tmp_path / "missing.key", "BAD_INVENTORY": bad_inventory,
            "TWICE_INVENTORY": twice_inventory}


@pytest.fixture
def invoke(llama_bin_dir: Path, files: dict[str, Path]) -> Invoke:
    def run(*args: str) -> Outcome:
        argv = [str(files[arg]) if arg in files else arg for arg in args]
        argv = [arg.replace("LLAMA_SERVER", str(llama_bin_dir / "llama-server")) for arg in argv]
        result = CliRunner().invoke(app, argv)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a traceback: the bug this file is about
        return Outcome(result.exit_code, result.stdout, result.stderr)

    return run


def assert_one_error_line(outcome: Outcome, code: int, *words: str) -> None:
    lines = outcome.stderr.splitlines()
    assert outcome.code == code, outcome
    assert len(lines) == 1 and ONE_ERROR_LINE.match(lines[0]), outcome
    assert "Traceback" not in outcome.stdout + outcome.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def assert_nothing_written(home: Path) -> None:
    """No run state, no log: only the (shared) cache may hold anything."""
    written = [p for p in home.rglob("*") if p.is_file() and "cache" not in p.relative_to(home).parts]
    assert not written and not (home / "state").exists(), written


PLAN = ("plan", "MODEL", "--assume", "CUDA0=8GiB", "--llama-server", "LLAMA_SERVER")
SERVE = ("serve", "MODEL", "--llama-server", "LLAMA_SERVER", "--no-tui", "--ctx", "2k")  # what-if devices: plans only

BAD_INPUT = {
    # the model file
    "not gguf": (("plan", "NOT_GGUF", "--assume", "CUDA0=8GiB"), ["notes.gguf", "not a GGUF file"]),
    "truncated gguf": (("plan", "TRUNCATED", "--assume", "CUDA0=8GiB"), ["truncated.gguf", "truncated"]),
    "model is a folder": (("plan", "/", "--assume", "CUDA0=8GiB"), ["directory"]),
    "no model": (("plan", "--assume", "CUDA0=8GiB"), ["no model", "--demo"]),
    "serve no model": (SERVE[:1] + SERVE[2:], ["no model", "--demo"]),
    "model and demo": ((*PLAN, "--demo"), ["both a model", "and --demo given"]),
    "serve model and demo": ((*SERVE, "--demo"), ["both a model", "and --demo given"]),
    # context and counts
    "ctx 16kk": ((*PLAN, "--ctx", "16kk"), ["'16kk'", "16k"]),
    "ctx -5": ((*PLAN, "--ctx", "-5"), ["'-5'"]),
    "ctx 0": ((*PLAN, "--ctx", "0"), ["'0'", "out of range"]),
    "ctx 1e99": ((*PLAN, "--ctx", "1e99"), ["'1e99'"]),
    "ctx too big": ((*PLAN, "--ctx", "999999999999"), ["out of range"]),
    "ctx nan": ((*PLAN, "--ctx", "nan"), ["'nan'"]),
    "ctx-min max": ((*PLAN, "--ctx-min", "max"), ["--ctx-min", "'max'"]),
    "ctx below ctx-min": ((*PLAN, "--ctx", "4k", "--ctx-min", "8k"), ["--ctx-min"]),
    "np 0": ((*PLAN, "-np", "0"), ["-np", "out of range"]),
    "np not a number": ((*PLAN, "-np", "abc"), ["-np", "--help"]),
    "toolchain jobs below one": (("toolchain", "install", "--jobs", "-3"), ["--jobs", "greater than or equal to 1", "--help"]),
    "ctx without its value": (("plan", "--ctx"), ["--ctx", "requires an argument", "plan --help"]),
    "ngl -1": ((*PLAN, "-ngl", "-1"), ["-ngl", "auto", "all"]),
    "ngl most": ((*PLAN, "-ngl", "most"), ["-ngl", "'most'", "auto"]),
    "batch 0": ((*PLAN, "-b", "0"), ["-b/--batch-size"]),
    # sizes and devices
    "budget 12XB": ((*PLAN, "--budget", "RPC0=12XB"), ["--budget RPC0", "'12XB'"]),
    "budget negative": ((*PLAN, "--budget", "CUDA0=-1GiB"), ["--budget CUDA0"]),
    "budget twice": ((*PLAN, "--budget", "CUDA0=1GiB", "--budget", "CUDA0=2GiB"), ["twice"]),
    "reserve unknown device": ((*PLAN, "--reserve", "CUDA9=1GiB"), ["CUDA9", "CUDA0"]),
    "margin 5XB": ((*PLAN, "--margin", "5XB"), ["--margin"]),
    "overhead not name=size": ((*PLAN, "--overhead", "zz"), ["--overhead", "NAME=SIZE"]),
    "size without a unit": ((*PLAN, "--budget", "CUDA0=6"), ["--budget CUDA0 '6' has no unit", "6GiB"]),
    "margin without a unit": ((*PLAN, "--margin", "64"), ["--margin '64' has no unit", "64MiB"]),
    "overhead without a unit": ((*PLAN, "--overhead", "CUDA=600"), ["--overhead CUDA '600' has no unit"]),
    "assume without a unit": (("plan", "MODEL", "--assume", "CUDA0=24"), ["'24' has no unit", "24GiB"]),
    "assume lots": (("plan", "MODEL", "--assume", "CUDA0=lots"), ["'lots'"]),
    "assume free above total": (("plan", "MODEL", "--assume", "CUDA0=4GiB/2GiB"), ["larger than total"]),
    "assume twice": (("plan", "MODEL", "--assume", "CUDA0=4GiB", "--assume", "CUDA0=2GiB"), ["twice"]),
    "assume unknown kind": (("plan", "MODEL", "--assume", "FOO0=4GiB"), ["'FOO0'", "CUDA0"]),
    "inventory bad line": (("plan", "MODEL", "--inventory", "BAD_INVENTORY"), ["box.txt, line 3: 'garbage line'"]),
    "inventory device twice": (("plan", "MODEL", "--inventory", "TWICE_INVENTORY"),
                               ["twice.txt, line 3: CUDA0 again (first on line 1)"]),
    "link for no device": ((*PLAN, "--link", "RPC0=1Gbit/0.3ms"), ["--link RPC0", "--rpc HOST:PORT"]),
    "link of three parts": ((*PLAN, "--link", "RPC0=1Gbit/0.3ms/2"), ["NAME=RATE/ROUNDTRIP"]),
    "link rate 0": ((*PLAN, "--link", "RPC0=0Gbit/0.3ms"), ["'0Gbit' must be positive"]),
    "flops without a unit": ((*PLAN, "--device-speed", "CUDA0=20GB:500"), ["'500' is not a FLOP/s figure",
                                                                          "500GFLOPS"]),
    "device speed for no device": ((*PLAN, "--device-speed", "CUDA1=20GB"), ["--device-speed CUDA1", "--assume"]),
    "dev duplicate": ((*PLAN, "-dev", "CUDA0,CUDA0"), ["twice"]),
    "dev empty": ((*PLAN, "-dev", ","), ["names no device"]),
    "dev unknown": ((*PLAN, "-dev", "CUDA9"), ["CUDA9"]),
    "exclude unknown": ((*PLAN, "--exclude", "CUDA9"), ["CUDA9"]),
    # contradictions and vocabulary
    "quantized V without flash attention": ((*PLAN, "-ctv", "q4_0", "-fa", "off"), ["q4_0", "--flash-attn off"]),
    "cache type": ((*PLAN, "-ctk", "q9_9"), ["q9_9", "q8_0"]),
    "flash attn": ((*PLAN, "-fa", "maybe"), ["'maybe'", "auto"]),
    "rpc empty list": (("plan", "MODEL", "--rpc", ","), ["--rpc ',' names no worker", "HOST:PORT"]),
    "rpc empty": (("devices", "--rpc", " "), ["--rpc ' ' names no worker"]),
    "rpc nonsense": (("plan", "MODEL", "--rpc", "nonsense"), ["'nonsense'", "HOST:PORT"]),
    "rpc port out of range": (("devices", "--rpc", "127.0.0.1:99999"), ["port 99999 is out of range", "1 to 65535"]),
    "rpc port 0": (("devices", "--rpc", "127.0.0.1:0"), ["port 0 is out of range"]),
    "rpc one worker twice": (("plan", "MODEL", "--rpc", "localhost:50999,127.0.0.1:50999"),
                             ["--rpc lists localhost:50999 and 127.0.0.1:50999: both are the worker at 127.0.0.1:50999",
                              "give each worker once"]),
    "rpc one worker as 0.0.0.0": (("devices", "--rpc", "0.0.0.0:50999,127.0.0.1:50999"),
                                  ["--rpc lists 0.0.0.0:50999 and 127.0.0.1:50999: both are the worker at "
                                   "127.0.0.1:50999"]),
    "unknown option": ((*PLAN, "--frobnicate"), ["--frobnicate", "--help"]),
    "option without value": ((*PLAN, "--ctx"), ["--ctx"]),
    "unknown command": (("frobnicate",), ["frobnicate", "--help"]),
    "devices assume": (("devices", "--assume", "CUDA0=1GiB/zz"), ["'zz'"]),
    "status name": (("status", "--name", "../x", "--once"), ["'../x'"]),
    "status name too long": (("status", "--name", "n" * 300, "--once"), ["300 characters long", "at most 128"]),
    "worker threads 0": (("worker", "--gpus", "cpu", "-t", "0"), ["-t/--threads"]),
    # serve's own options: refused before anything starts or is written
    "serve port 70000": ((*SERVE, "--port", "70000"), ["--port 70000"]),
    "serve port -1": ((*SERVE, "--port", "-1"), ["--port -1"]),
    "serve max-attempts 0": ((*SERVE, "--max-attempts", "0"), ["--max-attempts"]),
    "serve max-restarts -1": ((*SERVE, "--max-restarts", "-1"), ["--max-restarts"]),
    "serve backoff nan": ((*SERVE, "--backoff", "nan"), ["--backoff"]),
    "serve load-timeout 0": ((*SERVE, "--load-timeout", "0"), ["--load-timeout"]),
    "serve host": ((*SERVE, "--host", "not an address"), ["--host", "127.0.0.1"]),
    "serve name": ((*SERVE, "--name", "../etc"), ["'../etc'"]),
    "serve name too long": ((*SERVE, "--name", "n" * 300), ["300 characters long", "at most 128"]),
    "serve api key file missing": ((*SERVE, "--api-key-file", "MISSING"), ["missing.key"]),
    "serve api key file empty": ((*SERVE, "--api-key-file", "EMPTY_KEY"), ["holds no key"]),
    "serve api key file only comments": ((*SERVE, "--api-key-file", "NO_KEY"), ["holds no key"]),
    "serve api key on argv": ((*SERVE, "--", "--api-key", "secret"), ["--api-key-file"]),
    "serve planned flag after --": ((*SERVE, "--", "-ngl", "5"), ["-ngl", "--force"]),
    "serve own expert placement after --": ((*SERVE, "--", "--n-cpu-moe", "5"), ["--n-cpu-moe", "--force"]),
    "serve cpu-experts negative": ((*SERVE, "--cpu-experts", "-1"), ["--cpu-experts"]),
    "cpu-experts not a number": ((*PLAN, "--cpu-experts", "x"), ["--cpu-experts", "'x' is not a whole number"]),
    "serve backoff not a number": ((*SERVE, "--backoff", "x"), ["--backoff", "'x' is not a number"]),
    # a missing binary: a serve that took the what-if devices would fail (exit 1), not start llama-server
    "serve what-if devices": ((*SERVE, "--assume", "CUDA0=8GiB", "--llama-server", "MISSING"),
                              ["--assume", "for plans only", "drop it"]),
    "serve what-if inventory": ((*SERVE, "--inventory", "BAD_INVENTORY", "--llama-server", "MISSING"),
                                ["--inventory", "for plans only"]),
    "cpu-experts of a dense model": ((*PLAN, "--cpu-experts", "5"), ["--cpu-experts 5", "no routed experts",
                                                                      "drop --cpu-experts"]),
    # after --, a word is llama-server's even with --demo: never taken for the MODEL argument
    "serve demo planned flag after --": (("serve", *SERVE[2:], "--demo", "--", "-ngl", "5"), ["-ngl", "--force"]),
}


@pytest.mark.llama
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(invoke: Invoke, home: Path, case: str) -> None:
    args, words = BAD_INPUT[case]
    outcome = invoke(*args)
    assert_one_error_line(outcome, 2, *words)
    assert "secret" not in outcome.stderr
    assert_nothing_written(home)


@pytest.mark.parametrize("command", ["plan", "serve"])
def test_model_or_demo_is_one_rule_for_plan_and_serve(invoke: Invoke, files: dict[str, Path], command: str) -> None:
    """No model is an error for both (no demo served by surprise); a model and --demo together is too."""
    neither = invoke(command, *(("--no-tui",) if command == "serve" else ("--assume", "CUDA0=8GiB", "--json")))
    assert neither.code == 2
    assert neither.stdout == ("" if command == "serve" else json.dumps(  # --json: the error as JSON too
        {"error": "no model given", "hint": "pass MODEL.gguf, or --demo for the bundled SmolLM2-135M", "exit_code": 2},
        indent=2) + "\n")
    assert neither.stderr == "error: no model given (pass MODEL.gguf, or --demo for the bundled SmolLM2-135M)\n"
    both = invoke(command, "MODEL", "--demo", *(() if command == "serve" else ("--assume", "CUDA0=8GiB")))
    assert (both.code, both.stdout) == (2, "")
    assert both.stderr == (f"error: both a model ({files['MODEL']}) and --demo given (drop one: MODEL.gguf, or "
                           "--demo for the bundled SmolLM2-135M)\n")


def test_json_gets_json_for_a_bad_variable_read_before_the_command_runs(demo_model: Path) -> None:
    """LLAMALAUNCH_CTX=abc plan --json: the root reads the environment, before plan's own --json is parsed."""
    env = {**os.environ, "LLAMALAUNCH_CTX": "abc"}
    done = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", str(demo_model), "--json"], cwd=REPO_ROOT,
                          env=env, text=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert json.loads(done.stdout)["error"].startswith("environment variable LLAMALAUNCH_CTX: ctx = 'abc'")


def test_json_gets_json_for_a_usage_error_too() -> None:
    """click's own errors (an unknown option, a missing value) printed nothing on stdout under --json."""
    done = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", "--demo", "--json", "--bogus"], cwd=REPO_ROOT,
                          text=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stderr.startswith("error: No such option: --bogus")
    assert json.loads(done.stdout) == {"error": "No such option: --bogus",
                                       "hint": "see `python -m llamalaunch plan --help`", "exit_code": 2}


def test_plan_names_a_flag_after_separator_as_what_it_is(invoke: Invoke) -> None:
    """`plan --demo -- -nkvo` said "both a model (-nkvo) and --demo given"."""
    outcome = invoke("plan", "--demo", "--assume", "CUDA0=8GiB", "--", "-nkvo")
    assert (outcome.code, outcome.stdout) == (2, "")
    assert outcome.stderr == ("error: '-nkvo' is not a model file: plan takes no llama-server flags after -- (serve "
                              "takes them after --; the plan's command line is the same without them)\n")


def test_the_command_line_wins_over_a_profile_or_environment_model(invoke: Invoke, files: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`scripts/run-demo` (serve --demo) with a default profile naming a model: --demo, as given, wins."""
    monkeypatch.setenv("LLAMALAUNCH_MODEL", str(files["NOT_GGUF"]))
    demo = invoke("plan", "--demo", "--assume", "CUDA0=8GiB", "--json")
    assert demo.code == 0 and json.loads(demo.stdout)["model"]["path"] == str(files["MODEL"]), demo
    monkeypatch.delenv("LLAMALAUNCH_MODEL")
    monkeypatch.setenv("LLAMALAUNCH_DEMO", "true")
    model = invoke("plan", "NOT_GGUF", "--assume", "CUDA0=8GiB")
    assert model.code == 2 and "notes.gguf" in model.stderr, model  # the model given, not the demo


def test_an_inventory_line_is_named_by_file_and_number(invoke: Invoke, files: dict[str, Path]) -> None:
    outcome = invoke("devices", "--inventory", "BAD_INVENTORY")
    assert (outcome.code, outcome.stdout) == (2, "")
    assert outcome.stderr == (f"error: the inventory {files['BAD_INVENTORY']}, line 3: 'garbage line' is not "
                              "NAME=FREE[/TOTAL] (write one NAME=FREE[/TOTAL] a line, like CUDA0=24GiB or "
                              "RPC0=6GiB/8GiB)\n")


def test_a_quantized_v_cache_without_flash_attention_is_the_model_layers_one_rule(invoke: Invoke) -> None:
    """The command line says it with model/kv.py's check_cache_types, the rule the estimate enforces."""
    outcome = invoke(*PLAN, "-ctv", "q8_0", "-fa", "off")
    assert (outcome.code, outcome.stdout) == (2, "")
    assert outcome.stderr == "error: a q8_0 V cache needs flash attention (drop --flash-attn off or use an f16 V " \
                             "cache)\n"


@pytest.mark.llama
def test_ctx_max_is_allowed_for_the_context_itself(invoke: Invoke) -> None:
    """`max` is the one word --ctx takes (the largest that fits); elsewhere it is refused (above)."""
    outcome = invoke(*PLAN, "--ctx", "max", "--json")
    assert outcome.code == 0, outcome


@pytest.mark.llama
def test_serve_with_an_unknown_device_writes_nothing(invoke: Invoke, home: Path) -> None:
    outcome = invoke(*SERVE, "--reserve", "CUDA9=1GiB")
    assert outcome.code == 2
    assert_nothing_written(home)


def test_serve_with_metrics_on_its_own_port_is_refused_before_anything_starts(invoke: Invoke, home: Path) -> None:
    """It loaded, then failed on 'port in use' that our own /metrics held."""
    outcome = invoke(*SERVE, "--port", "18081", "--metrics-port", "18081")
    assert_one_error_line(outcome, 2, "--metrics-port 18081 is serve's --port too")
    assert_nothing_written(home)


def test_serve_with_a_missing_binary_names_the_install(invoke: Invoke, home: Path, tmp_path: Path) -> None:
    outcome = invoke("serve", "MODEL", "--llama-server", str(tmp_path / "nope" / "llama-server"),
                     "--no-tui", "--ctx", "2k")
    assert_one_error_line(outcome, 1, "nope/llama-server", "llamalaunch toolchain install")
    assert_nothing_written(home)


def test_a_missing_binary_given_for_a_what_if_plan_is_an_error_naming_that_path(
        invoke: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan for what-if devices needs no llama-server, but a wrong path the user typed is a typo to fix (it
    was a note under the table), and the fix is that path, not the way to give one."""
    missing = tmp_path / "nope" / "llama-server"
    outcome = invoke("plan", "MODEL", "--assume", "CUDA0=8GiB", "--llama-server", str(missing))
    assert (outcome.code, outcome.stdout) == (1, "")
    assert outcome.stderr == (f"error: {missing} given by --llama-server does not exist (fix the path given by "
                              "--llama-server, or drop it to use the one found on PATH or built by `llamalaunch "
                              "toolchain install`)\n")
    monkeypatch.setenv("LLAMALAUNCH_LLAMA_SERVER", str(missing))  # the variable's value reaches the option
    outcome = invoke("toolchain")
    assert (outcome.code, outcome.stdout) == (1, "")
    assert outcome.stderr.startswith(f"error: {missing} given by LLAMALAUNCH_LLAMA_SERVER does not exist (fix the "
                                     "path given by LLAMALAUNCH_LLAMA_SERVER, or drop it"), outcome


def test_a_folder_without_llama_server_names_that_folder_not_a_path_never_given(
        invoke: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMALAUNCH_LLAMA_SERVER", str(tmp_path))
    outcome = invoke("toolchain")
    assert (outcome.code, outcome.stdout) == (1, "")
    assert outcome.stderr == (f"error: {tmp_path} given by LLAMALAUNCH_LLAMA_SERVER is a folder with no llama-server "
                              "in it (give the path of the llama-server binary, or of the folder that holds it)\n")


def test_worker_names_a_wrong_llama_server_folder_rather_than_asking_to_set_it(
        invoke: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """worker looks for ggml-rpc-server beside the llama-server given: a wrong one is named (it said "not found
    ... or set LLAMALAUNCH_LLAMA_SERVER", the variable already set). PATH holds no ggml-rpc-server here."""
    monkeypatch.setenv("LLAMALAUNCH_LLAMA_SERVER", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    outcome = invoke("worker", "--gpus", "cpu")
    assert (outcome.code, outcome.stdout) == (1, "")
    assert outcome.stderr == (f"error: {tmp_path} given by LLAMALAUNCH_LLAMA_SERVER is a folder with no llama-server "
                              "in it (give the path of the llama-server binary, or of the folder that holds it)\n")


def test_a_folder_without_ggml_rpc_server_names_that_folder(invoke: Invoke, tmp_path: Path) -> None:
    outcome = invoke("worker", "--gpus", "cpu", "--rpc-server", str(tmp_path))
    assert (outcome.code, outcome.stdout) == (1, "")
    assert outcome.stderr == (f"error: {tmp_path} (from --rpc-server) is a folder with no ggml-rpc-server in it "
                              "(give the path of the ggml-rpc-server binary, or of the folder that holds it)\n")


def test_a_missing_rpc_server_given_to_worker_names_that_path_as_the_fix(invoke: Invoke, tmp_path: Path) -> None:
    missing = tmp_path / "ggml-rpc-server"
    outcome = invoke("worker", "--gpus", "cpu", "--rpc-server", str(missing))
    assert (outcome.code, outcome.stdout) == (1, "")
    assert outcome.stderr == (f"error: {missing} (from --rpc-server) is not an executable ggml-rpc-server (fix the "
                              "path given by --rpc-server, or drop it to use the one found on PATH or built by "
                              "`llamalaunch toolchain install`)\n")


def test_a_missing_binary_from_a_profile_is_named_as_the_profile_s(invoke: Invoke, tmp_path: Path) -> None:
    """Not "--llama-server": the user looks for the path where it came from."""
    profile = tmp_path / "p.toml"
    profile.write_text('llama_server = "/nope/llama-server"\n', encoding="utf-8")
    outcome = invoke("--config", str(profile), "plan", "MODEL", "--assume", "CUDA0=8GiB")
    assert (outcome.code, outcome.stdout) == (1, "")
    assert outcome.stderr == ("error: /nope/llama-server given by the config file's llama_server does not exist (fix "
                              "the path given by the config file's llama_server, or drop it to use the one found on "
                              "PATH or built by `llamalaunch toolchain install`)\n")


def test_plan_verify_without_a_toolchain_says_where_it_looked(invoke: Invoke, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the bare "--verify needs llama-server": the search that failed, and how to install one."""
    monkeypatch.setenv("LLAMALAUNCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    outcome = invoke("plan", "MODEL", "--verify")
    assert (outcome.code, outcome.stdout) == (1, "")
    assert outcome.stderr == ("error: llama-server not found (searched --llama-server, LLAMALAUNCH_LLAMA_SERVER, "
                              f"the config file, PATH and {tmp_path / 'cache' / 'llama.cpp'}) (run `llamalaunch "
                              "toolchain install` (or pass `--llama-server PATH` / set LLAMALAUNCH_LLAMA_SERVER))\n")


def test_plan_verify_refuses_what_if_devices(invoke: Invoke) -> None:
    """A load on this machine cannot check a plan for devices it does not have: it read as a wrong estimate."""
    outcome = invoke("plan", "MODEL", "--assume", "CUDA0=8GiB", "--verify")
    assert (outcome.code, outcome.stdout) == (2, "")
    assert outcome.stderr == ("error: --verify loads the plan on this machine's devices, but --assume describes "
                              "what-if ones (drop --assume to verify on the devices here, or drop --verify)\n")


def test_a_bad_option_variable_does_not_keep_status_stop_or_demo_from_running(invoke: Invoke,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """LLAMALAUNCH_CTX=abc in the shell is plan's and serve's problem: `status` of a running server still works."""
    monkeypatch.setenv("LLAMALAUNCH_CTX", "abc")
    status = invoke("status", "--once")
    assert (status.code, status.stdout) == (3, "")  # not running, as an LSB status action says
    assert status.stderr.startswith("error: no server has run here"), status
    stop = invoke("stop")  # nor stopping one; and stop has no --url to suggest
    assert (stop.code, stop.stdout) == (3, "")
    assert stop.stderr.startswith("error: no server has run here") and "--url" not in stop.stderr, stop
    plan = invoke(*PLAN)
    assert (plan.code, plan.stdout) == (2, "")
    assert plan.stderr.startswith("error: environment variable LLAMALAUNCH_CTX: ctx = 'abc' is not allowed"), plan


# --- the real entry point --------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "llamalaunch", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.llama
@pytest.mark.parametrize("case", ["not gguf", "ctx 1e99", "unknown option", "np not a number", "serve port 70000",
                                  "serve api key on argv"])
def test_the_real_command_line(case: str, files: dict[str, Path], llama_bin_dir: Path, home: Path) -> None:
    """Narrow pipes (80 columns): long messages still come out as one line, not wrapped or boxed."""
    args, words = BAD_INPUT[case]
    argv = [str(files[arg]) if arg in files else arg.replace("LLAMA_SERVER", str(llama_bin_dir / "llama-server"))
            for arg in args]
    done = run_cli(*argv)
    assert_one_error_line(Outcome(done.returncode, done.stdout, done.stderr), 2, *words)
    assert_nothing_written(home)


def test_the_real_command_line_without_a_binary(demo_model: Path, tmp_path: Path, home: Path) -> None:
    done = run_cli("serve", str(demo_model), "--llama-server", str(tmp_path / "llama-server"), "--no-tui")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "llamalaunch toolchain install" in done.stderr
    assert_nothing_written(home)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [("plan", "--assume", "CUDA0=8GiB"), ("plan", "--assume", "CUDA0=8GiB", "--json"),
                                  ("--help",)])
def test_output_to_a_full_disk_is_one_line_not_a_traceback(demo_model: Path, args: tuple[str, ...]) -> None:
    argv = [*args[:1], str(demo_model), *args[1:]] if args[0] == "plan" else list(args)
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "llamalaunch", *argv], cwd=REPO_ROOT, text=True, stdout=full,
                              stderr=subprocess.PIPE, timeout=60, stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stderr) == (1, "error: cannot write: No space left on device (free some space "
                                                 "there, or send the output elsewhere)\n")
