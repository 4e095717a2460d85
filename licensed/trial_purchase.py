"""A real test-mode purchase through the running server: ``licensed stripe check --e2e``.

The read-only checks show that each link is configured; only a payment shows
that they work together: Stripe signs its events with the endpoint's secret
(which no API reads back), delivers them through the public URL, and the
server turns them into a license, and a refund into a revocation. This buys a
subscription with Stripe's test card, watches the license appear and be
revoked through the server's own API, and removes what it created at Stripe
whatever happened, Ctrl-C included.

Test-mode keys only. It needs ``ADMIN_TOKEN``: the license is found with
``GET /api/admin/licenses?subscription_id=…`` and its key read from
``GET /api/admin/licenses/{id}``, so the purchase can be checked from any
machine that reaches ``APP_BASE_URL``. The test license stays in the
database, revoked, under the test buyer's e-mail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from . import licensing
from .errors import ConfigError, LicensedError, NotFound, PurchaseCheckFailed, StripeUnavailable
from .plans import Catalog, Plan
from .preflight import Answer, ServerClient
from .stripe_api import StripeGateway, invoice_payment_ids
from .stripe_sync import HANDLED_EVENTS

TEST_CARD = "pm_card_visa"
"""Stripe's test PaymentMethod for the card 4242 4242 4242 4242 (test mode only)."""
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.5
MARK = {"licensed_e2e": "1"}
"""Metadata on everything this creates at Stripe, to recognise a leftover."""


@dataclass(frozen=True)
class Step:
    ok: bool
    name: str
    detail: str
    seconds: float


def choose_plan(catalog: Catalog, plan_id: str | None) -> Plan:
    """The plan to buy: the one named, or the first subscription plan sold through Stripe."""
    if plan_id is not None:
        plan = catalog.plans.get(plan_id)
        if plan is None:
            raise ConfigError(f"--plan {plan_id}: no such plan")
        if not plan.stripe_price or plan.mode != "subscription":
            raise ConfigError(
                f"--plan {plan_id}: --e2e buys a subscription, and this plan is not a subscription plan"
                " with a stripe_price"
            )
        return plan
    for plan in catalog.plans.values():
        if plan.stripe_price and plan.mode == "subscription":
            return plan
    raise ConfigError("--e2e buys a subscription, and no plan is a subscription plan with a stripe_price")


def _charge_and_intent(refs: list[str]) -> tuple[str | None, str | None]:
    """The first charge id and the first payment intent id among a payment's ids."""
    charge = next((ref for ref in refs if ref.startswith("ch_")), None)
    intent = next((ref for ref in refs if ref.startswith("pi_")), None)
    return charge, intent


class TrialPurchase:
    """One purchase, its license, its refund, and the clean-up at Stripe."""

    def __init__(
        self,
        gateway: StripeGateway,
        server: ServerClient,
        plan: Plan,
        email: str,
        *,
        timeout: float = WAIT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.gateway = gateway
        self.server = server
        self.plan = plan
        self.email = email
        self.timeout = min(timeout, WAIT_SECONDS)
        self.clock = clock
        self.sleep = sleep
        self.started_at = licensing.iso(int(time.time())) or ""
        self.customer_id: str | None = None
        self.subscription_id: str | None = None
        self.invoice: dict[str, Any] = {}
        self.license_id: str | None = None
        self.key: str | None = None

    def run(self, emit: Callable[[Step], None]) -> bool:
        """Every step in turn until one fails; then the clean-up, always. True when all passed."""
        steps: list[tuple[str, Callable[[], str]]] = [
            ("admin API", self.admin_api),
            ("test customer", self.create_customer),
            ("subscription", self.subscribe),
            ("license", self.wait_for_license),
            ("key", self.validate_key),
            ("refund", self.refund),
            ("revoked", self.wait_for_revocation),
        ]
        passed = False
        try:
            passed = all(self._step(name, action, emit) for name, action in steps)
        finally:
            cleaned = self.clean_up(emit)
        return passed and cleaned

    def _step(self, name: str, action: Callable[[], str], emit: Callable[[Step], None]) -> bool:
        started = self.clock()
        try:
            detail = action()
        except LicensedError as err:
            emit(Step(False, name, err.message, self.clock() - started))
            return False
        emit(Step(True, name, detail, self.clock() - started))
        return True

    # --- the steps ---------------------------------------------------------------------------

    def admin_api(self) -> str:
        answer = self.server.get("/api/admin/stats", admin=True)
        if answer.status == 200:
            return f"the server at {self.server.base_url} accepts ADMIN_TOKEN"
        if answer.status == 401:
            raise PurchaseCheckFailed(
                "the running server refuses ADMIN_TOKEN: it runs with another one; restart it so it reads"
                " these settings (systemctl restart licensed)"
            )
        if answer.status == 403:
            raise PurchaseCheckFailed(
                "the running server has no ADMIN_TOKEN (admin API off): set it and restart"
            )
        raise PurchaseCheckFailed(
            f"GET /api/admin/stats answers {answer.status} {answer.code or ''}".rstrip()
        )

    def create_customer(self) -> str:
        customer = self.gateway.post(
            "/v1/customers",
            email=self.email,
            name="licensed stripe check --e2e",
            description="test purchase of `licensed stripe check --e2e`; deleted when it ends",
            metadata=MARK,
        )
        self.customer_id = str(customer["id"])
        card = self.gateway.post(f"/v1/payment_methods/{TEST_CARD}/attach", customer=self.customer_id)
        self.gateway.post(
            f"/v1/customers/{self.customer_id}", invoice_settings={"default_payment_method": card["id"]}
        )
        last4 = (card.get("card") or {}).get("last4") or "4242"
        return f"{self.customer_id} <{self.email}>, test card …{last4}"

    def subscribe(self) -> str:
        assert self.customer_id is not None
        sub = self.gateway.post(
            "/v1/subscriptions",
            customer=self.customer_id,
            items=[{"price": self.plan.stripe_price}],
            metadata=MARK,
            expand=["latest_invoice"],
        )
        self.subscription_id = str(sub["id"])
        invoice = sub.get("latest_invoice")
        if isinstance(invoice, str):
            invoice = self.gateway.get(f"/v1/invoices/{invoice}")
        self.invoice = invoice if isinstance(invoice, dict) else {}
        described = f"{self.subscription_id} to {self.plan.id} ({self.plan.stripe_price})"
        if sub.get("status") != "active" or self.invoice.get("status") != "paid":
            raise PurchaseCheckFailed(
                f"{described} is {sub.get('status')}, its first invoice {self.invoice.get('status')}:"
                " the test card was not charged"
            )
        return f"{described} active, invoice {self.invoice.get('id')} paid"

    def wait_for_license(self) -> str:
        assert self.subscription_id is not None
        path = f"/api/admin/licenses?subscription_id={quote(self.subscription_id)}"
        found = self._wait(lambda: self._first_license(self.server.get(path, admin=True)))
        if found is None:
            raise PurchaseCheckFailed(
                f"no license for {self.subscription_id} after {self.timeout:.0f} s: {self._diagnosis()}"
            )
        self.license_id = str(found["id"])
        return f"{self.license_id} ({found.get('plan')}) created by Stripe's events"

    def validate_key(self) -> str:
        assert self.license_id is not None
        shown = self.server.get(f"/api/admin/licenses/{quote(self.license_id)}", admin=True)
        key = shown.body.get("key")
        if shown.status != 200 or not isinstance(key, str):
            raise PurchaseCheckFailed(f"GET /api/admin/licenses/{self.license_id} answers {shown.status}")
        self.key = key
        last: list[str] = []
        answer = self._wait(lambda: self._code_is("VALID", last))
        if answer is None:
            raise PurchaseCheckFailed(
                f"the key answers {last[-1] if last else 'nothing'}, not VALID, after {self.timeout:.0f} s:"
                f" the payment has not reached the license; {self._diagnosis()}"
            )
        paid = (answer.get("license") or {}).get("paid_through")
        return f"POST /api/license/validate answers VALID (paid through {paid})"

    def refund(self) -> str:
        charge, intent = self._payment()
        target = {"charge": charge} if charge else {"payment_intent": intent}
        refund = self.gateway.post("/v1/refunds", metadata=MARK, **target)
        return f"{refund.get('id')} of {charge or intent}, {refund.get('status')}"

    def wait_for_revocation(self) -> str:
        last: list[str] = []
        if self._wait(lambda: self._code_is("REVOKED", last)) is None:
            raise PurchaseCheckFailed(
                f"the key still answers {last[-1] if last else 'nothing'} {self.timeout:.0f} s after the"
                " refund: the refund's event (charge.refunded) has not reached the license;"
                f" {self._diagnosis()}"
            )
        return "the key answers REVOKED"

    def clean_up(self, emit: Callable[[Step], None]) -> bool:
        """Cancel the subscription and delete the test customer, whatever happened before."""
        cleaned = True
        if self.subscription_id is not None:
            cleaned = self._step("clean-up", self._cancel, emit) and cleaned
        if self.customer_id is not None:
            cleaned = self._step("clean-up", self._delete_customer, emit) and cleaned
        return cleaned

    def _cancel(self) -> str:
        assert self.subscription_id is not None
        try:
            self.gateway.delete(f"/v1/subscriptions/{self.subscription_id}")
        except NotFound:
            return f"subscription {self.subscription_id} was already gone"
        except StripeUnavailable as err:
            raise PurchaseCheckFailed(
                f"{err.message}: cancel the test subscription {self.subscription_id} in the Dashboard"
            ) from err
        return f"subscription {self.subscription_id} canceled"

    def _delete_customer(self) -> str:
        assert self.customer_id is not None
        try:
            self.gateway.delete(f"/v1/customers/{self.customer_id}")
        except NotFound:
            return f"test customer {self.customer_id} was already gone"
        except StripeUnavailable as err:
            raise PurchaseCheckFailed(
                f"{err.message}: delete the test customer {self.customer_id} in the Dashboard (test mode)"
            ) from err
        return f"test customer {self.customer_id} deleted"

    # --- helpers ----------------------------------------------------------------------------------

    def _wait(self, probe: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """``probe()`` until it finds something or the time is up (one last look at the deadline)."""
        deadline = self.clock() + self.timeout
        while True:
            found = probe()
            if found is not None:
                return found
            left = deadline - self.clock()
            if left <= 0:
                return None
            self.sleep(min(POLL_SECONDS, left))

    @staticmethod
    def _first_license(answer: Answer) -> dict[str, Any] | None:
        if answer.status != 200:
            raise PurchaseCheckFailed(
                f"GET /api/admin/licenses answers {answer.status} {answer.code or ''}".rstrip()
            )
        found = answer.body.get("licenses") or []
        return found[0] if found and isinstance(found[0], dict) else None

    def _code_is(self, wanted: str, seen: list[str]) -> dict[str, Any] | None:
        answer = self.server.post_json("/api/license/validate", {"key": self.key})
        code = str(answer.body.get("code") or answer.code or answer.status)
        seen.append(code)
        return answer.body if code == wanted else None

    def _payment(self) -> tuple[str | None, str | None]:
        """The charge (or payment intent) that paid the first invoice, in either API shape."""
        charge, intent = _charge_and_intent(invoice_payment_ids(self.invoice))
        if charge is None and intent is None and self.invoice.get("id"):
            # The invoice came without its payments: list them (the same objects).
            payments = self.gateway.get("/v1/invoice_payments", invoice=self.invoice["id"])
            charge, intent = _charge_and_intent(invoice_payment_ids({"payments": payments}))
        if charge is None and intent is None:
            raise PurchaseCheckFailed(f"no payment found on invoice {self.invoice.get('id')} to refund")
        return charge, intent

    def _diagnosis(self) -> str:
        """What the server recorded since the purchase began, as a hint at the broken link."""
        seen = []
        for status in ("failed", "ignored"):
            answer = self.server.get(f"/api/admin/events?status={status}&limit=20", admin=True)
            for event in answer.body.get("events") or []:
                # Events licensed does not act on are ignored by design: no hint in those.
                relevant = status == "failed" or event.get("type") in HANDLED_EVENTS
                if relevant and str(event.get("received_at") or "") >= self.started_at:
                    reason = event.get("error") or event.get("reason") or status
                    seen.append(f"{event.get('type')} {status} ({reason})")
        if seen:
            return "the server recorded " + "; ".join(seen[:5])
        return (
            "the server recorded no failed or ignored event: look at the endpoint's deliveries in the"
            " Dashboard (Developers → Webhooks); a signature error there means STRIPE_WEBHOOK_SECRET is not"
            " that endpoint's signing secret"
        )
