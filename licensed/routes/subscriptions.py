"""``GET /api/subscriptions/status``: a signed-in user's subscription, for a desktop app."""

from __future__ import annotations

from .. import identities
from ..services import Services
from ..subscriptions import STATUS_ANSWER, status_answer
from ..web import Request, Response, Route
from .guards import require_identity


def routes(services: Services) -> list[Route]:
    def subscription_status(request: Request) -> Response:
        identity = require_identity(services, request)
        now = services.now()
        store = services.store
        licenses = store.licenses_of_customers(identities.customers_of(store, identity, now))
        used = {lic.id: store.count_machines(lic.id, lic.seated_since(now)) for lic in licenses}
        return Response(status_answer(licenses, used, now))

    return [
        Route(
            "GET",
            "/api/subscriptions/status",
            subscription_status,
            "Subscription status of the signed-in user (identity-provider access token)",
            tag="subscriptions",
            auth="oidc",
            response=STATUS_ANSWER,
        ),
    ]
