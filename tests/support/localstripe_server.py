"""Runs the localstripe emulator on 127.0.0.1 with its pickle file turned off.

localstripe binds every interface and saves its store to /tmp/localstripe.pickle
after each change; the tests want neither. Usage:

    python localstripe_server.py PORT [--current-api]

``--current-api`` fills in, from localstripe's own objects, the parts of
Stripe's API that ``licensed stripe check --e2e`` uses and localstripe lacks:

- ``GET /v1/prices/{id}``: localstripe has Plans only; a recurring Price is
  the current form of a Plan, and a Plan's id is accepted as a price id at
  Stripe, so each Plan is answered as its Price (``expand[]=product`` too);
- ``GET /v1/webhook_endpoints``: the webhooks registered through
  ``/_config/webhooks/{id}``, as endpoint objects (all events: ``*``);
- subscription items given by ``price`` (localstripe knows ``plan`` only);
- a refund sends ``charge.refunded`` with the refunded charge, signed and
  delivered like localstripe's other events (localstripe sends none).
"""

from __future__ import annotations

import sys
from typing import Any

from aiohttp import web
from localstripe import resources, server, webhooks


def _current_api() -> None:
    subscription_init = resources.Subscription.__init__
    refund_init = resources.Refund.__init__

    def subscription_by_price(self: Any, *args: Any, items: Any = None, **kwargs: Any) -> None:
        if isinstance(items, list):
            items = [
                {("plan" if k == "price" else k): v for k, v in item.items()}
                if isinstance(item, dict)
                else item
                for item in items
            ]
        subscription_init(self, *args, items=items, **kwargs)

    def refund_sends_its_event(self: Any, *args: Any, **kwargs: Any) -> None:
        refund_init(self, *args, **kwargs)
        charge = resources.Charge._api_retrieve(self.charge)
        webhooks.schedule_webhook(resources.Event("charge.refunded", charge))

    resources.Subscription.__init__ = subscription_by_price  # type: ignore[method-assign]
    resources.Refund.__init__ = refund_sends_its_event  # type: ignore[method-assign]

    def price(request: web.Request) -> web.Response:
        plan = resources.Plan._api_retrieve(request.match_info["id"])._export()
        expand = {v for k, v in request.query.items() if k.startswith("expand")}
        product: Any = plan.get("product")
        if "product" in expand and isinstance(product, str):
            product = resources.Product._api_retrieve(product)._export()
        body = {
            "id": plan["id"],
            "object": "price",
            "active": plan.get("active", True),
            "currency": plan.get("currency"),
            "unit_amount": plan.get("amount"),
            "type": "recurring",
            "recurring": {
                "interval": plan.get("interval"),
                "interval_count": plan.get("interval_count", 1),
                "usage_type": plan.get("usage_type", "licensed"),
            },
            "product": product,
            "livemode": False,
            "metadata": plan.get("metadata") or {},
        }
        return server.json_response(body)

    def endpoints(request: web.Request) -> web.Response:
        data = [
            {
                "id": f"we_{name}",
                "object": "webhook_endpoint",
                "url": hook.url,
                "status": "enabled",
                "enabled_events": list(hook.events) if hook.events is not None else ["*"],
                "livemode": False,
            }
            for name, hook in webhooks._webhooks.items()
        ]
        return server.json_response({"object": "list", "data": data, "has_more": False})

    server.app.router.add_get("/v1/prices/{id}", price)
    server.app.router.add_get("/v1/webhook_endpoints", endpoints)


def main() -> None:
    port = int(sys.argv[1])
    resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]
    resources.Store.try_load_from_disk = lambda self: None  # type: ignore[method-assign]
    if "--current-api" in sys.argv[2:]:
        _current_api()
    web.run_app(server.app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
