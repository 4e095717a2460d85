"""The Stripe routes: checkout, the success page's poll, the webhook, the billing portal."""

from __future__ import annotations

from .. import addresses, checkout, identities, openapi
from ..errors import LicensedError, StripeNotConfigured, WebhookSignatureError
from ..metrics import REGISTRY
from ..plans import MAX_URL_LENGTH
from ..services import Services
from ..stripe_api import parse_event, verify_signature
from ..stripe_sync import EventProcessor
from ..web import Request, Response, Route
from .guards import optional_identity, require_identity

REDIRECT_PATTERN = "^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?([/?#][!-~]*)?$"
"""A success or cancel URL: http(s), a host name, printable ASCII (``{CHECKOUT_SESSION_ID}`` too)."""
CHECKOUT_BODY = openapi.obj(
    {
        "plan": openapi.string(1, 64),
        "email": openapi.string(3, 254, pattern=addresses.SCHEMA_PATTERN),
        "success_url": openapi.string(8, MAX_URL_LENGTH, pattern=REDIRECT_PATTERN),
        "cancel_url": openapi.string(8, MAX_URL_LENGTH, pattern=REDIRECT_PATTERN),
    },
    required=["plan"],
)
WEBHOOK_MAX_BODY = 1024 * 1024
"""Stripe's events can exceed the other routes' body limit (a subscription with many items)."""


def routes(services: Services) -> list[Route]:
    processor = EventProcessor(services, services.stripe)

    def create_checkout(request: Request) -> Response:
        body = request.parsed
        answer = checkout.start(
            services,
            body["plan"],
            email=body.get("email"),
            identity=optional_identity(services, request),
            idempotency_key=request.header("Idempotency-Key"),
            success_url=body.get("success_url"),
            cancel_url=body.get("cancel_url"),
        )
        return Response(answer)

    def checkout_status(request: Request) -> Response:
        return Response(checkout.result(services, request.params["id"], services.now()))

    def webhook(request: Request) -> Response:
        secrets = services.config.stripe_webhook_secrets
        if not secrets:
            raise StripeNotConfigured("no webhook secret is configured")
        raw = request.body()
        try:
            verify_signature(raw, request.header("Stripe-Signature"), secrets, services.now())
        except WebhookSignatureError:
            REGISTRY.record_webhook("unverified", "bad_signature")
            raise
        event = parse_event(raw)
        try:
            outcome = processor.process(event, services.now())
        except LicensedError:
            REGISTRY.record_webhook(event["type"], "failed")
            raise
        REGISTRY.record_webhook(event["type"], outcome.status, outcome.reason)
        return Response({"received": True})

    def portal(request: Request) -> Response:
        """The signed-in customer's billing portal (a licence key alone does not open it:
        keys live on installations, and get shared)."""
        identity = require_identity(services, request)
        customers = identities.customers_of(services.store, identity, services.now())
        return Response({"url": checkout.portal_url(services, customers)})

    return [
        Route(
            "POST",
            "/api/checkout/session",
            create_checkout,
            "Start a Stripe Checkout for a plan",
            tag="checkout",
            body=CHECKOUT_BODY,
        ),
        Route(
            "GET",
            "/api/checkout/session/{id}",
            checkout_status,
            "The licence a checkout produced, once it exists (its key for 24 hours)",
            tag="checkout",
        ),
        Route(
            "POST",
            "/api/stripe/webhook",
            webhook,
            "Stripe events (signed)",
            tag="stripe",
            auth="stripe",
            max_body=WEBHOOK_MAX_BODY,
        ),
        Route(
            "POST",
            "/api/billing/portal",
            portal,
            "A Stripe billing portal session for the signed-in customer",
            tag="checkout",
            auth="oidc",
        ),
    ]
