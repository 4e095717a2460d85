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
            "account.secret",
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


def test_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """Under umask 022, an existing 0755 data dir becomes 0700, and the database, its WAL and
    shared memory, and a backup are 0600: signing keys and buyers' data are nobody else's."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data), "PORT": str(port)}

    def loose_umask() -> None:
        os.umask(0o022)

    proc = subprocess.Popen(
        [sys.executable, "-m", "licensed", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=loose_umask,
    )
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 30, "the server")
        backup = tmp_path / "copy.sqlite3"
        done = subprocess.run(
            [sys.executable, "-m", "licensed", "backup", str(backup)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=loose_umask,
        )
        assert done.returncode == 0, done.stderr
        modes = {
            path.name: path.stat().st_mode & 0o777
            for path in (data, data / "keys", *data.glob("licensed.sqlite3*"), backup)
        }
        assert modes == {
            "data": 0o700,
            "keys": 0o700,
            "licensed.sqlite3": 0o600,
            "licensed.sqlite3-wal": 0o600,
            "licensed.sqlite3-shm": 0o600,
            "copy.sqlite3": 0o600,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=15)
