"""A Stripe API double for what localstripe lacks: Checkout and billing portal sessions.

It answers over real HTTP on 127.0.0.1 with Stripe's own fixture objects
(``fixtures3.json``) updated from the request, and records every request so a
test can check exactly what was sent (form fields, idempotency key, auth).
"""

from __future__ import annotations

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

        def do_GET(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parsed.query))
            double.requests.append(Recorded("GET", parsed.path, query, dict(self.headers.items())))
            if parsed.path == "/v1/webhook_endpoints":
                _respond(self, 200, {"object": "list", "data": double.endpoints, "has_more": False})
            elif double.on_get is not None:
                _respond(self, *double.on_get(parsed.path, query))
            else:
                _respond(self, 404, {"error": {"type": "invalid_request_error", "message": "no such route"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            double.requests.append(Recorded("POST", self.path, form, dict(self.headers.items())))
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
