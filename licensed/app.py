"""The WSGI application: one routing table, one way to answer errors.

A request is matched (404, or 405 with ``Allow``), its body read under a size
cap (413), its media type checked (415), its JSON parsed and checked against
the route's schema (400), then handed to the route's handler. Every
:class:`errors.LicensedError` becomes the spec's error body in
:func:`error_response` (on the customer pages, a page saying the same:
:func:`routes.html.error_page`); anything else is logged and answered with a
generic 500.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from . import __version__, openapi, redact
from .cors import Cors
from .errors import LicensedError
from .metrics import REGISTRY
from .ratelimit import RateLimiter, client_address, is_limited
from .routes import all_routes, html
from .services import Services
from .web import Request, Response, Route, Router

log = logging.getLogger("licensed")
access_log = logging.getLogger("licensed.access")

StartResponse = Callable[..., Any]

JSON_TYPE = "application/json; charset=utf-8"


def error_response(err: LicensedError) -> Response:
    """The one place an error becomes ``{"error": {"code", "message"}}``."""
    return Response(
        {"error": {"code": err.code, "message": err.message}},
        status=err.status,
        headers=err.headers(),
    )


def status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


class App:
    """The WSGI callable."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.config = services.config
        self.limiter = RateLimiter(self.config.rate_limit_per_minute, services.clock)
        # Wrong admin or internal tokens spend the same per-address budget as public requests.
        self.bearer_failures = RateLimiter(self.config.rate_limit_per_minute, services.clock)
        self.cors = Cors(self.config.website_url)
        document = Route("GET", "/openapi.json", self.openapi, "This document", tag="public")
        self.router = Router([*all_routes(services, self.bearer_failures), document])
        self._openapi = openapi.document(
            [r for r in self.router.routes if r.api], self.config.app_base_url, __version__
        )

    def openapi(self, request: Request) -> Response:
        return Response(self._openapi, headers=[("Cache-Control", "public, max-age=300")])

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        request_id = _request_id(environ)
        redact.start_request()
        client = client_address(
            str(environ.get("REMOTE_ADDR") or ""),
            environ.get("HTTP_X_FORWARDED_FOR"),
            self.config.trusted_proxies,
        )
        origin = environ.get("HTTP_ORIGIN")
        route: Route | None = None
        try:
            if is_limited(path):
                self.limiter.check(client)
            if self.cors.is_preflight(method, path):
                response = self.cors.preflight(path, origin, self.router.methods(path))
            else:
                route, params = self.router.match(method, path)
                request = Request(environ, params, route.max_body or self.config.max_body_bytes, client)
                if route.guard is not None:
                    route.guard(request)
                if route.body is not None:
                    request.parsed = request.json()
                    redact.remember_body(request.parsed)
                    route.check_body(request.parsed)
                response = route.handler(request)
        except LicensedError as err:
            response = self.error(path, err)
        except Exception:
            log.error(
                "unhandled error",
                extra={"request_id": request_id, "trace": traceback.format_exc(limit=20)},
            )
            response = self.error(path, LicensedError())
        headers = self._headers(response, request_id, path, origin)
        payload = b"" if response.stream is not None else response.encode()
        if response.stream is None and response.status != 204:
            headers.append(("Content-Length", str(len(payload))))
        start_response(status_line(response.status), headers)
        elapsed = time.perf_counter() - started
        code = response.body.get("code") if isinstance(response.body, dict) else None
        REGISTRY.observe_request(
            method,
            route.path if route else None,
            response.status,
            elapsed,
            code if isinstance(code, str) else None,
        )
        access_log.info(
            "request",
            extra={
                "request_id": request_id,
                "method": method,
                "path": path,
                "status": response.status,
                "ms": round(elapsed * 1000, 2),
                "remote": client,
            },
        )
        if response.stream is not None:
            return response.stream
        return [payload]

    def error(self, path: str, err: LicensedError) -> Response:
        """The spec's JSON error body, or on the customer pages a page saying the same."""
        if html.is_page(path):
            return html.error_page(self.services, err)
        return error_response(err)

    def _headers(
        self, response: Response, request_id: str, path: str, origin: str | None
    ) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = [("X-Request-Id", request_id)]
        if response.status != 204:
            headers.append(("Content-Type", JSON_TYPE if response.raw is None else response.content_type))
        headers += response.headers
        headers += self.cors.headers(path, origin)
        if not any(name == "Cache-Control" for name, _ in headers):
            headers.append(("Cache-Control", "no-store"))
        return headers


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_request_numbers = itertools.count(1)
_PROCESS_TAG = os.urandom(4).hex()


def _request_id(environ: dict[str, Any]) -> str:
    """The caller's ``X-Request-Id`` when well-formed, else this process's tag and a counter."""
    given = environ.get("HTTP_X_REQUEST_ID")
    if given and _REQUEST_ID.fullmatch(given):
        return str(given)
    return f"{_PROCESS_TAG}-{next(_request_numbers):x}"
