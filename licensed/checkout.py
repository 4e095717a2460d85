"""Buying and managing a subscription through Stripe's hosted pages.

Checkout Sessions start a purchase (the licence itself comes from the webhook
that follows); the success page polls for the licence; the billing portal lets
a signed-in customer manage what they pay for.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

from . import addresses, licensing
from .errors import Conflict, NotFound, StripeNotConfigured
from .oidc import Identity
from .services import Services
from .stripe_api import StripeGateway

SESSION_ID = re.compile(r"^cs_[A-Za-z0-9_]{1,250}$")
KEY_SHOWN_SECONDS = 24 * 3600
"""How long after a purchase its checkout session id still shows the key (the id sits in
browser histories and shop logs; after that the key is mailed, and on the account page)."""


def gateway(services: Services) -> StripeGateway:
    if services.stripe is None:
        raise StripeNotConfigured()
    return services.stripe


def website(services: Services) -> str:
    return services.config.website_url or services.config.app_base_url


def start(
    services: Services,
    plan_id: str,
    *,
    email: str | None,
    identity: Identity | None,
    idempotency_key: str | None,
) -> dict[str, Any]:
    """A Checkout Session for a plan on sale: ``{"id", "url"}``."""
    stripe = gateway(services)
    plan = services.catalog.plans.get(plan_id)
    if plan is None or not plan.public or not plan.stripe_price:
        raise NotFound(f"no plan {plan_id!r} on sale")
    site = website(services)
    params: dict[str, Any] = {
        "mode": plan.mode,
        "line_items": [{"price": plan.stripe_price, "quantity": 1}],
        "success_url": f"{site}/checkout/success?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{site}/checkout/cancel?plan={plan.id}",
        "metadata": {"plan": plan.id},
    }
    if plan.mode == "subscription":
        params["subscription_data"] = {"metadata": {"plan": plan.id}}
    else:
        params["payment_intent_data"] = {"metadata": {"plan": plan.id}}
        params["customer_creation"] = "always"
    if email:
        params["customer_email"] = addresses.check_address(email)
    if identity is not None:
        params["client_reference_id"] = identity.sub
        if identity.verified_email and "customer_email" not in params:
            params["customer_email"] = identity.verified_email
    key = (
        f"checkout-{hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]}"
        if idempotency_key
        else f"checkout-{uuid.uuid4()}"
    )
    session = stripe.post("/v1/checkout/sessions", idempotency_key=key, **params)
    return {"id": session.get("id"), "url": session.get("url")}


def result(services: Services, session_id: str, now: int) -> dict[str, Any]:
    """What a checkout produced: pending until the webhook has made the licence, then the
    licence with its key, for :data:`KEY_SHOWN_SECONDS` after the purchase."""
    if not SESSION_ID.match(session_id):
        raise NotFound("no such checkout session")
    lic = services.store.find_license("stripe_checkout_session_id", session_id)
    if lic is None:
        return {"status": "pending"}
    view = licensing.license_view(lic, services.store.count_machines(lic.id, lic.seated_since(now)))
    if now - lic.created_at <= KEY_SHOWN_SECONDS:
        view["key"] = services.licensing.key(lic)
        return {"status": "complete", "license": view}
    return {"status": "complete", "license": view, "key_expired": True}


def portal_url(services: Services, customer_ids: list[str]) -> str:
    """A billing portal session for the first of these customers that Stripe knows."""
    stripe = gateway(services)
    for customer_id in customer_ids:
        row = services.store.get_customer(customer_id)
        if row is not None and row["stripe_customer_id"]:
            session = stripe.post(
                "/v1/billing_portal/sessions",
                customer=str(row["stripe_customer_id"]),
                return_url=website(services),
            )
            return str(session.get("url"))
    raise Conflict("nothing here was bought through Stripe", code="NO_STRIPE_CUSTOMER")
