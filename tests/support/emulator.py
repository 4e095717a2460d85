"""localstripe on 127.0.0.1 (pickle file off) and a real `licensed serve` it delivers to.

Import the fixtures ``emulator`` (one per session) and ``served`` (one per test).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from licensed import licensing
from licensed.config import Config
from licensed.services import build_services
from support.plans import TEST_PLANS
from support.server_proc import free_port, run_cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WEBHOOK_SECRET = "whsec_e2e_secret"


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Emulator:
    url: str
    client: stripe.StripeClient

    def call(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.client.raw_request(method, path, **params).data
        return data

    def hook(self, url: str, secret: str = WEBHOOK_SECRET) -> None:
        """Deliver every event to ``url`` from now on, signed with ``secret``."""
        answer = requests.post(
            f"{self.url}/_config/webhooks/licensed", data={"url": url, "secret": secret}, timeout=5
        )
        answer.raise_for_status()

    def customer(self, email: str) -> dict[str, Any]:
        token = self.call(
            "post",
            "/v1/tokens",
            card={"number": "4242424242424242", "exp_month": "12", "exp_year": "2030", "cvc": "123"},
        )
        return self.call("post", "/v1/customers", email=email, name="Grace Buyer", source=token["id"])


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as emu:
        yield emu


@contextlib.contextmanager
def run_emulator(*options: str) -> Iterator[Emulator]:
    """localstripe (``options``: see localstripe_server.py) with the test plans' prices as Plans."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "localstripe_server.py"), str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    client = stripe.StripeClient(
        "sk_test_e2e", base_addresses={"api": url}, http_client=stripe.new_default_http_client(timeout=5)
    )
    try:
        wait_for(lambda: _reachable(url), 20, "localstripe to listen")
        emu = Emulator(url, client)
        product = emu.call("post", "/v1/products", name="DashCaddy")
        for price in ("price_pro_monthly", "price_team_monthly"):
            emu.call(
                "post",
                "/v1/plans",
                id=price,
                product=product["id"],
                amount=1000,
                currency="usd",
                interval="month",
            )
        yield emu
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _reachable(url: str) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(url + "/v1/customers", auth=("sk_test_e2e", ""), timeout=1).status_code == 200
    return False


@dataclass
class Served:
    url: str
    db: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``licensed ARGS`` on this server's data dir and settings."""
        return run_cli(self.env, *args, timeout=timeout)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute(sql, params))
        finally:
            conn.close()

    def license_of(self, sub_id: str) -> sqlite3.Row | None:
        found = self.rows("SELECT * FROM licenses WHERE stripe_subscription_id = ?", (sub_id,))
        return found[0] if found else None

    def validate(self, key: str) -> dict[str, Any]:
        answer: dict[str, Any] = requests.post(
            self.url + "/api/license/validate", json={"key": key}, timeout=5
        ).json()
        return answer


@pytest.fixture
def served(tmp_path: Path, emulator: Emulator) -> Iterator[Served]:
    with serve(emulator, tmp_path / "data") as server:
        yield server


@contextlib.contextmanager
def serve(
    emulator: Emulator,
    data: Path,
    *,
    plans: str = TEST_PLANS,
    public_url: bool = False,
    settings: dict[str, str] | None = None,
) -> Iterator[Served]:
    """``licensed serve`` on a free port, hooked to ``emulator``. ``public_url``: APP_BASE_URL is
    the server's own address (else the default); ``settings`` adds or overrides variables."""
    data.mkdir()
    (data / "plans.toml").write_text(plans, encoding="utf-8")
    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(data),
        "PORT": str(port),
        "STRIPE_SECRET_KEY": "sk_test_e2e",
        "STRIPE_API_BASE": emulator.url,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LOG_LEVEL": "WARNING",
        **({"APP_BASE_URL": f"http://127.0.0.1:{port}"} if public_url else {}),
        **(settings or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "licensed", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url), 20, "licensed to listen")
        emulator.hook(url + "/api/stripe/webhook")
        yield Served(url, data / "licensed.sqlite3", proc, env)
    finally:
        emulator.hook(f"http://127.0.0.1:{free_port()}/gone")
        proc.terminate()
        proc.wait(timeout=10)
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "Traceback" not in err, err


def healthy(url: str) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(url + "/health", timeout=1).status_code == 200
    return False


def key_for(served: Served, license_id: str) -> str:
    """The key as mailed to the buyer, derived from the server's own data dir."""
    services = build_services(Config(data_dir=served.db.parent))
    try:
        lic = services.store.get_license(license_id)
        assert lic is not None
        return licensing.license_key(lic, services.catalog, services.ring, services.config.app_base_url)
    finally:
        services.store.close()
