"""Real llama-server loads for benchmarks: start, wait for a real answer, fill the context, stop.

Shared by the capacity benchmarks (GPU with a ballast, CPU with RPC workers under prlimit).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

N_CTX = re.compile(r"llama_context: n_ctx\s+= (\d+)")
OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(port: int, path: str, payload: dict, timeout_s: float) -> tuple[int, dict | str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")
    except (OSError, ValueError) as error:
        return 0, str(error)


@dataclass
class Trial:
    """One load: did it get ready, did a prompt filling the context complete, what llama.cpp printed."""

    argv: list[str]
    ready: bool = False
    filled: bool = False
    load_s: float = 0.0
    n_ctx: int | None = None
    offloaded: int | None = None
    returncode: int | None = None
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ready and self.filled and self.returncode in (None, 0, -15, 143)


def varied_tokens(count: int, seed: int = 0) -> list[int]:
    """`count` token ids that vary along the prompt (within the first 512 of any vocabulary): a synthetic MoE
    model written with varied routing (tests/synthetic.py) spreads them over its experts as a real prompt
    spreads; one token repeated would use the same few experts all along."""
    return [100 + (i * 37 + seed * 101) % 400 for i in range(count)]


def timed_completions(port: int, prompt_tokens: int, gen_tokens: int, runs: int) -> tuple[list, list, str | None]:
    """`runs` requests of `prompt_tokens` (varied tokens, another sequence each, no prompt cache) +
    `gen_tokens` generated: llama-server's own generation and prompt tok/s of each, and why a request failed
    (None: none did)."""
    gen: list[float] = []
    prompt: list[float] = []
    for rep in range(runs):
        payload = {"prompt": varied_tokens(prompt_tokens, rep), "n_predict": gen_tokens, "ignore_eos": True,
                   "cache_prompt": False}
        status, body = post(port, "/completion", payload, 600)
        if status != 200 or not isinstance(body, dict):
            return gen, prompt, f"request {rep}: HTTP {status} {str(body)[:200]}"
        timings = body.get("timings", {})
        gen.append(timings.get("predicted_per_second", 0.0))
        prompt.append(timings.get("prompt_per_second", 0.0))
    return gen, prompt, None


def run_trial(server: Path, argv: list[str], fill_tokens: int | None, log_path: Path,
              ready_timeout_s: float = 300.0, fill_timeout_s: float = 600.0) -> Trial:
    """Start llama-server with `argv`, wait for a one-token completion, then send a prompt of
    `fill_tokens` tokens (the context filled: run-time allocations happen there), then stop it."""
    port = free_port()
    trial = Trial(argv)
    started = time.monotonic()
    with open(log_path, "w+b") as log:
        process = subprocess.Popen([str(server), *argv, "--host", "127.0.0.1", "--port", str(port), "-lv", "5"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = started + ready_timeout_s
            while time.monotonic() < deadline and process.poll() is None:
                status, _ = post(port, "/completion", {"prompt": "Hi", "n_predict": 1}, 30)
                if status == 200:
                    trial.ready = True
                    break
                time.sleep(0.2)
            trial.load_s = time.monotonic() - started
            if trial.ready and fill_tokens:
                payload = {"prompt": varied_tokens(fill_tokens), "n_predict": 1, "cache_prompt": False}
                status, _ = post(port, "/completion", payload, fill_timeout_s)
                trial.filled = status == 200 and process.poll() is None
            elif trial.ready:
                trial.filled = True
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            trial.returncode = process.returncode
            log.seek(0)
            lines = log.read().decode("utf-8", "replace").splitlines()
    contexts = [int(m.group(1)) for line in lines if (m := N_CTX.search(line))]
    trial.n_ctx = contexts[-1] if contexts else None
    offloads = [int(m.group(1)) for line in lines if (m := OFFLOADED.search(line))]
    trial.offloaded = offloads[-1] if offloads else None
    trial.tail = [line for line in lines if " E " in line or "error" in line.lower()][-8:]
    return trial


def plan_cli(model: Path, server: Path, args: list[str]) -> tuple[dict, float]:
    """`llamalaunch plan MODEL --json ARGS` as a user runs it: the plan (or {"error": ...}) and its seconds."""
    import sys

    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "llamalaunch", "plan", str(model), "--json", "--llama-server",
                             str(server), *args], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": result.stderr.strip()}, elapsed
    return json.loads(result.stdout), elapsed


class Ballast:
    """Hold GPU memory so that about `leave_free_mib` stays free (bench/ballast.py in a child process)."""

    def __init__(self, leave_free_mib: int) -> None:
        import sys

        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ballast.py")),
                                         str(leave_free_mib)], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        self.free_mib = int(line.split()[-1]) if line.startswith("ballast ready") else None

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        time.sleep(1.0)


def largest_passing(check: callable[[int], bool], low: int, high: int, step: int) -> int:
    """Largest value in [low, high] (multiples of step) for which check passes; `low` is known to pass.
    `high` need not fail: the search widens past it while it passes."""
    while check(high):
        low, high = high, high + max(high - low, step) * 2
    while high - low > step:
        middle = (low + high) // 2 // step * step
        if middle <= low:
            break
        if check(middle):
            low = middle
        else:
            high = middle
    return low


# --- shared by the CPU benchmarks (plan speed, launch overhead, CPU capacity) --------------------------


def default_bin_dir() -> Path:
    """LLAMALAUNCH_BIN_DIR, else llamalaunch's own CPU build cache (as the tests' llama_bin_dir fixture)."""
    import os

    from llamalaunch.api import cached_bin_dir

    given = os.environ.get("LLAMALAUNCH_BIN_DIR")
    if given:
        return Path(given)
    cache = Path(os.environ.get("LLAMALAUNCH_CACHE", Path.home() / ".cache" / "llamalaunch"))
    return cached_bin_dir(cache)


def llama_build(bin_dir: Path) -> dict:
    """What built the binaries: build.json next to bin/ (llamalaunch's cache) and `llama-server --version`."""
    info: dict = {"bin_dir": str(bin_dir)}
    build_json = bin_dir.parent / "build.json"
    if build_json.exists():
        recorded = json.loads(build_json.read_text())
        info.update({key: recorded.get(key) for key in ("source", "backend", "cmake_flags")})
    result = subprocess.run([str(bin_dir / "llama-server"), "--version"], check=False, capture_output=True,
                            text=True, timeout=60)
    info["version"] = " ".join(line.strip() for line in (result.stdout + result.stderr).splitlines()
                               if line.startswith(("version", "built with")))
    return info


def machine() -> dict:
    """CPU model, core count, RAM and load at the start of a run (other processes share these machines)."""
    import os

    import psutil

    from llamalaunch.api import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def median_s(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def stop_process(process: subprocess.Popen, timeout_s: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout_s`; the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def worker_baseline_vsz(bin_dir: Path) -> int:
    """Address space of an idle ggml-rpc-server (bytes): what a `prlimit --as` limit must add room to."""
    import psutil

    process = subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(free_port())],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        return int(psutil.Process(process.pid).memory_info().vms)
    finally:
        process.kill()
        process.wait()


@dataclass
class FitParamsRun:
    """One llama-fit-params call: wall seconds, what it printed (`-c N -ngl N [-ts ...]`), parsed."""

    seconds: float
    returncode: int
    stdout: str
    ctx: int | None = None
    n_gpu_layers: int | None = None
    fit_seconds: float | None = None  # its own "fitting params ... took N seconds" (with -lv 4)


FIT_TOOK = re.compile(r"fitting params to free memory took ([\d.]+) seconds")


def run_fit_params(bin_dir: Path, model: Path, args: list[str], timeout_s: float = 300.0) -> FitParamsRun:
    started = time.perf_counter()
    result = subprocess.run([str(bin_dir / "llama-fit-params"), "-m", str(model), *args], check=False,
                            capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    # stdout is one line without a newline; a log line may follow it on the same terminal line
    printed = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    run = FitParamsRun(seconds, result.returncode, printed)
    if (ctx := re.search(r"-c (\d+)", printed)) and (ngl := re.search(r"-ngl (-?\d+)", printed)):
        run.ctx, run.n_gpu_layers = int(ctx.group(1)), int(ngl.group(1))
    if took := FIT_TOOK.search(result.stderr):
        run.fit_seconds = float(took.group(1))
    return run


def write_results(out_dir: Path, stem: str, data: dict, table: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / f"{stem}.txt").write_text("\n".join(table) + "\n")
