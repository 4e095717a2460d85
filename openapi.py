"""Request schemas, their checker, and the OpenAPI 3.1 document.

Each route declares its body as a JSON Schema. The same schema both checks
requests (a small checker for the subset used here) and appears in
``/openapi.json``, so the document cannot drift from what the server does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

from errors import ValidationFailed

Schema = dict[str, Any]

ERROR_SCHEMA: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"},
                "message": {"type": "string"},
            },
        }
    },
}

_PATTERNS: dict[str, re.Pattern[str]] = {}


def string(min_length: int = 1, max_length: int = 256, **extra: Any) -> Schema:
    return {"type": "string", "minLength": min_length, "maxLength": max_length, **extra}


def obj(properties: dict[str, Schema], required: Iterable[str] = ()) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": True,
    }


def check(value: Any, schema: Schema, where: str = "body") -> None:
    """Raise ValidationFailed naming the first field that breaks ``schema``."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            raise ValidationFailed(f"{where} must be a JSON object")
        for name in schema.get("required", ()):
            if value.get(name) is None:
                raise ValidationFailed(f"{_join(where, name)} is required")
        props = schema.get("properties", {})
        for name, sub in props.items():
            if value.get(name) is not None:
                check(value[name], sub, _join(where, name))
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                raise ValidationFailed(f"{_join(where, extra[0])} is not allowed")
    elif kind == "string":
        if not isinstance(value, str):
            raise ValidationFailed(f"{where} must be a string")
        if len(value) < schema.get("minLength", 0):
            raise ValidationFailed(f"{where} is too short")
        if len(value) > schema.get("maxLength", 1 << 30):
            raise ValidationFailed(f"{where} is too long")
        pattern = schema.get("pattern")
        if pattern is not None:
            compiled = _PATTERNS.get(pattern) or _PATTERNS.setdefault(pattern, _compile(pattern))
            if not compiled.search(value):
                raise ValidationFailed(f"{where} has the wrong form")
        if "enum" in schema and value not in schema["enum"]:
            raise ValidationFailed(f"{where} must be one of {', '.join(schema['enum'])}")
    elif kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValidationFailed(f"{where} must be an integer")
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            raise ValidationFailed(f"{where} is out of range")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise ValidationFailed(f"{where} must be true or false")
    elif kind == "array":
        if not isinstance(value, list):
            raise ValidationFailed(f"{where} must be an array")
        if len(value) > schema.get("maxItems", 1 << 30):
            raise ValidationFailed(f"{where} has too many items")
        for index, item in enumerate(value):
            check(item, schema.get("items", {}), f"{where}[{index}]")


def _compile(pattern: str) -> re.Pattern[str]:
    """A JSON Schema (ECMA-262) pattern for Python: a final ``$`` is the end of the text.

    Python's ``$`` also matches before a trailing newline, so ``^[a-z]+$`` would let
    ``"abc\\n"`` through where the published schema does not.
    """
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _join(where: str, name: str) -> str:
    return name if where == "body" else f"{where}.{name}"


class RouteInfo(Protocol):
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def auth(self) -> str | None: ...
    @property
    def body(self) -> Schema | None: ...
    @property
    def response(self) -> Schema | None: ...
    @property
    def status(self) -> int: ...
    @property
    def tag(self) -> str: ...
    @property
    def media_type(self) -> str: ...


SECURITY_SCHEMES: dict[str, Schema] = {
    "admin": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"},
    "internal": {"type": "http", "scheme": "bearer", "description": "INTERNAL_API_KEY"},
    "oidc": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
    "stripe": {"type": "apiKey", "in": "header", "name": "Stripe-Signature"},
}


def document(routes: Iterable[RouteInfo], base_url: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": _operation_id(route.method, route.path),
            "tags": [route.tag],
            "responses": {
                str(route.status): {
                    "description": "success",
                    "content": {route.media_type: {"schema": route.response or _any_body(route.media_type)}},
                },
                "default": {"$ref": "#/components/responses/Error"},
            },
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": string(1, 255)}
            for name in re.findall(r"\{(\w+)\}", route.path)
        ]
        params += [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
            for name in getattr(route, "query", ())
        ]
        if params:
            operation["parameters"] = params
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _as_checked(route.body)}},
            }
        if route.auth in SECURITY_SCHEMES:
            operation["security"] = [{route.auth: []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "licensed",
            "version": version,
            "description": "Self-hosted license server for software sold through Stripe.",
        },
        "servers": [{"url": base_url}],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "responses": {
                "Error": {
                    "description": "an error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def _as_checked(schema: Schema) -> Schema:
    """The request schema as :func:`check` applies it: an optional property may be ``null``.

    The checker treats ``null`` like an absent optional field, so the document says so.
    """
    if schema.get("type") != "object":
        return schema
    required = set(schema.get("required", ()))
    properties = {}
    for name, sub in (schema.get("properties") or {}).items():
        sub = _as_checked(sub)
        if name not in required and isinstance(sub.get("type"), str):
            sub = {**sub, "type": [sub["type"], "null"]}
        properties[name] = sub
    return {**schema, "properties": properties}


def _any_body(media_type: str) -> Schema:
    return {"type": "object"} if media_type == "application/json" else {"type": "string"}


def _operation_id(method: str, path: str) -> str:
    words = re.findall(r"[a-z0-9]+", path.replace("{", "by_").lower())
    return "_".join([method.lower(), *words])
