"""Bad input gets the spec's error body and a fitting status, never a 500.

Forged, tampered and lookalike keys are an outcome (200, ``INVALID_KEY``),
not an HTTP error; malformed requests are 4xx with ``{"error": {...}}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import nacl.signing
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.forge import (
    b64,
    claims_of,
    ed25519_token,
    flip,
    header_of,
    hs256_token,
    split_key,
    unsigned_token,
)
from support.live import Live

from licensed import keys, licensing

VALIDATE = "/api/license/validate"
ROUTES = ("validate", "activate", "deactivate")


@pytest.fixture
def live(module_live: Live) -> Live:
    """One server for this module: no test here moves the clock or shares a licence."""
    return module_live


def raw_post(
    live: Live, path: str, data: bytes | str, content_type: str | None = "application/json"
) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return live.http.post(live.url + path, data=data, headers=headers, timeout=10)


def assert_error(answer: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", body["error"]["code"])
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in answer.text
    error: dict[str, Any] = body["error"]
    return error


# --- malformed bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"key":', id="truncated"),
        pytest.param(b"{'key': 'x'}", id="single-quotes"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xef\xbb\xbf{}", id="bom"),
        pytest.param(b'{"key": "\xff\xfe"}', id="not-utf8"),
        pytest.param(b'{"key": "caf\xe9"}', id="latin-1"),
        pytest.param(b"[" * 50_000, id="nested-50k"),
        pytest.param(b'{"key": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", id="nested-inside"),
        pytest.param(b'{"key": NaN}', id="nan"),
        pytest.param(b'{"key": "k", "machine_id": Infinity}', id="infinity"),
        pytest.param(b'{"key": -Infinity}', id="minus-infinity"),
        pytest.param(b'{"key": 1' + b"0" * 5000 + b"}", id="huge-int"),
        pytest.param(b'{"key": "k", "machine_id": "\\ud800"}', id="lone-surrogate"),
        pytest.param(b'{"key": "k", "machine_id": "m\\udc00"}', id="lone-low-surrogate"),
        pytest.param(b'{"key": "k"} trailing', id="trailing-text"),
    ],
)
def test_malformed_json(live: Live, route: str, raw: bytes) -> None:
    assert_error(raw_post(live, f"/api/license/{route}", raw), 400, "INVALID_JSON")


@pytest.mark.parametrize("raw", ["[]", '"key"', "1", "null", "true", '[{"key": "x"}]'])
def test_body_must_be_an_object(live: Live, raw: str) -> None:
    error = assert_error(raw_post(live, VALIDATE, raw), 400, "VALIDATION_ERROR")
    assert "object" in error["message"]


WRONG_VALUES: list[Any] = [1, 1.5, True, False, [], ["x"], {}, {"k": "v"}]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field", ["key", "machine_id", "product"])
@pytest.mark.parametrize("value", WRONG_VALUES, ids=[json.dumps(v) for v in WRONG_VALUES])
def test_wrong_types(live: Live, route: str, field: str, value: Any) -> None:
    body: dict[str, Any] = {"key": "DC-PRO-x", "machine_id": "m-1", field: value}
    error = assert_error(live.post(f"/api/license/{route}", body), 400, "VALIDATION_ERROR")
    assert field in error["message"]


@pytest.mark.parametrize(
    ("route", "body", "missing"),
    [
        ("validate", {}, "key"),
        ("validate", {"machine_id": "m"}, "key"),
        ("validate", {"key": None}, "key"),
        ("activate", {"machine_id": "m"}, "key"),
        ("activate", {"key": "DC-PRO-x"}, "machine_id"),
        ("activate", {"key": "DC-PRO-x", "machine_id": None}, "machine_id"),
        ("deactivate", {"key": "DC-PRO-x"}, "machine_id"),
        ("deactivate", {"machine_id": "m"}, "key"),
    ],
)
def test_missing_fields(live: Live, route: str, body: dict[str, Any], missing: str) -> None:
    error = assert_error(live.post(f"/api/license/{route}", body), 400, "VALIDATION_ERROR")
    assert missing in error["message"] and "required" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "machine_id",
    [
        pytest.param("", id="empty"),
        pytest.param("m" * 257, id="257-chars"),
        pytest.param("\x00", id="nul"),
        pytest.param("a\nb", id="newline"),
        pytest.param("tab\there", id="tab"),
        pytest.param("del\x7f", id="del"),
        pytest.param("zero\u200bwidth", id="zero-width-space"),
        pytest.param("\u2028", id="line-separator"),
        pytest.param("bidi\u202e", id="bidi-override"),
    ],
)
def test_bad_machine_ids(live: Live, route: str, machine_id: str) -> None:
    key = live.issue()
    assert_error(
        live.post(f"/api/license/{route}", {"key": key, "machine_id": machine_id}), 400, "VALIDATION_ERROR"
    )
    lic_id = claims_of(split_key(key)[2])["sub"]
    assert live.services.store.count_machines(lic_id) == 0


@pytest.mark.parametrize("machine_id", ["m" * 256, "é" * 256, "机器-1", "a b c", "x"])
def test_good_machine_ids(live: Live, machine_id: str) -> None:
    body = live.post("/api/license/activate", {"key": live.issue(), "machine_id": machine_id}).json()
    assert body["code"] == "VALID" and body["activated"] is True


def test_key_longer_than_the_limit(live: Live) -> None:
    assert_error(live.post(VALIDATE, {"key": "DC-PRO-" + "A" * 8200}), 400, "VALIDATION_ERROR")


# --- transport-level errors -------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_one_mebibyte_body(live: Live, route: str) -> None:
    body = json.dumps({"key": "DC-PRO-x", "machine_id": "m", "pad": "x" * (1 << 20)})
    assert_error(raw_post(live, f"/api/license/{route}", body), 413, "PAYLOAD_TOO_LARGE")


def test_chunked_body_over_the_limit(live: Live) -> None:
    # No Content-Length: the cap must still hold for a chunked body.
    chunks = (b"x" * 65536 for _ in range(16))
    answer = live.http.post(
        live.url + VALIDATE, data=chunks, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert_error(answer, 413, "PAYLOAD_TOO_LARGE")


def test_body_just_under_the_limit_is_read(live: Live) -> None:
    limit = live.services.config.max_body_bytes
    key = live.issue()
    body = json.dumps({"key": key, "pad": ""})
    body = body.replace('"pad": ""', '"pad": "' + "x" * (limit - len(body)) + '"')
    assert len(body) == limit
    assert raw_post(live, VALIDATE, body).json()["code"] == "VALID"


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/jsonx"],
)
def test_wrong_content_type(live: Live, content_type: str | None) -> None:
    assert_error(raw_post(live, VALIDATE, '{"key": "x"}', content_type), 415, "UNSUPPORTED_MEDIA_TYPE")


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_content_type_parameters_accepted(live: Live, content_type: str) -> None:
    key = live.issue()
    answer = raw_post(live, VALIDATE, json.dumps({"key": key}), content_type)
    assert answer.status_code == 200 and answer.json()["code"] == "VALID"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/license/validate", "POST"),
        ("PUT", "/api/license/activate", "POST"),
        ("DELETE", "/api/license/deactivate", "POST"),
        ("POST", "/health", "GET"),
        ("PATCH", "/api/public/plans", "GET"),
        ("POST", "/.well-known/jwks.json", "GET"),
        ("DELETE", "/openapi.json", "GET"),
    ],
)
def test_wrong_method(live: Live, method: str, path: str, allow: str) -> None:
    answer = live.http.request(method, live.url + path, timeout=10)
    assert_error(answer, 405, "METHOD_NOT_ALLOWED")
    assert answer.headers["Allow"] == allow


@pytest.mark.parametrize(
    "path",
    ["/", "/nope", "/api/license/validate/", "/api/license", "/API/license/validate", "/health/x", "/%00"],
)
def test_unknown_path(live: Live, path: str) -> None:
    assert_error(live.get(path), 404, "NOT_FOUND")
    assert_error(live.post(path, {"key": "x"}), 404, "NOT_FOUND")


# --- forged, tampered and lookalike keys --------------------------------------------------------


def _answer(live: Live, key: str, **extra: Any) -> dict[str, Any]:
    answer = live.post(VALIDATE, {"key": key, **extra})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _parts(live: Live) -> tuple[str, str, str, dict[str, Any], dict[str, Any]]:
    """A real key's prefix, tier, JWS, header and claims."""
    prefix, tier, token = split_key(live.issue())
    return prefix, tier, token, header_of(token), claims_of(token)


def _our_key(live: Live) -> nacl.signing.SigningKey:
    signing: nacl.signing.SigningKey = live.services.ring.current.key
    return signing


def _flip_segment(index: int, position: str) -> Callable[[Live], str]:
    def make(live: Live) -> str:
        prefix, tier, token, _, _ = _parts(live)
        parts = token.split(".")
        where = {"first": 0, "middle": len(parts[index]) // 2, "last": len(parts[index]) - 1}[position]
        parts[index] = flip(parts[index], where)
        return f"{prefix}-{tier}-{'.'.join(parts)}"

    return make


def _resigned(change: Callable[[dict[str, Any], dict[str, Any]], None]) -> Callable[[Live], str]:
    """A key re-signed with OUR signing key after ``change`` edits header and claims."""

    def make(live: Live) -> str:
        prefix, tier, _, header, claims = _parts(live)
        change(header, claims)
        return f"{prefix}-{tier}-{ed25519_token(header, claims, _our_key(live))}"

    return make


def _foreign_key(kid: str | None) -> Callable[[Live], str]:
    def make(live: Live) -> str:
        prefix, tier, _, header, claims = _parts(live)
        header["kid"] = kid or header["kid"]
        return f"{prefix}-{tier}-{ed25519_token(header, claims, nacl.signing.SigningKey.generate())}"

    return make


def _alg_none(live: Live) -> str:
    prefix, tier, _, header, claims = _parts(live)
    return f"{prefix}-{tier}-{unsigned_token({**header, 'alg': 'none'}, claims)}"


def _hs256(secret_of: Callable[[Live], bytes]) -> Callable[[Live], str]:
    def make(live: Live) -> str:
        prefix, tier, _, header, claims = _parts(live)
        token = hs256_token({**header, "alg": "HS256"}, claims, secret_of(live))
        return f"{prefix}-{tier}-{token}"

    return make


def _public_bytes(live: Live) -> bytes:
    return bytes(_our_key(live).verify_key)


def _public_x(live: Live) -> bytes:
    return b64(bytes(_our_key(live).verify_key)).encode()


def _other_prefix(live: Live) -> str:
    _, tier, token, _, _ = _parts(live)
    return f"DT-{tier}-{token}"  # a DashCaddy key dressed as a Desktop key


def _other_tier(live: Live) -> str:
    prefix, _, token, _, _ = _parts(live)
    return f"{prefix}-TEAM-{token}"


def _lease_as_key(live: Live) -> str:
    key = live.issue()
    lease = live.post("/api/license/activate", {"key": key, "machine_id": "m"}).json()["lease"]
    return f"DC-PRO-{lease}"


def _extra_segment(live: Live) -> str:
    prefix, tier, token, _, _ = _parts(live)
    return f"{prefix}-{tier}-{token}.{token.split('.')[2]}"


def _bad_prefix(change: Callable[[str], str]) -> Callable[[Live], str]:
    def make(live: Live) -> str:
        return change(live.issue())

    return make


FORGERIES: dict[str, Callable[[Live], str]] = {
    "header-char-flipped": _flip_segment(0, "middle"),
    "payload-first-char-flipped": _flip_segment(1, "first"),
    "payload-char-flipped": _flip_segment(1, "middle"),
    "payload-last-char-flipped": _flip_segment(1, "last"),
    "signature-first-char-flipped": _flip_segment(2, "first"),
    "signature-char-flipped": _flip_segment(2, "middle"),
    # The last character of a 64-byte signature carries 4 unused bits: only a
    # canonical base64url encoding may be accepted.
    "signature-last-char-flipped": _flip_segment(2, "last"),
    "unknown-kid": _foreign_key("not-our-kid"),
    "foreign-key-our-kid": _foreign_key(None),
    "alg-none": _alg_none,
    "hs256-public-key-bytes": _hs256(_public_bytes),
    "hs256-public-key-x": _hs256(_public_x),
    "no-exp": _resigned(lambda h, c: c.pop("exp")),
    "exp-string": _resigned(lambda h, c: c.update(exp=str(c["exp"]))),
    "exp-float": _resigned(lambda h, c: c.update(exp=c["exp"] + 0.5)),
    "exp-bool": _resigned(lambda h, c: c.update(exp=True)),
    "no-sub": _resigned(lambda h, c: c.pop("sub")),
    "sub-not-string": _resigned(lambda h, c: c.update(sub=7)),
    "prod-other": _resigned(lambda h, c: c.update(prod="desktop")),
    "alg-ES256-our-signature": _resigned(lambda h, c: h.update(alg="ES256")),
    "typ-other": _resigned(lambda h, c: h.update(typ="JWE")),
    "header-jku": _resigned(lambda h, c: h.update(jku="http://evil.test/jwks")),
    "header-crit": _resigned(lambda h, c: h.update(crit=["exp"])),
    "kid-not-string": _resigned(lambda h, c: h.update(kid=1)),
    "other-product-prefix": _other_prefix,
    "other-tier-text": _other_tier,
    "lease-as-key": _lease_as_key,
    "four-segments": _extra_segment,
    "lower-case-prefix": _bad_prefix(lambda k: "dc" + k[2:]),
    "no-prefix": _bad_prefix(lambda k: split_key(k)[2]),
    "no-tier": _bad_prefix(lambda k: "DC-" + split_key(k)[2]),
    "trailing-newline": _bad_prefix(lambda k: k + "\n"),
    "leading-space": _bad_prefix(lambda k: " " + k),
    "padded-base64": _bad_prefix(lambda k: k + "=="),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_keys_are_invalid(live: Live, name: str) -> None:
    key = FORGERIES[name](live)
    body = _answer(live, key, machine_id="m-forged")
    assert body == {"valid": False, "code": "INVALID_KEY"}
    # No seat was taken by the forgery.
    assert (
        live.services.store.all(
            "SELECT * FROM machines WHERE machine_hash = ?", (keys.machine_hash("m-forged"),)
        )
        == []
    )


def test_resigning_helper_is_honest(live: Live) -> None:
    """The forgeries above fail for their change, not for how they are built."""
    assert _answer(live, _resigned(lambda h, c: None)(live))["code"] == "VALID"


def test_other_product_is_a_mismatch(live: Live) -> None:
    dc_key = live.issue("pro-monthly")
    dt_key = live.issue("desktop-pro")
    assert dt_key.startswith("DT-PRO-")
    assert _answer(live, dc_key, product="desktop")["code"] == "PRODUCT_MISMATCH"
    assert _answer(live, dt_key, product="dashcaddy")["code"] == "PRODUCT_MISMATCH"
    assert _answer(live, dt_key, product="desktop")["code"] == "VALID"
    assert _answer(live, dc_key, product="dashcaddy")["code"] == "VALID"
    # An unknown product name is no better than the wrong one.
    assert _answer(live, dc_key, product="nope")["code"] == "PRODUCT_MISMATCH"


# --- random input never breaks the server --------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def keyish(draw: st.DrawFn, real: str) -> str:
    """Random text, key-shaped text, and a real key with random damage."""
    kind = draw(st.sampled_from(["text", "shaped", "damaged"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "shaped":
        prefix = draw(st.sampled_from(["DC", "DT", "dc", "XX", ""]))
        tier = draw(st.sampled_from(["PRO", "TEAM", "", "-"]))
        body = draw(st.text(alphabet=_B64 + ".=", max_size=400))
        return f"{prefix}-{tier}-{body}"
    index = draw(st.integers(0, len(real) - 1))
    replacement = draw(st.text(max_size=3))
    return real[:index] + replacement + real[index + 1 :]


@pytest.fixture(scope="module")
def real_key(module_live: Live) -> str:
    return module_live.issue("team-monthly")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_input_never_breaks_the_server(live: Live, real_key: str, data: st.DataObject) -> None:
    real = real_key
    route = data.draw(st.sampled_from(ROUTES))
    body: dict[str, Any] = {"key": data.draw(keyish(real))}
    machine_id = data.draw(st.one_of(st.none(), st.text(max_size=300)))
    if machine_id is not None:
        body["machine_id"] = machine_id
    if data.draw(st.booleans()):
        body["product"] = data.draw(st.one_of(st.sampled_from(["dashcaddy", "desktop"]), st.text()))
    answer = live.post(f"/api/license/{route}", body)
    assert answer.status_code < 500, answer.text
    payload = answer.json()
    if answer.status_code == 200:
        assert payload["code"] in licensing.ALL_CODES
        assert isinstance(payload["valid"], bool)
        if payload["code"] != "INVALID_KEY":
            # Only the exact key the server issued gets past signature checks.
            assert body["key"] == real
    else:
        assert answer.status_code == 400
        assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}
