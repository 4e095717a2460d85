"""A Stripe API double for what localstripe lacks: Checkout and billing portal sessions,
webhook endpoints, prices and products, and the balance (whose ``livemode`` tells a key's mode).

It answers over real HTTP on 127.0.0.1 with Stripe's own fixture objects
(``fixtures3.json``) updated from the request, and records every request so a
test can check exactly what was sent (form fields, idempotency key, auth).
"""

from __future__ import annotations

import copy
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from support import stripe_events as se


@dataclass
class Recorded:
    method: str
    path: str
    form: dict[str, str]
    headers: dict[str, str]


GetHandler = Callable[[str, dict[str, str]], tuple[int, dict[str, Any]]]


@dataclass
class StripeDouble:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    fail_with: int | None = None
    on_get: GetHandler | None = None
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    livemode: bool = False
    """The mode of the account's keys, as ``GET /v1/balance`` tells it."""
    keys: set[str] | None = None
    """Secret keys Stripe accepts (401 for others); None accepts any."""

    def add_product(self, product_id: str, *, name: str = "DashCaddy", active: bool = True) -> dict[str, Any]:
        product = se.fixture("product")
        product.update(id=product_id, name=name, active=active, livemode=self.livemode)
        self.products[product_id] = product
        return product

    def add_price(
        self,
        price_id: str,
        *,
        product: str = "prod_dashcaddy",
        recurring: bool = True,
        active: bool = True,
        interval: str = "month",
    ) -> dict[str, Any]:
        if product not in self.products:
            self.add_product(product)
        price = se.fixture("price")
        price.update(id=price_id, product=product, active=active, livemode=self.livemode)
        if recurring:
            price["type"] = "recurring"
            price["recurring"] = {**price["recurring"], "interval": interval, "interval_count": 1}
        else:
            price.update(type="one_time", recurring=None)
        self.prices[price_id] = price
        return price

    def add_endpoint(
        self, url: str, events: list[str] | tuple[str, ...], *, status: str = "enabled"
    ) -> dict[str, Any]:
        endpoint = se.fixture("webhook_endpoint")
        endpoint.update(
            id=se.uid("we"), url=url, enabled_events=list(events), status=status, livemode=self.livemode
        )
        self.endpoints.append(endpoint)
        return endpoint

    def _get(self, path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        """The read routes of prices, products and the balance (None: not one of them)."""
        if path == "/v1/balance":
            return 200, {**se.fixture("balance"), "livemode": self.livemode}
        kind, _, object_id = path.removeprefix("/v1/").partition("/")
        found = {"prices": self.prices, "products": self.products}.get(kind)
        if found is None or not object_id or "/" in object_id:
            return None
        if object_id not in found:
            return 404, _missing(f"No such {kind[:-1]}: '{object_id}'")
        obj = copy.deepcopy(found[object_id])
        expand = {v for k, v in query.items() if k.startswith("expand")}
        if kind == "prices" and "product" in expand and obj["product"] in self.products:
            obj["product"] = copy.deepcopy(self.products[obj["product"]])
        return 200, obj


def _missing(message: str) -> dict[str, Any]:
    return {"error": {"type": "invalid_request_error", "code": "resource_missing", "message": message}}


def _respond(handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
    import json

    raw = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    handler.wfile.write(raw)


def _listed(form: dict[str, str], name: str) -> list[str]:
    """Form-encoded ``name[0]=a&name[1]=b`` back into a list."""
    return [v for k, v in sorted(form.items()) if k.startswith(f"{name}[")]


@contextmanager
def stripe_double() -> Iterator[StripeDouble]:
    double = StripeDouble()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _refused(self) -> bool:
            """Stripe's 401 for a key it does not know."""
            given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            if double.keys is None or given in double.keys:
                return False
            error = {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_****"}
            _respond(self, 401, {"error": error})
            return True

        def do_GET(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parsed.query))
            double.requests.append(Recorded("GET", parsed.path, query, dict(self.headers.items())))
            if self._refused():
                return
            answer = double._get(parsed.path, query)
            if answer is not None:
                _respond(self, *answer)
            elif parsed.path == "/v1/webhook_endpoints":
                _respond(self, 200, {"object": "list", "data": double.endpoints, "has_more": False})
            elif double.on_get is not None:
                _respond(self, *double.on_get(parsed.path, query))
            else:
                _respond(self, 404, {"error": {"type": "invalid_request_error", "message": "no such route"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            double.requests.append(Recorded("POST", self.path, form, dict(self.headers.items())))
            if self._refused():
                return
            if double.fail_with:
                _respond(self, double.fail_with, {"error": {"type": "api_error", "message": "boom"}})
                return
            if self.path == "/v1/checkout/sessions":
                session = se.fixture("checkout.session")
                session_id = se.uid("cs_test")
                session.update(
                    id=session_id,
                    mode=form.get("mode"),
                    status="open",
                    success_url=form.get("success_url"),
                    cancel_url=form.get("cancel_url"),
                    url=f"https://checkout.stripe.test/c/pay/{session_id}",
                    metadata={"plan": form.get("metadata[plan]")},
                    customer_email=form.get("customer_email"),
                    client_reference_id=form.get("client_reference_id"),
                )
                _respond(self, 200, session)
            elif self.path == "/v1/billing_portal/sessions":
                portal = se.fixture("billing_portal.session")
                portal.update(
                    id=se.uid("bps"),
                    customer=form.get("customer"),
                    return_url=form.get("return_url"),
                    url=f"https://billing.stripe.test/p/session/{se.uid('x')}",
                )
                _respond(self, 200, portal)
            elif self.path == "/v1/webhook_endpoints":
                endpoint = se.fixture("webhook_endpoint")
                endpoint.update(
                    id=se.uid("we"),
                    url=form.get("url"),
                    secret=f"whsec_{se.uid('s')}",
                    enabled_events=_listed(form, "enabled_events"),
                )
                double.endpoints.append({k: v for k, v in endpoint.items() if k != "secret"})
                _respond(self, 200, endpoint)
            elif self.path.startswith("/v1/webhook_endpoints/"):
                endpoint_id = self.path.rsplit("/", 1)[1]
                for endpoint in double.endpoints:
                    if endpoint["id"] == endpoint_id:
                        endpoint["enabled_events"] = _listed(form, "enabled_events")
                        if "disabled" in form:
                            endpoint["status"] = "disabled" if form["disabled"] == "true" else "enabled"
                        _respond(self, 200, endpoint)
                        return
                _respond(self, 404, {"error": {"type": "invalid_request_error", "message": "no endpoint"}})
            else:
                _respond(self, 404, {"error": {"type": "invalid_request_error", "message": "no such route"}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    double.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield double
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
