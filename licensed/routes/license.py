"""``/api/license/*``: what installations call to validate, activate and deactivate."""

from __future__ import annotations

from .. import openapi
from ..licensing import ALL_CODES, MACHINE_ID_PATTERN, LicenseRequest
from ..services import Services
from ..web import Request, Response, Route

KEY = openapi.string(1, 8192)
MACHINE_ID = openapi.string(1, 256, pattern=MACHINE_ID_PATTERN)
LICENSE_BODY = openapi.obj(
    {
        "key": KEY,
        "machine_id": MACHINE_ID,
        "product": openapi.string(1, 64),
        "label": openapi.string(1, 64, pattern=MACHINE_ID_PATTERN),
    },
    required=["key"],
)
DEACTIVATE_BODY = openapi.one_of(
    openapi.obj(
        {
            "key": KEY,
            "machine_id": MACHINE_ID,
            "machine": openapi.string(1, 64, pattern="^mch_[A-Za-z0-9_-]{1,60}$"),
            "product": openapi.string(1, 64),
        },
        required=["key"],
    ),
    "machine_id",
    "machine",
)
MACHINES_BODY = openapi.obj({"key": KEY, "product": openapi.string(1, 64)}, required=["key"])
MACHINES_ANSWER: openapi.Schema = {
    "type": "object",
    "required": ["valid", "code", "machines"],
    "properties": {
        "valid": {"type": "boolean"},
        "code": {"type": "string", "enum": list(ALL_CODES)},
        "machines": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "label", "activated_at", "last_seen_at"],
                "properties": {
                    "id": {"type": "string", "description": "opaque and stable; never the machine id"},
                    "label": {"type": ["string", "null"]},
                    "activated_at": {"type": "string", "format": "date-time"},
                    "last_seen_at": {"type": "string", "format": "date-time"},
                },
            },
        },
    },
}
LICENSE_VIEW: openapi.Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "product": {"type": "string"},
        "plan": {"type": "string"},
        "tier": {"type": "string"},
        "status": {"type": "string"},
        "features": {"type": "array", "items": {"type": "string"}},
        "max_machines": {"type": "integer"},
        "machines_used": {"type": "integer"},
        "paid_through": {"type": ["string", "null"]},
        "expires_at": {"type": ["string", "null"]},
        "lifetime": {"type": "boolean"},
        "cancel_at_period_end": {"type": "boolean"},
    },
}
LICENSE_ANSWER: openapi.Schema = {
    "type": "object",
    "required": ["valid", "code"],
    "properties": {
        "valid": {"type": "boolean"},
        "code": {"type": "string", "enum": list(ALL_CODES)},
        "activated": {"type": "boolean"},
        "deactivated": {"type": "boolean"},
        "license": LICENSE_VIEW,
        "key": {"type": "string"},
        "lease": {"type": "string"},
    },
}


def routes(services: Services) -> list[Route]:
    licensing = services.licensing

    def validate(request: Request) -> Response:
        req = LicenseRequest.from_body(request.parsed, machine_required=False)
        return Response(licensing.check(req, services.now()))

    def activate(request: Request) -> Response:
        req = LicenseRequest.from_body(request.parsed, machine_required=True)
        return Response(licensing.check(req, services.now()))

    def deactivate(request: Request) -> Response:
        req = LicenseRequest.from_body(request.parsed, machine_required=False)
        return Response(licensing.deactivate(req, services.now()))

    def machines(request: Request) -> Response:
        req = LicenseRequest.from_body(request.parsed, machine_required=False)
        return Response(licensing.machines(req, services.now()))

    return [
        Route(
            "POST",
            "/api/license/validate",
            validate,
            "Validate a key; activate with a machine id",
            body=LICENSE_BODY,
            response=LICENSE_ANSWER,
        ),
        Route(
            "POST",
            "/api/license/activate",
            activate,
            "Activate a machine",
            body={**LICENSE_BODY, "required": ["key", "machine_id"]},
            response=LICENSE_ANSWER,
        ),
        Route(
            "POST",
            "/api/license/deactivate",
            deactivate,
            "Free a machine's seat: this one (machine_id), or one from the machines list (machine)",
            body=DEACTIVATE_BODY,
            response=LICENSE_ANSWER,
        ),
        Route(
            "POST",
            "/api/license/machines",
            machines,
            "The machines holding the licence's seats",
            body=MACHINES_BODY,
            response=MACHINES_ANSWER,
        ),
    ]
