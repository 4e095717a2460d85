"""The reconciler: lost webhooks repaired from Stripe's events, or from its subscriptions."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import stripe_events as se
from support.clock import T0
from support.emulator import Emulator, Served, emulator, free_port, served
from support.live import Live
from support.server_proc import run_cli
from support.stripe_double import StripeDouble, stripe_double

from licensed import errors, stripe_api, stripe_sync
from licensed.errors import StripeUnavailable
from licensed.store import Store

__all__ = ["emulator", "served"]


def lose_webhooks(emulator: Emulator) -> None:
    """Point the emulator's deliveries at a port where nothing listens: the server is down."""
    emulator.hook(f"http://127.0.0.1:{free_port()}/down")


def subscribe(emulator: Emulator, email: str, plan: str = "price_pro_monthly") -> dict[str, Any]:
    customer = emulator.customer(email)
    return emulator.call("post", "/v1/subscriptions", customer=customer["id"], items=[{"plan": plan}])


def test_lost_webhooks_are_repaired_and_a_second_run_is_one_page(emulator: Emulator, served: Served) -> None:
    lose_webhooks(emulator)
    started = int(time.time())
    kept = [subscribe(emulator, f"kept{i}@example.com") for i in range(3)]
    cancelled = subscribe(emulator, "gone@example.com", "price_team_monthly")
    emulator.call("delete", f"/v1/subscriptions/{cancelled['id']}")
    time.sleep(1.5)  # the emulator records its events a moment after the calls
    assert all(served.license_of(s["id"]) is None for s in [*kept, cancelled])

    first = served.cli("reconcile", "--since", str(started - 5))
    assert first.returncode == 0, first.stdout + first.stderr
    for sub in kept:
        lic = served.license_of(sub["id"])
        assert lic is not None and lic["subscription_status"] == "active"
        assert lic["paid_through"] == sub["current_period_end"]
    gone = served.license_of(cancelled["id"])
    assert gone is not None and gone["subscription_status"] == "canceled"
    assert "repaired 0" not in first.stdout

    second = served.cli("reconcile")
    assert second.returncode == 0, second.stderr
    assert "repaired 0" in second.stdout and "failed 0" in second.stdout
    assert "stripe calls 1," in second.stdout
    health = served.rows("SELECT value FROM settings WHERE key = ?", (Store.LAST_RECONCILE,))
    assert health and int(health[0][0]) >= started


def test_full_repairs_a_license_whose_events_are_gone(emulator: Emulator, served: Served) -> None:
    lose_webhooks(emulator)
    missing = subscribe(emulator, "missing@example.com")
    wrong = subscribe(emulator, "wrong@example.com", "price_team_monthly")
    served.cli("reconcile", "--since", str(int(time.time()) - 5))
    # a license damaged behind Stripe's back: wrong tier, old paid_through
    conn = sqlite3.connect(served.db)
    conn.execute(
        "UPDATE licenses SET tier = 'PRO', plan = 'pro-monthly', paid_through = 1000"
        " WHERE stripe_subscription_id = ?",
        (wrong["id"],),
    )
    conn.execute("DELETE FROM licenses WHERE stripe_subscription_id = ?", (missing["id"],))
    conn.commit()
    conn.close()

    full = served.cli("reconcile", "--full")
    assert full.returncode == 0, full.stdout + full.stderr
    repaired = served.license_of(wrong["id"])
    assert (repaired["tier"], repaired["paid_through"]) == ("TEAM", wrong["current_period_end"])
    assert served.license_of(missing["id"]) is not None
    again = served.cli("reconcile", "--full")
    assert "repaired 0" in again.stdout, again.stdout


def test_second_concurrent_run_exits_at_once(served: Served) -> None:
    with open(served.db.parent / "reconcile.lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.monotonic()
        result = served.cli("reconcile")
        assert time.monotonic() - started < 10
    assert result.returncode != 0
    assert "another reconcile is running" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- failures, against a Stripe double ------------------------------------------------------------


@pytest.fixture
def double() -> Iterator[StripeDouble]:
    with stripe_double() as running:
        yield running


@pytest.fixture
def reconciler(services: Any, double: StripeDouble) -> stripe_sync.Reconciler:
    gateway = stripe_api.StripeGateway("sk_test_double", double.url, sleep=lambda _s: None)
    return stripe_sync.Reconciler(services, gateway)


def _event_page(after: str | None) -> tuple[int, dict[str, Any]]:
    sub = se.subscription(
        sub_id="sub_page", customer="cus_page", price="price_pro_monthly", period_end=T0 + 9999
    )
    evt = se.event("customer.subscription.created", sub, T0, event_id="evt_page1")
    if after is None:
        return 200, {"object": "list", "data": [evt], "has_more": True}
    return 500, {"error": {"type": "api_error", "message": "Stripe fell over"}}


def test_stripe_failure_mid_listing_keeps_the_cursor(
    services: Any, double: StripeDouble, reconciler: stripe_sync.Reconciler
) -> None:
    with services.store.atomic():
        services.store.set_reconcile_cursor(T0 - 100, T0)
    double.on_get = lambda path, query: _event_page(query.get("starting_after"))
    with pytest.raises(StripeUnavailable):
        reconciler.events(T0)
    assert services.store.reconcile_cursor() == T0 - 100
    assert services.store.one("SELECT COUNT(*) FROM stripe_events")[0] == 0
    assert services.store.last_reconcile_at() is None


def test_rate_limits_are_backed_off(services: Any, double: StripeDouble) -> None:
    waits: list[float] = []
    answers = iter([429, 429, 200])

    def on_get(path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        status = next(answers)
        if status == 429:
            return 429, {"error": {"type": "rate_limit_error", "message": "slow down"}}
        return 200, {"object": "list", "data": [], "has_more": False}

    double.on_get = on_get
    gateway = stripe_api.StripeGateway("sk_test_double", double.url, sleep=waits.append)
    report = stripe_sync.Reconciler(services, gateway).events(T0)
    assert report.failed == 0
    assert len(waits) >= 2 and waits == sorted(waits)


def test_stripe_setup_creates_then_updates(double: StripeDouble, data_dir: Path) -> None:
    base_url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the checks after it say so
    env = {
        "DATA_DIR": str(data_dir),
        "STRIPE_SECRET_KEY": "sk_test_double",
        "STRIPE_API_BASE": double.url,
        "APP_BASE_URL": base_url,
    }
    os_env = {**os.environ, **env}

    def setup() -> subprocess.CompletedProcess[str]:
        return run_cli(os_env, "stripe", "setup")

    first = setup()
    assert first.returncode == 0, first.stderr
    assert "STRIPE_WEBHOOK_SECRET=whsec_" in first.stdout
    [endpoint] = double.endpoints
    assert endpoint["url"] == f"{base_url}/api/stripe/webhook"
    assert sorted(endpoint["enabled_events"]) == sorted(stripe_sync.HANDLED_EVENTS)
    # Then the go-live checks: the endpoint is right; what is left to do is named.
    lines = first.stdout.splitlines()
    assert "ok    secret key: works (test mode)" in lines
    assert any(line.startswith("ok    webhook endpoint: ") for line in lines)
    assert any(
        line.startswith("FAIL  plan pro-monthly: price price_pro_monthly does not exist") for line in lines
    )
    assert any(line.startswith(f"FAIL  public URL: cannot reach {base_url}/health") for line in lines)
    assert lines[-1].endswith("checks failed: fix them, then run `licensed stripe check`")

    endpoint["status"] = "disabled"  # Stripe turned it off after days of failed deliveries
    second = setup()
    assert second.returncode == 0 and "updated" in second.stdout and "whsec_" not in second.stdout
    assert len(double.endpoints) == 1
    assert endpoint["status"] == "enabled"
    assert double.requests[-1].method == "GET", "the checks after set-up only read"


def test_replay_of_a_failed_event_from_its_stored_payload(services: Any) -> None:
    processor = stripe_sync.EventProcessor(services, gateway=None)
    inv = se.invoice(sub_id="sub_replay", period_end=T0 + 50 * 86400)
    evt = se.event("invoice.paid", inv, T0)
    with pytest.raises(errors.WebhookFailed):
        processor.process(evt, T0)
    sub = se.subscription(
        sub_id="sub_replay", customer="cus_r", price="price_pro_monthly", period_end=T0 + 20 * 86400
    )
    processor.process(se.event("customer.subscription.created", sub, T0 - 5), T0)
    outcome = processor.replay(evt["id"], T0 + 10)
    assert outcome.status == "applied"
    assert services.store.find_license("stripe_subscription_id", "sub_replay").paid_through == T0 + 50 * 86400


def test_health_reports_the_last_reconcile(live: Live) -> None:
    with live.services.store.atomic():
        live.services.store.set_last_reconcile_at(T0)
    assert live.get("/health").json()["last_reconcile_at"] == "2027-01-15T08:00:00Z"
