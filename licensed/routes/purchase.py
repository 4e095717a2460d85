"""The pages Stripe Checkout sends a buyer back to: the success page (the key) and the cancel page."""

from __future__ import annotations

from .. import checkout
from ..services import Services
from ..web import Request, Response, Route
from .html import page

REFRESH_SECONDS = 3
"""The pending page reloads itself this often while the webhook has not landed."""
REFRESH_LIMIT = 60
"""After this many reloads (3 minutes) the page stops and says what to do instead."""


def routes(services: Services) -> list[Route]:
    catalog = services.catalog

    def success(request: Request) -> Response:
        session_id = request.query.get("session_id", "")
        if not checkout.SESSION_ID.match(session_id):
            return page(services, "success.html", status=404, state="missing")
        tries = request.query.get("n", "0")
        count = int(tries) if tries.isdigit() and len(tries) <= 4 else 0
        result = checkout.result(services, session_id, services.now())
        if result["status"] == "pending":
            slow = count >= REFRESH_LIMIT
            return page(
                services,
                "success.html",
                state="slow" if slow else "pending",
                refresh=None if slow else f"{REFRESH_SECONDS}; url=?session_id={session_id}&n={count + 1}",
                again=f"?session_id={session_id}",
            )
        view = result["license"]
        product_name, plan_name = catalog.display_names(view["product"], view["plan"])
        return page(
            services,
            "success.html",
            state="shown" if "key" in view else "hidden",
            license=view,
            key=view.get("key"),
            plan_name=plan_name,
            product_name=product_name,
        )

    def cancel(request: Request) -> Response:
        plan = catalog.plans.get(request.query.get("plan", ""))
        return page(services, "cancel.html", plan_name=plan.name if plan else None)

    return [
        Route(
            "GET",
            "/checkout/success",
            success,
            "The page after a paid Checkout: the licence key, or a page that waits for it",
            tag="pages",
            query=("session_id",),
            media_type="text/html",
            api=False,
        ),
        Route(
            "GET",
            "/checkout/cancel",
            cancel,
            "The page after a Checkout left without paying",
            tag="pages",
            query=("plan",),
            media_type="text/html",
            api=False,
        ),
    ]
