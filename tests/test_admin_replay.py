"""Replaying a failed Stripe event through the admin API and the admin command line."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import pytest
import requests
from support import stripe_events as se
from support.clock import DAY, T0
from support.live import Live
from support.server_proc import run_cli

from licensed.config import Config

TOKEN = "adm_replay_0123456789abcdef"


@pytest.fixture
def config(config: Config) -> Config:
    return replace(config, admin_token=TOKEN, stripe_webhook_secrets=(se.SECRET,))


def deliver(live: Live, event: dict[str, Any]) -> requests.Response:
    body, headers = se.signed(event, int(live.clock()))
    return live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)


def failed_renewal(live: Live) -> tuple[str, dict[str, Any]]:
    """An invoice for a subscription not known yet fails (no Stripe to ask); then the subscription comes."""
    sub_id = se.uid("sub")
    renewal = se.event("invoice.paid", se.invoice(sub_id=sub_id, period_end=T0 + 60 * DAY), T0)
    assert deliver(live, renewal).status_code == 500
    sub = se.subscription(
        sub_id=sub_id, customer="cus_replay", price="price_pro_monthly", period_end=T0 + 30 * DAY
    )
    assert deliver(live, se.event("customer.subscription.created", sub, T0 - 5)).status_code == 200
    return sub_id, renewal


def paid_through(live: Live, sub_id: str) -> int | None:
    lic = live.services.store.find_license("stripe_subscription_id", sub_id)
    assert lic is not None
    return lic.paid_through


def test_replay_over_http_applies_the_event_and_is_audited(live: Live) -> None:
    sub_id, renewal = failed_renewal(live)
    listed = live.get("/api/admin/events?status=failed", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [e["id"] for e in listed["events"]] == [renewal["id"]]
    answer = live.post(
        f"/api/admin/events/{renewal['id']}/replay", None, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "applied"
    assert paid_through(live, sub_id) == T0 + 60 * DAY
    audit = live.services.store.all("SELECT actor, action FROM audit_log WHERE action = 'event.replay'")
    assert [tuple(r) for r in audit] == [("admin-token", "event.replay")]
    again = live.post(
        f"/api/admin/events/{renewal['id']}/replay", None, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert again.json()["outcome"] == "duplicate"


def test_replay_needs_the_token(live: Live) -> None:
    answer = live.post("/api/admin/events/evt_x/replay", None)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "UNAUTHORIZED"


def test_replay_of_an_unknown_event_is_404(live: Live) -> None:
    answer = live.post(
        "/api/admin/events/evt_nothing/replay", None, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, "NOT_FOUND")


def test_replay_that_fails_again_is_409(live: Live) -> None:
    renewal = se.event("invoice.paid", se.invoice(sub_id=se.uid("sub"), period_end=T0 + 60 * DAY), T0)
    assert deliver(live, renewal).status_code == 500
    answer = live.post(
        f"/api/admin/events/{renewal['id']}/replay", None, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert (answer.status_code, answer.json()["error"]["code"]) == (409, "REPLAY_FAILED")


def test_replay_from_the_command_line(live: Live) -> None:
    sub_id, renewal = failed_renewal(live)
    env = {**os.environ, "DATA_DIR": str(live.services.config.data_dir)}
    done = run_cli(env, "admin", "replay", renewal["id"], "--json")
    assert done.returncode == 0, done.stderr
    assert '"outcome": "applied"' in done.stdout
    assert paid_through(live, sub_id) == T0 + 60 * DAY
