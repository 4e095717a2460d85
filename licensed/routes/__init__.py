"""The HTTP routes: each module turns requests into calls of the rules it imports.

Nothing outside this package (and :mod:`licensed.app`) imports it: the rules
never know they are served over HTTP.
"""

from __future__ import annotations

from ..ratelimit import RateLimiter
from ..services import Services
from ..web import Route
from . import account, admin, html, license, metrics, public, purchase, stripe, subscriptions


def all_routes(services: Services, failures: RateLimiter | None = None) -> list[Route]:
    """The routing table, but for ``/openapi.json`` (which describes it)."""
    return [
        *public.routes(services),
        *license.routes(services),
        *stripe.routes(services),
        *subscriptions.routes(services),
        *metrics.routes(services),
        *admin.routes(services, failures),
        *purchase.routes(services),
        *account.routes(services),
        *html.routes(services),
    ]
