"""``/api/admin/*`` and ``POST /api/licenses/generate``: the admin verbs over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .. import addresses, openapi
from ..admin import (
    ADMIN_ACTOR,
    FIND_FIELDS,
    INTERNAL_ACTOR,
    MAX_DAYS,
    audit_trail,
    events,
    extend,
    find,
    generate,
    issue,
    link_identity,
    reinstate,
    remove_machine,
    replay,
    resend,
    reset_machines,
    revoke,
    show,
    stats,
    suspend,
)
from ..errors import ValidationFailed
from ..export import export
from ..plans import MAX_MACHINES
from ..ratelimit import RateLimiter
from ..services import Services
from ..web import Request, Response, Route
from .guards import bearer_guard

_INT = {"type": "integer"}
_TIME: openapi.Schema = {
    "type": ["string", "integer"],
    "description": "epoch seconds or ISO 8601 (UTC unless an offset is given)",
}
_EMAIL_FIELD = openapi.string(3, 254, pattern=addresses.SCHEMA_PATTERN)
ISSUE_BODY = openapi.obj(
    {
        "email": _EMAIL_FIELD,
        "plan": openapi.string(1, 64),
        "days": {**_INT, "minimum": 1, "maximum": MAX_DAYS},
        "expires_at": _TIME,
        "lifetime": {"type": "boolean"},
        "max_machines": {**_INT, "minimum": 1, "maximum": MAX_MACHINES},
        "send_email": {"type": "boolean"},
    },
    required=["email", "plan"],
)
GENERATE_BODY = openapi.obj(
    {
        "email": _EMAIL_FIELD,
        "plan": openapi.string(1, 64),
        "product": openapi.string(1, 64),
        "tier": openapi.string(1, 16),
        "expires_at": _TIME,
        "max_machines": {**_INT, "minimum": 1, "maximum": MAX_MACHINES},
        "send_email": {"type": "boolean"},
    },
    required=["email"],
)
EXTEND_BODY = openapi.obj({"days": {**_INT, "minimum": 1, "maximum": MAX_DAYS}, "paid_through": _TIME})
LINK_BODY = openapi.obj({"sub": openapi.string(1, 255), "email": _EMAIL_FIELD}, required=["sub", "email"])
REMOVE_MACHINE_BODY = openapi.obj(
    {
        "machine_id": openapi.string(1, 256),
        "machine_hash": openapi.string(64, 64, pattern="^[0-9a-fA-F]{64}$"),
    }
)
GENERATE_ANSWER: openapi.Schema = {
    "type": "object",
    "required": ["license"],
    "properties": {"license": {"type": "object", "required": ["id", "key"]}},
}


def _query_int(query: dict[str, str], name: str, default: int | None) -> int | None:
    if name not in query:
        return default
    try:
        return int(query[name])
    except ValueError as err:
        raise ValidationFailed(f"{name} must be an integer") from err


def _only(query: dict[str, str], allowed: Iterable[str]) -> dict[str, str]:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ValidationFailed(f"unknown query parameter {unknown[0]}")
    return query


class AdminApi:
    """The HTTP shell: each handler unpacks the request and calls one verb."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def _now(self) -> int:
        return self.services.now()

    def find(self, request: Request) -> Response:
        query = _only(request.query, FIND_FIELDS)
        return Response(find(self.services, ADMIN_ACTOR, self._now(), **query))

    def show(self, request: Request) -> Response:
        return Response(show(self.services, ADMIN_ACTOR, self._now(), request.params["license_id"]))

    def issue(self, request: Request) -> Response:
        body = request.parsed
        answer = issue(
            self.services,
            ADMIN_ACTOR,
            self._now(),
            email=body["email"],
            plan=body["plan"],
            days=body.get("days"),
            expires_at=body.get("expires_at"),
            lifetime=body.get("lifetime"),
            max_machines=body.get("max_machines"),
            send_email=bool(body.get("send_email")),
        )
        return Response(answer, status=201)

    def extend(self, request: Request) -> Response:
        body = request.parsed
        return Response(
            extend(
                self.services,
                ADMIN_ACTOR,
                self._now(),
                request.params["license_id"],
                days=body.get("days"),
                paid_through=body.get("paid_through"),
            )
        )

    def remove_machine(self, request: Request) -> Response:
        body = request.parsed
        return Response(
            remove_machine(
                self.services,
                ADMIN_ACTOR,
                self._now(),
                request.params["license_id"],
                machine_id=body.get("machine_id"),
                machine_hash=body.get("machine_hash"),
            )
        )

    def simple(
        self, verb: Callable[[Services, str, int, str], dict[str, Any]]
    ) -> Callable[[Request], Response]:
        def handler(request: Request) -> Response:
            return Response(verb(self.services, ADMIN_ACTOR, self._now(), request.params["license_id"]))

        return handler

    def events(self, request: Request) -> Response:
        query = _only(request.query, ("status", "limit"))
        limit = _query_int(query, "limit", 100)
        assert limit is not None
        return Response(
            events(self.services, ADMIN_ACTOR, self._now(), status=query.get("status", "failed"), limit=limit)
        )

    def replay(self, request: Request) -> Response:
        return Response(replay(self.services, ADMIN_ACTOR, self._now(), request.params["event_id"]))

    def stats(self, request: Request) -> Response:
        _only(request.query, ())
        return Response(stats(self.services, ADMIN_ACTOR, self._now()))

    def audit(self, request: Request) -> Response:
        query = _only(request.query, ("license_id", "actor", "before_id", "limit"))
        limit = _query_int(query, "limit", 100)
        assert limit is not None
        return Response(
            audit_trail(
                self.services,
                ADMIN_ACTOR,
                self._now(),
                license_id=query.get("license_id"),
                by=query.get("actor"),
                before_id=_query_int(query, "before_id", None),
                limit=limit,
            )
        )

    def link(self, request: Request) -> Response:
        body = request.parsed
        return Response(
            link_identity(self.services, ADMIN_ACTOR, self._now(), sub=body["sub"], email=body["email"])
        )

    def debug_store(self, request: Request) -> Response:
        _only(request.query, ())
        return Response(stream=export(self.services, ADMIN_ACTOR, self._now()))

    def generate(self, request: Request) -> Response:
        body = request.parsed
        answer = generate(
            self.services,
            INTERNAL_ACTOR,
            self._now(),
            email=body["email"],
            plan=body.get("plan"),
            product=body.get("product"),
            tier=body.get("tier"),
            expires_at=body.get("expires_at"),
            max_machines=body.get("max_machines"),
            send_email=bool(body.get("send_email")),
        )
        return Response(answer, status=201)


def routes(services: Services, failures: RateLimiter | None = None) -> list[Route]:
    """The admin and internal routes; failed bearer attempts count against ``failures``."""
    api = AdminApi(services)
    admin_guard = bearer_guard(lambda: services.config.admin_token, "ADMIN_DISABLED", "ADMIN_TOKEN", failures)
    internal_guard = bearer_guard(
        lambda: services.config.internal_api_key, "INTERNAL_API_DISABLED", "INTERNAL_API_KEY", failures
    )
    base = "/api/admin/licenses/{license_id}"

    def admin(
        method: str, path: str, handler: Callable[[Request], Response], summary: str, **kw: Any
    ) -> Route:
        return Route(method, path, handler, summary, tag="admin", auth="admin", guard=admin_guard, **kw)

    return [
        admin(
            "GET",
            "/api/admin/licenses",
            api.find,
            "Find licenses by e-mail, key, license id or Stripe customer, subscription or session id",
            query=FIND_FIELDS,
        ),
        admin(
            "POST",
            "/api/admin/licenses",
            api.issue,
            "Issue a license (any plan)",
            body=ISSUE_BODY,
            status=201,
        ),
        admin("GET", base, api.show, "A license with machines, Stripe events, mail and audit trail"),
        admin(
            "POST", f"{base}/extend", api.extend, "Extend paid_through (re-issues the key)", body=EXTEND_BODY
        ),
        admin("POST", f"{base}/suspend", api.simple(suspend), "Suspend a license"),
        admin("POST", f"{base}/reinstate", api.simple(reinstate), "Reinstate a suspended or revoked license"),
        admin("POST", f"{base}/revoke", api.simple(revoke), "Revoke a license"),
        admin("POST", f"{base}/reset-machines", api.simple(reset_machines), "Free every machine seat"),
        admin(
            "POST",
            f"{base}/remove-machine",
            api.remove_machine,
            "Free one seat by machine id or machine hash",
            body=REMOVE_MACHINE_BODY,
        ),
        admin("POST", f"{base}/resend", api.simple(resend), "Queue the license key mail again"),
        admin(
            "GET",
            "/api/admin/events",
            api.events,
            "Stripe events by status (failed by default)",
            query=("status", "limit"),
        ),
        admin(
            "POST",
            "/api/admin/events/{event_id}/replay",
            api.replay,
            "Apply a failed or ignored Stripe event again (fetched from Stripe when configured)",
        ),
        admin("GET", "/api/admin/stats", api.stats, "Licenses by plan and state, events today, mail backlog"),
        admin(
            "GET",
            "/api/admin/audit",
            api.audit,
            "The audit trail, newest first",
            query=("license_id", "actor", "before_id", "limit"),
        ),
        admin(
            "POST",
            "/api/admin/identities",
            api.link,
            "Link a signed-in user (OIDC sub) to the customers with an e-mail address",
            body=LINK_BODY,
        ),
        admin("GET", "/api/admin/debug/store", api.debug_store, "Streamed export without keys or secrets"),
        Route(
            "POST",
            "/api/licenses/generate",
            api.generate,
            "Issue a license for another service",
            tag="internal",
            auth="internal",
            guard=internal_guard,
            body=GENERATE_BODY,
            response=GENERATE_ANSWER,
            status=201,
        ),
    ]
