"""Customer identity and ``GET /api/subscriptions/status``.

A real identity provider stands in (tests/oidc_provider.py): keys made with
``cryptography``, a JWKS endpoint served by ``http.server`` on 127.0.0.1 that
counts its requests, tokens signed with PyJWT. The licence server runs for
real (``live``) and trusts it through the ordinary settings.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from support.clock import DAY, T0
from support.live import Live
from support.oidc_provider import AUDIENCE, Provider, SigningKey, ec_key, rsa_key
from support.server_proc import run_cli

from licensed import identities, licensing, oidc
from licensed.config import Config
from licensed.errors import ConfigError, Conflict, InvalidBearerToken, NotFound, OidcUnavailable

STATUS = "/api/subscriptions/status"
EMAIL = "Buyer@Example.com"


@pytest.fixture(scope="module")
def ec_signing_key() -> SigningKey:
    return ec_key("logto-es384-1")


@pytest.fixture(scope="module")
def rsa_signing_key() -> SigningKey:
    return rsa_key("rotated-rs256-2")


@pytest.fixture
def provider(ec_signing_key: SigningKey) -> Iterator[Provider]:
    idp = Provider(ec_signing_key)
    yield idp
    idp.stop()


@pytest.fixture
def oidc_enabled() -> bool:
    """Tests of a server without OIDC settings parametrize this to False."""
    return True


@pytest.fixture
def config(data_dir: Path, provider: Provider, oidc_enabled: bool) -> Config:
    """The server's settings name the provider's issuer; the JWKS URL comes from its discovery document."""
    values = {"DATA_DIR": str(data_dir), "APP_BASE_URL": "http://licensed.test"}
    if oidc_enabled:
        values.update({"OIDC_ISSUER": provider.issuer, "OIDC_AUDIENCE": AUDIENCE})
    return Config.from_mapping(values)


def get_status(live: Live, token: str | None = None, **headers: str) -> requests.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return live.get(STATUS, headers=headers)


def assert_error(answer: requests.Response, status: int, code: str) -> str:
    """The spec's error body, and its message for further checks."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    return message


def user_token(provider: Provider, now: int, **claims: Any) -> str:
    """A token of a user whose verified e-mail is the buyer's (in another case)."""
    return provider.token(now, email=EMAIL.lower(), email_verified=True, **claims)


# --- good tokens and the answer ---------------------------------------------------------


def test_good_token_shows_the_subscription(live: Live, provider: Provider) -> None:
    lic = live.issue_license("pro-monthly", days=30, email=EMAIL)
    live.key_of(lic)
    answer = get_status(live, user_token(provider, live.services.now()))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "active"
    assert body["plan"] == "pro-monthly"
    assert body["current_period_end"] == licensing.iso(T0 + 30 * DAY)
    assert body["cancel_at_period_end"] is False
    assert body["licenses"] == [licensing.license_view(live.license(lic.id), 0)]
    assert "@" not in answer.text  # no e-mail, not even the user's own
    assert provider.requests == 1


def test_lowercase_bearer_scheme_is_accepted(live: Live, provider: Provider) -> None:
    answer = live.get(STATUS, headers={"Authorization": f"bearer {provider.token(live.services.now())}"})
    assert answer.status_code == 200
    assert answer.json()["status"] == "none"


def test_openapi_shows_bearer_security(live: Live) -> None:
    document = live.get("/openapi.json").json()
    operation = document["paths"][STATUS]["get"]
    assert operation["security"] == [{"oidc": []}]
    assert document["components"]["securitySchemes"]["oidc"]["scheme"] == "bearer"
    assert (
        "none"
        in operation["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["status"][
            "enum"
        ]
    )


# --- bad tokens and headers: 401 --------------------------------------------------------

TokenMaker = Callable[[Provider, int], str]

BAD_TOKENS: dict[str, tuple[TokenMaker, str, str]] = {
    # name: (maker, code, a word the message must contain)
    "expired": (lambda p, now: p.token(now - 7200, exp=now - oidc.LEEWAY), "TOKEN_EXPIRED", "expired"),
    "not yet valid": (lambda p, now: p.token(now, nbf=now + oidc.LEEWAY + 1), "INVALID_TOKEN", "nbf"),
    "issued in the future": (lambda p, now: p.token(now + 600), "INVALID_TOKEN", "iat"),
    "wrong issuer": (lambda p, now: p.token(now, iss="https://evil.example/oidc"), "INVALID_TOKEN", "issuer"),
    "wrong audience": (lambda p, now: p.token(now, aud="https://other.example"), "INVALID_TOKEN", "audience"),
    "no exp": (lambda p, now: p.token(now, exp=None), "INVALID_TOKEN", "exp"),
    "exp not a time": (lambda p, now: p.token(now, exp="tomorrow"), "INVALID_TOKEN", "exp"),
    "no sub": (lambda p, now: p.token(now, sub=None), "INVALID_TOKEN", "sub"),
    "no aud": (lambda p, now: p.token(now, aud=None), "INVALID_TOKEN", "aud"),
    "alg none": (lambda p, now: p.unsigned_token(now), "INVALID_TOKEN", "none"),
    "HS256 keyed with the public key": (lambda p, now: p.hmac_with_public_key(now), "INVALID_TOKEN", "HS256"),
    "signed by another key under the same kid": (
        lambda p, now: p.token(now, key=ec_key(p.signing.kid)),
        "INVALID_TOKEN",
        "signature",
    ),
    "RS256 claimed for the EC key": (
        lambda p, now: p.token(now, key=SigningKey(p.signing.kid, "RS256", rsa_key("x").private)),
        "INVALID_TOKEN",
        "RS256",
    ),
    "no kid": (lambda p, now: p.token(now, headers={"kid": None}), "INVALID_TOKEN", "kid"),
    "garbage": (lambda p, now: "garbage", "INVALID_TOKEN", "JWT"),
    "three garbage segments": (lambda p, now: "a.b.c", "INVALID_TOKEN", "JWT"),
    "too long": (lambda p, now: "a" * (oidc.MAX_TOKEN_LENGTH + 1), "INVALID_TOKEN", "long"),
}


@pytest.mark.parametrize("name", list(BAD_TOKENS))
def test_bad_token_is_refused(live: Live, provider: Provider, name: str) -> None:
    live.issue_license("pro-monthly", days=30, email=EMAIL)
    maker, code, word = BAD_TOKENS[name]
    answer = get_status(live, maker(provider, live.services.now()))
    message = assert_error(answer, 401, code)
    assert word in message
    assert answer.headers["WWW-Authenticate"].startswith("Bearer ")
    assert live.services.store.customer_ids_for_sub("user-1") == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer    "},
        {"Authorization": "Token abc"},
    ],
    ids=["missing", "basic", "bearer without token", "bearer with blanks", "other scheme"],
)
def test_missing_or_malformed_authorization_is_refused(
    live: Live, provider: Provider, headers: dict[str, str]
) -> None:
    message = assert_error(live.get(STATUS, headers=headers), 401, "UNAUTHORIZED")
    assert "Bearer" in message
    assert provider.requests == 0


@pytest.mark.parametrize(
    ("claim", "offset", "accepted"),
    [
        ("exp", -oidc.LEEWAY + 1, True),
        ("exp", -oidc.LEEWAY, False),
        ("nbf", oidc.LEEWAY, True),
        ("nbf", oidc.LEEWAY + 1, False),
        ("iat", oidc.LEEWAY, True),
        ("iat", oidc.LEEWAY + 1, False),
    ],
)
def test_leeway_boundaries(live: Live, provider: Provider, claim: str, offset: int, accepted: bool) -> None:
    now = live.services.now()
    claims: dict[str, Any] = {claim: now + offset}
    answer = get_status(live, provider.token(now, **claims))
    assert answer.status_code == (200 if accepted else 401), answer.text


# --- the clock is the caller's ----------------------------------------------------------


@pytest.mark.parametrize(
    ("frozen_at", "exp_offset", "accepted"),
    [
        (1_500_000_000, 3600, True),  # 2017: long past on the wall clock, valid on the frozen one
        (4_000_000_000, -3600, False),  # 2096: valid on the wall clock, expired on the frozen one
    ],
)
def test_times_are_checked_against_the_frozen_clock(
    live: Live, provider: Provider, frozen_at: int, exp_offset: int, accepted: bool
) -> None:
    live.clock.set(frozen_at)
    token = provider.token(frozen_at, iat=None, exp=frozen_at + exp_offset)
    # PyJWT on its own reads the wall clock and would decide the other way.
    wall_clock_ok = True
    try:
        jwt.decode(token, provider.signing.private.public_key(), algorithms=["ES384"], audience=AUDIENCE)
    except jwt.ExpiredSignatureError:
        wall_clock_ok = False
    assert wall_clock_ok is not accepted
    answer = get_status(live, token)
    if accepted:
        assert answer.status_code == 200, answer.text
    else:
        assert_error(answer, 401, "TOKEN_EXPIRED")


# --- the provider's keys: cache, rotation, unknown kids ----------------------------------


def test_rotation_is_fetched_once_and_unknown_kids_do_not_storm(
    live: Live, provider: Provider, rsa_signing_key: SigningKey
) -> None:
    now = live.services.now()
    for _ in range(3):
        assert get_status(live, provider.token(now)).status_code == 200
    assert provider.requests == 1  # fetched once, then cached

    provider.rotate(rsa_signing_key)  # RS256 now, the EC key withdrawn
    assert get_status(live, provider.token(now)).status_code == 200
    assert provider.requests == 2  # the new kid caused exactly one fetch
    assert get_status(live, provider.token(now)).status_code == 200
    assert provider.requests == 2

    bogus = [SigningKey(f"bogus-{n}", "RS256", rsa_signing_key.private) for n in range(25)]
    for key in bogus:
        message = assert_error(get_status(live, provider.token(now, key=key)), 401, "INVALID_TOKEN")
        assert "does not publish" in message
    assert provider.requests == 2  # a flood of bogus kids right after a fetch: no fetch at all

    live.clock.advance(oidc.UNKNOWN_KID_INTERVAL)
    assert_error(get_status(live, provider.token(now, key=bogus[0])), 401, "INVALID_TOKEN")
    assert provider.requests == 3  # one more look, once the interval has passed
    live.clock.advance(oidc.UNKNOWN_KID_INTERVAL)
    assert_error(get_status(live, provider.token(now, key=bogus[0])), 401, "INVALID_TOKEN")
    assert provider.requests == 3  # never twice for the same kid
    assert get_status(live, provider.token(live.services.now())).status_code == 200


def test_keys_are_refreshed_after_their_max_age(live: Live, provider: Provider) -> None:
    assert get_status(live, provider.token(live.services.now())).status_code == 200
    live.clock.advance(oidc.KEYS_MAX_AGE - 1)
    assert get_status(live, provider.token(live.services.now())).status_code == 200
    assert provider.requests == 1
    live.clock.advance(1)
    assert get_status(live, provider.token(live.services.now())).status_code == 200
    assert provider.requests == 2


DOWN_MODES = ["stopped", "error", "huge", "huge_undeclared", "garbage", "no_usable_keys"]


@pytest.mark.parametrize("mode", DOWN_MODES)
def test_provider_down_answers_503(live: Live, provider: Provider, mode: str) -> None:
    token = provider.token(live.services.now())
    if mode == "stopped":
        provider.stop()
    else:
        provider.mode = mode
    assert_error(get_status(live, token), 503, "OIDC_UNAVAILABLE")
    assert_error(get_status(live, token), 503, "OIDC_UNAVAILABLE")
    if mode == "stopped":
        return
    assert provider.requests == 1  # the second request did not try again so soon
    provider.mode = "ok"
    live.clock.advance(oidc.RETRY_AFTER_FAILURE)
    assert get_status(live, token).status_code == 200
    assert provider.requests == 2


def test_cached_keys_outlive_a_provider_outage_for_a_while(live: Live, provider: Provider) -> None:
    assert get_status(live, provider.token(live.services.now())).status_code == 200
    provider.mode = "error"
    live.clock.advance(oidc.KEYS_MAX_AGE)
    assert get_status(live, provider.token(live.services.now())).status_code == 200  # stale keys
    assert provider.requests == 2
    assert get_status(live, provider.token(live.services.now())).status_code == 200
    assert provider.requests == 2  # no retry within RETRY_AFTER_FAILURE
    live.clock.advance(oidc.STALE_LIMIT)
    assert_error(get_status(live, provider.token(live.services.now())), 503, "OIDC_UNAVAILABLE")


def test_unknown_kid_while_the_provider_is_down_answers_503(
    live: Live, provider: Provider, rsa_signing_key: SigningKey
) -> None:
    now = live.services.now()
    assert get_status(live, provider.token(now)).status_code == 200
    provider.mode = "error"
    assert_error(get_status(live, provider.token(now, key=rsa_signing_key)), 503, "OIDC_UNAVAILABLE")


def test_a_stalling_provider_is_given_up_on_in_time(provider: Provider) -> None:
    verifier = oidc.OidcVerifier(provider.issuer, AUDIENCE, timeout=0.5)
    provider.mode = "stall"
    started = time.monotonic()
    with pytest.raises(OidcUnavailable):
        verifier.verify(provider.token(T0), T0)
    assert time.monotonic() - started < 3


def test_keys_from_the_jwks_are_filtered(ec_signing_key: SigningKey) -> None:
    good = ec_signing_key.public_jwk
    document = {
        "keys": [
            {"kty": "oct", "kid": "shared", "k": "c2VjcmV0"},
            {**good, "kid": "for-encryption", "use": "enc"},
            {**good, "kid": "hs", "alg": "HS256"},
            {**good, "kid": "private", "d": "AAAA"},
            {**good, "kid": "broken", "x": "AA"},
            {"kty": "EC", "crv": "P-384"},
            "not a key",
            good,
        ]
    }
    assert list(oidc.parse_jwks(json.dumps(document).encode())) == [ec_signing_key.kid]


# --- without OIDC settings ----------------------------------------------------------------


@pytest.mark.parametrize("oidc_enabled", [False])
def test_without_oidc_settings_the_route_answers_503(live: Live, provider: Provider) -> None:
    message = assert_error(get_status(live, provider.token(live.services.now())), 503, "OIDC_NOT_CONFIGURED")
    assert "not configured" in message
    assert_error(get_status(live), 503, "OIDC_NOT_CONFIGURED")
    assert provider.requests == 0


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"OIDC_AUDIENCE": "https://api"}, "OIDC_ISSUER"),
        ({"OIDC_JWKS_URL": "https://idp.example/oidc/jwks"}, "OIDC_ISSUER"),
        ({"OIDC_AUDIENCE": "https://api", "OIDC_JWKS_URL": "https://idp.example/jwks"}, "OIDC_ISSUER"),
        ({"OIDC_ISSUER": "https://idp.example/oidc"}, "OIDC_AUDIENCE"),
        ({"OIDC_ISSUER": "https://idp.example/oidc", "OIDC_JWKS_URL": "https://x/jwks"}, "OIDC_AUDIENCE"),
        ({"OIDC_ISSUER": "not a url", "OIDC_AUDIENCE": "https://api"}, "OIDC_ISSUER"),
    ],
)
def test_half_given_oidc_settings_stop_start_up(values: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Config.from_mapping(values)


@pytest.mark.parametrize(
    ("values", "jwks_url"),
    [
        ({"OIDC_ISSUER": "https://t.logto.app/oidc/", "OIDC_AUDIENCE": "a"}, None),
        (
            {"OIDC_ISSUER": "https://t.logto.app/oidc", "OIDC_AUDIENCE": "a", "OIDC_JWKS_URL": "https://k/j"},
            "https://k/j",
        ),
    ],
)
def test_complete_oidc_settings(values: dict[str, str], jwks_url: str | None) -> None:
    config = Config.from_mapping(values)
    verifier = oidc.OidcVerifier.from_config(config)
    assert verifier is not None
    assert verifier.jwks_url == jwks_url
    assert oidc.OidcVerifier.from_config(Config()) is None


def test_serve_refuses_half_given_settings(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "DATA_DIR": str(tmp_path / "data"),
        "OIDC_AUDIENCE": "https://api.licensed.test",
    }
    done = run_cli(env, "serve")
    assert done.returncode == 2
    assert "OIDC_ISSUER" in done.stderr
    assert not (tmp_path / "data").exists()


# --- linking users to customers ----------------------------------------------------------


def test_verified_email_links_every_unowned_customer_once(live: Live, provider: Provider) -> None:
    store, now = live.services.store, live.services.now()
    by_hand = live.issue_license("lifetime", email=EMAIL)
    with store.atomic():
        stripe_customer = store.upsert_customer(now, email=EMAIL.upper(), stripe_customer_id="cus_Stripe1")
    bought = live.issue_license("pro-monthly", days=30, email="someone@else.example")
    with store.atomic():
        row = live.license(bought.id)
        row.customer_id = stripe_customer
        store.save_license(row, now)

    body = get_status(live, user_token(provider, now)).json()
    assert body["status"] == "active"
    assert body["plan"] == "lifetime"  # lifetime outlasts the monthly
    assert body["current_period_end"] is None
    assert {v["id"] for v in body["licenses"]} == {by_hand.id, bought.id}
    assert sorted(store.customer_ids_for_sub("user-1")) == sorted([by_hand.customer_id, stripe_customer])
    links = store.all("SELECT actor, after FROM audit_log WHERE action = 'customer.link'")
    assert len(links) == 2
    assert all(r["actor"] == "oidc:user-1" for r in links)

    # Linked now: a token without e-mail claims finds the same licences, and nothing is linked again.
    again = get_status(live, provider.token(now)).json()
    assert {v["id"] for v in again["licenses"]} == {by_hand.id, bought.id}
    assert len(store.all("SELECT id FROM audit_log WHERE action = 'customer.link'")) == 2


@pytest.mark.parametrize(
    "claims",
    [
        {"email": EMAIL},
        {"email": EMAIL, "email_verified": False},
        {"email": EMAIL, "email_verified": "true"},
        {"email_verified": True},
    ],
    ids=["unverified", "verified false", "verified as a string", "no email"],
)
def test_unverified_email_links_nothing(live: Live, provider: Provider, claims: dict[str, Any]) -> None:
    live.issue_license("pro-monthly", days=30, email=EMAIL)
    body = get_status(live, provider.token(live.services.now(), **claims)).json()
    assert body == {
        "status": "none",
        "plan": None,
        "current_period_end": None,
        "cancel_at_period_end": False,
        "licenses": [],
    }
    assert live.services.store.customer_ids_for_sub("user-1") == []


def test_a_customer_owned_by_another_user_is_not_claimed(live: Live, provider: Provider) -> None:
    now = live.services.now()
    lic = live.issue_license("pro-monthly", days=30, email=EMAIL)
    assert identities.link_customer(live.services.store, lic.customer_id, "owner", now) is True
    body = get_status(live, user_token(provider, now, sub="intruder")).json()
    assert body["status"] == "none"
    assert get_status(live, provider.token(now, sub="owner")).json()["status"] == "active"


def test_a_customer_linked_through_its_column_is_found(live: Live, provider: Provider) -> None:
    store, now = live.services.store, live.services.now()
    with store.atomic():
        customer = store.upsert_customer(now, email=None, stripe_customer_id="cus_Col", oidc_sub="user-1")
    lic = live.issue_license("pro-monthly", days=30)
    with store.atomic():
        row = live.license(lic.id)
        row.customer_id = customer
        store.save_license(row, now)
    body = get_status(live, provider.token(now)).json()
    assert [v["id"] for v in body["licenses"]] == [lic.id]
    with pytest.raises(Conflict):
        identities.link_customer(store, customer, "someone-else", now)


def test_link_customer(live: Live) -> None:
    store, now = live.services.store, live.services.now()
    lic = live.issue_license("pro-monthly", days=30, email=EMAIL)
    assert identities.link_customer(store, lic.customer_id, "user-9", now) is True
    assert identities.link_customer(store, lic.customer_id, "user-9", now) is False
    with pytest.raises(Conflict):
        identities.link_customer(store, lic.customer_id, "user-10", now)
    with pytest.raises(NotFound):
        identities.link_customer(store, "cus_missing", "user-9", now)
    assert store.oidc_sub_of(lic.customer_id) == "user-9"
    assert len(store.all("SELECT id FROM audit_log WHERE action = 'customer.link'")) == 1


def test_concurrent_first_requests_link_once(live: Live, provider: Provider) -> None:
    now = live.services.now()
    for _ in range(3):
        live.issue_license("pro-monthly", days=30, email=EMAIL)
    token = user_token(provider, now)
    results: list[int] = []
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait(timeout=10)
        results.append(
            requests.get(
                live.url + STATUS, headers={"Authorization": f"Bearer {token}"}, timeout=10
            ).status_code
        )

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [200] * 8
    store = live.services.store
    assert len(store.all("SELECT customer_id FROM customer_identities WHERE oidc_sub = 'user-1'")) == 1
    assert len(store.all("SELECT id FROM audit_log WHERE action = 'customer.link'")) == 1


# --- the status follows the licence's lifecycle ---------------------------------------------


def test_status_follows_the_license_lifecycle(live: Live, provider: Provider) -> None:
    store, clock = live.services.store, live.clock
    lic = live.issue_license("pro-monthly", days=30, email=EMAIL)

    def edit(**fields: Any) -> None:
        with store.atomic():
            row = live.license(lic.id)
            for name, value in fields.items():
                setattr(row, name, value)
            store.save_license(row, live.services.now())

    def status() -> dict[str, Any]:
        answer = get_status(live, user_token(provider, live.services.now()))
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        assert [v["id"] for v in body["licenses"]] == [lic.id]
        return body

    edit(subscription_status="active")
    assert status()["status"] == "active"
    edit(subscription_status="past_due")
    assert status()["status"] == "past_due"
    edit(subscription_status="active", cancel_at_period_end=True)
    body = status()
    assert (body["status"], body["cancel_at_period_end"]) == ("canceled", True)
    edit(cancel_at_period_end=False)
    clock.advance(31 * DAY)  # paid period over, 7 grace days running
    body = status()
    assert body["status"] == "past_due"
    assert body["current_period_end"] == licensing.iso(T0 + 30 * DAY)
    clock.advance(7 * DAY)  # grace over
    assert status()["status"] == "expired"
    edit(paid_through=live.services.now() + 30 * DAY)  # renewed
    assert status()["status"] == "active"
    edit(subscription_status="canceled", paid_through=live.services.now() - 1)
    assert status()["status"] == "expired"  # ended subscriptions get no grace
    edit(subscription_status="active", paid_through=live.services.now() + DAY, status="revoked")
    assert status()["status"] == "expired"

    other = get_status(live, provider.token(live.services.now(), sub="user-without-licenses")).json()
    assert (other["status"], other["licenses"]) == ("none", [])


def test_verifier_rejects_tokens_before_any_fetch(provider: Provider) -> None:
    verifier = oidc.OidcVerifier(provider.issuer, AUDIENCE)
    for token in ("garbage", provider.unsigned_token(T0), provider.hmac_with_public_key(T0)):
        with pytest.raises(InvalidBearerToken):
            verifier.verify(token, T0)
    assert provider.requests == 0


# --- what an access token is, and where its keys are ------------------------------------------------


@pytest.mark.parametrize(
    ("typ", "accepted"),
    [("at+jwt", True), ("JWT", True), (None, True), ("logout+jwt", False), ("dpop+jwt", False)],
)
def test_only_access_token_types_are_accepted(
    live: Live, provider: Provider, typ: str | None, accepted: bool
) -> None:
    token = provider.token(int(live.clock()), headers={"typ": typ})
    answer = get_status(live, token)
    if accepted:
        assert answer.status_code == 200, answer.text
    else:
        assert "typ" in assert_error(answer, 401, "INVALID_TOKEN")


def test_an_opaque_token_is_told_to_ask_for_the_audience(live: Live) -> None:
    message = assert_error(get_status(live, "opaque-8f2b4c1d9e"), 401, "INVALID_TOKEN")
    assert AUDIENCE in message and "OIDC_AUDIENCE" in message


def test_keys_are_found_through_the_discovery_document_once(live: Live, provider: Provider) -> None:
    for n in range(3):
        token = provider.token(int(live.clock()), sub=f"user-{n}")
        assert get_status(live, token).status_code == 200
    assert provider.discovery_requests == 1
    assert live.services.oidc is not None and live.services.oidc.jwks_url == provider.jwks_url


def test_a_discovery_document_for_another_issuer_is_refused(live: Live, provider: Provider) -> None:
    provider.discovered_issuer = "http://127.0.0.1:1/someone-else"
    token = provider.token(int(live.clock()))
    message = assert_error(get_status(live, token), 503, "OIDC_UNAVAILABLE")
    assert "another issuer" in message
