"""Routes anyone may read: health, the shop's settings and plans, and the public keys."""

from __future__ import annotations

from .. import __version__, admin, keys
from ..licensing import iso
from ..services import Services
from ..web import Request, Response, Route


def routes(services: Services) -> list[Route]:
    config = services.config

    def health(request: Request) -> Response:
        now = services.now()
        store = services.store
        store.probe_writable()
        warnings = [w for w in (admin.unmapped_purchases_warning(store),) if w]
        return Response(
            {
                "status": "ok",
                "warnings": warnings,
                "version": __version__,
                "schema_version": store.schema_version(),
                "time": iso(now),
                "signing_kid": services.ring.current.kid,
                "last_reconcile_at": iso(store.last_reconcile_at()),
            }
        )

    def public_config(request: Request) -> Response:
        return Response(
            {
                "publishable_key": config.stripe_publishable_key,
                "website_url": config.website_url,
                "issuer": config.app_base_url,
                "jwks_url": f"{config.app_base_url}/.well-known/jwks.json",
                "products": [
                    {"id": p.id, "name": p.name, "key_prefix": p.key_prefix}
                    for p in services.catalog.products.values()
                ],
            }
        )

    def public_plans(request: Request) -> Response:
        plans = [p.public_view() for p in services.catalog.plans.values() if p.public]
        return Response({"plans": plans})

    def jwks(request: Request) -> Response:
        now = services.now()
        ttl = config.lease_ttl_hours * 3600
        in_use: set[str] | None = None

        def still_needed(key: keys.SigningKey, retired_at: float) -> bool:
            nonlocal in_use
            if retired_at + ttl > now:
                return True
            if in_use is None:
                in_use = services.store.kids_in_use(now)
            return key.kid in in_use

        return Response(services.ring.jwks(still_needed), headers=[("Cache-Control", "public, max-age=300")])

    return [
        Route("GET", "/health", health, "Liveness and database writability", tag="ops"),
        Route("GET", "/api/public/config", public_config, "Public settings for a shop page", tag="public"),
        Route("GET", "/api/public/plans", public_plans, "Plans on sale", tag="public"),
        Route("GET", "/.well-known/jwks.json", jwks, "Public keys that verify keys and leases", tag="public"),
    ]
