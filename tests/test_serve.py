"""`licensed serve` as a process: first start, and a clean stop on SIGTERM (systemd's stop)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.emulator import ROOT, free_port, healthy, wait_for
from support.server_proc import ServerProcess, make_data_dir

from licensed.errors import ConfigError
from licensed.server import cpus_to_keep


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


@pytest.mark.parametrize(
    ("setting", "allowed", "kept"),
    [
        ("one", {0, 1, 2, 3}, {3}),
        ("one", {2, 5}, {5}),
        ("one", {0}, {0}),
        ("all", {0, 1}, None),
        ("1", {0, 1}, {1}),
        ("0", {0, 1}, {0}),
    ],
)
def test_cpu_affinity_chooses_among_the_cpus_allowed(
    setting: str, allowed: set[int], kept: set[int] | None
) -> None:
    assert cpus_to_keep(setting, allowed) == kept


def test_a_cpu_the_process_may_not_use_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="CPU_AFFINITY: CPU 4 is not one this process may use \\(0, 1\\)"):
        cpus_to_keep("4", {0, 1})


def cpus_of_every_thread(pid: int) -> dict[int, str]:
    """Each thread of a process and the CPUs it may run on, as the kernel lists them."""
    cpus = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus[int(task.name)] = line.split(":", 1)[1].strip()
    return cpus


def cpu_list(cpus: set[int]) -> str:
    """A set of CPUs as the kernel writes it (``0-3``, ``1,3``)."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][-1] == cpu - 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (None, lambda allowed: {max(allowed)}),
        ("all", lambda allowed: allowed),
        ("first", lambda allowed: {min(allowed)}),
    ],
    ids=["default", "all", "a-number"],
)
def test_every_thread_of_the_server_keeps_to_the_cpus_chosen(
    tmp_path: Path, setting: str | None, expected: Any
) -> None:
    """Waitress' threads, the main loop and the log all run where ``CPU_AFFINITY`` says,
    whatever CPUs the process was started with."""
    allowed = os.sched_getaffinity(0)
    extra = {} if setting is None else {"CPU_AFFINITY": str(min(allowed)) if setting == "first" else setting}
    server = ServerProcess(make_data_dir(tmp_path / "data"), extra_env={**extra, "THREADS": "3"})
    server.start()
    try:
        threads = cpus_of_every_thread(server.pid)
        assert len(threads) >= 4  # the main loop and three workers
        assert set(threads.values()) == {cpu_list(expected(allowed))}
        said = [json.loads(line) for line in server.stderr().splitlines()]
        assert [line["cpus"] for line in said if line["msg"] == "listening"] == [sorted(expected(allowed))]
    finally:
        server.stop()
