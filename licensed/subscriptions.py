"""``GET /api/subscriptions/status``: what a signed-in user's subscription is now.

A desktop app sends the user's identity-provider access token (see
:mod:`auth`) and gets one status for the user plus the licences behind it.

Each licence is in one state (:func:`license_state`), judged from its row and
``now`` with the same entitlement rules as validation:

- ``expired``: not entitled now: past paid-through and grace, an ended
  subscription past its paid period, revoked, suspended or paused;
- ``canceled``: entitled, but ends at the period's end (``cancel_at_period_end``
  or the subscription already canceled while still paid for);
- ``past_due``: entitled, but a payment is missing (in grace, or Stripe says
  ``past_due``, ``unpaid`` or ``incomplete``);
- ``active``: entitled and paid (subscriptions, one-time purchases, lifetime).

The user's status is the best state among their licences, in the order
active > past_due > canceled > expired, and ``none`` without licences: a live,
paid licence speaks for the user even when an older one lapsed. Among licences
in the best state the one paid furthest ahead (lifetime first, then the newest)
gives ``plan``, ``current_period_end`` and ``cancel_at_period_end``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import licensing
from .store import License

ACTIVE = "active"
PAST_DUE = "past_due"
CANCELED = "canceled"
EXPIRED = "expired"
NONE = "none"

STATES = (ACTIVE, PAST_DUE, CANCELED, EXPIRED)
"""Licence states, best first."""

RANK = {state: len(STATES) - index for index, state in enumerate(STATES)}

PAYMENT_MISSING = frozenset({"past_due", "unpaid", "incomplete"})
"""Stripe subscription states in which a payment is owed."""

ENDING = frozenset({"canceled", "incomplete_expired"})
"""Stripe subscription states that have ended (the paid period may still run)."""


def license_state(lic: License, now: int) -> str:
    """One licence's state (module docstring), from its row alone."""
    entitlement = licensing.entitlement(lic, now)
    if entitlement not in licensing.VALID_CODES:
        return EXPIRED
    if lic.cancel_at_period_end or lic.subscription_status in ENDING:
        return CANCELED
    if entitlement == licensing.GRACE_PERIOD or lic.subscription_status in PAYMENT_MISSING:
        return PAST_DUE
    return ACTIVE


@dataclass(frozen=True)
class Summary:
    status: str
    license: License | None

    def answer(self, licenses: Sequence[dict[str, Any]]) -> dict[str, Any]:
        lic = self.license
        return {
            "status": self.status,
            "plan": lic.plan if lic else None,
            "current_period_end": licensing.iso(lic.paid_through) if lic and not lic.lifetime else None,
            "cancel_at_period_end": bool(lic and lic.cancel_at_period_end),
            "licenses": list(licenses),
        }


def summarize(licenses: Sequence[License], now: int) -> Summary:
    """The user's status and the licence that speaks for it: a pure function of rows and ``now``."""
    if not licenses:
        return Summary(NONE, None)

    def strength(lic: License) -> tuple[int, float, int, str]:
        end = math.inf if lic.lifetime else (lic.paid_through if lic.paid_through is not None else -math.inf)
        return (RANK[license_state(lic, now)], end, lic.created_at, lic.id)

    best = max(licenses, key=strength)
    return Summary(license_state(best, now), best)


def status_answer(licenses: Sequence[License], machines_used: Mapping[str, int], now: int) -> dict[str, Any]:
    views = [licensing.license_view(lic, machines_used.get(lic.id, 0)) for lic in licenses]
    return summarize(licenses, now).answer(views)


STATUS_ANSWER: dict[str, Any] = {
    "type": "object",
    "required": ["status", "plan", "current_period_end", "cancel_at_period_end", "licenses"],
    "properties": {
        "status": {"type": "string", "enum": [*STATES, NONE]},
        "plan": {"type": ["string", "null"]},
        "current_period_end": {"type": ["string", "null"], "format": "date-time"},
        "cancel_at_period_end": {"type": "boolean"},
        "licenses": {
            "type": "array",
            "items": {"type": "object", "description": "a licence, as in the license routes' answers"},
        },
    },
}
