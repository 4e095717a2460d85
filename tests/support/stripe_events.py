"""Stripe objects and signed events for tests, built from Stripe's own fixtures.

Every object starts as a deep copy of the matching object in
``shared/stripe/fixtures3.json`` (the current API's shapes); ``legacy=True``
moves fields to where older API versions put them (period on the subscription,
subscription and payment intent on the invoice).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from licensed import stripe_api, stripe_sync
from licensed.config import Config
from licensed.errors import LicensedError
from licensed.server import init_data_dir
from licensed.services import Services, build_services
from licensed.store import License
from support.clock import FrozenClock
from support.plans import TEST_PLANS

SECRET = "whsec_test_secret"
_counter = itertools.count(1)


def _fixtures_path() -> Path:
    given = os.environ.get("LICENSED_STRIPE_FIXTURES")
    if given:
        return Path(given)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "stripe" / "fixtures3.json"
        if candidate.exists():
            return candidate
    raise FileNotFoundError("shared/stripe/fixtures3.json not found beside the checkout")


@cache
def _resources() -> dict[str, Any]:
    resources: dict[str, Any] = json.loads(_fixtures_path().read_text(encoding="utf-8"))["resources"]
    return resources


def fixture(name: str) -> dict[str, Any]:
    return copy.deepcopy(_resources()[name])


def uid(prefix: str) -> str:
    return f"{prefix}_t{next(_counter):06d}{os.getpid()}"


def subscription(
    *,
    sub_id: str,
    customer: str,
    price: str,
    status: str = "active",
    period_end: int,
    quantity: int = 1,
    cancel_at_period_end: bool = False,
    ended_at: int | None = None,
    legacy: bool = False,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    sub = fixture("subscription")
    sub.update(
        id=sub_id,
        customer=customer,
        status=status,
        cancel_at_period_end=cancel_at_period_end,
        cancel_at=None,
        canceled_at=ended_at,
        ended_at=ended_at,
        pause_collection=None,
        trial_end=None,
        metadata=metadata or {},
    )
    item = sub["items"]["data"][0]
    item["subscription"] = sub_id
    item["price"]["id"] = price
    item["price"]["metadata"] = {}
    item["quantity"] = quantity
    item["current_period_start"] = period_end - 30 * 86400
    item["current_period_end"] = period_end
    if legacy:
        del item["current_period_end"], item["current_period_start"]
        sub["current_period_end"] = period_end
        sub["current_period_start"] = period_end - 30 * 86400
        sub["quantity"] = quantity
    return sub


def invoice(
    *,
    sub_id: str | None,
    period_end: int,
    payment_intent: str | None = None,
    customer: str = "cus_test",
    legacy: bool = False,
    status: str = "paid",
    reason: str = "subscription_cycle",
    amount: int = 2000,
) -> dict[str, Any]:
    inv = fixture("invoice")
    paid = amount if status == "paid" else 0
    inv.update(
        id=uid("in"),
        customer=customer,
        status=status,
        billing_reason=reason,
        amount_due=amount,
        amount_paid=paid,
        amount_remaining=amount - paid,
    )
    line = inv["lines"]["data"][0]
    line["period"] = {"start": period_end - 30 * 86400, "end": period_end}
    inv["payments"] = {"object": "list", "data": [], "has_more": False}
    if legacy:
        inv["subscription"] = sub_id
        inv["parent"] = None
        inv["payment_intent"] = payment_intent
    else:
        inv["subscription"] = None
        inv["parent"] = {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": sub_id},
        }
        if payment_intent:
            payment = fixture("invoice_payment")
            payment["payment"] = {"type": "payment_intent", "payment_intent": payment_intent}
            inv["payments"]["data"].append(payment)
    return inv


def charge(
    *, charge_id: str, payment_intent: str | None, amount: int = 2000, refunded_amount: int = 0
) -> dict[str, Any]:
    obj = fixture("charge")
    obj.update(
        id=charge_id,
        payment_intent=payment_intent,
        amount=amount,
        amount_captured=amount,
        amount_refunded=refunded_amount,
        refunded=refunded_amount >= amount,
        captured=True,
    )
    return obj


def dispute(*, dispute_id: str, charge_id: str, payment_intent: str | None, status: str) -> dict[str, Any]:
    obj = fixture("dispute")
    obj.update(id=dispute_id, charge=charge_id, payment_intent=payment_intent, status=status)
    return obj


def checkout_session(
    *,
    session_id: str,
    mode: str,
    email: str = "buyer@example.com",
    customer: str | None = None,
    subscription_id: str | None = None,
    payment_intent: str | None = None,
    plan: str | None = None,
    payment_status: str = "paid",
    client_reference_id: str | None = None,
) -> dict[str, Any]:
    obj = fixture("checkout.session")
    obj.update(
        id=session_id,
        mode=mode,
        customer=customer,
        subscription=subscription_id,
        payment_intent=payment_intent,
        payment_status=payment_status,
        status="complete",
        metadata={"plan": plan} if plan else {},
        client_reference_id=client_reference_id,
    )
    obj["customer_details"]["email"] = email
    obj["customer_details"]["name"] = "Ada Buyer"
    return obj


def event(kind: str, obj: dict[str, Any], created: int, event_id: str | None = None) -> dict[str, Any]:
    envelope = fixture("event")
    envelope.update(
        id=event_id or uid("evt"),
        type=kind,
        created=created,
        api_version="2025-10-29.clover",
        data={"object": obj},
    )
    return envelope


def signed(evt: dict[str, Any], timestamp: int, secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(evt).encode()
    return body, {
        "Stripe-Signature": stripe_api.sign_payload(body, secret, timestamp),
        "Content-Type": "application/json; charset=utf-8",
    }


# --- events applied in-process, as the expected outcome --------------------------------------------

STATE_FIELDS = (
    "status",
    "status_reason",
    "subscription_status",
    "paid_through",
    "plan",
    "tier",
    "features",
    "max_machines",
    "cancel_at_period_end",
    "ended_at",
    "grace_days",
)
"""What the Stripe events decide about a licence: compared across orders and crashes."""


def license_state(lic: License) -> dict[str, Any]:
    return {name: getattr(lic, name) for name in STATE_FIELDS}


@contextmanager
def replayed(events: list[dict[str, Any]], now: int) -> Iterator[Services]:
    """A fresh store with ``events`` applied in the given order in-process, each failure
    retried after the others as Stripe retries it, until none fails (bounded)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
        config = Config(data_dir=data)
        init_data_dir(config, now)
        services = build_services(config, FrozenClock(now))
        try:
            processor = stripe_sync.EventProcessor(services, gateway=None)
            pending = list(events)
            for _ in range(len(events) + 1):
                retry, pending = pending, []
                for evt in retry:
                    try:
                        processor.process(evt, now)
                    except LicensedError:
                        pending.append(evt)
                if not pending:
                    break
            assert not pending, [e["id"] for e in pending]
            yield services
        finally:
            services.store.close()
