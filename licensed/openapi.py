"""Request schemas, their checker, and the OpenAPI 3.1 document.

Each route declares its body as a JSON Schema. The same schema both checks
requests (a small checker for the subset used here) and appears in
``/openapi.json``, so the document cannot drift from what the server does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .errors import ValidationFailed

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


def string(min_length: int = 1, max_length: int = 256, **extra: Any) -> Schema:
    return {"type": "string", "minLength": min_length, "maxLength": max_length, **extra}


def one_of(schema: Schema, *names: str) -> Schema:
    """``schema`` (an object) where exactly one of the fields ``names`` must be given."""
    branches = [{"required": [n], "properties": {n: {"type": "string"}}} for n in names]
    return {**schema, "oneOf": branches}


def obj(properties: dict[str, Schema], required: Iterable[str] = ()) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": True,
    }


Checker = Callable[[Any], None]


def check(value: Any, schema: Schema, where: str = "body") -> None:
    """Raise ValidationFailed naming the first field that breaks ``schema``."""
    checker(schema, where)(value)


def checker(schema: Schema, where: str = "body") -> Checker:
    """:func:`check` for one schema, the schema read once: each route builds its own on
    first use, so a request runs only the tests its schema asks for."""
    kind = schema.get("type")
    if kind == "object":
        return _object_checker(schema, where)
    if kind == "string":
        return _string_checker(schema, where)
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")

        def check_integer(value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValidationFailed(f"{where} must be an integer")
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValidationFailed(f"{where} is out of range")

        return check_integer
    if kind == "boolean":

        def check_boolean(value: Any) -> None:
            if not isinstance(value, bool):
                raise ValidationFailed(f"{where} must be true or false")

        return check_boolean
    if kind == "array":
        return _array_checker(schema, where)
    return _anything


def _anything(value: Any) -> None:
    """A schema without a ``type`` allows any value."""


def _object_checker(schema: Schema, where: str) -> Checker:
    required = tuple((name, _join(where, name)) for name in schema.get("required", ()))
    props: dict[str, Schema] = schema.get("properties", {})
    fields = tuple((name, checker(sub, _join(where, name))) for name, sub in props.items())
    closed = frozenset(props) if schema.get("additionalProperties") is False else None
    # "oneOf" here is only ever a choice between fields: exactly one of them is given.
    choice = tuple(name for branch in schema.get("oneOf", ()) for name in branch["required"])

    def check_object(value: Any) -> None:
        if not isinstance(value, dict):
            raise ValidationFailed(f"{where} must be a JSON object")
        for name, label in required:
            if value.get(name) is None:
                raise ValidationFailed(f"{label} is required")
        if choice and sum(value.get(name) is not None for name in choice) != 1:
            raise ValidationFailed(f"exactly one of {' or '.join(choice)} is required")
        for name, check_field in fields:
            field = value.get(name)
            if field is not None:
                check_field(field)
        if closed is not None:
            extra = sorted(set(value) - closed)
            if extra:
                raise ValidationFailed(f"{_join(where, extra[0])} is not allowed")

    return check_object


def _string_checker(schema: Schema, where: str) -> Checker:
    shortest, longest = schema.get("minLength", 0), schema.get("maxLength", 1 << 30)
    pattern = schema.get("pattern")
    compiled = None if pattern is None else _compile(pattern)
    allowed = schema.get("enum")

    def check_string(value: Any) -> None:
        if not isinstance(value, str):
            raise ValidationFailed(f"{where} must be a string")
        size = len(value)
        if size < shortest:
            raise ValidationFailed(f"{where} is too short")
        if size > longest:
            raise ValidationFailed(f"{where} is too long")
        if compiled is not None and not compiled.search(value):
            raise ValidationFailed(f"{where} has the wrong form")
        if allowed is not None and value not in allowed:
            raise ValidationFailed(f"{where} must be one of {', '.join(allowed)}")

    return check_string


def _array_checker(schema: Schema, where: str) -> Checker:
    most = schema.get("maxItems", 1 << 30)
    items = schema.get("items", {})

    def check_array(value: Any) -> None:
        if not isinstance(value, list):
            raise ValidationFailed(f"{where} must be an array")
        if len(value) > most:
            raise ValidationFailed(f"{where} has too many items")
        for index, item in enumerate(value):
            checker(items, f"{where}[{index}]")(item)

    return check_array


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
