"""`licensed serve` as a process: first start, and a clean stop on SIGTERM (systemd's stop)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from support.emulator import ROOT, free_port, healthy, wait_for


def test_first_start_then_sigterm_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data), "PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "licensed", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 30, "the server")
        assert sorted(p.name for p in data.iterdir()) == [
            "keys",
            "licensed.sqlite3",
            "licensed.sqlite3-shm",
            "licensed.sqlite3-wal",
            "plans.toml",
            "templates",
        ]
        assert [p.stat().st_mode & 0o777 for p in (data / "keys").iterdir()] == [0o600]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in proc.stderr.read().decode().splitlines()] if proc.stderr else []
    messages = [line["msg"] for line in lines]
    assert "listening" in messages and messages[-1] == "stopping"
