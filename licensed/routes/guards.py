"""Who may call a route: bearer tokens of the operator, and signed-in customers."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from ..errors import Forbidden, OidcNotConfigured, Unauthorized
from ..oidc import Identity
from ..ratelimit import RateLimiter
from ..services import Services
from ..web import Request


def bearer_guard(
    token_of: Callable[[], str | None], disabled_code: str, setting: str, failures: RateLimiter | None = None
) -> Callable[[Request], None]:
    """A route guard: 403 while ``setting`` is unset, 401 unless the bearer token equals it.

    Failed attempts count against the client's budget in ``failures`` (429 when spent).
    """

    def guard(request: Request) -> None:
        expected = token_of()
        if not expected:
            raise Forbidden(f"this route is off: {setting} is not set", code=disabled_code)
        given = request.bearer()
        if given is None or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
            if failures is not None:
                failures.check(request.client)
            raise Unauthorized()

    return guard


def require_identity(services: Services, request: Request) -> Identity:
    """The signed-in user of a request with ``Authorization: Bearer <access token>``.

    503 ``OIDC_NOT_CONFIGURED`` without OIDC settings, 401 without a usable token.
    """
    verifier = services.oidc
    if verifier is None:
        raise OidcNotConfigured()
    header = request.header("Authorization")
    if header is None:
        raise Unauthorized("send the user's access token as Authorization: Bearer <token>")
    token = request.bearer()
    if token is None:
        raise Unauthorized("the Authorization header must be Bearer <token>")
    return verifier.verify(token, services.now())


def optional_identity(services: Services, request: Request) -> Identity | None:
    """Like :func:`require_identity`, but None for a request without an Authorization header."""
    if request.header("Authorization") is None:
        return None
    return require_identity(services, request)
