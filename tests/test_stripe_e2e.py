"""End to end: localstripe on 127.0.0.1 delivers real webhooks to a real `licensed serve`.

Customers, plans, subscriptions, cancellations and refunds are made through
the Stripe API of the emulator; it signs and sends its events to the server.
What the emulator never sends (charge.refunded, checkout sessions) is built
from its own objects and signed like Stripe does.
"""

from __future__ import annotations

import time

import requests
from support import stripe_events as se
from support.emulator import (
    WEBHOOK_SECRET,
    Emulator,
    Served,
    emulator,
    free_port,
    key_for,
    served,
    wait_for,
)

__all__ = ["emulator", "served"]


def test_subscription_created_then_cancelled(emulator: Emulator, served: Served) -> None:
    customer = emulator.customer("grace@example.com")
    sub = emulator.call(
        "post", "/v1/subscriptions", customer=customer["id"], items=[{"plan": "price_pro_monthly"}]
    )
    assert sub["status"] == "active"
    lic = wait_for(lambda: served.license_of(sub["id"]), what="the licence")
    assert lic["plan"] == "pro-monthly"
    wait_for(
        lambda: served.rows(
            "SELECT 1 FROM stripe_events WHERE type = 'invoice.payment_succeeded' AND status = 'applied'"
        ),
        what="the invoice event",
    )
    lic = served.license_of(sub["id"])
    assert lic["paid_through"] == sub["current_period_end"]
    assert lic["stripe_customer_id"] == customer["id"]
    mail = served.rows("SELECT to_addr, kind FROM outbox WHERE license_id = ?", (lic["id"],))
    assert [tuple(m) for m in mail] == [("grace@example.com", "license_key")]
    key = key_for(served, lic["id"])
    assert served.validate(key)["code"] == "VALID"

    emulator.call("delete", f"/v1/subscriptions/{sub['id']}")
    wait_for(
        lambda: served.license_of(sub["id"])["subscription_status"] == "canceled", what="the cancellation"
    )
    assert served.validate(key)["code"] == "EXPIRED"


def test_refund_revokes(emulator: Emulator, served: Served) -> None:
    customer = emulator.customer("refund@example.com")
    sub = emulator.call(
        "post", "/v1/subscriptions", customer=customer["id"], items=[{"plan": "price_team_monthly"}]
    )
    invoice = emulator.call("get", f"/v1/invoices/{sub['latest_invoice']}")
    charge_id = invoice["charge"]["id"]
    lic = wait_for(lambda: served.license_of(sub["id"]), what="the licence")
    wait_for(lambda: served.rows("SELECT 1 FROM payments WHERE ref = ?", (charge_id,)), what="the payment")
    key = key_for(served, lic["id"])
    assert served.validate(key)["code"] == "VALID"

    emulator.call("post", "/v1/refunds", charge=charge_id)
    charge = emulator.call("get", f"/v1/charges/{charge_id}")
    assert charge["refunded"] is True
    body, headers = se.signed(
        se.event("charge.refunded", charge, int(time.time())), int(time.time()), WEBHOOK_SECRET
    )
    answer = requests.post(served.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200
    assert served.validate(key)["code"] == "REVOKED"


def test_checkout_before_any_subscription_event_fetches_from_stripe(
    emulator: Emulator, served: Served
) -> None:
    emulator.hook(f"http://127.0.0.1:{free_port()}/lost")  # the emulator's own events get lost
    customer = emulator.customer("early@example.com")
    sub = emulator.call(
        "post", "/v1/subscriptions", customer=customer["id"], items=[{"plan": "price_pro_monthly"}]
    )
    session = se.checkout_session(
        session_id=se.uid("cs"),
        mode="subscription",
        customer=customer["id"],
        subscription_id=sub["id"],
        email="early@example.com",
    )
    now = int(time.time())
    body, headers = se.signed(se.event("checkout.session.completed", session, now), now, WEBHOOK_SECRET)
    answer = requests.post(served.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    lic = served.license_of(sub["id"])
    assert lic is not None and lic["paid_through"] == sub["current_period_end"]
    status = requests.get(f"{served.url}/api/checkout/session/{session['id']}", timeout=5).json()
    assert status["status"] == "complete"
    assert served.validate(status["license"]["key"])["code"] == "VALID"


def test_a_failed_charge_and_its_recovery_move_nothing_money_did_not(
    emulator: Emulator, served: Served
) -> None:
    """localstripe has no renewals and no clock to move: it charges an extra invoice of a live
    subscription with a card that fails authentication (``invoice.payment_failed``, the
    subscription ``past_due`` in the emulator), then with a good card
    (``invoice.payment_succeeded``). The licence keeps the paid period throughout; the
    renewal sequences over time are in tests/test_renewals.py."""

    def card(customer_id: str, number: str) -> None:
        method = emulator.call(
            "post",
            "/v1/payment_methods",
            type="card",
            card={"number": number, "exp_month": "12", "exp_year": "2030", "cvc": "123"},
        )
        emulator.call("post", f"/v1/payment_methods/{method['id']}/attach", customer=customer_id)
        emulator.call(
            "post", f"/v1/customers/{customer_id}", invoice_settings={"default_payment_method": method["id"]}
        )

    customer = emulator.customer("retry@example.com")
    sub = emulator.call(
        "post", "/v1/subscriptions", customer=customer["id"], items=[{"plan": "price_pro_monthly"}]
    )
    wait_for(
        lambda: served.license_of(sub["id"]) and served.license_of(sub["id"])["paid_through"], what="payment"
    )
    lic = served.license_of(sub["id"])
    key = key_for(served, lic["id"])
    card(customer["id"], "4000002500003155")  # asks for 3-D Secure
    invoice = emulator.call("post", "/v1/invoices", customer=customer["id"], subscription=sub["id"])
    invoice = emulator.call("post", f"/v1/invoices/{invoice['id']}/pay")
    intent = emulator.call("get", f"/v1/payment_intents/{invoice['payment_intent']}")
    emulator.call(
        "post",
        f"/v1/payment_intents/{intent['id']}/_authenticate",
        client_secret=intent["client_secret"],
        success="false",
    )
    assert emulator.call("get", f"/v1/subscriptions/{sub['id']}")["status"] == "past_due"
    failed = wait_for(
        lambda: served.rows(
            "SELECT status, license_id FROM stripe_events WHERE type = 'invoice.payment_failed'"
        ),
        what="the failed payment's event",
    )
    assert [tuple(r) for r in failed] == [("applied", lic["id"])]
    assert served.license_of(sub["id"])["paid_through"] == lic["paid_through"]
    assert served.validate(key)["code"] == "VALID"  # the first period is paid and still running

    card(customer["id"], "4242424242424242")
    assert emulator.call("post", f"/v1/invoices/{invoice['id']}/pay")["status"] == "paid"
    wait_for(
        lambda: len(served.rows("SELECT 1 FROM stripe_events WHERE type = 'invoice.payment_succeeded'")) == 2,
        what="the recovery's event",
    )
    assert served.license_of(sub["id"])["paid_through"] == lic["paid_through"]
    assert served.validate(key)["code"] == "VALID"
