"""The subscription status as a pure function of licence rows and ``now``."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.clock import DAY, T0

from licensed import licensing, subscriptions
from licensed.store import License

_ids = itertools.count()


def make_license(**fields: Any) -> License:
    """A monthly subscription licence paid 10 days ahead, with ``fields`` changed."""
    number = next(_ids)
    values: dict[str, Any] = {
        "id": f"lic_{number}",
        "customer_id": "cus_1",
        "product": "dashcaddy",
        "plan": "pro-monthly",
        "tier": "PRO",
        "features": ["sso"],
        "max_machines": 1,
        "status": "active",
        "status_reason": None,
        "paid_through": T0 + 10 * DAY,
        "grace_days": 7,
        "lifetime": False,
        "subscription_status": "active",
        "cancel_at_period_end": False,
        "source": "stripe",
        "stripe_customer_id": None,
        "stripe_subscription_id": None,
        "stripe_checkout_session_id": None,
        "stripe_payment_intent_id": None,
        "stripe_charge_id": None,
        "stripe_price_id": None,
        "snapshot_version": "",
        "status_version": "",
        "ended_at": None,
        "key_kid": "kid",
        "key_iat": T0,
        "created_at": T0 - 100 * DAY + number,
        "updated_at": T0,
    }
    values.update(fields)
    return License(**values)


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({}, "active"),
        ({"subscription_status": "trialing"}, "active"),
        ({"subscription_status": None}, "active"),  # a one-time purchase
        ({"lifetime": True, "paid_through": None, "subscription_status": None}, "active"),
        ({"paid_through": T0}, "active"),  # the last paid second
        ({"subscription_status": "past_due"}, "past_due"),
        ({"subscription_status": "unpaid"}, "past_due"),
        ({"subscription_status": "incomplete"}, "past_due"),
        ({"paid_through": T0 - DAY}, "past_due"),  # in grace
        ({"paid_through": T0 - 7 * DAY}, "past_due"),  # the last second of grace
        ({"cancel_at_period_end": True}, "canceled"),
        ({"subscription_status": "canceled"}, "canceled"),  # ended, still paid for
        ({"subscription_status": "incomplete_expired"}, "canceled"),
        ({"paid_through": T0 - 7 * DAY - 1}, "expired"),  # grace over
        ({"subscription_status": "canceled", "paid_through": T0 - 1}, "expired"),  # no grace once ended
        ({"subscription_status": "unpaid", "paid_through": T0 - 1}, "expired"),
        ({"cancel_at_period_end": True, "paid_through": T0 - 8 * DAY}, "expired"),
        ({"subscription_status": None, "paid_through": T0 - 1, "grace_days": 0}, "expired"),
        ({"paid_through": None}, "expired"),
        ({"status": "revoked"}, "expired"),
        ({"status": "revoked", "lifetime": True}, "expired"),
        ({"status": "suspended"}, "expired"),
        ({"subscription_status": "paused"}, "expired"),
    ],
)
def test_license_state(fields: dict[str, Any], state: str) -> None:
    lic = make_license(**fields)
    assert subscriptions.license_state(lic, T0) == state
    assert subscriptions.summarize([lic], T0).status == state


@pytest.mark.parametrize(
    ("states", "status"),
    [
        ([], "none"),
        (["expired"], "expired"),
        (["active", "past_due"], "active"),
        (["past_due", "active"], "active"),
        (["past_due", "canceled"], "past_due"),
        (["canceled", "expired"], "canceled"),
        (["expired", "canceled", "past_due", "active"], "active"),
    ],
)
def test_the_best_license_speaks_for_the_user(states: list[str], status: str) -> None:
    examples: dict[str, dict[str, Any]] = {
        "active": {},
        "past_due": {"subscription_status": "past_due"},
        "canceled": {"cancel_at_period_end": True},
        "expired": {"paid_through": T0 - 30 * DAY},
    }
    licenses = [make_license(**examples[state]) for state in states]
    summary = subscriptions.summarize(licenses, T0)
    assert summary.status == status
    if licenses:
        assert summary.license is licenses[states.index(status)]
    else:
        assert summary.license is None


def test_the_license_paid_furthest_ahead_gives_plan_and_period() -> None:
    short = make_license(plan="basic-monthly", paid_through=T0 + 3 * DAY)
    long = make_license(plan="team-monthly", paid_through=T0 + 20 * DAY, cancel_at_period_end=False)
    lapsed = make_license(plan="pro-monthly", paid_through=T0 - 60 * DAY)
    answer = subscriptions.status_answer([short, lapsed, long], {long.id: 2}, T0)
    assert answer["status"] == "active"
    assert answer["plan"] == "team-monthly"
    assert answer["current_period_end"] == licensing.iso(T0 + 20 * DAY)
    assert answer["cancel_at_period_end"] is False
    assert [v["id"] for v in answer["licenses"]] == [short.id, lapsed.id, long.id]
    assert [v["machines_used"] for v in answer["licenses"]] == [0, 0, 2]

    lifetime = make_license(plan="lifetime", lifetime=True, paid_through=None, subscription_status=None)
    answer = subscriptions.status_answer([long, lifetime], {}, T0)
    assert (answer["plan"], answer["current_period_end"]) == ("lifetime", None)


def test_nobody_without_licenses() -> None:
    assert subscriptions.status_answer([], {}, T0) == {
        "status": "none",
        "plan": None,
        "current_period_end": None,
        "cancel_at_period_end": False,
        "licenses": [],
    }


licenses_strategy = st.builds(
    make_license,
    status=st.sampled_from(["active", "suspended", "revoked"]),
    subscription_status=st.sampled_from(
        [
            None,
            "active",
            "trialing",
            "past_due",
            "unpaid",
            "incomplete",
            "canceled",
            "incomplete_expired",
            "paused",
        ]
    ),
    paid_through=st.one_of(st.none(), st.integers(T0 - 40 * DAY, T0 + 40 * DAY)),
    grace_days=st.integers(0, 14),
    lifetime=st.booleans(),
    cancel_at_period_end=st.booleans(),
    created_at=st.integers(T0 - 400 * DAY, T0),
)


@settings(max_examples=200, deadline=None)
@given(licenses=st.lists(licenses_strategy, max_size=6), extra=licenses_strategy, data=st.data())
def test_status_invariants(licenses: list[License], extra: License, data: st.DataObject) -> None:
    summary = subscriptions.summarize(licenses, T0)
    if not licenses:
        assert (summary.status, summary.license) == ("none", None)
    else:
        # The status is the state of the licence that speaks for the user, and no licence is better.
        assert summary.license is not None
        assert summary.status == subscriptions.license_state(summary.license, T0)
        ranks = [subscriptions.RANK[subscriptions.license_state(lic, T0)] for lic in licenses]
        assert subscriptions.RANK[summary.status] == max(ranks)
    # The order of the rows does not matter.
    shuffled = data.draw(st.permutations(licenses))
    again = subscriptions.summarize(shuffled, T0)
    assert (again.status, again.license) == (summary.status, summary.license)
    # One more licence never makes the user worse off.
    more = subscriptions.summarize([*licenses, extra], T0)
    if licenses:
        assert subscriptions.RANK[more.status] >= subscriptions.RANK[summary.status]
    else:
        assert more.status == subscriptions.license_state(extra, T0)
