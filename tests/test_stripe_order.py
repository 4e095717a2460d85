"""Any order and any duplication of one customer's events ends in the in-order state.

Stripe retries an event until it is acknowledged; here a failed event (one
that arrived before what it depends on) is retried after the others, as Stripe
would. The final licence must equal the one the in-order stream produces.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import stripe_events as se
from support.clock import DAY, T0
from support.stripe_scenarios import SCENARIOS

SUB = "sub_lifecycle"
CUS = "cus_lifecycle"
P1, P2, P3 = T0 + 30 * DAY, T0 + 60 * DAY, T0 + 90 * DAY


def lifecycle(ends: bool = True) -> list[dict[str, Any]]:
    """One subscription's life: buy, renew, upgrade, fail, recover, dispute, (cancel)."""

    def sub(created: int, kind: str, **kw: Any) -> dict[str, Any]:
        kw.setdefault("price", "price_pro_monthly")
        kw.setdefault("period_end", P1)
        obj = se.subscription(sub_id=SUB, customer=CUS, **kw)
        return se.event(f"customer.subscription.{kind}", obj, created, event_id=f"evt_{created}")

    def inv(created: int, kind: str, period_end: int, pi: str | None = None) -> dict[str, Any]:
        obj = se.invoice(sub_id=SUB, period_end=period_end, payment_intent=pi, customer=CUS)
        return se.event(kind, obj, created, event_id=f"evt_{created}")

    def dispute(created: int, kind: str, status: str) -> dict[str, Any]:
        obj = se.dispute(dispute_id="dp_life", charge_id="ch_life", payment_intent="pi_2", status=status)
        return se.event(kind, obj, created, event_id=f"evt_{created}")

    refund = se.charge(charge_id="ch_life", payment_intent="pi_2", refunded_amount=300)
    events = [
        sub(100, "created"),
        inv(101, "invoice.paid", P1, "pi_1"),
        sub(200, "updated", price="price_team_monthly", quantity=2),
        inv(300, "invoice.payment_failed", P2),
        sub(301, "updated", price="price_team_monthly", quantity=2, status="past_due", period_end=P2),
        inv(400, "invoice.paid", P2, "pi_2"),
        sub(401, "updated", price="price_team_monthly", quantity=2, period_end=P2, cancel_at_period_end=True),
        dispute(450, "charge.dispute.created", "needs_response"),
        se.event("charge.refunded", refund, 460, event_id="evt_460"),
        dispute(500, "charge.dispute.closed", "won"),
        sub(
            600,
            "deleted",
            price="price_team_monthly",
            quantity=2,
            status="canceled",
            period_end=P2,
            ended_at=P2,
            cancel_at_period_end=True,
        ),
    ]
    return events if ends else events[:-1]


def renewal(name: str) -> list[dict[str, Any]]:
    """One of Stripe's real renewal sequences (recovered, unpaid, canceled), all its steps."""
    return [event for step in SCENARIOS[name]() for _kind, event in step.events]


def run(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Deliver ``events`` in the given order, then retry failures as Stripe would."""
    sub_id = next(e["data"]["object"]["id"] for e in events if e["type"].startswith("customer.subscription."))
    with se.replayed(events, T0 + 100 * DAY) as services:
        lic = services.store.find_license("stripe_subscription_id", sub_id)
        assert lic is not None
        state = se.license_state(lic)
        state["applied_events"] = services.store.one(
            "SELECT COUNT(*) FROM stripe_events WHERE status = 'applied'"
        )[0]
        return state


IN_ORDER = run(lifecycle())
IN_ORDER_LIVING = run(lifecycle(ends=False))
STREAMS = {
    "lifecycle": lifecycle(),
    "lifecycle-living": lifecycle(ends=False),
    **{f"renewal-{name}": renewal(name) for name in SCENARIOS},
}
IN_ORDER_STATES = {name: run(events) for name, events in STREAMS.items()}


def test_in_order_state_is_what_the_lifecycle_means() -> None:
    assert IN_ORDER == {
        "status": "active",
        "status_reason": None,
        "subscription_status": "canceled",
        "paid_through": P2,
        "plan": "team-monthly",
        "tier": "TEAM",
        "features": ["sso", "recipes", "swarm"],
        "max_machines": 6,
        "cancel_at_period_end": True,
        "ended_at": P2,
        "grace_days": 7,
        "applied_events": 10,  # the partial refund is recorded as ignored
    }
    living = dict(IN_ORDER, subscription_status="active", ended_at=None, applied_events=9)
    assert living == IN_ORDER_LIVING


def test_in_order_renewals_end_where_the_money_says() -> None:
    paid = {name: state["paid_through"] for name, state in IN_ORDER_STATES.items()}
    statuses = {name: state["subscription_status"] for name, state in IN_ORDER_STATES.items()}
    assert paid["renewal-recovered"] == T0 + 60 * DAY
    assert paid["renewal-unpaid"] == paid["renewal-canceled"] == T0 + 30 * DAY
    assert (statuses["renewal-recovered"], statuses["renewal-unpaid"], statuses["renewal-canceled"]) == (
        "active",
        "unpaid",
        "canceled",
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_order_and_duplication_gives_the_in_order_state(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(STREAMS)))
    events = STREAMS[name]
    order = data.draw(st.permutations(events))
    duplicates = data.draw(st.lists(st.sampled_from(events), max_size=6))
    stream = list(order)
    for dup in duplicates:
        stream.insert(data.draw(st.integers(0, len(stream))), dup)
    assert run(stream) == IN_ORDER_STATES[name]
