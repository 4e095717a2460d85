"""CORS for the shop site: ``WEBSITE_URL`` may call the checkout and public routes.

Only those two prefixes ever carry CORS headers, and only for the one
allowed origin; the license, admin and webhook routes are not meant for
browsers on other sites and get none. A preflight (any ``OPTIONS``) on an
existing CORS path is answered here with 204 and ``Allow``, before routing,
which would otherwise say 405.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .web import Response

CORS_PREFIXES = ("/api/checkout/", "/api/public/")
ALLOWED_HEADERS = "Content-Type, Authorization"
EXPOSED_HEADERS = "Retry-After, X-Request-Id"
MAX_AGE = 600
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` as a browser writes it in ``Origin`` (default port left out)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def is_cors_path(path: str) -> bool:
    return path.startswith(CORS_PREFIXES)


class Cors:
    """The CORS policy of one server: one allowed origin, or none."""

    def __init__(self, website_url: str | None) -> None:
        self.origin = origin_of(website_url) if website_url else None

    def allows(self, path: str, origin: str | None) -> bool:
        if self.origin is None or not origin or not is_cors_path(path):
            return False
        return origin_of(origin) == self.origin

    def headers(self, path: str, origin: str | None) -> list[tuple[str, str]]:
        """Headers for any answer on ``path`` (errors included, so a page can read a 429)."""
        if not is_cors_path(path) or self.origin is None:
            return []
        # Caches must not hand one origin's answer to another.
        vary = [("Vary", "Origin")]
        if not self.allows(path, origin):
            return vary
        return [
            ("Access-Control-Allow-Origin", self.origin),
            ("Access-Control-Expose-Headers", EXPOSED_HEADERS),
            *vary,
        ]

    @staticmethod
    def is_preflight(method: str, path: str) -> bool:
        return method == "OPTIONS" and is_cors_path(path)

    def preflight(self, path: str, origin: str | None, methods: list[str]) -> Response:
        """204 for a preflight on a path whose routes accept ``methods``.

        The grant (``Access-Control-Allow-*``) is added only for the allowed
        origin; any other origin gets a bare 204 and the browser stops there.
        """
        headers = [("Allow", ", ".join([*sorted(methods), "OPTIONS"]))]
        if self.allows(path, origin):
            headers += [
                ("Access-Control-Allow-Methods", ", ".join([*sorted(methods), "OPTIONS"])),
                ("Access-Control-Allow-Headers", ALLOWED_HEADERS),
                ("Access-Control-Max-Age", str(MAX_AGE)),
            ]
        return Response(status=204, headers=headers, raw=b"", content_type="text/plain")
