"""A real ``licensed serve`` subprocess that tests and benches can kill, restart and read.

Unlike ``live`` (in-process, frozen clock) this is the program as deployed: its
own interpreter, the real clock, SQLite on disk, a real port. Its stderr goes
to a file that survives restarts, so a test can search every line it ever
logged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from licensed import licensing
from licensed.config import Config
from licensed.keys import KeyRing
from licensed.plans import Catalog, load_catalog
from licensed.server import init_data_dir
from licensed.services import build_services
from licensed.store import License

ROOT = Path(__file__).resolve().parents[2]
BASE_URL = "http://licensed.test"


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``licensed ARGS`` in a child process with ``env``, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "licensed", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_data_dir(path: Path, plans: str | None = None) -> Path:
    """A data dir holding the test plans (the server creates its signing key itself)."""
    if plans is None:
        from support.plans import TEST_PLANS

        plans = TEST_PLANS
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    (path / "plans.toml").write_text(plans, encoding="utf-8")
    return path


@dataclass
class ServerProcess:
    """``python -m licensed serve`` on a fixed port of 127.0.0.1 and a data dir on disk."""

    data_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"server-{self.port}.stderr"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "licensed.sqlite3"

    @property
    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "ADMIN_", "SMTP_"))}
        return {
            **base,
            "DATA_DIR": str(self.data_dir),
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "APP_BASE_URL": BASE_URL,
            "LOG_LEVEL": "INFO",
            "RATE_LIMIT_PER_MINUTE": "0",
            **self.extra_env,
        }

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until ``/health`` answers (any status: a full disk answers 503)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "licensed", "serve"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"licensed serve exited with {self.proc.returncode}:\n{self.stderr()}")
            with contextlib.suppress(requests.RequestException):
                requests.get(self.url + "/health", timeout=1)
                return
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"licensed serve did not listen within {timeout} s:\n{self.stderr()}")

    def kill(self) -> None:
        """SIGKILL: no clean-up runs, exactly like a power cut for the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def stderr(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def rss_kib(self) -> int:
        """Resident set size of the server process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    # --- reading the data the server wrote ---------------------------------------

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Read the database (read-write open, so a crashed WAL is recovered first)."""
        conn = sqlite3.connect(self.db_path, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute(sql, params))
        finally:
            conn.close()

    def ring(self) -> KeyRing:
        return KeyRing(self.data_dir / "keys")

    def catalog(self) -> Catalog:
        return load_catalog(self.data_dir / "plans.toml")

    def key_for(self, row: sqlite3.Row, ring: KeyRing | None = None, catalog: Catalog | None = None) -> str:
        """The licence's key, derived as the server derives it (keys are never stored)."""
        lic = License.from_row(row)
        return licensing.license_key(lic, catalog or self.catalog(), ring or self.ring(), BASE_URL)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args, timeout=timeout)

    def issue(self, plan: str = "pro-monthly", days: int = 30, email: str = "buyer@example.com") -> str:
        """Issue a licence with ``licensed admin issue`` and return its key."""
        args = ["admin", "issue", "--email", email, "--plan", plan]
        catalog = self.catalog()
        chosen = catalog.plans[plan]
        if not (chosen.lifetime or chosen.duration_days):
            args += ["--days", str(days)]
        done = self.cli(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def issue_keys(data_dir: Path, count: int, *, days: int, tag: str, plan: str = "team-monthly") -> list[str]:
    """Issue licences straight into a data dir (before its server starts); returns their keys,
    signed for the server's ``BASE_URL`` so it hands out no fresh ones."""
    config = Config(data_dir=data_dir, app_base_url=BASE_URL)
    init_data_dir(config, int(time.time()))
    services = build_services(config)
    try:
        chosen = services.catalog.plans[plan]
        keys = []
        for n in range(count):
            lic = licensing.issue_license(
                services.store,
                services.ring,
                chosen,
                email=f"{tag}{n}@example.com",
                now=services.now(),
                actor=tag,
                days=days,
            )
            keys.append(licensing.license_key(lic, services.catalog, services.ring, BASE_URL))
        return keys
    finally:
        services.store.close()
