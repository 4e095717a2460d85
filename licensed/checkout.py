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
from .errors import Conflict, NotFound, StripeNotConfigured, ValidationFailed
from .oidc import Identity
from .plans import is_redirect_url
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


def redirect_url(value: str | None, name: str) -> str | None:
    """A success or cancel URL given with the request: http(s) only (400 otherwise)."""
    if value is not None and not is_redirect_url(value):
        raise ValidationFailed(f"{name} must be an http(s) URL")
    return value


def start(
    services: Services,
    plan_id: str,
    *,
    email: str | None,
    identity: Identity | None,
    idempotency_key: str | None,
    success_url: str | None = None,
    cancel_url: str | None = None,
) -> dict[str, Any]:
    """A Checkout Session for a plan on sale: ``{"id", "url"}``.

    After paying, the buyer lands on ``success_url`` (the request's, else the plan's, else
    this server's own success page, which shows the key); going back, on ``cancel_url``
    (likewise; this server's cancel page links back to the shop).
    """
    success_url = redirect_url(success_url, "success_url")
    cancel_url = redirect_url(cancel_url, "cancel_url")
    stripe = gateway(services)
    plan = services.catalog.plans.get(plan_id)
    if plan is None or not plan.public or not plan.stripe_price:
        raise NotFound(f"no plan {plan_id!r} on sale")
    base = services.config.app_base_url
    params: dict[str, Any] = {
        "mode": plan.mode,
        "line_items": [{"price": plan.stripe_price, "quantity": 1}],
        "success_url": success_url
        or plan.success_url
        or f"{base}/checkout/success?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": cancel_url or plan.cancel_url or f"{base}/checkout/cancel?plan={plan.id}",
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


def portal_url(services: Services, customer_ids: list[str], return_url: str | None = None) -> str:
    """A billing portal session for the first of these customers that Stripe knows; its
    way back leads to ``return_url`` (default: the shop)."""
    stripe = gateway(services)
    for customer_id in customer_ids:
        row = services.store.get_customer(customer_id)
        if row is not None and row["stripe_customer_id"]:
            session = stripe.post(
                "/v1/billing_portal/sessions",
                customer=str(row["stripe_customer_id"]),
                return_url=return_url or website(services),
            )
            return str(session.get("url"))
    raise Conflict("nothing here was bought through Stripe", code="NO_STRIPE_CUSTOMER")
