"""Start-up cost: what `plan --json` imports and does before it answers (bench/bench_startup.py times it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import psutil
import pytest
import typer
from typer._coercion import build_runtime_param, resolve_type_descriptor
from typer.models import OptionInfo
from typer.testing import CliRunner

from llamalaunch.cli import OneLineUsageErrors, app, only_the_invoked
from llamalaunch.cli_values import _NOT_PLAIN, plain_value
from llamalaunch.model import gguf_header
from llamalaunch.probe.host import linux_memory, probe_host
from llamalaunch.toolchain import demo, discover
from tests.serve_support import ServeRun
from tests.synthetic import write_preset
from tests.test_help import PATHS

REPO_ROOT = Path(__file__).resolve().parent.parent
# Packages `plan --json` for what-if devices never needs: the rich tables, psutil and NVML (it probes
# nothing but host RAM), Prometheus (serve --metrics-port), pydantic (typer's option conversion), gguf/numpy.
NOT_ON_THE_PLAN_PATH = ("rich", "psutil", "pynvml", "prometheus_client", "pydantic", "pydantic_core", "numpy",
                        "gguf", "wsgiref", "hashlib", "zipfile")
IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.MULTILINE)


def imported_by(argv: list[str]) -> tuple[set[str], str]:
    """Top-level packages a fresh `python -X importtime -m llamalaunch ARGV` imports, and its stdout."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "llamalaunch", *argv], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return {name.split(".")[0] for name in IMPORTED.findall(done.stderr)}, done.stdout


def modules_imported_by(argv: list[str], drop_env: tuple[str, ...] = ()) -> tuple[set[str], str]:
    """Every module a fresh `python -m llamalaunch ARGV` has imported when it exits, and its stdout
    (sys.modules: -X importtime does not see importlib.import_module)."""
    env = {key: value for key, value in os.environ.items()
           if key != "PYTHONDONTWRITEBYTECODE" and key not in drop_env}
    at_exit = ("import atexit, runpy, sys; atexit.register(lambda: print(*sys.modules, file=sys.stderr)); "
               "runpy.run_module('llamalaunch', run_name='__main__', alter_sys=True)")
    done = subprocess.run([sys.executable, "-c", at_exit, *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stderr.split()), done.stdout


def test_plan_json_for_what_if_devices_imports_none_of_the_heavy_packages(tmp_path: Path) -> None:
    model = write_preset(tmp_path / "tiny.gguf", "tiny-llama")
    packages, stdout = imported_by(["plan", str(model), "--assume", "CUDA0=8GiB", "--json"])
    assert json.loads(stdout)["schema"] == 1
    assert sorted(packages.intersection(NOT_ON_THE_PLAN_PATH)) == []


def test_plan_json_for_what_if_devices_imports_what_it_uses(tmp_path: Path) -> None:
    """One graph family (the model's), no NVML or RPC protocol (nothing is probed), nothing of launch/ (no
    device to calibrate: the default --calibrate on, as users run it), no TOML parser (no profile)."""
    model = write_preset(tmp_path / "tiny.gguf", "tiny-llama")
    modules, stdout = modules_imported_by(["plan", str(model), "--assume", "CUDA0=8GiB", "--json"],
                                          drop_env=("LLAMALAUNCH_CALIBRATE",))
    assert json.loads(stdout)["schema"] == 1
    graphs = "llamalaunch.model.ggml.graphs."
    assert sorted(name for name in modules if name.startswith(graphs)) == [f"{graphs}base", f"{graphs}llama"]
    unused = {"llamalaunch.probe.nvml", "llamalaunch.probe.gpus", "llamalaunch.probe.rpc", "llamalaunch.launch",
              "tomllib", "socket"}
    assert sorted(modules & unused) == []


def test_every_graph_family_is_found_where_the_table_says() -> None:
    from llamalaunch.model.ggml.graphs import BUILDERS, Builder

    assert all(issubclass(BUILDERS[arch], Builder) for arch in BUILDERS)  # type: ignore[arg-type]
    assert "llama" in BUILDERS and "nosuch" not in BUILDERS and BUILDERS.get("nosuch") is None


def test_only_the_invoked_command_is_built() -> None:
    def built(args: list[str]) -> list[str]:
        return sorted(typer.main.get_command(only_the_invoked(app, args)).commands)  # type: ignore[attr-defined]

    everything = built([])
    assert built(["--config", "my.toml", "plan", "m.gguf", "--json"]) == ["plan"]
    assert built(["--config=my.toml", "toolchain", "install"]) == ["toolchain"]
    assert built(["status", "--help"]) == ["status"]
    # help and --version, an unknown or misspelt name, and systemd (it parses serve's options): everything
    for args in (["--help"], ["--version"], ["plna"], ["systemd", "server", "--", "--ctx", "4k"], ["--", "x"]):
        assert built(args) == everything
    assert len(everything) > 5


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "llamalaunch")
def test_a_command_built_alone_says_what_the_whole_app_says(path: tuple[str, ...]) -> None:
    runner = CliRunner()
    for args in ([*path, "--help"], [*path, "--no-such-option"]):
        whole = runner.invoke(app, args, env={"COLUMNS": "120"}, prog_name="llamalaunch")
        alone = runner.invoke(only_the_invoked(app, args), args, env={"COLUMNS": "120"}, prog_name="llamalaunch")
        assert (alone.exit_code, alone.stdout, alone.stderr) == (whole.exit_code, whole.stdout, whole.stderr)


def test_options_given_as_numbers_need_no_pydantic_either(tmp_path: Path) -> None:
    model = write_preset(tmp_path / "tiny.gguf", "tiny-llama")
    packages, stdout = imported_by(["plan", str(model), "--assume", "CUDA0=8GiB", "-np", "2", "--ctx", "4096",
                                    "--reserve", "CUDA0=1GiB", "--json"])
    assert json.loads(stdout)["argv"][json.loads(stdout)["argv"].index("-np") + 1] == "2"
    assert sorted(packages.intersection({"pydantic", "pydantic_core"})) == []


@pytest.mark.parametrize("annotation, value", [
    (str, "16k"), (str, ""), (int, 4), (int, "4096"), (int, "-1"), (int, "0"), (float, 1.0), (float, 600),
    (float, "0.5"), (float, "30"), (list[str], ()), (list[str], ("CUDA0=8GiB", "CUDA1=6GiB")),
    (list[str], ["a"])])
def test_plain_values_are_what_typer_would_make(annotation: object, value: object) -> None:
    descriptor = resolve_type_descriptor(annotation, OptionInfo())  # type: ignore[arg-type]
    expected = build_runtime_param(descriptor).coerce(value, param=_Param(), ctx=None)  # type: ignore[arg-type]
    got = plain_value(annotation, value)
    assert (got, type(got)) == (expected, type(expected))


@pytest.mark.parametrize("annotation, value", [(int, "4k"), (int, "007"), (int, " 4"), (int, 4.0), (int, True),
                                               (float, "1e3"), (float, "inf"), (str, 5), (list[str], (1,))])
def test_anything_else_is_left_to_typer(annotation: object, value: object) -> None:
    assert plain_value(annotation, value) is _NOT_PLAIN


class _Param:
    multiple = False
    nargs = 1


def test_a_malformed_number_gets_typers_own_message(tmp_path: Path) -> None:
    from llamalaunch.cli import app

    model = write_preset(tmp_path / "tiny.gguf", "tiny-llama")
    result = CliRunner().invoke(app, ["plan", str(model), "--assume", "CUDA0=8GiB", "-np", "two", "--json"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: Invalid value for '-np' / '--parallel': ")


def test_host_memory_is_what_psutil_says() -> None:
    free, total = linux_memory() or (0, 0)
    memory = psutil.virtual_memory()
    assert total == memory.total
    assert abs(free - memory.available) < 256 * 2**20  # read a moment apart
    assert probe_host().cpu_count == psutil.cpu_count(logical=True)


def test_inspection_records_are_written_once_and_gone_binaries_dropped(
        llama_bin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMALAUNCH_CACHE", str(tmp_path / "cache"))
    records = tmp_path / "cache" / "inspected-binaries.json"
    gone = tmp_path / "gone"  # a build that is deleted later, as tests' stand-ins are
    gone.mkdir()
    (gone / "llama-server").symlink_to(llama_bin_dir / "llama-server")
    discover.find_toolchain(str(gone / "llama-server"), cache=tmp_path / "cache")
    shutil.rmtree(gone)
    discover._inspected.clear()
    discover.find_toolchain(str(llama_bin_dir), cache=tmp_path / "cache")
    written = records.stat().st_mtime_ns
    assert {record["path"] for record in json.loads(records.read_text()).values()} == {
        str(llama_bin_dir / name) for name in ("llama-server", "ggml-rpc-server", "llama-fit-params")}
    discover._inspected.clear()  # a new process: read from the file, not written again
    discover.find_toolchain(str(llama_bin_dir), cache=tmp_path / "cache")
    assert records.stat().st_mtime_ns == written


def test_the_demo_model_is_hashed_once_not_per_command(demo_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / demo_model.name).symlink_to(demo_model)
    hashed: list[Path] = []
    real_sha256 = demo.file_sha256
    monkeypatch.setattr(demo, "file_sha256", lambda path: hashed.append(path) or real_sha256(path))
    for _ in range(2):
        demo._verified.clear()  # as in a new process
        assert demo.demo_model_path(cache) == cache / "models" / demo_model.name
    assert len(hashed) == 1


def test_process_start_time_is_psutils_without_importing_it() -> None:
    from llamalaunch.launch.state import process_started_at

    for pid in (os.getpid(), os.getppid(), 1):
        assert process_started_at(pid) == pytest.approx(psutil.Process(pid).create_time(), abs=0.011)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert process_started_at(gone.pid) is None



def test_serve_without_a_terminal_imports_none_of_the_heavy_packages(serve: Callable[..., ServeRun],
                                                                      demo_model: Path) -> None:
    """systemd's serve: plain lines (no rich), no psutil, no Prometheus unless --metrics-port, no pydantic.
    pynvml is imported: serve looks at the local GPUs."""
    run = serve(demo_model, "--ctx", "1024", env={"PYTHONPROFILEIMPORTTIME": "1"})
    run.wait_ready(timeout_s=120)
    run.process.send_signal(signal.SIGINT)
    assert run.wait_exit() == 130
    packages = {name.split(".")[0] for name in IMPORTED.findall("\n".join(run.stderr))}
    assert "llamalaunch" in packages
    heavy = {"rich", "psutil", "prometheus_client", "pydantic", "pydantic_core", "numpy", "gguf"}
    assert sorted(packages.intersection(heavy)) == []


def test_a_vocabulary_walked_once_is_jumped_over_the_next_time(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMALAUNCH_CACHE", str(tmp_path / "cache"))
    path = write_preset(tmp_path / "m.gguf", "tiny-llama", n_vocab=6000)  # arrays past MAX_KEPT_ARRAY: walked
    first = gguf_header.read_header(path)
    records = json.loads((tmp_path / "cache" / "gguf-string-arrays.json").read_text())
    (ends,) = records.values()
    ((start, end),) = ends.items()  # the tokens array (scores and types are skipped by size)
    assert end > int(start)
    assert gguf_header.read_header(path) == first
    # A record that does not fit (the cache damaged) costs a second walk, never a wrong header.
    stamp = next(iter(records))
    (tmp_path / "cache" / "gguf-string-arrays.json").write_text(json.dumps({stamp: {k: int(k) + 8 for k in ends}}))
    assert gguf_header.read_header(path) == first


def test_bounds_choices_and_parsers_stay_typers_to_check() -> None:
    """An option with min/max, a Literal choice or a parser is converted by typer, as without cli_values."""
    app = typer.Typer(cls=OneLineUsageErrors)

    @app.command()
    def run(port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
            fa: Annotated[Literal["on", "off"], typer.Option()] = "on",
            size: Annotated[int, typer.Option(parser=lambda text: int(text) * 1024)] = 0) -> None:
        print(port, fa, size)

    @app.command()
    def other() -> None:  # two commands: a group, as llamalaunch's CLI
        pass

    runner = CliRunner()
    assert runner.invoke(app, ["run", "--port", "80", "--fa", "off", "--size", "2"]).stdout == "80 off 2048\n"
    for args, problem in ((["--port", "0"], "--port"), (["--fa", "maybe"], "--fa")):
        result = runner.invoke(app, ["run", *args])
        assert result.exit_code == 2 and result.stderr.startswith("error: Invalid value for ")
        assert problem in result.stderr
