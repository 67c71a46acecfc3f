"""systemd units: pure rendering, the `systemd` command (print / --install), and systemd's own judges:
`systemd-analyze verify` must pass and `systemd-analyze security` exposure is recorded and bounded."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from llamalaunch import cli_ops
from llamalaunch.cli import app as cli_app
from llamalaunch.launch.systemd import (
    SERVER_UNIT,
    WORKER_UNIT,
    UnitOptions,
    exec_line,
    quote_word,
    render_server,
    render_worker,
    unit_dir,
)
from tests.synthetic import write_preset

# Measured with systemd 252 (Debian 12), `systemd-analyze security --offline=true`: system units 1.7,
# the same as a user unit (no device ACL or capability bounding there) 4.4. 10 is "UNSAFE".
MAX_SYSTEM_EXPOSURE = 2.0
MAX_USER_EXPOSURE = 5.0


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Something executable where ggml-rpc-server would be: the unit pins its path."""
    path = tmp_path_factory.mktemp("bin") / "ggml-rpc-server"
    path.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def app(rpc_server: str) -> Iterator[typer.Typer]:
    cli_ops.register(cli_app)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMALAUNCH_RPC_SERVER", rpc_server)
        yield cli_app


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    """systemd-analyze, from Debian's systemd package when the machine lacks it."""
    found = shutil.which("systemd-analyze")
    if found is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "systemd"],
                       capture_output=True, timeout=300, check=False)
        found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing and `apt-get install -y systemd` could not install it")
    return found


def options(**changes: Any) -> UnitOptions:
    base: dict[str, Any] = {"launcher": (sys.executable, "-m", "llamalaunch"),
                            "args": ("serve", "--ctx", "16k"), "run_as": "llamalaunch",
                            "environment": (("PYTHONUNBUFFERED", "1"),),
                            "read_write_paths": ("/var/cache/llamalaunch",), "working_directory": "/srv"}
    return UnitOptions(**{**base, **changes})


def directives(unit_text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit_text.splitlines():
        if "=" in line and not line.startswith("#"):
            name, _sep, value = line.partition("=")
            found.setdefault(name, []).append(value)
    return found


def invoke(app: typer.Typer, args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, args, env={"COLUMNS": "200", **(env or {})}, catch_exceptions=False)


def other_lines(stderr: str) -> str:
    """stderr less the notes on this interpreter and the fixtures' binaries, which a checkout and pytest's folders
    under /tmp (CI's) get on every unit."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not line.startswith(("note: the Python that runs llamalaunch", "note: LLAMALAUNCH_RPC_SERVER ",
                                           "note: LLAMALAUNCH_LLAMA_SERVER ")))


def test_a_binary_from_the_environment_under_tmp_gets_the_note_a_flag_gets(app: typer.Typer,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """LLAMALAUNCH_LLAMA_SERVER=/tmp/... was pinned next to PrivateTmp=yes without a word; --llama-server got one."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp itself, whatever TMPDIR says
    server = folder / "llama-server"
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    monkeypatch.setenv("LLAMALAUNCH_LLAMA_SERVER", str(server))
    result = invoke(app, ["systemd", "server", "--demo"])
    shutil.rmtree(folder)
    assert f"note: LLAMALAUNCH_LLAMA_SERVER {server} is under /tmp, which the unit cannot see (PrivateTmp=yes): " \
        "move it elsewhere" in result.stderr.splitlines(), result.stderr


# --- rendering ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("word", "written"), [
    ("--ctx", "--ctx"), ("16k", "16k"), ("/models/a b.gguf", '"/models/a b.gguf"'), ("50%", "50%%"),
    ("$HOME", "$$HOME"), ('say "hi"', '"say \\"hi\\""'), ("", '""'), (";", '";"'), ("%i", "%i"),
])
def test_exec_start_words_are_escaped_for_systemd(word: str, written: str) -> None:
    assert quote_word(word) == written


def test_server_unit_speaks_notify_restarts_on_failure_and_keeps_gpus() -> None:
    unit = render_server(options(environment=(("PYTHONUNBUFFERED", "1"), ("LLAMALAUNCH_CTX", "16k"))))
    assert unit.name == SERVER_UNIT
    found = directives(unit.content)
    assert found["Type"] == ["notify"] and found["NotifyAccess"] == ["main"]
    assert found["Restart"] == ["on-failure"] and found["SuccessExitStatus"] == ["130 143"]
    assert found["ExecStart"] == [exec_line((sys.executable, "-m", "llamalaunch", "serve", "--ctx", "16k"))]
    assert found["Environment"] == ['"PYTHONUNBUFFERED=1"', '"LLAMALAUNCH_CTX=16k"']
    assert found["StandardOutput"] == ["journal"] and found["User"] == ["llamalaunch"]
    for name, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                        ("ProtectHome", "read-only")]:
        assert found[name] == [value]
    assert found["ReadWritePaths"] == ["-/var/cache/llamalaunch"]
    assert "char-nvidia-frontend rw" in found["DeviceAllow"] and "char-nvidia-uvm rw" in found["DeviceAllow"]
    assert "PrivateDevices" not in found and "MemoryDenyWriteExecute" not in found
    assert found["WantedBy"] == ["multi-user.target"] and found["StateDirectory"] == ["llamalaunch"]


def test_user_unit_leaves_out_what_a_user_manager_cannot_do() -> None:
    found = directives(render_server(options(user_unit=True, run_as=None)).content)
    for name in ("User", "DeviceAllow", "DevicePolicy", "CapabilityBoundingSet", "StateDirectory"):
        assert name not in found
    assert found["WantedBy"] == ["default.target"] and found["ProtectSystem"] == ["strict"]
    assert "After" not in found  # network-online.target is the system manager's


def test_worker_template_takes_the_gpu_from_the_instance() -> None:
    unit = render_worker(options(args=("worker", "--gpus", "%i", "--port-base", "50100"), port_base=50100))
    assert unit.name == WORKER_UNIT
    assert directives(unit.content)["ExecStart"][0].endswith("worker --gpus %i --port-base 50100")
    assert "port 50100 + N" in unit.content and "SyslogIdentifier=llamalaunch-worker-%i" in unit.content
    with pytest.raises(ValueError, match="%i"):
        render_worker(options(args=("worker",)))


# --- the command -------------------------------------------------------------------------------------------


def test_systemd_server_prints_the_unit_with_the_same_options(app: typer.Typer) -> None:
    result = invoke(app, ["systemd", "server", "--demo", "--ctx", "16k", "--rpc", "10.0.0.5:50052", "--", "--metrics",
                          "--alias", "my model"])
    assert result.exit_code == 0, result.output
    exec_start = directives(result.stdout)["ExecStart"][0]
    assert exec_start.endswith('serve --demo --ctx 16k --rpc 10.0.0.5:50052 -- --metrics --alias "my model"')
    assert exec_start.startswith(f"{sys.executable} -m llamalaunch ")


def test_systemd_server_runs_with_a_profile(app: typer.Typer, tmp_path: Path) -> None:
    profile = tmp_path / "server.toml"
    profile.write_text('demo = true\nctx = "16k"\nllama_server = "/opt/llama.cpp/bin/llama-server"\n', encoding="utf-8")
    result = invoke(app, ["systemd", "server", "--config", str(profile), "--name", "big"],
                    env={"LLAMALAUNCH_PARALLEL": "2"})
    assert result.exit_code == 0, result.output
    found = directives(result.stdout)
    assert found["ExecStart"][0].endswith(f"-m llamalaunch --config {profile} serve --name big")
    # The environment's options are options too; the profile's llama_server is not overridden by a pin.
    assert '"LLAMALAUNCH_PARALLEL=2"' in found["Environment"]
    assert not any("LLAMALAUNCH_LLAMA_SERVER" in line for line in found["Environment"])


@pytest.mark.parametrize(("args", "message"), [
    (["server", "--ctxx", "16k"], "serve options for the unit: No such option: --ctxx"),
    (["worker", "--gpus", "0"], "--gpus is the unit's instance name"),
    (["worker", "--port-base", "many"], "worker options for the unit"),
    (["daemon"], "unit kind 'daemon' is not known"),
    (["server", "--user", "--run-as", "bob"], "--run-as is for system units"),
])
def test_systemd_refuses_bad_options_now_not_at_boot(app: typer.Typer, args: list[str], message: str) -> None:
    result = invoke(app, ["systemd", *args])
    assert result.exit_code == 2 and message in result.stderr, result.output


@pytest.mark.parametrize(("args", "message"), [
    (["server", "--demo", "--ctx", "0"], "context '0' is out of range (give a positive count up to 1024m)"),
    (["server", "--demo", "-np", "0"], "-np/--parallel 0 is out of range (give a value from 1 to 256)"),
    (["server", "--demo", "--port", "70000"], "--port 70000 is out of range (give a value from 0 to 65535)"),
    (["server", "--demo", "--assume", "CUDA0=lots"],
     "--assume CUDA0 free size 'lots' is not a size (write it like 6GiB, 6144MiB, 1.5G or 512M)"),
    (["server", "--demo", "--", "-ngl", "3"],
     "-ngl after -- would contradict the plan (use llamalaunch's own options (-ngl before --) or add --force)"),
    (["server", "--demo", "--", "-ot", "exps=CPU", "-ts", "3,1"],
     "-ot, -ts after -- would contradict the plan (use llamalaunch's own options (--cpu-experts N; --ctx, -dev, "
     "--budget ...) or add --force)"),
    (["server", "--demo", "--", "-nkvo", "-sm", "row", "--main-gpu=1"],
     "-nkvo, -sm, --main-gpu after -- would contradict the plan (use llamalaunch's own options (none for the KV "
     "cache and the split: the plan assumes llama.cpp's defaults) or add --force)"),
    (["server", "--demo", "--", "--no-host"],
     "--no-host after -- would contradict the plan (use llamalaunch's own options (--host-weights auto, pinned, mapped "
     "or repacked) or add --force)"),
    (["worker", "--port-base", "0"], "--port-base 0 is out of range (give a value from 1 to 65535)"),
    (["server", "--demo", "--port", "18081", "--metrics-port", "18081"],
     "--metrics-port 18081 is serve's --port too (give /metrics a port of its own)"),
    (["worker", "--port-base", "51052", "--metrics-port", "51052"],
     "--metrics-port 51052 is a worker's port (--port-base) too (give /metrics a port of its own)"),
    (["worker", "--host", "myhost"], "--host 'myhost' is not an IPv4 address (ggml-rpc-server binds an IPv4 "
                                     "address: 127.0.0.1, a LAN address, or 0.0.0.0)"),
    (["server", "--demo", "--name", "../x"], "run name '../x' is not usable as a file name (use letters, digits, "
                                             "- and _)"),
])
def test_systemd_refuses_values_serve_or_worker_would_refuse_at_boot(app: typer.Typer, args: list[str],
                                                                     message: str) -> None:
    """A unit that could only fail in the journal is not written: the command's own checks run now."""
    result = invoke(app, ["systemd", *args])
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"error: {message}\n")


def test_a_damaged_model_is_refused_now_not_at_boot(app: typer.Typer, tmp_path: Path) -> None:
    """serve reads the model's header first thing: a unit for a damaged file is not written."""
    whole = write_preset(tmp_path / "whole.gguf", "tiny-qwen3moe").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:1000])
    result = invoke(app, ["systemd", "server", str(cut)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {cut}: truncated header") and result.stderr.count("\n") == 1


def test_a_python_under_tmp_is_named_the_unit_cannot_see(app: typer.Typer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A venv under /tmp: ExecStart's interpreter is hidden by the unit's private /tmp; said now, not at boot."""
    monkeypatch.setattr(sys, "executable", "/tmp/clone/.venv/bin/python")
    result = invoke(app, ["systemd", "server", "--user", "--demo"])
    assert result.exit_code == 0, result.output
    assert directives(result.stdout)["ExecStart"][0].startswith("/tmp/clone/.venv/bin/python -m llamalaunch ")
    assert "note: the Python that runs llamalaunch /tmp/clone/.venv/bin/python is under /tmp, which the unit " \
        "cannot see (PrivateTmp=yes): move it elsewhere\n" in result.stderr


def test_systemd_unit_gets_absolute_paths_that_exist(app: typer.Typer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit starts at boot from its own folder and /tmp: every path is absolute and checked now."""
    folder = Path(os.environ["LLAMALAUNCH_HOME"]) / "work"  # under pytest's /tmp: the note says so
    folder.mkdir()
    write_preset(folder / "m.gguf", "tiny-qwen3moe")  # its header is read now, as serve reads it at boot
    for name in ("k", "i"):
        (folder / name).write_text("x\n")
    monkeypatch.chdir(folder)
    result = invoke(app, ["systemd", "server", "--user", "m.gguf", "--api-key-file", "k", "--mmproj=i",
                          "--llama-server", "llama-server", "--", "--alias", "a.gguf"])
    assert result.exit_code == 0, result.output
    assert directives(result.stdout)["ExecStart"][0].endswith(
        f"serve {folder}/m.gguf --api-key-file {folder}/k --mmproj={folder}/i --llama-server llama-server "
        "-- --alias a.gguf")
    assert f"note: --api-key-file {folder}/k is under /tmp, which the unit cannot see (PrivateTmp=yes): move it " \
        "elsewhere\n" in result.stderr
    missing = invoke(app, ["systemd", "server", "--user", "m.gguf", "--mmproj", "nope.gguf"])
    assert (missing.exit_code, missing.stdout) == (2, "")
    assert missing.stderr == (f"error: --mmproj nope.gguf ({folder}/nope.gguf) does not exist (give the unit a "
                              "path that exists; a relative one is taken from this folder)\n")
    profile = folder / "p.toml"
    profile.write_text('model = "m.gguf"\napi_key_file = "nokey"\n', encoding="utf-8")
    in_profile = invoke(app, ["systemd", "server", "--user", "--config", "p.toml"])
    assert (in_profile.exit_code, in_profile.stdout) == (2, "")
    assert in_profile.stderr.startswith(f"error: {profile}: api_key_file = {folder}/nokey does not exist (")


def test_systemd_server_needs_a_model_or_demo(app: typer.Typer) -> None:
    result = invoke(app, ["systemd", "server", "--ctx", "16k"])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == "error: no model given (pass MODEL.gguf, or --demo for the bundled SmolLM2-135M)\n"


def test_systemd_worker_pins_the_rpc_server(app: typer.Typer, rpc_server: str) -> None:
    result = invoke(app, ["systemd", "worker", "--port-base", "50100", "--threads", "4"])
    assert result.exit_code == 0, result.output
    found = directives(result.stdout)
    assert found["ExecStart"][0].endswith("worker --gpus %i --port-base 50100 --threads 4")
    assert f'"LLAMALAUNCH_RPC_SERVER={rpc_server}"' in found["Environment"]


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_install_writes_the_unit_and_says_what_to_run(app: typer.Typer, user: bool) -> None:
    result = invoke(app, ["systemd", "worker", "--install", *(["--user"] if user else [])])
    assert result.exit_code == 0, result.output
    path = unit_dir(user) / WORKER_UNIT
    assert path.is_file() and path.stat().st_mode & 0o777 == 0o644
    assert f"wrote {path}" in result.stdout
    systemctl = "systemctl --user" if user else "systemctl"
    assert f"{systemctl} link {path}" in result.stdout  # not systemd's own folder (LLAMALAUNCH_HOME)
    assert re.search(rf"{systemctl} enable --now llamalaunch-worker@(cpu|0)\.service", result.stdout)
    assert ("loginctl enable-linger" in result.stdout) == user


def test_a_run_as_user_this_machine_lacks_is_said_now(app: typer.Typer) -> None:
    """A note, not an error: the unit may be written before the account (systemd would fail with 217/USER)."""
    result = invoke(app, ["systemd", "server", "--demo", "--run-as", "no-such-user-h20"])
    assert result.exit_code == 0, result.output
    assert "User=no-such-user-h20" in result.stdout
    assert other_lines(result.stderr) == ("note: --run-as no-such-user-h20: no such user on this machine; the unit "
                                          "will not start until it exists (create it: useradd --system "
                                          "--create-home no-such-user-h20)\n")
    known = invoke(app, ["systemd", "server", "--demo", "--run-as", "root"])
    assert (known.exit_code, other_lines(known.stderr)) == (0, "")


def test_install_into_a_file_says_how_to_fix_it(app: typer.Typer, tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("mine\n")
    result = invoke(app, ["systemd", "worker", "--install", "--unit-dir", str(taken)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert other_lines(result.stderr) == (f"error: cannot write units to {taken}: File exists (give --unit-dir a "
                                          "folder you can write to, or leave it out for systemd's)\n")
    assert taken.read_text() == "mine\n"


# --- systemd's verdict -------------------------------------------------------------------------------------


def _render_all(app: typer.Typer, folder: Path) -> dict[str, Path]:
    """The units `llamalaunch systemd` writes, one folder per manager, worker also as instance @0."""
    written: dict[str, Path] = {}
    for kind, user in [("server", False), ("worker", False), ("server", True), ("worker", True)]:
        target = folder / ("user" if user else "system")
        args = ["systemd", kind, "--install", "--unit-dir", str(target)]
        args += ["--user"] if user else ["--run-as", "llamalaunch"]
        args += ["--demo", "--ctx", "16k", "--", "--metrics"] if kind == "server" else ["--host", "127.0.0.1"]
        result = invoke(app, args)
        assert result.exit_code == 0, result.output
        name = SERVER_UNIT if kind == "server" else WORKER_UNIT
        written[f"{kind}-{'user' if user else 'system'}"] = target / name
    for manager in ("system", "user"):
        template = folder / manager / WORKER_UNIT
        instance = template.with_name(WORKER_UNIT.replace("@.", "@0."))
        instance.write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
        written[f"worker@0-{manager}"] = instance
    return written


def _analyze(systemd_analyze: str, unit: Path, *args: str,
             tmp_path: Path) -> subprocess.CompletedProcess[str]:
    user = ["--user"] if unit.parent.name == "user" else []
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(runtime)}  # a user manager needs a runtime dir
    return subprocess.run([systemd_analyze, *user, *args, str(unit)], capture_output=True, text=True,
                          timeout=60, check=False, env=env)


def test_units_pass_systemd_analyze_verify(app: typer.Typer, systemd_analyze: str, tmp_path: Path) -> None:
    for name, unit in _render_all(app, tmp_path).items():
        done = _analyze(systemd_analyze, unit, "verify", tmp_path=tmp_path)
        assert done.returncode == 0 and not done.stderr.strip(), f"{name}: {done.stdout}{done.stderr}"


def test_exposure_recorded_by_systemd_analyze_security(app: typer.Typer, systemd_analyze: str,
                                                       tmp_path: Path) -> None:
    exposures: dict[str, float] = {}
    for name, unit in _render_all(app, tmp_path).items():
        if name.startswith("worker-"):
            continue  # a template has no security verdict; its instance @0 stands for it
        done = _analyze(systemd_analyze, unit, "security", "--offline=true", tmp_path=tmp_path)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
        assert match, f"{name}: {done.stdout}{done.stderr}"
        exposures[name] = float(match.group(1))
    print("systemd-analyze security exposure:", exposures)
    for name, exposure in exposures.items():
        limit = MAX_USER_EXPOSURE if name.endswith("-user") else MAX_SYSTEM_EXPOSURE
        assert exposure <= limit, f"{name}: exposure {exposure} > {limit}"


def test_an_alias_variable_reaches_the_unit_as_config_show_says(app: typer.Typer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """LLAMALAUNCH_CTX_SIZE=32k: `config show` said ctx 32k from env, and the unit left it out (it ran with max)."""
    monkeypatch.setenv("LLAMALAUNCH_CTX_SIZE", "32k")
    result = invoke(app, ["systemd", "server", "--demo"])
    assert result.exit_code == 0, result.output
    assert '"LLAMALAUNCH_CTX_SIZE=32k"' in result.stdout


def test_metrics_on_the_same_port_of_another_address_is_allowed(app: typer.Typer) -> None:
    """--host 10.0.0.5 --port 8080 beside --metrics-host 127.0.0.1 --metrics-port 8080 binds fine."""
    result = invoke(app, ["systemd", "server", "--demo", "--host", "10.0.0.5", "--port", "8080", "--metrics-host",
                          "127.0.0.1", "--metrics-port", "8080"])
    assert result.exit_code == 0, result.output
