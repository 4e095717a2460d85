"""The webhook endpoint through a real server, with signed events built from Stripe's fixtures."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import requests
from support import stripe_events as se
from support.clock import DAY, T0
from support.live import Live

from licensed import licensing
from licensed.config import Config

SUB_PRICE = "price_pro_monthly"


@pytest.fixture
def config(data_dir: Any) -> Config:
    return Config(
        data_dir=data_dir,
        app_base_url="http://licensed.test",
        stripe_webhook_secrets=("whsec_old_secret", se.SECRET),
    )


def deliver(
    live: Live, evt: dict[str, Any], *, timestamp: int | None = None, secret: str = se.SECRET
) -> requests.Response:
    body, headers = se.signed(evt, timestamp if timestamp is not None else int(live.clock()), secret)
    return live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)


def events_table(live: Live) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in live.services.store.all("SELECT id, type, status, error, license_id FROM stripe_events")
    ]


def lic_for(live: Live, sub_id: str) -> Any:
    return live.services.store.find_license("stripe_subscription_id", sub_id)


def validate(live: Live, key: str) -> dict[str, Any]:
    answer: dict[str, Any] = live.post("/api/license/validate", {"key": key}).json()
    return answer


def new_subscription(
    live: Live, *, legacy: bool = False, price: str = SUB_PRICE, paid: bool = True, **kw: Any
) -> tuple[str, dict[str, Any]]:
    """A subscription as Stripe starts one: created, then its first invoice paid (unless ``paid=False``)."""
    sub_id = se.uid("sub")
    customer = se.uid("cus")
    sub = se.subscription(
        sub_id=sub_id, customer=customer, price=price, period_end=T0 + 30 * DAY, legacy=legacy, **kw
    )
    answer = deliver(live, se.event("customer.subscription.created", sub, created=T0))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"received": True}
    if paid:
        first = se.invoice(
            sub_id=sub_id,
            period_end=T0 + 30 * DAY,
            customer=customer,
            legacy=legacy,
            reason="subscription_create",
        )
        assert deliver(live, se.event("invoice.paid", first, created=T0)).status_code == 200
    return sub_id, sub


# --- refusals: nothing is recorded ---------------------------------------------------------


def _post_raw(live: Live, body: bytes, headers: dict[str, str]) -> requests.Response:
    return live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("missing header", 400, "INVALID_SIGNATURE"),
        ("wrong secret", 400, "INVALID_SIGNATURE"),
        ("stale timestamp", 400, "INVALID_SIGNATURE"),
        ("future timestamp", 400, "INVALID_SIGNATURE"),
        ("tampered body", 400, "INVALID_SIGNATURE"),
        ("malformed header", 400, "INVALID_SIGNATURE"),
        ("signed non-JSON", 400, "INVALID_JSON"),
        ("signed non-event", 400, "VALIDATION_ERROR"),
    ],
)
def test_bad_webhooks_are_refused_and_nothing_is_written(
    live: Live, case: str, status: int, code: str
) -> None:
    sub = se.subscription(sub_id=se.uid("sub"), customer="cus_x", price=SUB_PRICE, period_end=T0 + 30 * DAY)
    evt = se.event("customer.subscription.created", sub, created=T0)
    now = int(live.clock())
    body, headers = se.signed(evt, now)
    if case == "missing header":
        del headers["Stripe-Signature"]
    elif case == "wrong secret":
        body, headers = se.signed(evt, now, secret="whsec_wrong")
    elif case == "stale timestamp":
        body, headers = se.signed(evt, now - 301)
    elif case == "future timestamp":
        body, headers = se.signed(evt, now + 301)
    elif case == "tampered body":
        body = body.replace(b'"active"', b'"trialing"')
    elif case == "malformed header":
        headers["Stripe-Signature"] = "garbage"
    elif case == "signed non-JSON":
        body = b"{not json"
        headers["Stripe-Signature"] = se.stripe_api.sign_payload(body, se.SECRET, now)
    elif case == "signed non-event":
        body = json.dumps({"id": "evt_1", "type": "x"}).encode()
        headers["Stripe-Signature"] = se.stripe_api.sign_payload(body, se.SECRET, now)
    answer = _post_raw(live, body, headers)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code
    assert events_table(live) == []
    assert live.services.store.one("SELECT COUNT(*) FROM licenses")[0] == 0


def test_signature_within_tolerance_and_rotated_secret_accepted(live: Live) -> None:
    sub = se.subscription(sub_id=se.uid("sub"), customer="cus_x", price=SUB_PRICE, period_end=T0 + 30 * DAY)
    evt = se.event("customer.subscription.created", sub, created=T0)
    answer = deliver(live, evt, timestamp=int(live.clock()) - 300, secret="whsec_old_secret")
    assert answer.status_code == 200


def test_unknown_event_type_is_recorded_and_ignored(live: Live) -> None:
    evt = se.event("plan.created", se.fixture("plan"), created=T0)
    assert deliver(live, evt).status_code == 200
    assert [(e["type"], e["status"]) for e in events_table(live)] == [("plan.created", "ignored")]


def test_webhook_without_configured_secret_is_503(live: Live) -> None:
    live.services.config = dataclasses.replace(live.services.config, stripe_webhook_secrets=())
    # The route object captured the config at start-up only through services: rebuild nothing,
    # the handler reads services.config at request time.
    evt = se.event("plan.created", se.fixture("plan"), created=T0)
    answer = deliver(live, evt)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "STRIPE_NOT_CONFIGURED"


# --- the lifecycle ----------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["current-shape", "legacy-shape"])
def test_subscription_lifecycle(live: Live, legacy: bool) -> None:
    sub_id, _ = new_subscription(live, legacy=legacy)
    lic = lic_for(live, sub_id)
    assert lic is not None
    assert lic.paid_through == T0 + 30 * DAY
    assert lic.plan == "pro-monthly" and lic.tier == "PRO" and lic.max_machines == 1
    key = live.key_of(lic)
    assert validate(live, key)["code"] == "VALID"

    # renewal: invoice.paid moves paid_through; validate hands out the new key
    inv = se.invoice(sub_id=sub_id, period_end=T0 + 60 * DAY, payment_intent="pi_renew_1", legacy=legacy)
    live.clock.set(T0 + 30 * DAY - 60)
    assert deliver(live, se.event("invoice.paid", inv, created=T0 + 30 * DAY - 60)).status_code == 200
    assert lic_for(live, sub_id).paid_through == T0 + 60 * DAY
    answer = validate(live, key)
    assert answer["code"] == "VALID"
    assert answer["key"] != key
    key = answer["key"]

    # upgrade with quantity 2 → TEAM, 6 machines
    upgraded = se.subscription(
        sub_id=sub_id,
        customer="cus_x",
        price="price_team_monthly",
        quantity=2,
        period_end=T0 + 60 * DAY,
        legacy=legacy,
    )
    assert (
        deliver(live, se.event("customer.subscription.updated", upgraded, created=T0 + 31 * DAY)).status_code
        == 200
    )
    lic = lic_for(live, sub_id)
    assert (lic.tier, lic.max_machines, lic.features) == ("TEAM", 6, ["sso", "recipes", "swarm"])
    answer = validate(live, key)
    assert answer["key"].startswith("DC-TEAM-")
    key = answer["key"]

    # downgrade back to BASE
    down = se.subscription(
        sub_id=sub_id, customer="cus_x", price="price_basic_monthly", period_end=T0 + 60 * DAY, legacy=legacy
    )
    live.clock.set(T0 + 32 * DAY)
    assert (
        deliver(live, se.event("customer.subscription.updated", down, created=T0 + 32 * DAY)).status_code
        == 200
    )
    lic = lic_for(live, sub_id)
    assert (lic.tier, lic.max_machines, lic.grace_days) == ("BASE", 1, 3)

    # payment fails at renewal: past_due, grace runs from paid_through
    failed = se.invoice(sub_id=sub_id, period_end=T0 + 90 * DAY, legacy=legacy, status="open")
    live.clock.set(T0 + 60 * DAY + 10)
    assert (
        deliver(live, se.event("invoice.payment_failed", failed, created=T0 + 60 * DAY + 10)).status_code
        == 200
    )
    past_due = se.subscription(
        sub_id=sub_id,
        customer="cus_x",
        price="price_basic_monthly",
        status="past_due",
        period_end=T0 + 90 * DAY,
        legacy=legacy,
    )
    assert (
        deliver(
            live, se.event("customer.subscription.updated", past_due, created=T0 + 60 * DAY + 10)
        ).status_code
        == 200
    )
    lic = lic_for(live, sub_id)
    assert lic.subscription_status == "past_due"
    assert lic.paid_through == T0 + 60 * DAY
    assert validate(live, key)["code"] in ("GRACE_PERIOD",)

    # cancel at period end is recorded
    cancelling = se.subscription(
        sub_id=sub_id,
        customer="cus_x",
        price="price_basic_monthly",
        status="past_due",
        period_end=T0 + 90 * DAY,
        cancel_at_period_end=True,
        legacy=legacy,
    )
    assert (
        deliver(
            live, se.event("customer.subscription.updated", cancelling, created=T0 + 60 * DAY + 20)
        ).status_code
        == 200
    )
    assert lic_for(live, sub_id).cancel_at_period_end is True

    # deleted a day after the last paid period: nothing after it was paid, and no grace
    ended = T0 + 61 * DAY
    gone = se.subscription(
        sub_id=sub_id,
        customer="cus_x",
        price="price_basic_monthly",
        status="canceled",
        period_end=T0 + 90 * DAY,
        ended_at=ended,
        legacy=legacy,
    )
    live.clock.set(ended + 5)
    assert deliver(live, se.event("customer.subscription.deleted", gone, created=ended)).status_code == 200
    lic = lic_for(live, sub_id)
    paid = T0 + 60 * DAY
    assert (lic.subscription_status, lic.paid_through, lic.ended_at, lic.expires_at) == (
        "canceled",
        paid,
        ended,
        paid,
    )
    assert validate(live, key)["code"] == "EXPIRED"


def test_duplicate_event_changes_nothing(live: Live) -> None:
    sub = se.subscription(sub_id=se.uid("sub"), customer="cus_d", price=SUB_PRICE, period_end=T0 + 30 * DAY)
    evt = se.event("customer.subscription.created", sub, created=T0)
    assert deliver(live, evt).status_code == 200
    before = dataclasses.asdict(lic_for(live, sub["id"]))
    live.clock.advance(100)
    for _ in range(3):
        assert deliver(live, evt).status_code == 200
    assert dataclasses.asdict(lic_for(live, sub["id"])) == before
    assert live.services.store.one("SELECT COUNT(*) FROM licenses")[0] == 1
    assert live.services.store.one("SELECT attempts FROM stripe_events WHERE id = ?", (evt["id"],))[0] == 1


def test_older_event_never_undoes_newer_state(live: Live) -> None:
    sub_id, _ = new_subscription(live)
    newer = se.subscription(
        sub_id=sub_id,
        customer="cus_x",
        price="price_team_monthly",
        period_end=T0 + 30 * DAY,
        cancel_at_period_end=True,
    )
    older = se.subscription(sub_id=sub_id, customer="cus_x", price=SUB_PRICE, period_end=T0 + 30 * DAY)
    assert (
        deliver(live, se.event("customer.subscription.updated", newer, created=T0 + 200)).status_code == 200
    )
    assert (
        deliver(live, se.event("customer.subscription.updated", older, created=T0 + 100)).status_code == 200
    )
    lic = lic_for(live, sub_id)
    assert (lic.tier, lic.cancel_at_period_end) == ("TEAM", True)
    # an old renewal cannot shorten paid_through either
    old_invoice = se.invoice(sub_id=sub_id, period_end=T0 + 10 * DAY)
    assert deliver(live, se.event("invoice.paid", old_invoice, created=T0 + 50)).status_code == 200
    assert lic_for(live, sub_id).paid_through == T0 + 30 * DAY


def test_failure_rolls_back_is_recorded_answers_500_and_replays(live: Live) -> None:
    """An invoice for a subscription never seen needs Stripe, which is not configured here."""
    sub_id = se.uid("sub")
    inv = se.invoice(sub_id=sub_id, period_end=T0 + 60 * DAY)
    evt = se.event("invoice.paid", inv, created=T0)
    answer = deliver(live, evt)
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "WEBHOOK_FAILED"
    [row] = events_table(live)
    assert row["status"] == "failed" and "Stripe" in row["error"]
    assert live.services.store.one("SELECT COUNT(*) FROM licenses")[0] == 0
    # the subscription arrives; Stripe's retry of the invoice now succeeds
    sub = se.subscription(sub_id=sub_id, customer="cus_r", price=SUB_PRICE, period_end=T0 + 30 * DAY)
    assert deliver(live, se.event("customer.subscription.created", sub, created=T0 - 10)).status_code == 200
    assert deliver(live, evt).status_code == 200
    assert lic_for(live, sub_id).paid_through == T0 + 60 * DAY
    status, attempts = live.services.store.one(
        "SELECT status, attempts FROM stripe_events WHERE id = ?", (evt["id"],)
    )
    assert (status, attempts) == ("applied", 2)


# --- checkout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", ["pro-year", None])
def test_checkout_payment_mode_creates_one_license_and_mails(live: Live, plan: str | None) -> None:
    session = se.checkout_session(
        session_id=se.uid("cs"),
        mode="payment",
        customer="cus_pay",
        payment_intent="pi_onetime",
        plan=plan or "pro-year",
    )
    evt = se.event("checkout.session.completed", session, created=T0)
    assert deliver(live, evt).status_code == 200
    assert deliver(live, se.event("checkout.session.completed", session, created=T0)).status_code == 200
    rows = live.services.store.all("SELECT id, paid_through FROM licenses")
    assert len(rows) == 1 and rows[0]["paid_through"] == T0 + 365 * DAY
    outbox = live.services.store.all("SELECT to_addr, kind, license_id FROM outbox")
    assert [(r["to_addr"], r["kind"]) for r in outbox] == [("buyer@example.com", "license_key")]
    status = live.get(f"/api/checkout/session/{session['id']}").json()
    assert status["status"] == "complete"
    assert validate(live, status["license"]["key"])["code"] == "VALID"
    customer = live.services.store.one("SELECT email, stripe_customer_id FROM customers")
    assert tuple(customer) == ("buyer@example.com", "cus_pay")


def test_checkout_unpaid_is_ignored_until_async_payment_succeeds(live: Live) -> None:
    session = se.checkout_session(
        session_id=se.uid("cs"),
        mode="payment",
        payment_intent="pi_async",
        plan="pro-year",
        payment_status="unpaid",
    )
    assert deliver(live, se.event("checkout.session.completed", session, created=T0)).status_code == 200
    assert live.get(f"/api/checkout/session/{session['id']}").json() == {"status": "pending"}
    session["payment_status"] = "paid"
    assert (
        deliver(
            live, se.event("checkout.session.async_payment_succeeded", session, created=T0 + 60)
        ).status_code
        == 200
    )
    assert live.get(f"/api/checkout/session/{session['id']}").json()["status"] == "complete"


def test_checkout_subscription_mode_links_to_subscription_license(live: Live) -> None:
    sub_id, _ = new_subscription(live)
    session = se.checkout_session(
        session_id=se.uid("cs"),
        mode="subscription",
        customer="cus_x",
        subscription_id=sub_id,
        plan="pro-monthly",
        client_reference_id="user-123",
    )
    assert deliver(live, se.event("checkout.session.completed", session, created=T0 + 1)).status_code == 200
    assert live.services.store.one("SELECT COUNT(*) FROM licenses")[0] == 1
    lic = lic_for(live, sub_id)
    assert lic.stripe_checkout_session_id == session["id"]
    assert live.get(f"/api/checkout/session/{session['id']}").json()["license"]["id"] == lic.id
    assert live.services.store.customer_ids_for_sub("user-123") == [lic.customer_id]


def test_checkout_status_of_unknown_or_malformed_session(live: Live) -> None:
    assert live.get("/api/checkout/session/cs_unknown123").json() == {"status": "pending"}
    answer = live.get("/api/checkout/session/not-a-session")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "NOT_FOUND"


# --- refunds and disputes -------------------------------------------------------------------------


def _paid_subscription(live: Live, pi: str) -> tuple[str, str]:
    sub_id, _ = new_subscription(live)
    inv = se.invoice(sub_id=sub_id, period_end=T0 + 30 * DAY, payment_intent=pi)
    assert deliver(live, se.event("invoice.paid", inv, created=T0 + 1)).status_code == 200
    lic = lic_for(live, sub_id)
    return lic.id, live.key_of(lic)


def test_full_refund_revokes_before_the_200(live: Live) -> None:
    license_id, key = _paid_subscription(live, "pi_refund_full")
    charge = se.charge(charge_id="ch_full", payment_intent="pi_refund_full", refunded_amount=2000)
    assert deliver(live, se.event("charge.refunded", charge, created=T0 + 2)).status_code == 200
    # no waiting: the very next request sees it
    assert validate(live, key)["code"] == "REVOKED"
    assert live.license(license_id).status_reason == "refund"


def test_partial_refund_keeps_the_license(live: Live) -> None:
    license_id, key = _paid_subscription(live, "pi_refund_part")
    charge = se.charge(charge_id="ch_part", payment_intent="pi_refund_part", refunded_amount=500)
    assert deliver(live, se.event("charge.refunded", charge, created=T0 + 2)).status_code == 200
    assert validate(live, key)["code"] == "VALID"
    assert live.license(license_id).status == "active"


@pytest.mark.parametrize(
    ("outcome", "final"), [("won", "VALID"), ("lost", "REVOKED"), ("warning_closed", "VALID")]
)
def test_dispute_suspends_then_settles(live: Live, outcome: str, final: str) -> None:
    _license_id, key = _paid_subscription(live, "pi_dispute")
    opened = se.dispute(
        dispute_id="dp_1", charge_id="ch_d", payment_intent="pi_dispute", status="needs_response"
    )
    assert deliver(live, se.event("charge.dispute.created", opened, created=T0 + 5)).status_code == 200
    assert validate(live, key)["code"] == "SUSPENDED"
    closed = se.dispute(dispute_id="dp_1", charge_id="ch_d", payment_intent="pi_dispute", status=outcome)
    assert deliver(live, se.event("charge.dispute.closed", closed, created=T0 + 50)).status_code == 200
    assert validate(live, key)["code"] == final


def test_refund_revocation_is_not_undone_by_a_won_dispute(live: Live) -> None:
    _license_id, key = _paid_subscription(live, "pi_both")
    opened = se.dispute(
        dispute_id="dp_2", charge_id="ch_b", payment_intent="pi_both", status="needs_response"
    )
    deliver(live, se.event("charge.dispute.created", opened, created=T0 + 5))
    refund = se.charge(charge_id="ch_b", payment_intent="pi_both", refunded_amount=2000)
    deliver(live, se.event("charge.refunded", refund, created=T0 + 6))
    won = se.dispute(dispute_id="dp_2", charge_id="ch_b", payment_intent="pi_both", status="won")
    deliver(live, se.event("charge.dispute.closed", won, created=T0 + 7))
    assert validate(live, key)["code"] == "REVOKED"


def test_price_mapped_through_metadata(live: Live) -> None:
    sub = se.subscription(
        sub_id=se.uid("sub"), customer="cus_m", price="price_not_in_file", period_end=T0 + 30 * DAY
    )
    sub["items"]["data"][0]["price"]["metadata"] = {"license_plan": "team-monthly"}
    assert deliver(live, se.event("customer.subscription.created", sub, created=T0)).status_code == 200
    assert lic_for(live, sub["id"]).plan == "team-monthly"


def test_subscription_for_unlicensed_product_is_ignored(live: Live) -> None:
    sub = se.subscription(
        sub_id=se.uid("sub"), customer="cus_n", price="price_unrelated", period_end=T0 + 30 * DAY
    )
    sub["items"]["data"][0]["price"]["product"] = {"id": "prod_x", "metadata": {}}
    assert deliver(live, se.event("customer.subscription.created", sub, created=T0)).status_code == 200
    assert events_table(live)[0]["status"] == "ignored"
    assert live.services.store.one("SELECT COUNT(*) FROM licenses")[0] == 0


def test_stripe_routes_without_stripe_keys_answer_503(live: Live) -> None:
    answer = live.post("/api/checkout/session", {"plan": "pro-monthly"})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "STRIPE_NOT_CONFIGURED"
    key = live.issue("pro-monthly", days=30)
    answer = live.post("/api/billing/portal", {"key": key})
    assert answer.status_code == 503
    assert validate(live, key)["code"] == licensing.VALID


def test_checkout_with_an_unmailable_address_still_creates_the_license(live: Live) -> None:
    session = se.checkout_session(
        session_id=se.uid("cs"),
        mode="payment",
        payment_intent="pi_bad_mail",
        plan="pro-year",
        email="buyer@example.com\r\nBcc: victim@example.com",
    )
    assert deliver(live, se.event("checkout.session.completed", session, created=T0)).status_code == 200
    assert live.get(f"/api/checkout/session/{session['id']}").json()["status"] == "complete"
    assert live.services.store.one("SELECT COUNT(*) FROM outbox")[0] == 0


def test_partial_refund_revokes_when_the_plan_says_so(live: Live, data_dir: Any) -> None:
    plans = live.services.catalog.plans
    plans["pro-monthly"] = dataclasses.replace(plans["pro-monthly"], revoke_on_partial_refund=True)
    _license_id, key = _paid_subscription(live, "pi_part_revoke")
    charge = se.charge(charge_id="ch_pr", payment_intent="pi_part_revoke", refunded_amount=1)
    assert deliver(live, se.event("charge.refunded", charge, created=T0 + 2)).status_code == 200
    assert validate(live, key)["code"] == "REVOKED"


def test_webhook_outcomes_are_counted_in_metrics(live: Live) -> None:
    def count(kind: str, outcome: str) -> float:
        for line in live.get("/metrics").text.splitlines():
            if (
                line.startswith("licensed_webhooks_total{")
                and f'type="{kind}"' in line
                and f'outcome="{outcome}"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count("customer.subscription.created", "applied"), count("unverified", "bad_signature")
    sub = se.subscription(sub_id=se.uid("sub"), customer="cus_m", price=SUB_PRICE, period_end=T0 + 30 * DAY)
    evt = se.event("customer.subscription.created", sub, created=T0)
    deliver(live, evt)
    deliver(live, evt, secret="whsec_wrong")
    assert count("customer.subscription.created", "applied") == before[0] + 1
    assert count("unverified", "bad_signature") == before[1] + 1
