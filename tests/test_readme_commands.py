"""The README's first command as a user runs it: set-up, then the demo model served until Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.llama
def test_run_demo_serves_until_ctrl_c(tmp_path: Path, demo_model: Path, llama_bin_dir: Path) -> None:
    port = free_port()
    output = tmp_path / "run-demo.txt"
    with open(output, "wb") as sink:
        process = subprocess.Popen([str(ROOT / "scripts" / "run-demo"), "--no-tui", "--port", str(port)],
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while " ready: " not in output.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert " ready: " in output.read_text(), output.read_text()[-2000:]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/completion",
                                         data=json.dumps({"prompt": "Hello", "n_predict": 4}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
        children = [p for p in psutil.Process(process.pid).children(recursive=True) if "llama-server" in p.name()]
        assert children
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(30) == 130
        assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
