"""Entitlement follows money: Stripe's real renewal sequences, step by step.

At renewal Stripe advances the subscription's period and sends
``customer.subscription.updated`` (still ``active``) together with
``invoice.created``; about an hour later it finalizes the invoice and tries the
charge. A failed charge sends ``invoice.payment_failed`` and the subscription
turns ``past_due``; retries follow for days, and then either the invoice is paid
(``invoice.paid``, ``invoice.payment_succeeded``, the subscription ``active``
again) or the subscription becomes ``unpaid`` or is canceled
(``customer.subscription.deleted``), as the account's settings say.

Each scenario is a list of steps: the events Stripe sends at a time, then the
code validate must answer a little later and the ``paid_through`` it must show.
The same table must hold when the events arrive as webhooks and when the server
was down and the reconciler lists them from Stripe afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from support import stripe_events as se
from support.clock import DAY, T0
from support.live import Live
from support.stripe_double import StripeDouble, stripe_double
from support.stripe_scenarios import HOUR, P0, P1, P2, PRICE, SCENARIOS, Step, Stream, recovered, start

from licensed import licensing, stripe_api, stripe_sync
from licensed.config import Config


def table(steps: list[Step]) -> list[tuple[str, str, str | None]]:
    return [(s.label, s.code, licensing.iso(s.paid_through)) for s in steps]


@pytest.fixture
def config(data_dir: Any) -> Config:
    return Config(data_dir=data_dir, app_base_url="http://licensed.test", stripe_webhook_secrets=(se.SECRET,))


def deliver(live: Live, event: dict[str, Any]) -> None:
    body, headers = se.signed(event, int(live.clock()))
    answer = live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text


def observe(live: Live, sub_id: str, at: int) -> tuple[str, str | None]:
    """Validate the licence's key a minute after ``at``: the code and the paid-through shown."""
    live.clock.set(at + 60)
    lic = live.services.store.find_license("stripe_subscription_id", sub_id)
    assert lic is not None
    answer: dict[str, Any] = live.post("/api/license/validate", {"key": live.key_of(lic)}).json()
    return answer["code"], answer["license"]["paid_through"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_step_of_a_renewal_as_webhooks(live: Live, scenario: str) -> None:
    steps = SCENARIOS[scenario]()
    seen = []
    for step in steps:
        live.clock.set(step.at)
        for _kind, event in step.events:
            deliver(live, event)
            deliver(live, event)  # Stripe delivers at least once
        seen.append((step.label, *observe(live, steps[0].events[0][1]["data"]["object"]["id"], step.at)))
    assert seen == table(steps)


# --- the same sequences through the reconciler, after the server was down ------------------------


class StripeEvents:
    """A Stripe double's ``/v1/events`` (newest first, ``created[gte]``) and subscription look-ups."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def on_get(self, path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if path == "/v1/events":
            since = int(query.get("created[gte]", "0"))
            listed = sorted(
                (e for e in self.events if e["created"] >= since), key=lambda e: (-e["created"], e["id"])
            )
            return 200, {"object": "list", "data": listed, "has_more": False, "url": "/v1/events"}
        if path.startswith("/v1/subscriptions/"):
            subs = [
                e["data"]["object"] for e in self.events if e["type"].startswith("customer.subscription.")
            ]
            if subs:
                return 200, subs[-1]
        if path.startswith("/v1/customers/"):
            return 200, {**se.fixture("customer"), "id": path.rsplit("/", 1)[1], "email": "buyer@example.com"}
        return 404, {"error": {"type": "invalid_request_error", "message": f"no {path}"}}


@pytest.fixture
def double() -> Iterator[StripeDouble]:
    with stripe_double() as running:
        yield running


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_step_of_a_renewal_through_the_reconciler(
    live: Live, double: StripeDouble, scenario: str
) -> None:
    """No webhook arrives: after each step the cron reconcile lists what Stripe sent."""
    stripe = StripeEvents()
    double.on_get = stripe.on_get
    gateway = stripe_api.StripeGateway("sk_test_double", double.url, sleep=lambda _s: None)
    reconciler = stripe_sync.Reconciler(live.services, gateway)
    steps = SCENARIOS[scenario]()
    seen = []
    for step in steps:
        stripe.events += [event for _kind, event in step.events]
        report = reconciler.events(step.at + 30, since=P0 - 60)
        assert report.failed == 0, report.failures
        seen.append((step.label, *observe(live, steps[0].events[0][1]["data"]["object"]["id"], step.at)))
    assert seen == table(steps)


def test_a_renewal_replayed_all_at_once_after_the_outage(live: Live, double: StripeDouble) -> None:
    """Down for the whole renewal: one reconcile at the end gives the final state, once."""
    stripe = StripeEvents()
    double.on_get = stripe.on_get
    steps = recovered()
    stripe.events = [event for step in steps for _kind, event in step.events]
    gateway = stripe_api.StripeGateway("sk_test_double", double.url, sleep=lambda _s: None)
    reconciler = stripe_sync.Reconciler(live.services, gateway)
    first = reconciler.events(P2 - HOUR, since=P0 - 60)
    assert (first.failed, first.checked) == (0, len(stripe.events))
    again = reconciler.events(P2 - HOUR, since=P0 - 60)
    assert (again.duplicates, again.repaired) == (len(stripe.events), 0)
    assert observe(live, "sub_recovered", P2 - HOUR) == ("VALID", licensing.iso(P2))


# --- reconcile --full: the latest invoice decides whether the current period is paid -----------------


def _listed_subscription(name: str, invoice_status: str) -> dict[str, Any]:
    sub = se.subscription(sub_id=f"sub_{name}", customer=f"cus_{name}", price=PRICE, period_end=P2)
    sub["items"]["data"][0]["current_period_start"] = P1
    inv = se.invoice(sub_id=sub["id"], period_end=P2, customer=f"cus_{name}", status=invoice_status)
    sub["latest_invoice"] = inv
    return sub


def test_full_reconcile_repairs_periods_counted_before_they_were_paid(
    live: Live, double: StripeDouble
) -> None:
    """A database written by the old rule (period end taken from an unpaid renewal) is set right,
    and a paid renewal still counts; one list call carries every subscription's latest invoice."""
    listed = [_listed_subscription("open", "open"), _listed_subscription("paid", "paid")]

    def on_get(path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if path == "/v1/subscriptions":
            assert query.get("expand[]") == "data.latest_invoice"
            return 200, {"object": "list", "data": listed, "has_more": False}
        return 404, {"error": {"type": "invalid_request_error", "message": f"no {path}"}}

    double.on_get = on_get
    for sub in listed:
        lic = live.issue_license("pro-monthly", days=60)  # the old rule's result: paid through P2
        with live.services.store.atomic():
            lic.stripe_subscription_id = sub["id"]
            lic.paid_through = P2
            live.services.store.save_license(lic, T0)
    gateway = stripe_api.StripeGateway("sk_test_double", double.url, sleep=lambda _s: None)
    report = stripe_sync.Reconciler(live.services, gateway).full(P1 + 2 * DAY)
    assert report.failed == 0
    assert [r.path for r in double.requests] == ["/v1/subscriptions", "/v1/checkout/sessions"]
    assert observe(live, "sub_open", P1 + 2 * DAY) == ("GRACE_PERIOD", licensing.iso(P1))
    assert observe(live, "sub_paid", P1 + 2 * DAY) == ("VALID", licensing.iso(P2))
    assert report.repaired == 2  # the open one lowered; the paid one took the listed state
    again = stripe_sync.Reconciler(live.services, gateway).full(P1 + 2 * DAY)
    assert again.repaired == 0


# --- events that change nothing say why ------------------------------------------------------------


def _event_row(live: Live, event_id: str) -> dict[str, Any]:
    row = live.services.store.one("SELECT status, reason, error FROM stripe_events WHERE id = ?", (event_id,))
    assert row is not None
    return dict(row)


def _metric(live: Live, reason: str) -> float:
    for line in live.get("/metrics").text.splitlines():
        if line.startswith(f'licensed_stripe_events_ignored_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_paid_checkout_for_an_unknown_price_is_impossible_to_miss(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    session = se.checkout_session(session_id=se.uid("cs"), mode="payment", payment_intent="pi_lost")
    event = se.event("checkout.session.completed", session, T0)
    before = _metric(live, "no_plan")
    with caplog.at_level("WARNING", logger="licensed.stripe"):
        deliver(live, event)
    assert _event_row(live, event["id"]) == {"status": "ignored", "reason": "no_plan", "error": None}
    [record] = [r for r in caplog.records if getattr(r, "event_id", None) == event["id"]]
    assert record.levelname == "WARNING" and record.type == "checkout.session.completed"  # type: ignore[attr-defined]
    assert record.reason == "no_plan"  # type: ignore[attr-defined]
    assert _metric(live, "no_plan") == before + 1
    admin_events = stripe_sync_events(live, "ignored")
    assert [(e["id"], e["reason"]) for e in admin_events] == [(event["id"], "no_plan")]
    health = live.get("/health")
    assert health.status_code == 200
    assert any(event["id"] in w for w in health.json()["warnings"])
    from licensed.admin import stats

    assert stats(live.services, "test", T0)["unmapped_purchases"] == {
        "count": 1,
        "newest_events": [event["id"]],
    }


def stripe_sync_events(live: Live, status: str) -> list[dict[str, Any]]:
    from licensed.admin import events

    listed: list[dict[str, Any]] = events(live.services, "test", T0, status=status)["events"]
    return listed


@pytest.mark.parametrize(
    ("kind", "build", "reason"),
    [
        (
            "checkout.session.completed",
            lambda: se.checkout_session(
                session_id=se.uid("cs"), mode="payment", plan="pro-year", payment_status="unpaid"
            ),
            "payment_not_complete",
        ),
        (
            "customer.subscription.created",
            lambda: se.subscription(
                sub_id=se.uid("sub"), customer="cus_o", price="price_other", period_end=P1
            ),
            "no_plan",
        ),
        ("customer.updated", lambda: {**se.fixture("customer"), "id": "cus_nobody"}, "unknown_customer"),
        ("invoice.paid", lambda: se.invoice(sub_id=None, period_end=P1), "not_a_subscription_invoice"),
        (
            "invoice.created",
            lambda: se.invoice(sub_id="sub_x", period_end=P1, status="draft"),
            "unhandled_type",
        ),
    ],
)
def test_events_that_change_nothing_record_why(live: Live, kind: str, build: Any, reason: str) -> None:
    event = se.event(kind, build(), T0)
    deliver(live, event)
    assert _event_row(live, event["id"])["reason"] == reason
    assert live.services.store.one("SELECT COUNT(*) FROM licenses")[0] == 0


# --- the licence follows the Stripe customer's address ---------------------------------------------


def test_customer_updated_moves_the_address_of_its_licenses(live: Live) -> None:
    s = Stream("mail")
    for _kind, event in start(s)[0].events:
        deliver(live, event)
    lic = live.services.store.find_license("stripe_subscription_id", s.sub_id)
    customer = {**se.fixture("customer"), "id": s.customer, "email": "new@example.com", "name": "Ada New"}
    newer = se.event("customer.updated", customer, T0 + 200)
    older = se.event("customer.updated", {**customer, "email": "old@example.com"}, T0 + 100)
    deliver(live, newer)
    deliver(live, older)  # late and older: changes nothing
    row = live.services.store.get_customer(lic.customer_id)
    assert (row["email"], row["name"]) == ("new@example.com", "Ada New")
    from licensed.admin import find

    assert [x["id"] for x in find(live.services, "test", T0, email="new@example.com")["licenses"]] == [lic.id]
    audit = live.services.store.all(
        "SELECT action, after FROM audit_log WHERE license_id = ? AND action = 'license.customer_update'",
        (lic.id,),
    )
    assert len(audit) == 1 and "new@example.com" in audit[0]["after"]


# --- refunds reported as refund objects -----------------------------------------------------------


def _paid(live: Live, name: str) -> tuple[Stream, str]:
    s = Stream(name)
    for _kind, event in start(s)[0].events:
        deliver(live, event)
    lic = live.services.store.find_license("stripe_subscription_id", s.sub_id)
    return s, live.key_of(lic)


def _refund(s: Stream, amount: int, status: str = "succeeded") -> dict[str, Any]:
    refund = se.fixture("refund")
    refund.update(
        id=se.uid("re"), amount=amount, charge=None, payment_intent=f"pi_{s.name}_first", status=status
    )
    return refund


@pytest.mark.parametrize(
    "kinds", [("refund.created",), ("refund.updated",), ("refund.created", "charge.refunded")]
)
def test_a_full_refund_object_revokes_once(live: Live, kinds: tuple[str, ...]) -> None:
    s, key = _paid(live, f"refund{len(kinds)}{kinds[0][-7:]}")
    refund = _refund(s, 2000)
    for n, kind in enumerate(kinds):
        obj = (
            refund
            if kind.startswith("refund.")
            else se.charge(charge_id="ch_x", payment_intent=f"pi_{s.name}_first", refunded_amount=2000)
        )
        deliver(live, se.event(kind, obj, T0 + 10 + n))
        deliver(live, se.event(kind, obj, T0 + 10 + n))
    assert live.post("/api/license/validate", {"key": key}).json()["code"] == "REVOKED"
    revokes = live.services.store.one("SELECT COUNT(*) FROM audit_log WHERE action = 'license.revoke'")[0]
    assert revokes == 1


@pytest.mark.parametrize(
    ("amount", "status", "reason"),
    [(500, "succeeded", "partial_refund"), (2000, "pending", "refund_not_succeeded")],
)
def test_a_partial_or_pending_refund_keeps_the_license(
    live: Live, amount: int, status: str, reason: str
) -> None:
    s, key = _paid(live, f"part{amount}{status}")
    event = se.event("refund.created", _refund(s, amount, status), T0 + 10)
    deliver(live, event)
    assert _event_row(live, event["id"])["reason"] == reason
    assert live.post("/api/license/validate", {"key": key}).json()["code"] == "VALID"


@pytest.mark.parametrize("kind", ["refund.created", "charge.refunded"])
def test_a_refund_traced_through_stripe_reads_its_charge_at_most_once(
    live: Live, double: StripeDouble, kind: str
) -> None:
    """A refund of a payment this server never saw is traced to its licence through Stripe. A
    refund object's charge is read once, for the licence and for the amount refunded alike; a
    ``charge.refunded`` event carries the charge itself, which is not read again."""
    s, key = _paid(live, f"traced{kind[:6]}")
    charge = se.charge(charge_id=f"ch_{s.name}", payment_intent=None, refunded_amount=2000)
    invoice = {**se.invoice(sub_id=s.sub_id, period_end=P1, customer=s.customer), "id": f"in_{s.name}"}

    def on_get(path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if path == f"/v1/charges/{charge['id']}":
            return 200, {**charge, "invoice": invoice["id"]}
        if path == f"/v1/invoices/{invoice['id']}":
            return 200, invoice
        if path == "/v1/invoice_payments":
            assert query["payment[payment_intent]"] == f"pi_{s.name}_other"
            payment = {**se.fixture("invoice_payment"), "invoice": invoice["id"]}
            return 200, {"object": "list", "data": [payment], "has_more": False}
        return 404, {"error": {"type": "invalid_request_error", "message": f"no {path}"}}

    double.on_get = on_get
    if kind == "refund.created":
        obj = {**_refund(s, 2000), "charge": charge["id"], "payment_intent": None}
        read = [f"/v1/charges/{charge['id']}", f"/v1/invoices/{invoice['id']}"]
    else:
        obj = {**charge, "payment_intent": f"pi_{s.name}_other"}
        read = ["/v1/invoice_payments", f"/v1/invoices/{invoice['id']}"]
    gateway = stripe_api.StripeGateway("sk_test_double", double.url, sleep=lambda _s: None)
    processor = stripe_sync.EventProcessor(live.services, gateway)
    outcome = processor.process(se.event(kind, obj, T0 + 10), T0 + 10)
    assert outcome.effect is stripe_sync.Effect.CHANGED
    assert [r.path for r in double.requests] == read
    assert live.post("/api/license/validate", {"key": key}).json()["code"] == "REVOKED"


def test_the_key_mail_goes_out_once_when_the_first_period_is_paid(live: Live) -> None:
    """A subscription created before its payment mails nothing; the payment mails the key, once."""
    s = Stream("firstmail")
    created, *_rest, paid, succeeded = start(s)[0].events
    deliver(live, created[1])
    customer = {**se.fixture("customer"), "id": s.customer, "email": "first@example.com"}
    deliver(live, se.event("customer.updated", customer, T0))
    assert live.services.store.one("SELECT COUNT(*) FROM outbox")[0] == 0
    deliver(live, paid[1])
    deliver(live, succeeded[1])
    rows = live.services.store.all("SELECT to_addr, kind FROM outbox")
    assert [tuple(r) for r in rows] == [("first@example.com", "license_key")]
