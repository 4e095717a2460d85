"""What the bench scripts share: a data dir, a real ``licensed serve``, licences, Stripe events.

The scripts in this folder import it as ``harness`` (a script's own folder is
first on ``sys.path`` when Python runs it), and import licensed as the
installed package, so they run as ``python bench/<name>.py`` from the
repository root with the project installed (``make`` installs it editable).
The plans and the Stripe objects and signed events come from the tests'
helpers (``tests/support``, put on ``sys.path`` here), built from Stripe's own
example objects, so a bench sends exactly what the tests do. Needs the test
dependencies (``make bench`` installs them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from licensed import licensing
from licensed.config import Config
from licensed.server import init_data_dir
from licensed.services import build_services

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests")]

from support.emulator import healthy  # noqa: E402
from support.plans import SOLD_PLANS  # noqa: E402
from support.server_proc import free_port  # noqa: E402
from support.stripe_events import SECRET  # noqa: E402
from support.stripe_events import charge as charge  # noqa: E402
from support.stripe_events import event as event  # noqa: E402
from support.stripe_events import invoice as invoice  # noqa: E402
from support.stripe_events import signed as signed  # noqa: E402
from support.stripe_events import subscription as subscription  # noqa: E402

HOST = "127.0.0.1"
BASE_URL = "http://licensed.test"
"""The issuer every bench server runs with: keys issued here are signed for it, so the
server has no reason to hand out fresh ones."""

WEBHOOK_SECRET = SECRET
"""What bench servers verify webhooks with: the secret ``signed`` signs with."""

PLANS = SOLD_PLANS
"""Stripe subscriptions on ``price_pro_monthly`` become pro licences; issued ones are team (3 seats)."""


# --- a data dir and licences in it ------------------------------------------------------------


def make_data_dir(path: Path) -> Path:
    """A data dir holding the bench plans (the server creates its signing key itself)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    (path / "plans.toml").write_text(PLANS, encoding="utf-8")
    return path


def issue_keys(data_dir: Path, count: int, *, days: int, tag: str, plan: str = "team-monthly") -> list[str]:
    """``count`` licences straight into the data dir (before its server starts), in one
    transaction, each for its own customer; returns their keys."""
    config = Config(data_dir=data_dir, app_base_url=BASE_URL)
    now = int(time.time())
    init_data_dir(config, now)
    services = build_services(config)
    try:
        chosen = services.catalog.plans[plan]
        issued = []
        with services.store.atomic():
            for n in range(count):
                customer = services.store.upsert_customer(now, email=f"{tag}{n}@example.com")
                lic = licensing.new_license(
                    plan=chosen,
                    customer_id=customer,
                    ring=services.ring,
                    now=now,
                    source="bench",
                    paid_through=now + days * 86400,
                )
                services.store.insert_license(lic)
                issued.append(lic)
        return [services.licensing.key(lic) for lic in issued]
    finally:
        services.store.close()


# --- a real server -------------------------------------------------------------------------------


@dataclass
class Server:
    """``python -m licensed serve`` in its own process; its stderr is kept in a file."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        """Resident set size of the server process, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def stderr(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_server(
    data_dir: Path,
    env: dict[str, str] | None = None,
    *,
    port: int | None = None,
    poll: float = 0.02,
    timeout: float = 60.0,
) -> Server:
    """Start ``licensed serve`` on ``data_dir`` (created by the server if missing) and wait
    for the first 200 of ``/health``. The caller's Stripe, admin and SMTP settings are left
    out; ``env`` adds to (and overrides) the bench defaults."""
    port = port or free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "ADMIN_", "SMTP_"))}
    full_env = {
        **inherited,
        "DATA_DIR": str(data_dir),
        "HOST": HOST,
        "PORT": str(port),
        "APP_BASE_URL": BASE_URL,
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_PER_MINUTE": "0",
        **(env or {}),
    }
    log_path = data_dir.parent / f"server-{port}.stderr"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "licensed", "serve"],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    server = Server(proc, f"http://{HOST}:{port}", log_path)
    deadline = time.monotonic() + timeout
    while not healthy(server.url):
        if not server.alive():
            raise SystemExit(f"licensed serve exited with {proc.returncode}:\n{server.stderr()}")
        if time.monotonic() > deadline:
            server.stop()
            raise SystemExit(f"licensed serve did not answer /health within {timeout:g} s")
        time.sleep(poll)
    return server
