"""Stripe events → licences: the rules the webhook and the reconciler share.

Stripe is the billing truth; this module turns its events into licence state.

Entitlement follows money: ``paid_through`` moves forward only when a period
is paid (a paid invoice, $0 included; the first payment of a checkout; a
trial's end). Subscription events carry status, plan, seats, the cancel flag
and the current period, which is remembered but not counted as paid: at
renewal Stripe advances the period about an hour before it tries the charge.

Exactly once: an event id is recorded in the same transaction as its effect,
so a duplicate changes nothing. Out of order: every field keeps the version
(event ``created``, then id) of the event that last set it, and an older event
never overwrites a newer value; ``paid_through`` only grows until the
subscription ends, which is final. Any order and any duplication of one
subscription's events therefore ends in the same state.

Stripe API calls happen before the write transaction opens, never inside it,
so a slow Stripe never holds the database lock.
"""

from __future__ import annotations

import enum
import fcntl
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import addresses, identities, licensing, outbox
from .errors import (
    Conflict,
    InvalidEmail,
    LicensedError,
    NoLicenseYet,
    NotFound,
    ReconcileBusy,
    StripeNotConfigured,
    StripeUnavailable,
    WebhookFailed,
)
from .plans import MAX_MACHINES, Plan
from .services import Services
from .store import License, Store
from .stripe_api import (
    StripeGateway,
    amount,
    id_of,
    invoice_is_paid,
    invoice_payment_ids,
    invoice_period_end,
    invoice_subscription,
    subscription_period,
    subscription_price,
    subscription_quantity,
)

log = logging.getLogger("licensed.stripe")

TERMINAL = frozenset({"canceled", "incomplete_expired"})
"""Subscription states Stripe never leaves: final here too."""
NOT_STARTED = frozenset({"incomplete", "incomplete_expired"})
"""Subscription states whose first payment was never made."""

DISPUTE_CLOSED = frozenset({"won", "lost", "warning_closed", "charge_refunded", "prevented"})


def _version(event: dict[str, Any]) -> str:
    """Orders events: ``created`` first, the id breaking ties deterministically."""
    return f"{int(event['created']):012d}:{event['id']}"


# --- the event processor ------------------------------------------------------------------------


class Effect(enum.Enum):
    """What applying an event did."""

    CHANGED = "changed"
    UNCHANGED = "unchanged"
    """Applied, and the licence already said what the event says (an older or repeated state)."""
    IGNORED = "ignored"
    """Recorded with a :class:`Reason`: nothing in it concerns a licence."""
    DUPLICATE = "duplicate"


class Reason(enum.StrEnum):
    """Why an event changed nothing: stored with the event, logged, counted in ``/metrics``."""

    UNHANDLED_TYPE = "unhandled_type"
    NO_PLAN = "no_plan"
    PAYMENT_NOT_COMPLETE = "payment_not_complete"
    SUBSCRIPTION_NOT_PAID = "subscription_not_paid"
    NOT_A_SUBSCRIPTION_INVOICE = "not_a_subscription_invoice"
    UNKNOWN_SUBSCRIPTION = "unknown_subscription"
    UNKNOWN_CUSTOMER = "unknown_customer"
    UNKNOWN_PAYMENT = "unknown_payment"
    INVALID_EMAIL = "invalid_email"
    PARTIAL_REFUND = "partial_refund"
    REFUND_NOT_SUCCEEDED = "refund_not_succeeded"
    REFUND_AMOUNT_UNKNOWN = "refund_amount_unknown"


REASON_TEXT = {
    Reason.UNHANDLED_TYPE: "this event type does not concern licences",
    Reason.NO_PLAN: "the price bought maps to no plan (plans file, or metadata license_plan)",
    Reason.PAYMENT_NOT_COMPLETE: "the checkout is not paid yet",
    Reason.SUBSCRIPTION_NOT_PAID: "the subscription's first payment is not made",
    Reason.NOT_A_SUBSCRIPTION_INVOICE: "the invoice belongs to no subscription",
    Reason.UNKNOWN_SUBSCRIPTION: "the subscription has no licence (not for a licensed plan)",
    Reason.UNKNOWN_CUSTOMER: "no licence belongs to this Stripe customer",
    Reason.UNKNOWN_PAYMENT: "the payment paid for no licence",
    Reason.INVALID_EMAIL: "the customer's new e-mail address cannot be used",
    Reason.PARTIAL_REFUND: "a partial refund keeps the licence",
    Reason.REFUND_NOT_SUCCEEDED: "the refund has not succeeded",
    Reason.REFUND_AMOUNT_UNKNOWN: "the refunded payment's amount is unknown",
}


@dataclass(frozen=True)
class Outcome:
    effect: Effect
    license_id: str | None = None
    reason: Reason | None = None
    subject: str | None = None
    """What the reason is about: the price, customer, subscription or payment id."""

    @property
    def status(self) -> str:
        """What ``stripe_events.status`` records: ``applied``, ``ignored`` (or ``duplicate``)."""
        if self.effect is Effect.IGNORED:
            return "ignored"
        if self.effect is Effect.DUPLICATE:
            return "duplicate"
        return "applied"

    @property
    def detail(self) -> str:
        if self.reason is not None:
            text = REASON_TEXT[self.reason]
            return f"{text}: {self.subject}" if self.subject else text
        return self.effect.value


def _ignored(reason: Reason, subject: str | None = None) -> Outcome:
    return Outcome(Effect.IGNORED, reason=reason, subject=subject)


@dataclass
class Prepared:
    """What an event needs from Stripe, fetched before the transaction opens."""

    subscription: dict[str, Any] | None = None
    customer: dict[str, Any] | None = None
    plan: Plan | None = None
    license_id: str | None = None
    prices: list[str] = field(default_factory=list)
    """The prices looked at for a plan (named when none maps)."""
    refund_full: bool | None = None
    """For a refund: whether the payment is now refunded in full (None: unknown)."""
    charge: dict[str, Any] | None = None
    """For a refund or dispute: the charge paid, the event's own or read from Stripe once
    (``{}``: Stripe has no such charge; None: not read)."""


class EventProcessor:
    """Applies verified Stripe events to the store: the webhook and the reconciler share it.

    Entitlement follows money: ``paid_through`` moves forward only when a
    period is paid (a paid invoice, $0 included; the first payment of a
    checkout; a trial's end). Subscription events carry status, plan, seats,
    the cancel flag and the current period, which is remembered but not
    counted as paid: at renewal Stripe advances the period about an hour
    before it even tries the charge.
    """

    def __init__(self, services: Services, gateway: StripeGateway | None) -> None:
        self.services = services
        self.store: Store = services.store
        self.gateway = gateway

    # --- entry point ---

    def process(self, event: dict[str, Any], now: int) -> Outcome:
        """Apply ``event`` exactly once; on failure record it and raise WebhookFailed."""
        event_id = event["id"]
        if self._done(event_id):
            return Outcome(Effect.DUPLICATE)
        handler = HANDLERS.get(event["type"])
        try:
            prepared = self._prepare(event) if handler else Prepared()
            with self.store.atomic():
                if self._done(event_id):
                    return Outcome(Effect.DUPLICATE)
                if handler is None:
                    outcome = _ignored(Reason.UNHANDLED_TYPE)
                else:
                    outcome = handler(self, event, prepared, now)
                self._record(event, outcome, None, now)
        except Exception as err:
            message = err.message if isinstance(err, LicensedError) else f"{type(err).__name__}: {err}"
            log.warning(
                "stripe event failed", extra={"event_id": event_id, "type": event["type"], "error": message}
            )
            try:
                with self.store.atomic():
                    self._record(event, None, message, now)
            except LicensedError:
                log.error("could not record failed event", extra={"event_id": event_id})
            raise WebhookFailed(f"event {event_id} failed: {message}") from err
        if outcome.reason is not None:
            _log_ignored(event, outcome)
        return outcome

    def replay(self, event_id: str, now: int) -> Outcome:
        """Apply a recorded event again: fetched afresh from Stripe when it is configured."""
        if self.gateway is not None:
            event = self.gateway.get(f"/v1/events/{event_id}")
        else:
            recorded = self.store.stripe_event_payload(event_id)
            if recorded is None:
                raise NotFound(f"no event {event_id}")
            event = recorded
        self.store.reopen_ignored_event(event_id)
        return self.process(event, now)

    def repair_subscription(self, sub: dict[str, Any], now: int) -> Outcome:
        """Make the licence match a subscription as Stripe has it now.

        With ``latest_invoice`` expanded, the current period counts as paid only
        when that invoice is paid; an unpaid one for the current period takes
        ``paid_through`` back to the period's start (which repairs licences
        extended by subscription events alone).
        """
        prepared = Prepared(plan=self._plan_for_subscription(sub))
        if not self.store.find_license("stripe_subscription_id", sub["id"]):
            prepared.customer = self._customer(sub.get("customer"))
        with self.store.atomic():
            return self._snapshot(sub, prepared, _as_of(now), now, repair=True)

    def repair_checkout(self, session: dict[str, Any], now: int) -> Outcome:
        """Create the licence of a completed one-time checkout if it is missing."""
        if self.store.find_license("stripe_checkout_session_id", session["id"]):
            return Outcome(Effect.UNCHANGED)
        prepared = Prepared()
        prepared.plan = self._plan_for_session(session, None, prepared)
        event = dict(_as_of(int(session.get("created") or now)), data={"object": session})
        with self.store.atomic():
            return self._checkout_completed(event, prepared, now)

    def _done(self, event_id: str) -> bool:
        return self.store.stripe_event_status(event_id) in ("applied", "ignored")

    def _record(self, event: dict[str, Any], outcome: Outcome | None, error: str | None, now: int) -> None:
        """Record the event with its outcome (None: it failed, with ``error``)."""
        self.store.record_stripe_event(
            event,
            status="failed" if outcome is None else outcome.status,
            error=error,
            reason=None if outcome is None or outcome.reason is None else outcome.reason.value,
            subject=None if outcome is None else outcome.subject,
            license_id=None if outcome is None else outcome.license_id,
            now=now,
        )

    # --- preparation (may call Stripe; no transaction open) ---

    def _need_gateway(self, why: str) -> StripeGateway:
        if self.gateway is None:
            raise StripeNotConfigured(f"Stripe is needed to {why}")
        return self.gateway

    def _prepare(self, event: dict[str, Any]) -> Prepared:
        obj = event["data"]["object"]
        kind = event["type"]
        prepared = Prepared()
        if kind.startswith("checkout.session."):
            if obj.get("mode") == "subscription":
                sub_id = id_of(obj.get("subscription"))
                if sub_id and not self.store.find_license("stripe_subscription_id", sub_id):
                    sub = obj["subscription"] if isinstance(obj.get("subscription"), dict) else None
                    prepared.subscription = sub or self._need_gateway("read the subscription").get(
                        f"/v1/subscriptions/{sub_id}"
                    )
            prepared.plan = self._plan_for_session(obj, prepared.subscription, prepared)
        elif kind.startswith("customer.subscription."):
            prepared.plan = self._plan_for_subscription(obj, prepared)
            if not self.store.find_license("stripe_subscription_id", obj["id"]):
                prepared.customer = self._customer(obj.get("customer"))
        elif kind.startswith("invoice."):
            sub_id = invoice_subscription(obj)
            if sub_id and not self.store.find_license("stripe_subscription_id", sub_id):
                # The subscription's own events have not arrived: learn it from Stripe.
                sub = self._need_gateway("read the invoice's subscription").get(f"/v1/subscriptions/{sub_id}")
                prepared.subscription = sub
                prepared.plan = self._plan_for_subscription(sub, prepared)
                prepared.customer = self._customer(sub.get("customer"))
        elif kind == "charge.refunded":
            prepared.charge = obj  # the event's object is the charge: it is not read again
            payment_intent = id_of(obj.get("payment_intent"))
            prepared.license_id = self._license_for_payment(obj["id"], payment_intent, obj, prepared)
            prepared.refund_full = _charge_refunded_in_full(obj)
        elif kind.startswith("charge.dispute."):
            charge_id, payment_intent = id_of(obj.get("charge")), id_of(obj.get("payment_intent"))
            prepared.license_id = self._license_for_payment(charge_id, payment_intent, obj, prepared)
        elif kind.startswith("refund."):
            charge_id, payment_intent = id_of(obj.get("charge")), id_of(obj.get("payment_intent"))
            prepared.license_id = self._license_for_payment(charge_id, payment_intent, {}, prepared)
            if prepared.license_id is not None and obj.get("status") == "succeeded":
                prepared.refund_full = self._refund_is_full(obj, charge_id, payment_intent, prepared)
        return prepared

    def _charge(self, charge_id: str, prepared: Prepared) -> dict[str, Any]:
        """The charge paid, read from Stripe at most once per event (``{}`` when Stripe has none)."""
        if prepared.charge is None:
            try:
                prepared.charge = self._need_gateway("read the charge").get(f"/v1/charges/{charge_id}")
            except NotFound:
                prepared.charge = {}
        return prepared.charge

    def _refund_is_full(
        self, refund: dict[str, Any], charge_id: str | None, payment_intent: str | None, prepared: Prepared
    ) -> bool | None:
        """Whether the payment a refund belongs to is now refunded in full.

        Stripe's charge says so (``amount_refunded``); without Stripe, the amount
        recorded when the payment arrived is compared with the refund's.
        """
        if charge_id and self.gateway is not None:
            charge = self._charge(charge_id, prepared)
            if charge:
                return _charge_refunded_in_full(charge)
        refunded = amount(refund.get("amount"))
        for ref in (charge_id, payment_intent):
            if ref and refunded is not None:
                paid = self.store.payment_amount(ref)
                if paid is not None:
                    return refunded >= paid
        return None

    def _customer(self, value: Any) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        customer_id = id_of(value)
        if not customer_id or self.gateway is None:
            return {"id": customer_id} if customer_id else None
        try:
            return self.gateway.get(f"/v1/customers/{customer_id}")
        except NotFound:
            return {"id": customer_id}

    def _plan_for_price(self, price: dict[str, Any], prepared: Prepared | None = None) -> Plan | None:
        """Plans file by price id, else ``license_plan`` in price or product metadata."""
        catalog = self.services.catalog
        price_id = id_of(price)
        if price_id:
            if prepared is not None:
                prepared.prices.append(price_id)
            plan = catalog.plan_for_price(price_id)
            if plan:
                return plan
        named = (price.get("metadata") or {}).get("license_plan")
        product = price.get("product")
        if not named and isinstance(product, dict):
            named = (product.get("metadata") or {}).get("license_plan")
        if not named and isinstance(product, str) and self.gateway is not None:
            try:
                named = (self.gateway.get(f"/v1/products/{product}").get("metadata") or {}).get(
                    "license_plan"
                )
            except NotFound:
                named = None
        return catalog.plans.get(named) if named else None

    def _plan_for_subscription(self, sub: dict[str, Any], prepared: Prepared | None = None) -> Plan | None:
        plan = self._plan_for_price(subscription_price(sub), prepared)
        if plan is None:
            named = (sub.get("metadata") or {}).get("plan")
            plan = self.services.catalog.plans.get(named) if named else None
        return plan

    def _plan_for_session(
        self, session: dict[str, Any], sub: dict[str, Any] | None, prepared: Prepared
    ) -> Plan | None:
        named = (session.get("metadata") or {}).get("plan")
        if named and named in self.services.catalog.plans:
            return self.services.catalog.plans[named]
        if sub is not None:
            plan = self._plan_for_subscription(sub, prepared)
            if plan:
                return plan
        if self.gateway is None:
            return None
        items = self.gateway.get(
            f"/v1/checkout/sessions/{session['id']}/line_items", **{"expand[]": "data.price.product"}
        )
        for item in items.get("data") or []:
            plan = self._plan_for_price(item.get("price") or {}, prepared)
            if plan:
                return plan
        return None

    def _license_for_payment(
        self, charge_id: str | None, payment_intent: str | None, obj: dict[str, Any], prepared: Prepared
    ) -> str | None:
        for ref in (charge_id, payment_intent):
            if ref:
                license_id = self.store.payment_license(ref)
                if license_id:
                    return license_id
        if payment_intent:
            lic = self.store.find_license("stripe_payment_intent_id", payment_intent)
            if lic:
                return lic.id
        if charge_id:
            lic = self.store.find_license("stripe_charge_id", charge_id)
            if lic:
                return lic.id
        invoice_id = id_of(obj.get("invoice"))
        if invoice_id is None and charge_id and self.gateway is not None:
            charge = self._charge(charge_id, prepared)
            invoice_id = id_of(charge.get("invoice"))
            payment_intent = payment_intent or id_of(charge.get("payment_intent"))
        if invoice_id is None and payment_intent and self.gateway is not None:
            try:
                found = self.gateway.get(
                    "/v1/invoice_payments",
                    **{"payment[type]": "payment_intent", "payment[payment_intent]": payment_intent},
                )
                first = (found.get("data") or [{}])[0]
                invoice_id = id_of(first.get("invoice"))
            except (NotFound, StripeUnavailable):
                invoice_id = None
        if invoice_id and self.gateway is not None:
            inv = self.gateway.get(f"/v1/invoices/{invoice_id}")
            sub_id = invoice_subscription(inv)
            if sub_id:
                lic = self.store.find_license("stripe_subscription_id", sub_id)
                if lic is None:
                    raise NoLicenseYet(f"the subscription {sub_id} of this payment has no licence yet")
                return lic.id
        if self.gateway is None:
            # Without Stripe the payment cannot be traced: fail, so Stripe retries
            # once the invoice that links it to a licence has arrived.
            raise NoLicenseYet("no licence is known for this payment yet")
        return None

    # --- application (inside the transaction) ---

    def _new_license(
        self, plan: Plan, customer: dict[str, Any] | None, email: str | None, name: str | None, now: int
    ) -> License:
        customer_id = self.store.upsert_customer(
            now, email=email, name=name, stripe_customer_id=id_of(customer)
        )
        return licensing.new_license(
            plan=plan, customer_id=customer_id, ring=self.services.ring, now=now, source="stripe"
        )

    def _mail_key_once(self, lic: License, now: int) -> None:
        """Queue the key mail the first time a licence is entitled and its buyer's address known.

        A purchase reaches that point by one of several events (checkout, first
        invoice, trial), in any order; the outbox remembers that the key went out.
        An imported licence (``licensed admin import``) is never mailed: its buyer
        holds the old key, and the installation is handed the signed one itself.
        """
        if lic.source == "import" or licensing.entitlement(lic, now) not in licensing.VALID_CODES:
            return
        if self.store.has_mail(lic.id, outbox.KIND_LICENSE_KEY):
            return
        customer = self.store.get_customer(lic.customer_id)
        if customer is None or not customer["email"]:
            return
        try:
            outbox.queue_mail(
                self.store, lic.id, outbox.KIND_LICENSE_KEY, customer["email"], customer["name"], now
            )
        except InvalidEmail as err:
            log.warning("license key not mailed", extra={"license_id": lic.id, "error": err.message})

    def _checkout_completed(self, event: dict[str, Any], prepared: Prepared, now: int) -> Outcome:
        session = event["data"]["object"]
        if session.get("payment_status") not in ("paid", "no_payment_required"):
            return _ignored(Reason.PAYMENT_NOT_COMPLETE, str(session.get("payment_status")))
        plan = prepared.plan
        if plan is None:
            return _ignored(Reason.NO_PLAN, ", ".join(prepared.prices) or "no price found")
        details = session.get("customer_details") or {}
        email = details.get("email") or session.get("customer_email")
        name = details.get("name")
        oidc_sub = session.get("client_reference_id")
        existing = self.store.find_license("stripe_checkout_session_id", session["id"])
        sub_id = id_of(session.get("subscription"))
        if existing is None and sub_id:
            existing = self.store.find_license("stripe_subscription_id", sub_id)
        if existing is not None:
            before = licensing.license_view(existing, 0)
            claims_before = licensing.key_claims(existing, "")
            existing.stripe_checkout_session_id = existing.stripe_checkout_session_id or session["id"]
            self._link_customer(existing.customer_id, email, name, oidc_sub, now)
            if session.get("mode") == "subscription":
                self._first_period_paid(existing, prepared.subscription, event)
            self._restamp_if_changed(existing, claims_before, now)
            self.store.save_license(existing, now)
            self.store.audit(
                now,
                "stripe",
                "license.link_checkout",
                existing.id,
                before,
                licensing.license_view(existing, 0),
            )
            self._mail_key_once(existing, now)
            return Outcome(Effect.CHANGED, existing.id)
        customer = session.get("customer")
        lic = self._new_license(plan, customer if customer else None, email, name, now)
        lic.stripe_checkout_session_id = session["id"]
        lic.stripe_customer_id = id_of(customer)
        lic.stripe_price_id = plan.stripe_price
        if session.get("mode") == "subscription" and sub_id:
            lic.stripe_subscription_id = sub_id
            sub = prepared.subscription or {}
            self._apply_snapshot(lic, sub, plan, event, now, created=True)
            self._first_period_paid(lic, sub, event)
        else:
            lic.stripe_payment_intent_id = id_of(session.get("payment_intent"))
            if plan.duration_days and not plan.lifetime:
                lic.paid_through = int(event["created"]) + plan.duration_days * 86400
        self.store.insert_license(lic)
        if lic.stripe_payment_intent_id:
            self.store.remember_payment(
                lic.stripe_payment_intent_id, lic.id, amount(session.get("amount_total"))
            )
        if oidc_sub:
            self._link_customer(lic.customer_id, None, None, oidc_sub, now)
        self.store.audit(now, "stripe", "license.create", lic.id, None, licensing.license_view(lic, 0))
        self._mail_key_once(lic, now)
        return Outcome(Effect.CHANGED, lic.id)

    def _first_period_paid(self, lic: License, sub: dict[str, Any] | None, event: dict[str, Any]) -> None:
        """A paid checkout paid the subscription's first period: the one current when it completed.

        The period comes from the subscription Stripe sent (or fetched), else from
        the one the licence remembers; a later period (the checkout's event came
        late) is left to its own invoice.
        """
        start, end = subscription_period(sub) if sub else (lic.period_start, lic.period_end)
        if start is not None and end is not None and start <= int(event["created"]):
            self._extend(lic, end)

    def _link_customer(
        self, customer_id: str, email: str | None, name: str | None, oidc_sub: str | None, now: int
    ) -> None:
        self.store.fill_customer_contact(customer_id, email, name, now)
        if oidc_sub and isinstance(oidc_sub, str) and len(oidc_sub) <= 255:
            try:
                identities.link_customer(self.store, customer_id, oidc_sub, now, via="checkout")
            except Conflict:
                log.warning(
                    "checkout's sign-in is linked to another customer", extra={"customer": customer_id}
                )

    def _subscription_snapshot(self, event: dict[str, Any], prepared: Prepared, now: int) -> Outcome:
        sub = event["data"]["object"]
        return self._snapshot(sub, prepared, event, now)

    def _snapshot(
        self,
        sub: dict[str, Any],
        prepared: Prepared,
        event: dict[str, Any],
        now: int,
        *,
        repair: bool = False,
    ) -> Outcome:
        lic = self.store.find_license("stripe_subscription_id", sub["id"])
        plan = prepared.plan
        if lic is None:
            if plan is None:
                return _ignored(Reason.NO_PLAN, ", ".join(prepared.prices) or sub["id"])
            if sub.get("status") in NOT_STARTED:
                return _ignored(Reason.SUBSCRIPTION_NOT_PAID, sub["id"])
            customer = prepared.customer or (
                {"id": id_of(sub.get("customer"))} if sub.get("customer") else None
            )
            email = (customer or {}).get("email")
            name = (customer or {}).get("name")
            lic = self._new_license(plan, customer, email, name, now)
            lic.stripe_subscription_id = sub["id"]
            lic.stripe_customer_id = id_of(sub.get("customer"))
            self._apply_snapshot(lic, sub, plan, event, now, created=True, repair=repair)
            self.store.insert_license(lic)
            self.store.audit(now, "stripe", "license.create", lic.id, None, licensing.license_view(lic, 0))
            self._mail_key_once(lic, now)
            return Outcome(Effect.CHANGED, lic.id)
        before = licensing.license_view(lic, 0)
        versions_before = (lic.snapshot_version, lic.status_version)
        changed = self._apply_snapshot(lic, sub, plan, event, now, created=False, repair=repair)
        if not changed:
            if versions_before != (lic.snapshot_version, lic.status_version):
                # Same state, newer event: remember its version, or an older event could win later.
                self.store.save_license(lic, now)
            return Outcome(Effect.UNCHANGED, lic.id)
        self.store.save_license(lic, now)
        self.store.audit(now, "stripe", "license.update", lic.id, before, licensing.license_view(lic, 0))
        self._mail_key_once(lic, now)
        return Outcome(Effect.CHANGED, lic.id)

    def _apply_snapshot(
        self,
        lic: License,
        sub: dict[str, Any],
        plan: Plan | None,
        event: dict[str, Any],
        now: int,
        *,
        created: bool,
        repair: bool = False,
    ) -> bool:
        """Merge a subscription snapshot into the licence; True if anything changed.

        Never moves ``paid_through`` forward, except to a trial's end, or (``repair``)
        as the subscription's latest invoice says (:meth:`_paid_by_latest_invoice`).
        """
        version = _version(event)
        claims_before = licensing.key_claims(lic, "")
        state_before = _money_state(lic)
        status = sub.get("status")
        if isinstance(status, str):
            self._set_status(lic, status, version)
        if version > lic.snapshot_version:
            lic.snapshot_version = version
            lic.cancel_at_period_end = bool(sub.get("cancel_at_period_end"))
            lic.period_start, lic.period_end = subscription_period(sub)
            if plan is not None:
                quantity = subscription_quantity(sub)
                lic.plan = plan.id
                lic.tier = plan.tier
                lic.features = list(plan.features)
                lic.grace_days = plan.grace_days
                lic.release_after_days = plan.release_after_days
                lic.max_machines = min(MAX_MACHINES, plan.max_machines * quantity)
                lic.stripe_price_id = id_of(subscription_price(sub)) or lic.stripe_price_id
        trial_end = sub.get("trial_end")
        if isinstance(trial_end, int) and status not in TERMINAL and status not in NOT_STARTED:
            self._extend(lic, trial_end)  # a trial is a period the vendor gives
        if status in TERMINAL:
            self._end(lic, int(sub.get("ended_at") or sub.get("canceled_at") or event["created"]))
        if repair:
            self._paid_by_latest_invoice(lic, sub)
        if created:
            return True
        claims_changed = self._restamp_if_changed(lic, claims_before, now)
        return claims_changed or state_before != _money_state(lic)

    def _paid_by_latest_invoice(self, lic: License, sub: dict[str, Any]) -> None:
        """The reconciler's rule: the current period counts once its latest invoice is paid.

        Needs ``latest_invoice`` expanded (the list call asks for it); an id alone
        says nothing and changes nothing.
        """
        inv = sub.get("latest_invoice")
        if not isinstance(inv, dict):
            return
        start, end = subscription_period(sub)
        if invoice_is_paid(inv):
            paid_end = invoice_period_end(inv) or end
            if paid_end is not None:
                self._extend(lic, paid_end)
        elif (
            inv.get("status") in ("draft", "open", "uncollectible")
            and inv.get("billing_reason") in ("subscription_cycle", "subscription_create")
            and start is not None
            and lic.ended_at is None
            and lic.paid_through is not None
            and lic.paid_through > start
        ):
            lic.paid_through = start  # the current period is not paid: the last paid one ended at its start

    def _restamp_if_changed(self, lic: License, claims_before: dict[str, Any], now: int) -> bool:
        """Re-issue the key when a claim changed, so the client is handed the new one."""
        if licensing.key_claims(lic, "") == claims_before:
            return False
        licensing.restamp_key(lic, self.services.ring, now)
        return True

    def _set_status(self, lic: License, status: str, version: str) -> None:
        """Last writer wins by event version; a final state is never left."""
        if lic.subscription_status in TERMINAL:
            return
        if status in TERMINAL or version > lic.status_version:
            lic.subscription_status = status
            lic.status_version = max(version, lic.status_version)

    def _extend(self, lic: License, period_end: int) -> None:
        """A period was paid up to ``period_end``: paid-through only grows, and never
        past the end of an ended subscription (so any order of events agrees)."""
        if lic.ended_at is not None:
            period_end = min(period_end, lic.ended_at)
        lic.paid_through = max(lic.paid_through or 0, period_end)

    def _end(self, lic: License, ended_at: int) -> None:
        """The subscription ended: nothing after ``ended_at`` is paid, and no grace follows."""
        lic.ended_at = ended_at if lic.ended_at is None else min(lic.ended_at, ended_at)
        if lic.paid_through is not None:
            lic.paid_through = min(lic.paid_through, lic.ended_at)

    def _invoice_paid(self, event: dict[str, Any], prepared: Prepared, now: int) -> Outcome:
        inv = event["data"]["object"]
        sub_id = invoice_subscription(inv)
        if not sub_id:
            return _ignored(Reason.NOT_A_SUBSCRIPTION_INVOICE, inv.get("id"))
        if prepared.subscription is not None:
            outcome = self._snapshot(prepared.subscription, prepared, _older(event), now)
            if outcome.effect is Effect.IGNORED:
                return outcome
        lic = self.store.find_license("stripe_subscription_id", sub_id)
        if lic is None:
            return _ignored(Reason.UNKNOWN_SUBSCRIPTION, sub_id)
        before = licensing.license_view(lic, 0)
        state_before = _money_state(lic)
        claims_before = licensing.key_claims(lic, "")
        period_end = invoice_period_end(inv)
        if period_end is not None:
            self._extend(lic, period_end)
        for ref in invoice_payment_ids(inv):
            self.store.remember_payment(ref, lic.id, amount(inv.get("amount_paid")))
        self._restamp_if_changed(lic, claims_before, now)
        if _money_state(lic) == state_before:
            return Outcome(Effect.UNCHANGED, lic.id)
        self.store.save_license(lic, now)
        self.store.audit(now, "stripe", "license.renew", lic.id, before, licensing.license_view(lic, 0))
        self._mail_key_once(lic, now)
        return Outcome(Effect.CHANGED, lic.id)

    def _invoice_failed(self, event: dict[str, Any], prepared: Prepared, now: int) -> Outcome:
        """A failed charge moves nothing: ``paid_through`` stays at the last paid period's end,
        and grace runs from there while the subscription lives (its own events say
        ``past_due``, then ``unpaid`` or ``canceled``)."""
        inv = event["data"]["object"]
        sub_id = invoice_subscription(inv)
        if not sub_id:
            return _ignored(Reason.NOT_A_SUBSCRIPTION_INVOICE, inv.get("id"))
        if prepared.subscription is not None:
            self._snapshot(prepared.subscription, prepared, _older(event), now)
        lic = self.store.find_license("stripe_subscription_id", sub_id)
        if lic is None:
            return _ignored(Reason.UNKNOWN_SUBSCRIPTION, sub_id)
        return Outcome(Effect.UNCHANGED, lic.id)

    def _customer_updated(self, event: dict[str, Any], prepared: Prepared, now: int) -> Outcome:
        """The licences follow their Stripe customer's e-mail address and name (newest event wins)."""
        customer = event["data"]["object"]
        row = self.store.customer_by_stripe_id(customer["id"])
        if row is None:
            return _ignored(Reason.UNKNOWN_CUSTOMER, customer["id"])
        version = _version(event)
        if version <= row["stripe_version"]:
            return Outcome(Effect.UNCHANGED)
        email, name = customer.get("email"), customer.get("name")
        try:
            email = addresses.check_address(email) if email else row["email"]
            name = addresses.check_display_name(name) if name else row["name"]
        except InvalidEmail:
            return _ignored(Reason.INVALID_EMAIL, customer["id"])
        licenses = self.store.licenses_where("customer_id", row["id"])
        self.store.update_customer_contact(row["id"], email, name, version, now)
        if (email, name) == (row["email"], row["name"]):
            return Outcome(Effect.UNCHANGED)
        for lic in licenses:
            self.store.audit(
                now,
                "stripe",
                "license.customer_update",
                lic.id,
                {"email": row["email"], "name": row["name"]},
                {"email": email, "name": name},
            )
        return Outcome(Effect.CHANGED, licenses[0].id if licenses else None)

    def _paid_license(self, prepared: Prepared, subject: str | None) -> License | Outcome:
        """The licence a charge paid for, or the outcome saying there is none."""
        lic = self.store.get_license(prepared.license_id) if prepared.license_id else None
        return lic if lic is not None else _ignored(Reason.UNKNOWN_PAYMENT, subject)

    def _refunded(self, event: dict[str, Any], prepared: Prepared, now: int) -> Outcome:
        """A full refund revokes the licence the payment paid for, whichever event says it first."""
        obj = event["data"]["object"]
        payment = id_of(obj.get("charge")) if event["type"].startswith("refund.") else obj["id"]
        lic = self._paid_license(prepared, payment or id_of(obj.get("payment_intent")))
        if isinstance(lic, Outcome):
            return lic
        if event["type"].startswith("refund.") and obj.get("status") != "succeeded":
            return _ignored(Reason.REFUND_NOT_SUCCEEDED, obj.get("id"))
        full = prepared.refund_full
        plan = self.services.catalog.plans.get(lic.plan)
        if full is None:
            return _ignored(Reason.REFUND_AMOUNT_UNKNOWN, payment)
        if not full and not (plan and plan.revoke_on_partial_refund):
            return _ignored(Reason.PARTIAL_REFUND, payment)
        if lic.status == "revoked":
            return Outcome(Effect.UNCHANGED, lic.id)
        before = licensing.license_view(lic, 0)
        lic.status = "revoked"
        lic.status_reason = "refund"
        self.store.save_license(lic, now)
        self.store.audit(now, "stripe", "license.revoke", lic.id, before, licensing.license_view(lic, 0))
        return Outcome(Effect.CHANGED, lic.id)

    def _dispute(self, event: dict[str, Any], prepared: Prepared, now: int) -> Outcome:
        dispute = event["data"]["object"]
        lic = self._paid_license(prepared, id_of(dispute.get("charge")))
        if isinstance(lic, Outcome):
            return lic
        version = _version(event)
        status = str(dispute.get("status") or "")
        row = self.store.dispute(dispute["id"])
        if row is None:
            self.store.insert_dispute(dispute["id"], lic.id, status, version)
        elif row["status"] not in DISPUTE_CLOSED and (status in DISPUTE_CLOSED or version > row["version"]):
            self.store.update_dispute(dispute["id"], status, version)
        before = licensing.license_view(lic, 0)
        self._settle_disputes(lic)
        self.store.save_license(lic, now)
        self.store.audit(
            now,
            "stripe",
            f"license.dispute.{status or 'unknown'}",
            lic.id,
            before,
            licensing.license_view(lic, 0),
        )
        return Outcome(Effect.CHANGED, lic.id)

    def _settle_disputes(self, lic: License) -> None:
        """Derive the licence status from its disputes: lost revokes, open suspends."""
        statuses = self.store.dispute_statuses(lic.id)
        if lic.status == "revoked":
            return
        if "lost" in statuses:
            lic.status, lic.status_reason = "revoked", "dispute_lost"
        elif any(s not in DISPUTE_CLOSED for s in statuses):
            if lic.status == "active":
                lic.status, lic.status_reason = "suspended", "dispute"
        elif lic.status == "suspended" and lic.status_reason == "dispute":
            lic.status, lic.status_reason = "active", None


Handler = Callable[[EventProcessor, dict[str, Any], Prepared, int], Outcome]

HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": EventProcessor._checkout_completed,
    "checkout.session.async_payment_succeeded": EventProcessor._checkout_completed,
    "customer.subscription.created": EventProcessor._subscription_snapshot,
    "customer.subscription.updated": EventProcessor._subscription_snapshot,
    "customer.subscription.deleted": EventProcessor._subscription_snapshot,
    "customer.subscription.paused": EventProcessor._subscription_snapshot,
    "customer.subscription.resumed": EventProcessor._subscription_snapshot,
    "customer.updated": EventProcessor._customer_updated,
    "invoice.paid": EventProcessor._invoice_paid,
    "invoice.payment_succeeded": EventProcessor._invoice_paid,
    "invoice.payment_failed": EventProcessor._invoice_failed,
    "charge.refunded": EventProcessor._refunded,
    "refund.created": EventProcessor._refunded,
    "refund.updated": EventProcessor._refunded,
    "charge.dispute.created": EventProcessor._dispute,
    "charge.dispute.updated": EventProcessor._dispute,
    "charge.dispute.closed": EventProcessor._dispute,
}
"""Each event type licensed acts on, and the method that applies it; any other type is ignored."""
HANDLED_EVENTS = tuple(HANDLERS)
"""The event types the webhook endpoint must send (endpoint setup and ``stripe check`` use it)."""


def _money_state(lic: License) -> tuple[Any, ...]:
    """What an event may change, compared before and after to tell whether it did."""
    return (
        lic.subscription_status,
        lic.paid_through,
        lic.ended_at,
        lic.cancel_at_period_end,
        lic.plan,
        lic.max_machines,
        lic.period_start,
        lic.period_end,
    )


def _charge_refunded_in_full(charge: dict[str, Any]) -> bool:
    paid = amount(charge.get("amount")) or 0
    refunded = amount(charge.get("amount_refunded")) or 0
    return bool(charge.get("refunded")) or (paid > 0 and refunded >= paid)


def _log_ignored(event: dict[str, Any], outcome: Outcome) -> None:
    """One WARNING line naming the event and what it was about (not for unhandled types)."""
    assert outcome.reason is not None
    fields = {
        "event_id": event["id"],
        "type": event["type"],
        "reason": outcome.reason.value,
        "subject": outcome.subject,
    }
    message = f"stripe event {event['id']} ({event['type']}) changed nothing: {outcome.detail}"
    if outcome.reason is Reason.UNHANDLED_TYPE:
        log.debug(message, extra=fields)
    else:
        log.warning(message, extra=fields)


def _as_of(now: int) -> dict[str, Any]:
    """A pseudo event for state read from Stripe at ``now``: newer than anything before."""
    return {"id": "reconcile", "created": now, "type": "reconcile"}


def _older(event: dict[str, Any]) -> dict[str, Any]:
    """A fetched subscription is as old as the event that made us fetch it, minus a tick."""
    return {"id": "", "created": int(event["created"]) - 1, "type": "fetched"}


# --- repair: replay, reconcile, endpoint setup -------------------------------------------

RECONCILE_OVERLAP = 600
"""Seconds re-listed before the cursor: Stripe can list an event a little after its ``created``."""


@dataclass
class ReconcileReport:
    mode: str
    checked: int = 0
    applied: int = 0
    repaired: int = 0
    duplicates: int = 0
    ignored: int = 0
    failed: int = 0
    cursor: int | None = None
    calls: int = 0
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        parts = [
            f"reconcile {self.mode}: checked {self.checked}",
            f"applied {self.applied}",
            f"repaired {self.repaired}",
            f"duplicates {self.duplicates}",
            f"ignored {self.ignored}",
            f"failed {self.failed}",
            f"stripe calls {self.calls}",
        ]
        if self.cursor is not None:
            parts.append(f"cursor {licensing.iso(self.cursor)}")
        return ", ".join(parts)


class Reconciler:
    """Brings licences in line with Stripe when webhooks were lost. One run at a time."""

    def __init__(self, services: Services, gateway: StripeGateway) -> None:
        self.services = services
        self.gateway = gateway
        self.processor = EventProcessor(services, gateway)
        self.lock_path = services.config.data_dir / "reconcile.lock"

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        handle = open(self.lock_path, "a+b")  # noqa: SIM115 - held for the whole run
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise ReconcileBusy() from err
            yield
        finally:
            handle.close()

    def events(self, now: int, since: int | None = None, overlap: int = RECONCILE_OVERLAP) -> ReconcileReport:
        """Apply every event listed since the cursor (minus an overlap), oldest first.

        The cursor moves only when every listed event was applied; a Stripe
        failure while listing raises before anything moves.
        """
        with self._exclusive():
            store = self.services.store
            report = ReconcileReport("events")
            calls_before = self.gateway.calls
            cursor = since if since is not None else store.reconcile_cursor()
            start = max(0, cursor - overlap)
            events = list(self.gateway.list_all("/v1/events", **{"created[gte]": start}))
            events.sort(key=lambda e: (int(e["created"]), str(e["id"])))
            newest = cursor
            oldest_failed: int | None = None
            for event in events:
                report.checked += 1
                try:
                    outcome = self.processor.process(event, now)
                except WebhookFailed as err:
                    report.failed += 1
                    report.failures.append(err.message)
                    created = int(event["created"])
                    oldest_failed = created if oldest_failed is None else min(oldest_failed, created)
                    continue
                self._count(report, outcome)
                newest = max(newest, int(event["created"]))
            report.cursor = newest if oldest_failed is None else min(newest, oldest_failed)
            with store.atomic():
                store.set_reconcile_cursor(report.cursor, now)
                if not report.failed:
                    store.set_last_reconcile_at(now)
            report.calls = self.gateway.calls - calls_before
            return report

    def full(self, now: int, window_days: int = 90) -> ReconcileReport:
        """Walk every subscription and recent completed checkout, repairing licences.

        For when the events are gone (Stripe lists 30 days of them).
        """
        with self._exclusive():
            report = ReconcileReport("full")
            calls_before = self.gateway.calls
            # The latest invoice comes with each subscription (no call more): the
            # current period counts as paid only when that invoice is.
            expand: dict[str, Any] = {"expand[]": "data.latest_invoice"}
            subscriptions = self.gateway.list_all("/v1/subscriptions", status="all", **expand)
            for sub in subscriptions:
                report.checked += 1
                self._count(report, self.processor.repair_subscription(sub, now))
            try:
                sessions = list(
                    self.gateway.list_all(
                        "/v1/checkout/sessions",
                        status="complete",
                        **{"created[gte]": now - window_days * 86400},
                    )
                )
            except NotFound:
                sessions = []
                log.warning("this Stripe API lists no checkout sessions; one-time purchases not checked")
            for session in sessions:
                if session.get("mode") != "payment":
                    continue
                report.checked += 1
                self._count(report, self.processor.repair_checkout(session, now))
            with self.services.store.atomic():
                self.services.store.set_last_reconcile_at(now)
            report.calls = self.gateway.calls - calls_before
            return report

    @staticmethod
    def _count(report: ReconcileReport, outcome: Outcome) -> None:
        if outcome.effect is Effect.DUPLICATE:
            report.duplicates += 1
        elif outcome.effect is Effect.IGNORED:
            report.ignored += 1
        else:
            report.applied += 1
            report.repaired += outcome.effect is Effect.CHANGED


def webhook_url(base_url: str) -> str:
    """Where Stripe must send this server's events."""
    return f"{base_url.rstrip('/')}/api/stripe/webhook"


def setup_webhook_endpoint(gateway: StripeGateway, base_url: str) -> tuple[str, str | None, bool]:
    """Create or update the endpoint at ``base_url``; returns (id, secret or None, created).

    An existing endpoint gets every handled event type, and is enabled again if
    it was disabled (Stripe disables an endpoint that failed for days).
    """
    url = webhook_url(base_url)
    for endpoint in gateway.list_all("/v1/webhook_endpoints"):
        if endpoint.get("url") == url:
            changes: dict[str, Any] = {"enabled_events": list(HANDLED_EVENTS)}
            if endpoint.get("status") == "disabled":
                changes["disabled"] = "false"
            gateway.post(f"/v1/webhook_endpoints/{endpoint['id']}", **changes)
            return str(endpoint["id"]), None, False
    created = gateway.post(
        "/v1/webhook_endpoints", url=url, enabled_events=list(HANDLED_EVENTS), description="licensed"
    )
    return str(created["id"]), created.get("secret"), True
