"""TOML profiles: loading, checking, precedence (command line > env > profile > defaults), the shipped
examples planned with what-if devices through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from llamalaunch import cli_ops
from llamalaunch.cli import app as cli_app
from llamalaunch.config import default_map, environment_settings, load_profile, load_settings
from llamalaunch.errors import BadInputError
from llamalaunch.options import OPTIONS
from llamalaunch.paths import config_dir
from llamalaunch.units import GIB
from tests.synthetic import write_preset

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.toml"))
# Options that choose how a result is shown, not what runs: not storable.
NOT_STORABLE = {"as_json", "verify", "config", "cuda", "jobs", "sdist", "path_only", "kind", "user",
                "install_units", "unit_dir", "run_as", "env", "quiet", "force", "no_tui", "command",
                "recalibrate"}


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    cli_ops.register(cli_app)  # a no-op once cli.py registers the commands itself
    return cli_app


@pytest.fixture(scope="module")
def model_70b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sparse 70B-shaped GGUF (header only on disk): what the examples are written for."""
    return write_preset(tmp_path_factory.mktemp("models") / "llama-70b.gguf", "llama-70b")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preset(tmp_path_factory.mktemp("models") / "tiny.gguf", "tiny-llama")


def invoke(app: typer.Typer, args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, args, env=env, catch_exceptions=False)


def plan_json(app: typer.Typer, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    result = invoke(app, [*args, "--json"], env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def write(tmp_path: Path, text: str, name: str = "profile.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- the shipped examples ------------------------------------------------------------------------------


def test_three_examples_ship() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_every_example_loads(path: Path) -> None:
    profile = load_profile(path)
    assert profile.settings, path
    assert "model" in profile.settings


def test_seed_example_plans_across_two_gpus_and_two_workers(app: typer.Typer, model_70b: Path) -> None:
    profile = CONFIGS / "seed-24g-6g-two-workers.toml"
    plan = plan_json(app, ["--config", str(profile), "plan", str(model_70b),
                           "--assume", "RPC0=12GiB,RPC1=12GiB,CUDA0=24GiB,CUDA1=6GiB"])
    argv = plan["argv"]
    assert argv[argv.index("--rpc") + 1] == "192.168.1.20:50052,192.168.1.21:50052"
    assert argv[argv.index("-ctk") + 1] == "q8_0" and argv[argv.index("-fa") + 1] == "on"
    assert argv[argv.index("-np") + 1] == "1"
    assert plan["ctx"] == 32768 and plan["n_gpu_layers"] == 81
    layers = {device["name"]: device["n_layers"] for device in plan["devices"]}
    assert set(layers) == {"RPC0", "RPC1", "CUDA0", "CUDA1"} and all(layers.values())
    cuda0 = next(device for device in plan["devices"] if device["name"] == "CUDA0")
    assert cuda0["reserved_bytes"] == 1 * GIB  # reserve = { CUDA0 = "1GiB" }


def test_single_gpu_example_spills_to_the_cpu(app: typer.Typer, model_70b: Path) -> None:
    plan = plan_json(app, ["--config", str(CONFIGS / "single-gpu-cpu-spill.toml"), "plan", str(model_70b),
                           "--assume", "CUDA0=12GiB,CPU=64GiB"])
    assert 0 < plan["n_gpu_layers"] < 81  # the first layers stay on the CPU
    assert plan["ctx"] == 16384
    assert plan["devices"][0]["reserved_bytes"] == 512 * 1024 * 1024


def test_rpc_only_example_plans_on_the_workers_only(app: typer.Typer, model_70b: Path) -> None:
    plan = plan_json(app, ["--config", str(CONFIGS / "rpc-only-cluster.toml"), "plan", str(model_70b),
                           "--assume", "RPC0=24GiB,RPC1=24GiB,RPC2=24GiB,RPC3=24GiB"])
    argv = plan["argv"]
    assert argv[argv.index("--rpc") + 1].count(",") == 3
    assert plan["n_gpu_layers"] == 81 and plan["ctx"] >= 16384
    rpc3 = next(device for device in plan["devices"] if device["name"] == "RPC3")
    assert rpc3["planned_bytes"] <= 20 * GIB  # budget = { RPC3 = "20GiB" }


def test_rpc_only_example_configures_the_worker_command(app: typer.Typer) -> None:
    result = invoke(app, ["--config", str(CONFIGS / "rpc-only-cluster.toml"), "config", "show", "--for",
                          "worker", "--json"])
    values = {row["key"]: (row["value"], row["source"]) for row in json.loads(result.stdout)["options"]}
    assert values["worker.port_base"] == (50052, "config")
    assert values["worker.max_restarts"] == (10, "config")
    assert values["worker.host"] == ("127.0.0.1", "default")


# --- precedence ------------------------------------------------------------------------------------------


def test_command_line_beats_environment_beats_profile_beats_default(app: typer.Typer, tiny_model: Path,
                                                                     tmp_path: Path) -> None:
    profile = write(tmp_path, 'ctx = "2k"\nparallel = 2\nubatch = 256\n')
    common = ["--config", str(profile), "plan", str(tiny_model), "--assume", "CUDA0=8GiB"]

    def flag(plan: dict[str, Any], name: str) -> str:
        return str(plan["argv"][plan["argv"].index(name) + 1])

    from_profile = plan_json(app, common)
    assert (from_profile["ctx"], flag(from_profile, "-np"), flag(from_profile, "-ub")) == (2048, "2", "256")
    assert flag(from_profile, "-b") == "2048"  # nobody set it: the default
    from_env = plan_json(app, common, env={"LLAMALAUNCH_CTX": "1k", "LLAMALAUNCH_PARALLEL": "3"})
    assert (from_env["ctx"], flag(from_env, "-np"), flag(from_env, "-ub")) == (1024, "3", "256")
    from_line = plan_json(app, [*common, "--ctx", "512"], env={"LLAMALAUNCH_CTX": "1k"})
    assert from_line["ctx"] == 512


def test_flags_and_lists_come_from_the_profile(app: typer.Typer, tiny_model: Path, tmp_path: Path) -> None:
    profile = write(tmp_path, 'kv_unified = false\nexclude = ["CUDA1"]\nbudget = { CUDA0 = "1GiB" }\n')
    plan = plan_json(app, ["--config", str(profile), "plan", str(tiny_model),
                           "--assume", "CUDA0=8GiB,CUDA1=8GiB"])
    assert "-kvu" not in plan["argv"]
    cuda1 = next(device for device in plan["devices"] if device["name"] == "CUDA1")
    assert cuda1["excluded"]
    cuda0 = next(device for device in plan["devices"] if device["name"] == "CUDA0")
    assert cuda0["limit_bytes"] <= GIB


def test_config_show_names_each_source(app: typer.Typer, tmp_path: Path) -> None:
    profile = write(tmp_path, 'ctx = "16k"\nrpc = ["10.0.0.5:50052"]\nextra_args = ["--metrics"]\n')
    result = invoke(app, ["config", "show", "--config", str(profile), "--json"],
                    env={"LLAMALAUNCH_PARALLEL": "2"})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    rows = {row["key"]: row for row in shown["options"]}
    assert shown["profile"] == str(profile)
    ctx = rows["ctx"]
    assert (ctx["value"], ctx["source"], ctx["origin"]) == ("16k", "config", str(profile))
    assert (rows["parallel"]["value"], rows["parallel"]["source"]) == (2, "env")
    assert rows["parallel"]["origin"] == "LLAMALAUNCH_PARALLEL"
    assert (rows["batch"]["value"], rows["batch"]["source"]) == (2048, "default")
    assert rows["extra_args"]["value"] == ["--metrics"]


def test_config_show_table(app: typer.Typer, tmp_path: Path) -> None:
    profile = write(tmp_path, 'ctx = "16k"\n')
    result = invoke(app, ["--config", str(profile), "config", "show", "--for", "plan"],
                    env={"LLAMALAUNCH_MARGIN": "1GiB", "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:] if line.strip()}
    assert lines["ctx"] == ["16k", "config"]
    assert lines["margin"] == ["1GiB", "env", "LLAMALAUNCH_MARGIN"]
    assert lines["parallel"] == ["4", "default"]
    assert lines["gpu_layers"] == ["auto", "default"]  # what the default does, not "-"


def test_default_profile_in_the_config_folder_applies(tmp_path: Path) -> None:
    config_dir().mkdir(parents=True, exist_ok=True)
    (config_dir() / "config.toml").write_text('ctx = "8k"\n', encoding="utf-8")
    profile, settings = load_settings(None, environ={})
    assert profile is not None and settings["ctx"].value == "8k"
    named = write(tmp_path, 'ctx = "4k"\n')
    _profile, from_env = load_settings(None, environ={"LLAMALAUNCH_CONFIG": str(named)})
    assert from_env["ctx"].value == "4k"


def test_default_map_sends_each_key_to_its_commands(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, 'rpc = ["h:1"]\nhost = "0.0.0.0"\n'
                                           'llama_server = "bin/llama-server"\n'
                                           '[worker]\nhost = "10.0.0.5"\nport_base = 50100\n'))
    commands = default_map(profile.settings)
    assert commands["devices"] == {"rpc": ["h:1"]}
    assert commands["serve"]["host"] == "0.0.0.0" and commands["worker"]["host"] == "10.0.0.5"
    assert commands["worker"]["port_base"] == 50100
    # A relative path is relative to the profile's folder, not to wherever the command runs.
    assert commands["toolchain"]["llama_server"] == str(tmp_path / "bin" / "llama-server")


def test_profile_values_take_toml_and_command_line_shapes(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, 'ctx = 16384\nflash_attn = true\ndevice = ["RPC0", "CUDA0"]\n'
                                           'reserve = ["CUDA0=1GiB"]\nmodel = "m.gguf"\n'
                                           '[worker]\ngpus = [0, 2]\n'))
    values = {name: setting.value for name, setting in profile.settings.items()}
    assert values["ctx"] == "16384" and values["flash_attn"] == "on"
    assert values["device"] == "RPC0,CUDA0" and values["reserve"] == ["CUDA0=1GiB"]
    assert values["model"] == str(tmp_path / "m.gguf") and values["worker.gpus"] == "0,2"


# --- errors name the file, the key and what is allowed ---------------------------------------------------


@pytest.mark.parametrize(("text", "named", "allowed"), [
    ('ctx_mni = "16k"\n', "unknown key 'ctx_mni'", "did you mean 'ctx_min'"),
    ('zzz = "16k"\n', "unknown key 'zzz'", "allowed keys: model, demo, ctx"),
    ("ctx = true\n", "ctx = True is not allowed", 'a context like "16k", 16384 or "max"'),
    ('ctx = "lots"\n', "ctx = 'lots' is not allowed", 'a context like "16k"'),
    ('parallel = "many"\n', "parallel = 'many' is not allowed", "a slot count from 1 to 256"),
    ('parallel = "999"\n', "parallel = '999' is not allowed", "a slot count from 1 to 256"),
    ('gpu_layers = "most"\n', "gpu_layers = 'most' is not allowed", "a layer count, all or auto"),
    ("parallel = 0\n", "out of range", "a slot count from 1 to 256"),
    ('cache_type_k = "q3"\n', "cache_type_k = 'q3' is not allowed", "one of f32, f16"),
    ('rpc = ["nohost"]\n', "rpc = ['nohost'] is not allowed", "a list of workers"),
    ('reserve = { GPU0 = "1GiB" }\n', "reserve = {'GPU0': '1GiB'} is not allowed", "a table of device names"),
    ('margin = "lots"\n', "margin = 'lots' is not allowed", "a size like"),
    ('exclude = ["CUDA1", 3]\n', "exclude = ['CUDA1', 3] is not allowed", "a list of device names"),
    ('[reserve]\nCUDA0 = "1GiB"\nport = 8080\n', "the reserve table holds port", "move those keys above"),
    ('[worker]\nport = 1\n', "unknown key 'worker.port'", "did you mean 'port_base'"),
    ('[serve]\nport = 8080\n', "there is no [serve] table", "plan and serve read the keys at the top of the file"),
    ('[worker]\ngpus = "first"\n', "worker.gpus = 'first' is not allowed", "all, cpu, or GPU indices"),
    ('ctx = "16k\n', "is not valid TOML", "see the examples in configs/"),
])
def test_bad_profiles_are_refused_with_the_file_and_key(tmp_path: Path, text: str, named: str,
                                                        allowed: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(BadInputError) as caught:
        load_profile(path)
    assert str(path) in caught.value.message and named in caught.value.message
    assert allowed in str(caught.value)


@pytest.mark.parametrize(("text", "said"), [
    ('port = "8080"\n', 'port = "8080" is a string: write it without quotes (port = 8080)'),
    ('parallel = "4"\n', 'parallel = "4" is a string: write it without quotes (parallel = 4)'),
    ('load_timeout = "90"\n', 'load_timeout = "90" is a string: write it without quotes (load_timeout = 90)'),
    ('load_timeout = " 2.5"\n', 'load_timeout = " 2.5" is a string: write it without quotes (load_timeout = 2.5)'),
    ('kv_unified = "false"\n', 'kv_unified = "false" is a string: write it without quotes (kv_unified = false)'),
    ('[worker]\nport_base = "50100"\n',
     'worker.port_base = "50100" is a string: write it without quotes (port_base = 50100)'),
])
def test_a_quoted_number_or_flag_is_told_to_lose_its_quotes(app: typer.Typer, tmp_path: Path, text: str,
                                                             said: str) -> None:
    path = write(tmp_path, text)
    result = invoke(app, ["--config", str(path), "plan", "--demo", "--assume", "CUDA0=1GiB"])
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"error: {path}: {said}\n")


def test_missing_profile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        load_profile(tmp_path / "absent.toml")


def test_a_folder_given_as_profile_is_one_line_with_the_fix(app: typer.Typer, tmp_path: Path) -> None:
    result = invoke(app, ["--config", str(tmp_path), "plan", "--demo", "--assume", "CUDA0=1GiB"])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (f"error: cannot read config file {tmp_path}: Is a directory (give --config or "
                             "LLAMALAUNCH_CONFIG a TOML file (examples in configs/))\n")


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(BadInputError) as caught:
        environment_settings({"LLAMALAUNCH_PARALLEL": "many"})
    assert "LLAMALAUNCH_PARALLEL" in caught.value.message and "slot count" in str(caught.value)
    # Variables that are not options (LLAMALAUNCH_HOME, LLAMALAUNCH_CACHE) are left alone.
    assert environment_settings({"LLAMALAUNCH_HOME": "/x", "LLAMALAUNCH_CPU_SPILL": "yes"})["cpu_spill"].value



def test_misspelt_environment_variable_is_an_error_not_ignored(app: typer.Typer) -> None:
    result = invoke(app, ["plan", "--demo", "--assume", "CUDA0=1GiB"], env={"LLAMALAUNCH_CTXX": "8k"})
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == ("error: environment variable LLAMALAUNCH_CTXX is not a llamalaunch setting (did you "
                             "mean LLAMALAUNCH_CTX? Rename it, or unset LLAMALAUNCH_CTXX)\n")
    # near misses of the variables that are not options too; names far from every one stay allowed
    with pytest.raises(BadInputError, match="LLAMALAUNCH_LLAMA_SERVER"):
        environment_settings({"LLAMALAUNCH_LLAMA_SERVR": "/opt/llama-server"})
    assert environment_settings({"LLAMALAUNCH_SLOW": "1", "LLAMALAUNCH_HOME": "/x", "LLAMALAUNCH_CUDA": "1"}) == {}
    # every name shares the prefix: only what follows it counts (DEBUG is not a near miss of BUDGET)
    others = ("DEBUG", "URL", "TEST", "LOGS", "ROOT", "DATA", "CPU", "MODEL_DIR", "STATE_DIR", "CACHE_DIR")
    assert environment_settings({f"LLAMALAUNCH_{name}": "1" for name in others}) == {}
    with pytest.raises(BadInputError, match="did you mean LLAMALAUNCH_HOME"):
        environment_settings({"LLAMALAUNCH_HOMR": "/x"})


def test_environment_takes_the_profile_s_aliases() -> None:
    """A profile takes ctx_size = "2k"; LLAMALAUNCH_CTX_SIZE=2k was ignored without a word."""
    setting = environment_settings({"LLAMALAUNCH_CTX_SIZE": "2k"})["ctx"]
    assert (setting.value, setting.origin) == ("2k", "LLAMALAUNCH_CTX_SIZE")
    assert environment_settings({"LLAMALAUNCH_N_GPU_LAYERS": "3"})["gpu_layers"].value == "3"
    with pytest.raises(BadInputError, match="LLAMALAUNCH_CTX and LLAMALAUNCH_CTX_SIZE both set ctx"):
        environment_settings({"LLAMALAUNCH_CTX": "4k", "LLAMALAUNCH_CTX_SIZE": "2k"})

def test_cli_reports_a_bad_profile_in_one_line(app: typer.Typer, tmp_path: Path) -> None:
    path = write(tmp_path, "ctx_mni = 1\n")
    result = invoke(app, ["--config", str(path), "plan", "--assume", "CUDA0=1GiB"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "unknown key 'ctx_mni'" in result.stderr
    result = invoke(app, ["config", "show", "--config", str(path)])
    assert result.exit_code == 2 and "unknown key 'ctx_mni'" in result.stderr


# --- the key table matches the commands ------------------------------------------------------------------


def _params(app: typer.Typer, command: str) -> dict[str, Any]:
    root = typer.main.get_command(app)
    target = root.commands[command]  # type: ignore[attr-defined]
    return {param.name: param for param in target.params}


@pytest.mark.parametrize("command", ["plan", "serve", "devices", "toolchain", "worker"])
def test_keys_and_command_options_agree(app: typer.Typer, command: str) -> None:
    """Every key is an option of its commands, and every option that says what runs is a key."""
    params = _params(app, command)
    keys = {key.param for key in OPTIONS if command in key.commands}
    assert keys - {"extra_args"} <= set(params), keys - set(params)
    assert set(params) - NOT_STORABLE <= keys, set(params) - NOT_STORABLE - keys


def test_gpu_layers_take_llama_cpps_words_from_every_source(app: typer.Typer, tiny_model: Path,
                                                            tmp_path: Path) -> None:
    """-ngl all and auto as llama.cpp takes them: every slot, and as many as fit (the default)."""
    common = ["plan", str(tiny_model), "--assume", "CUDA0=8GiB"]
    default = plan_json(app, common)["n_gpu_layers"]
    assert plan_json(app, [*common, "-ngl", "2"])["n_gpu_layers"] == 2
    assert plan_json(app, [*common, "-ngl", "auto"])["n_gpu_layers"] == default
    assert plan_json(app, [*common, "-ngl", "ALL"])["n_gpu_layers"] == default == plan_json(app, [*common, "-ngl", "999"])["n_gpu_layers"]
    from_profile = plan_json(app, ["--config", str(write(tmp_path, "gpu_layers = 1\n")), *common])
    assert from_profile["n_gpu_layers"] == 1
    assert plan_json(app, common, env={"LLAMALAUNCH_GPU_LAYERS": "all"})["n_gpu_layers"] == default
