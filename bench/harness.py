"""What the bench scripts share: a data dir, a real ``licensed serve``, licences, Stripe events.

The scripts in this folder import it as ``harness`` (a script's own folder is
first on ``sys.path`` when Python runs it), and import licensed as the
installed package, so they run as ``python bench/<name>.py`` from the
repository root with the project installed (``make`` installs it editable).
Nothing here imports from ``tests/``: the tests' helpers carry checks and
fixtures the benches do not need.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import requests

from licensed import licensing, stripe_api
from licensed.config import Config
from licensed.server import init_data_dir
from licensed.services import build_services

HOST = "127.0.0.1"
BASE_URL = "http://licensed.test"
"""The issuer every bench server runs with: keys issued here are signed for it, so the
server has no reason to hand out fresh ones."""

WEBHOOK_SECRET = "whsec_bench_secret"

PLANS = """\
[products.dashcaddy]
name = "DashCaddy"
key_prefix = "DC"

[plans.pro-monthly]
product = "dashcaddy"
name = "DashCaddy Pro, monthly"
tier = "PRO"
stripe_price = "price_pro_monthly"
max_machines = 1
features = ["sso", "recipes"]
grace_days = 7

[plans.team-monthly]
product = "dashcaddy"
name = "DashCaddy Team, monthly"
tier = "TEAM"
stripe_price = "price_team_monthly"
max_machines = 3
features = ["sso", "recipes", "swarm"]
grace_days = 7
"""
"""Stripe subscriptions on ``price_pro_monthly`` become pro licences; issued ones are team (3 seats)."""


# --- a data dir and licences in it ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


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


def healthy(url: str) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(url + "/health", timeout=1).status_code == 200
    return False


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


# --- Stripe events, built from Stripe's own example objects ---------------------------------------


def _fixtures_path() -> Path:
    """``LICENSED_STRIPE_FIXTURES``, or ``shared/stripe/fixtures3.json`` beside the checkout."""
    given = os.environ.get("LICENSED_STRIPE_FIXTURES")
    if given:
        return Path(given)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "stripe" / "fixtures3.json"
        if candidate.exists():
            return candidate
    raise SystemExit("shared/stripe/fixtures3.json not found (set LICENSED_STRIPE_FIXTURES)")


@cache
def _resources() -> dict[str, Any]:
    resources: dict[str, Any] = json.loads(_fixtures_path().read_text(encoding="utf-8"))["resources"]
    return resources


def fixture(name: str) -> dict[str, Any]:
    """A fresh copy of Stripe's example object ``name``."""
    return copy.deepcopy(_resources()[name])


def subscription(*, sub_id: str, customer: str, price: str, period_end: int) -> dict[str, Any]:
    """An active subscription to ``price``, one seat, its period ending at ``period_end``."""
    sub = fixture("subscription")
    sub.update(
        id=sub_id,
        customer=customer,
        status="active",
        cancel_at_period_end=False,
        cancel_at=None,
        canceled_at=None,
        ended_at=None,
        pause_collection=None,
        trial_end=None,
        metadata={},
    )
    item = sub["items"]["data"][0]
    item["subscription"] = sub_id
    item["price"]["id"] = price
    item["price"]["metadata"] = {}
    item["quantity"] = 1
    item["current_period_start"] = period_end - 30 * 86400
    item["current_period_end"] = period_end
    return sub


def invoice(
    *, invoice_id: str, customer: str, sub_id: str, period_end: int, payment_intent: str
) -> dict[str, Any]:
    """A paid renewal invoice of ``sub_id`` (current API shape: subscription under ``parent``,
    the payment intent in ``payments``)."""
    inv = fixture("invoice")
    inv.update(
        id=invoice_id,
        customer=customer,
        status="paid",
        billing_reason="subscription_cycle",
        amount_due=2000,
        amount_paid=2000,
        amount_remaining=0,
        subscription=None,
        parent={
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": sub_id},
        },
    )
    inv["lines"]["data"][0]["period"] = {"start": period_end - 30 * 86400, "end": period_end}
    payment = fixture("invoice_payment")
    payment["payment"] = {"type": "payment_intent", "payment_intent": payment_intent}
    inv["payments"] = {"object": "list", "data": [payment], "has_more": False}
    return inv


def charge(*, charge_id: str, payment_intent: str, amount: int = 2000, refunded: int = 0) -> dict[str, Any]:
    """A captured charge of ``amount``, ``refunded`` of it refunded."""
    obj = fixture("charge")
    obj.update(
        id=charge_id,
        payment_intent=payment_intent,
        amount=amount,
        amount_captured=amount,
        amount_refunded=refunded,
        refunded=refunded >= amount,
        captured=True,
    )
    return obj


def event(kind: str, obj: dict[str, Any], created: int, event_id: str) -> dict[str, Any]:
    envelope = fixture("event")
    envelope.update(
        id=event_id, type=kind, created=created, api_version="2025-10-29.clover", data={"object": obj}
    )
    return envelope


def signed(evt: dict[str, Any], timestamp: int) -> tuple[bytes, dict[str, str]]:
    """The body and headers Stripe would POST, signed with ``WEBHOOK_SECRET``."""
    body = json.dumps(evt).encode()
    return body, {
        "Stripe-Signature": stripe_api.sign_payload(body, WEBHOOK_SECRET, timestamp),
        "Content-Type": "application/json; charset=utf-8",
    }
