"""`GET /api/subscriptions/status` follows a subscription driven by signed Stripe events.

The buyer signs in (a local identity provider), checks out with their token, and
Stripe's events then move the subscription: active, past due, recovered,
cancelling at period end, ended.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import requests
from support import stripe_events as se
from support.clock import DAY, T0
from support.live import Live
from support.oidc_provider import AUDIENCE, Provider, ec_key

from licensed.config import Config

SUB = "sub_status_lifecycle"
CUSTOMER = "cus_status_lifecycle"


@pytest.fixture
def provider() -> Iterator[Provider]:
    idp = Provider(ec_key("status-es384"))
    yield idp
    idp.stop()


@pytest.fixture
def config(config: Config, provider: Provider) -> Config:
    return replace(
        config,
        stripe_webhook_secrets=(se.SECRET,),
        oidc_issuer=provider.issuer,
        oidc_audience=AUDIENCE,
        oidc_jwks_url=provider.jwks_url,
    )


def deliver(live: Live, event: dict[str, Any]) -> None:
    body, headers = se.signed(event, int(live.clock()))
    answer = live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text


def status(live: Live, provider: Provider) -> dict[str, Any]:
    token = provider.token(int(live.clock()), sub="buyer-7")
    answer: requests.Response = live.get(
        "/api/subscriptions/status", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def subscription(status: str, period_end: int, **kw: Any) -> dict[str, Any]:
    return se.subscription(
        sub_id=SUB, customer=CUSTOMER, price="price_pro_monthly", status=status, period_end=period_end, **kw
    )


def test_status_follows_the_stripe_lifecycle(live: Live, provider: Provider) -> None:
    assert status(live, provider)["status"] == "none"

    deliver(live, se.event("customer.subscription.created", subscription("active", T0 + 30 * DAY), T0))
    session = se.checkout_session(
        session_id=se.uid("cs"),
        mode="subscription",
        customer=CUSTOMER,
        subscription_id=SUB,
        plan="pro-monthly",
        client_reference_id="buyer-7",
    )
    deliver(live, se.event("checkout.session.completed", session, T0 + 1))
    first = status(live, provider)
    assert first["status"] == "active"
    assert first["plan"] == "pro-monthly"
    assert first["current_period_end"] == "2027-02-14T08:00:00Z"
    assert [lic["tier"] for lic in first["licenses"]] == ["PRO"]

    live.clock.set(T0 + 30 * DAY + 60)
    failed = se.invoice(sub_id=SUB, period_end=T0 + 60 * DAY, customer=CUSTOMER, status="open")
    deliver(live, se.event("invoice.payment_failed", failed, T0 + 30 * DAY + 60))
    assert status(live, provider)["status"] == "past_due"

    paid = se.invoice(sub_id=SUB, period_end=T0 + 60 * DAY, customer=CUSTOMER, payment_intent="pi_status")
    deliver(live, se.event("invoice.paid", paid, T0 + 30 * DAY + 120))
    assert status(live, provider)["status"] == "active"

    cancelling = subscription("active", T0 + 60 * DAY, cancel_at_period_end=True)
    deliver(live, se.event("customer.subscription.updated", cancelling, T0 + 40 * DAY))
    answer = status(live, provider)
    assert (answer["status"], answer["cancel_at_period_end"]) == ("canceled", True)

    live.clock.set(T0 + 60 * DAY + 5)
    ended = subscription("canceled", T0 + 60 * DAY, ended_at=T0 + 60 * DAY, cancel_at_period_end=True)
    deliver(live, se.event("customer.subscription.deleted", ended, T0 + 60 * DAY))
    assert status(live, provider)["status"] == "expired"
