"""Hostile input: generated requests against the OpenAPI document, fuzzed parsers, abusive bodies.

* schemathesis reads ``/openapi.json`` from a running server (``live``, with
  Stripe pointed at a local double, a webhook secret and a local identity
  provider, so every route does its real work) and sends schema-valid and
  schema-violating requests to every operation: no 5xx, every answer
  conforms to the document, violations are refused.
* hypothesis feeds arbitrary text and bytes to the key parser, lease
  verification, ``jws.verify``, the webhook signature check and the event
  parser: the only exceptions allowed are :class:`errors.LicensedError`.
* every POST route gets oversized, deeply nested, non-UTF-8, non-JSON and
  wrongly typed bodies: each is refused with the spec's error body.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import stripe_events as se
from support.live import Live
from support.oidc_provider import AUDIENCE, Provider, ec_key
from support.stripe_double import StripeDouble, stripe_double

from licensed import jws, keys, oidc, stripe_api
from licensed.app import App
from licensed.config import Config
from licensed.errors import LicensedError
from licensed.services import Services

EXAMPLES_PER_OPERATION = 25
ADMIN_TOKEN = "adm_hostile_0123456789abcdef"
INTERNAL_KEY = "int_hostile_0123456789abcdef"

CHECKS = schemathesis.config.SchemathesisConfig.from_dict(
    # 413 refuses a body over MAX_BODY_BYTES (a negative key can be longer than that);
    # schemathesis does not count it as a refusal by default.
    {"checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 409, 413, 415, 422]}}}
)

# --- a server whose every route is wired ------------------------------------------------------


@pytest.fixture
def double() -> Iterator[StripeDouble]:
    with stripe_double() as running:
        yield running


@pytest.fixture
def provider() -> Iterator[Provider]:
    idp = Provider(ec_key("hostile-es384"))
    yield idp
    idp.stop()


@pytest.fixture
def config(data_dir: Path, double: StripeDouble, provider: Provider) -> Config:
    return Config(
        data_dir=data_dir,
        app_base_url="http://licensed.test",
        website_url="https://shop.example.com",
        stripe_secret_key="sk_test_double",
        stripe_api_base=double.url,
        stripe_webhook_secrets=(se.SECRET,),
        oidc_issuer=provider.issuer,
        oidc_audience=AUDIENCE,
        oidc_jwks_url=provider.jwks_url,
        admin_token=ADMIN_TOKEN,
        internal_api_key=INTERNAL_KEY,
        rate_limit_per_minute=0,  # thousands of requests from one address; the limiter has its own tests
    )


def post_routes(live: Live) -> list[Any]:
    return [r for r in App(live.services).router.routes if r.method == "POST"]


# --- schemathesis against /openapi.json ------------------------------------------------------------


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_generated_requests_get_no_5xx_and_answers_match_the_document(
    live: Live, mode: GenerationMode
) -> None:
    live.issue()  # something in the database for the lookups to find or miss
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json", config=CHECKS)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Every route but the document itself, which schemathesis leaves out when loading from it.
    routes = {f"{r.method} {r.path}" for r in App(live.services).router.routes if r.api}
    assert {op.label for op in operations} == routes - {"GET /openapi.json"}
    tried: dict[str, int] = {}
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        tried[label] = 0
        exercise(operation, mode, label, live, tried)
    assert all(count != 0 for count in tried.values()), tried


def exercise(operation: Any, mode: GenerationMode, label: str, live: Live, tried: dict[str, int]) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        tried[label] += 1
        excluded = []
        if label == "POST /api/stripe/webhook":
            # The signature is an HMAC of the body under the secret: no generator can make one,
            # so a schema-valid request is refused (400, as Stripe's own libraries answer).
            excluded = [positive_data_acceptance]
        answer = case.call_and_validate(base_url=live.url, session=live.http, excluded_checks=excluded)
        assert answer.status_code < 500, f"{label}: {answer.status_code} {answer.text[:300]}"
        if excluded:
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_SIGNATURE"

    try:
        run()
    except Unsatisfiable:
        # Nothing to break: no body, no parameters (GET /health and the like).
        assert mode == GenerationMode.NEGATIVE and not operation.body and not operation.path_parameters
        tried[label] = -1


# --- fuzzing the parsers ------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def tokens(draw: st.DrawFn) -> str:
    """Strings shaped like a JWS often enough to get past the first checks."""
    shape = draw(st.sampled_from(["text", "parts", "json parts"]))
    if shape == "text":
        return draw(st.text(max_size=300))
    if shape == "parts":
        return ".".join(draw(st.lists(st.text("ABCxyz019-_=.+/", max_size=40), min_size=1, max_size=4)))
    header = draw(
        st.fixed_dictionaries(
            {}, optional={"alg": JSONISH | st.just("EdDSA"), "typ": JSONISH, "kid": JSONISH}
        )
    )
    claims = draw(st.dictionaries(st.sampled_from(["sub", "exp", "mid", "prod", "tier"]), JSONISH))
    signature = draw(st.binary(max_size=80))
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def only_licensed_errors(call: Any) -> None:
    with contextlib.suppress(LicensedError):
        call()


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@FUZZ
@given(
    token=tokens(), prefix=st.sampled_from(["DC-PRO-", "DT-PRO-", "DC--", "DC-", "", "XX-PRO-", "dc-PRO-"])
)
def test_fuzz_license_key_parser(services: Services, token: str, prefix: str) -> None:
    only_licensed_errors(lambda: keys.parse_license_key(prefix + token, services.catalog, services.ring))


@FUZZ
@given(token=tokens())
def test_fuzz_lease_verification(services: Services, token: str) -> None:
    only_licensed_errors(lambda: keys.verify_lease(token, services.ring))


@FUZZ
@given(token=tokens() | st.text(max_size=9000))
def test_fuzz_jws_verify(services: Services, token: str) -> None:
    only_licensed_errors(lambda: jws.verify(token, services.ring.verify_key))


@FUZZ
@given(
    payload=st.binary(max_size=200),
    header=st.one_of(
        st.none(),
        st.text(max_size=200),
        st.builds(
            lambda t, sigs: ",".join([f"t={t}", *(f"v1={s}" for s in sigs)]),
            st.integers(-(10**15), 10**15).map(str) | st.text(max_size=14),
            st.lists(st.text(max_size=70), max_size=3),
        ),
    ),
    now=st.integers(0, 2**40),
)
def test_fuzz_webhook_signature(payload: bytes, header: str | None, now: int) -> None:
    only_licensed_errors(lambda: stripe_api.verify_signature(payload, header, (se.SECRET,), now))


@FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        JSONISH.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {},
            optional={"id": JSONISH | st.text().map("evt_".__add__), "type": JSONISH, "created": JSONISH},
        )
        .flatmap(lambda env: st.builds(lambda data: {**env, "data": data}, JSONISH))
        .map(lambda v: json.dumps(v).encode()),
    )
)
def test_fuzz_event_parser(raw: bytes) -> None:
    only_licensed_errors(lambda: stripe_api.parse_event(raw))


def test_deeply_nested_event_is_refused_cleanly() -> None:
    for depth in (1000, 100_000):
        with pytest.raises(LicensedError):
            stripe_api.parse_event(b"[" * depth + b"]" * depth)


# --- abusive bodies on every POST route ---------------------------------------------------------


def bodies(max_body: int) -> list[tuple[str, bytes, str, set[int], set[str]]]:
    """(what, body, content type, accepted statuses, accepted codes)."""
    nested = b'{"key":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"
    deep_list = b"[" * (max_body // 2 + 10) + b"]" * (max_body // 2 + 10)
    return [
        (
            "oversized",
            b'{"key":"' + b"A" * (max_body + 10) + b'"}',
            "application/json",
            {413},
            {"PAYLOAD_TOO_LARGE"},
        ),
        ("nested object", nested, "application/json", {400}, {"VALIDATION_ERROR", "INVALID_JSON"}),
        ("nested list (oversized)", deep_list, "application/json", {413}, {"PAYLOAD_TOO_LARGE"}),
        (
            "nested list",
            b"[" * 30_000 + b"]" * 30_000,
            "application/json",
            {400},
            {"INVALID_JSON", "VALIDATION_ERROR"},
        ),
        ("latin-1", '{"key":"caf\u00e9"}'.encode("latin-1"), "application/json", {400}, {"INVALID_JSON"}),
        ("invalid UTF-8", b'{"key":"\xff\xfe\xc3("}', "application/json", {400}, {"INVALID_JSON"}),
        ("UTF-16", '{"key":"x"}'.encode("utf-16"), "application/json", {400}, {"INVALID_JSON"}),
        ("not JSON", b"key=x&machine_id=y", "application/json", {400}, {"INVALID_JSON"}),
        ("NaN", b'{"key": NaN}', "application/json", {400}, {"INVALID_JSON"}),
        ("array", b'["key"]', "application/json", {400}, {"VALIDATION_ERROR"}),
        (
            "wrong types",
            b'{"key":1,"machine_id":[],"plan":{},"email":true}',
            "application/json",
            {400},
            {"VALIDATION_ERROR"},
        ),
        ("empty", b"", "application/json", {400}, {"INVALID_JSON"}),
        ("form", b"key=x", "application/x-www-form-urlencoded", {415}, {"UNSUPPORTED_MEDIA_TYPE"}),
    ]


def test_abusive_bodies_on_every_post_route_are_refused_cleanly(live: Live) -> None:
    max_body = live.services.config.max_body_bytes
    routes = post_routes(live)
    assert {r.path for r in routes} >= {
        "/api/license/validate",
        "/api/stripe/webhook",
        "/api/checkout/session",
    }
    for route in routes:
        if route.body is None and route.path != "/api/stripe/webhook":
            continue  # reads no body (the webhook reads its raw body)
        for what, body, media, statuses, codes in bodies(route.max_body or max_body):
            headers = {"Content-Type": media}
            if route.auth in ("admin", "internal"):
                # With the right token, so the body is what is judged.
                headers["Authorization"] = f"Bearer {ADMIN_TOKEN if route.auth == 'admin' else INTERNAL_KEY}"
            if route.path == "/api/stripe/webhook":
                # Signed, so the body itself is what is judged, not the signature.
                headers["Stripe-Signature"] = stripe_api.sign_payload(body, se.SECRET, int(live.clock()))
            try:
                path = route.path.replace("{license_id}", "lic_x").replace("{event_id}", "evt_x")
                answer = live.http.post(live.url + path, data=body, headers=headers, timeout=30)
            except requests.ConnectionError:
                # Waitress may close the connection once it has answered 413 to a body it will not read.
                assert what.startswith(("oversized", "nested list (oversized)")), (route.path, what)
                continue
            assert answer.headers["Content-Type"].startswith("application/json"), (route.path, what)
            error = answer.json().get("error")
            assert error is not None, (route.path, what, answer.text[:200])
            if route.path == "/api/stripe/webhook" and what in ("form", "wrong types", "array", "NaN"):
                # The webhook reads the raw body (Stripe signs bytes), whatever the media type.
                assert answer.status_code == 400, (route.path, what, answer.text)
                continue
            assert answer.status_code in statuses, (route.path, what, answer.status_code, answer.text[:200])
            assert error["code"] in codes, (route.path, what, error)
    # The server is still answering, and nothing was stored.
    assert live.get("/health").status_code == 200
    assert live.services.store.one("SELECT COUNT(*) FROM stripe_events")[0] == 0


def test_body_larger_than_declared_length_and_lying_content_length(live: Live) -> None:
    """A Content-Length that lies (too big, negative, not a number) is refused, not trusted."""
    import socket

    host, port = live.url.removeprefix("http://").split(":")
    for length in ("99999999", "-1", "abc"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            request = (
                f"POST /api/license/validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\nConnection: close\r\n\r\n{{}}"
            )
            sock.sendall(request.encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        status = int(reply.split(b" ", 2)[1])
        assert 400 <= status < 500, (length, reply[:300])


def test_oidc_routes_refuse_hostile_bearers(live: Live) -> None:
    for token in ("x", "a.b.c", "e30.e30.", "\u00e9t\u00e9", "A" * 20_000):
        try:
            answer = live.get("/api/subscriptions/status", headers={"Authorization": f"Bearer {token}"})
        except (UnicodeEncodeError, ValueError):
            continue
        assert answer.status_code in (400, 401, 431), answer.text[:200]


@pytest.mark.parametrize(
    "header",
    [
        "t={t},v1=" + "\u00e9" * 64,
        "t={t},v1=caf\u00e9",
        "t={t},v1=\u00ff",
        "t=\u00b2,v1=ab",
        "t=1\u00b9,v1=ab",
    ],
)
def test_webhook_signature_with_non_ascii_value_is_refused(live: Live, header: str) -> None:
    """Header values reach WSGI as latin-1 text; a non-ASCII signature or a superscript
    digit in the timestamp once crashed the check."""
    body, headers = se.signed(
        se.event("plan.created", se.fixture("plan"), int(live.clock())), int(live.clock())
    )
    headers["Stripe-Signature"] = header.format(t=int(live.clock()))
    answer = live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "INVALID_SIGNATURE"


@pytest.mark.parametrize("length", ["\u00b2", "1\u00b9", "-5", "abc"])
def test_identity_provider_with_a_hostile_content_length(length: str) -> None:
    """A JWKS answer whose Content-Length is not ASCII digits is read or refused, never a crash."""
    import socket
    import threading

    body = b'{"keys": []}'
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            conn.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    try:
        verifier = oidc.OidcVerifier(f"http://127.0.0.1:{port}/oidc", "api://licensed")

        def fetch() -> None:
            assert verifier._download(f"http://127.0.0.1:{port}/oidc/jwks") == body

        only_licensed_errors(fetch)
    finally:
        thread.join(timeout=10)
        listener.close()
