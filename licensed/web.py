"""HTTP plumbing shared by every route module: requests, responses, routes.

No framework: a :class:`Router` maps ``(method, path)`` to a :class:`Route`;
the modules of :mod:`licensed.routes` each contribute rows to the table that
:class:`licensed.app.App` serves.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from . import openapi
from .errors import (
    BadRequest,
    InvalidJSON,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)

Handler = Callable[["Request"], "Response"]


class Request:
    def __init__(
        self, environ: dict[str, Any], params: dict[str, str], max_body: int, client: str = ""
    ) -> None:
        self.environ = environ
        self.params = params
        self.client = client
        """The client's address (``X-Forwarded-For`` believed only from trusted proxies)."""
        self.method: str = environ["REQUEST_METHOD"]
        self.path: str = environ.get("PATH_INFO", "") or "/"
        self.max_body = max_body
        self.parsed: Any = None
        self._body: bytes | None = None

    def header(self, name: str) -> str | None:
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        value = self.environ.get(key)
        return str(value) if value is not None else None

    def bearer(self) -> str | None:
        value = self.header("Authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    @property
    def query(self) -> dict[str, str]:
        """Query-string parameters; of a repeated name the first value counts."""
        return first_values(str(self.environ.get("QUERY_STRING") or ""))

    def body(self) -> bytes:
        """The raw body, at most ``max_body`` bytes (else 413)."""
        if self._body is None:
            raw_length = self.environ.get("CONTENT_LENGTH") or "0"
            try:
                length = int(raw_length)
            except ValueError as err:
                raise BadRequest("bad Content-Length") from err
            if length > self.max_body:
                raise PayloadTooLarge(f"the body is larger than {self.max_body} bytes")
            stream = self.environ["wsgi.input"]
            data = stream.read(length) if length > 0 else b""
            self._body = data
        return self._body

    def json(self) -> Any:
        if media_type(self.environ.get("CONTENT_TYPE")) != "application/json":
            raise UnsupportedMediaType()
        return parse_json(self.body())


def first_values(encoded: str) -> dict[str, str]:
    """The fields of a query string or urlencoded form, blanks kept; of a repeated name the
    first value counts."""
    fields: dict[str, str] = {}
    for name, value in parse_qsl(encoded, keep_blank_values=True):
        fields.setdefault(name, value)
    return fields


def media_type(content_type: str | None) -> str:
    """A ``Content-Type``'s media type, lower-cased, without its parameters (``""`` if none)."""
    return (content_type or "").split(";")[0].strip().lower()


@dataclass
class Response:
    body: Any = None
    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    content_type: str = "application/json"
    raw: bytes | None = None
    stream: Iterable[bytes] | None = None
    """Chunks sent as they are produced (no Content-Length), for large exports."""

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body, separators=(",", ":")).encode("ascii")


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, strict where ``json`` is lax.

    Invalid UTF-8, ``NaN`` and ``Infinity``, numbers beyond a double, lone
    surrogates (``\\ud800``: text UTF-8 cannot carry, which would fail later,
    deep in a handler) and nesting deep enough to exhaust the stack are all
    malformed JSON.
    """
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InvalidJSON(f"the body is not valid JSON: {err}") from err
    if "\\ud" in text.lower() and _has_surrogate(value):
        raise InvalidJSON("the body is not valid JSON: a lone surrogate is not text")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is beyond a double")
    return number


_SURROGATE = re.compile("[\\ud800-\\udfff]")


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


# --- routing -----------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str = "licensing"
    auth: str | None = None
    body: openapi.Schema | None = None
    response: openapi.Schema | None = None
    status: int = 200
    guard: Callable[[Request], None] | None = None
    """Runs before the body is read: an auth check raises before any parsing."""
    query: tuple[str, ...] = ()
    """Query-string parameters the route reads, for the API description."""
    media_type: str = "application/json"
    """What a successful answer is, for the API description."""
    max_body: int | None = None
    """The largest body this route reads (None: the server's ``MAX_BODY_BYTES``)."""
    api: bool = True
    """False for the customer pages and their assets: made for people, not described in
    ``/openapi.json``."""

    @functools.cached_property
    def check_body(self) -> openapi.Checker:
        """The body's schema as a checker, built on first use."""
        return openapi.checker(self.body or {})

    @property
    def pattern(self) -> re.Pattern[str]:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[A-Za-z0-9_.-]{1,255})", re.escape(self.path))
        return re.compile(f"^{regex}$")


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        self._static: dict[str, dict[str, Route]] = {}
        self._dynamic: list[tuple[re.Pattern[str], dict[str, Route]]] = []
        for route in self.routes:
            if "{" in route.path:
                for pattern, methods in self._dynamic:
                    if pattern.pattern == route.pattern.pattern:
                        methods[route.method] = route
                        break
                else:
                    self._dynamic.append((route.pattern, {route.method: route}))
            else:
                self._static.setdefault(route.path, {})[route.method] = route

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        methods, params = self._lookup(path)
        route = methods.get(method)
        if route is None:
            raise MethodNotAllowed(list(methods))
        return route, params

    def methods(self, path: str) -> list[str]:
        """The methods routed at ``path`` (CORS preflights answer with them); 404 if none."""
        return sorted(self._lookup(path)[0])

    def _lookup(self, path: str) -> tuple[dict[str, Route], dict[str, str]]:
        methods = self._static.get(path)
        params: dict[str, str] = {}
        if methods is None:
            for pattern, candidates in self._dynamic:
                found = pattern.match(path)
                if found:
                    methods, params = candidates, found.groupdict()
                    break
        if methods is None:
            raise NotFound(f"no route {path}")
        return methods, params
