"""Stripe's real renewal sequences, as steps of events with what validate must answer after each.

At renewal Stripe advances the subscription's period and sends
``customer.subscription.updated`` (still ``active``) together with
``invoice.created``; about an hour later it finalizes the invoice and tries the
charge. A failed charge sends ``invoice.payment_failed`` and the subscription
turns ``past_due``; retries follow for days, and then either the invoice is paid
(``invoice.paid``, ``invoice.payment_succeeded``, the subscription ``active``
again) or the subscription becomes ``unpaid`` or is canceled
(``customer.subscription.deleted``), as the account's settings say.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from support import stripe_events as se
from support.clock import DAY, T0

HOUR = 3600
P0, P1, P2 = T0, T0 + 30 * DAY, T0 + 60 * DAY
"""Period boundaries: the first period runs P0..P1, the renewal P1..P2 (plan grace: 7 days)."""
PRICE = "price_pro_monthly"


@dataclass(frozen=True)
class Step:
    label: str
    at: int
    events: tuple[tuple[str, dict[str, Any]], ...]
    code: str
    paid_through: int


class Stream:
    """Builds one subscription's events with Stripe's object shapes and ids in order."""

    def __init__(self, name: str) -> None:
        self.sub_id = f"sub_{name}"
        self.customer = f"cus_{name}"
        self.renewal = f"in_{name}_renewal"
        self._ids = itertools.count(1)
        self.name = name

    def event(self, kind: str, obj: dict[str, Any], at: int) -> tuple[str, dict[str, Any]]:
        return kind, se.event(kind, obj, at, event_id=f"evt_{self.name}_{next(self._ids):03d}")

    def subscription(self, kind: str, at: int, status: str, period: tuple[int, int], **kw: Any) -> Any:
        sub = se.subscription(
            sub_id=self.sub_id, customer=self.customer, price=PRICE, status=status, period_end=period[1], **kw
        )
        sub["items"]["data"][0]["current_period_start"] = period[0]
        sub["latest_invoice"] = self.renewal if period[0] >= P1 else f"in_{self.name}_first"
        return self.event(f"customer.subscription.{kind}", sub, at)

    def invoice(self, kind: str, at: int, status: str, *, first: bool = False, **kw: Any) -> Any:
        inv = se.invoice(
            sub_id=self.sub_id,
            period_end=P1 if first else P2,
            customer=self.customer,
            status=status,
            reason="subscription_create" if first else "subscription_cycle",
            payment_intent=f"pi_{self.name}_{'first' if first else 'renewal'}" if status == "paid" else None,
        )
        inv["id"] = f"in_{self.name}_first" if first else self.renewal
        inv.update(kw)
        return self.event(kind, inv, at)


def start(s: Stream) -> list[Step]:
    """What every scenario shares: the first period paid, then a renewal charge that fails."""
    return [
        Step(
            "subscribed, first invoice paid",
            P0,
            (
                s.subscription("created", P0, "active", (P0, P1)),
                s.invoice("invoice.created", P0, "draft", first=True),
                s.invoice("invoice.finalized", P0, "open", first=True),
                s.invoice("invoice.paid", P0, "paid", first=True),
                s.invoice("invoice.payment_succeeded", P0, "paid", first=True),
            ),
            "VALID",
            P1,
        ),
        Step("a day before renewal", P1 - DAY, (), "VALID", P1),
        Step(
            "period advanced, charge not tried yet",
            P1,
            (
                s.subscription("updated", P1, "active", (P1, P2)),
                s.invoice("invoice.created", P1, "draft"),
            ),
            "GRACE_PERIOD",
            P1,
        ),
        Step(
            "charge failed",
            P1 + HOUR,
            (
                s.invoice("invoice.finalized", P1 + HOUR, "open"),
                s.invoice("invoice.payment_failed", P1 + HOUR, "open", attempt_count=1),
                s.subscription("updated", P1 + HOUR, "past_due", (P1, P2)),
            ),
            "GRACE_PERIOD",
            P1,
        ),
        Step(
            "first retry failed",
            P1 + 1 * DAY,
            (s.invoice("invoice.payment_failed", P1 + DAY, "open", attempt_count=2),),
            "GRACE_PERIOD",
            P1,
        ),
    ]


def recovered() -> list[Step]:
    s = Stream("recovered")
    return [
        *start(s),
        Step(
            "second retry paid",
            P1 + 3 * DAY,
            (
                s.invoice("invoice.paid", P1 + 3 * DAY, "paid"),
                s.invoice("invoice.payment_succeeded", P1 + 3 * DAY, "paid"),
                s.subscription("updated", P1 + 3 * DAY, "active", (P1, P2)),
            ),
            "VALID",
            P2,
        ),
        Step("end of the paid period", P2 - HOUR, (), "VALID", P2),
    ]


def unpaid() -> list[Step]:
    s = Stream("unpaid")
    return [
        *start(s),
        Step(
            "last retry failed: unpaid, inside the grace days",
            P1 + 3 * DAY,
            (
                s.invoice("invoice.payment_failed", P1 + 3 * DAY, "open", attempt_count=3),
                s.subscription("updated", P1 + 3 * DAY, "unpaid", (P1, P2)),
            ),
            "EXPIRED",
            P1,
        ),
        Step("still unpaid", P1 + 20 * DAY, (), "EXPIRED", P1),
    ]


def canceled() -> list[Step]:
    s = Stream("canceled")
    ended = P1 + 10 * DAY
    return [
        *start(s),
        Step("retrying, last grace day", P1 + 7 * DAY - HOUR, (), "GRACE_PERIOD", P1),
        Step("grace over while Stripe retries", P1 + 8 * DAY, (), "EXPIRED", P1),
        Step(
            "retries exhausted: canceled",
            ended,
            (
                s.invoice("invoice.payment_failed", ended, "open", attempt_count=4),
                s.subscription(
                    "deleted", ended, "canceled", (P1, P2), ended_at=ended, cancel_at_period_end=False
                ),
            ),
            "EXPIRED",
            P1,
        ),
    ]


SCENARIOS = {"recovered": recovered, "unpaid": unpaid, "canceled": canceled}
