"""The core HTTP routes and every licence outcome, through a real waitress server."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from support.clock import DAY, T0
from support.forge import claims_of, header_of, split_key
from support.live import Live

from licensed import keys, licensing
from licensed.app import App

ISSUER = "http://licensed.test"
TTL = 168 * 3600


def check_answer(body: dict[str, Any]) -> None:
    """The shape every validate/activate/deactivate answer shares."""
    assert isinstance(body["valid"], bool)
    assert body["code"] in licensing.ALL_CODES
    if body["code"] not in ("DEACTIVATED", "MACHINE_NOT_ACTIVATED"):
        assert body["valid"] == (body["code"] in licensing.VALID_CODES)
    else:  # deactivate: says whether the licence itself is still good
        assert body["deactivated"] == (body["code"] == "DEACTIVATED")
    if "license" in body:
        view = body["license"]
        assert set(view) >= {
            "id",
            "product",
            "plan",
            "tier",
            "status",
            "features",
            "max_machines",
            "machines_used",
            "paid_through",
            "expires_at",
        }
        assert not {"email", "customer_id", "stripe_customer_id"} & set(view)


def post(live: Live, route: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = live.post(f"/api/license/{route}", body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    assert "buyer@example.com" not in answer.text
    data: dict[str, Any] = answer.json()
    check_answer(data)
    return data


# --- one scenario per outcome code ---------------------------------------------------


def _valid(live: Live) -> dict[str, Any]:
    return post(live, "validate", {"key": live.issue()})


def _grace(live: Live) -> dict[str, Any]:
    key = live.issue(days=30)
    live.clock.advance(30 * DAY + 1)
    return post(live, "validate", {"key": key})


def _expired(live: Live) -> dict[str, Any]:
    key = live.issue(days=30)
    live.clock.advance(40 * DAY)
    return post(live, "validate", {"key": key})


def _set_status(live: Live, key: str, **changes: Any) -> None:
    store = live.services.store
    lic = store.get_license(claims_of(split_key(key)[2])["sub"])
    assert lic is not None
    with store.atomic():
        store.save_license(dataclasses.replace(lic, **changes), live.services.now())


def _revoked(live: Live) -> dict[str, Any]:
    key = live.issue()
    _set_status(live, key, status="revoked", status_reason="refund")
    return post(live, "validate", {"key": key, "machine_id": "m-1"})


def _suspended(live: Live) -> dict[str, Any]:
    key = live.issue()
    _set_status(live, key, status="suspended", status_reason="dispute")
    return post(live, "validate", {"key": key})


def _invalid_key(live: Live) -> dict[str, Any]:
    return post(live, "validate", {"key": "DC-PRO-not.a.token"})


def _not_found(live: Live) -> dict[str, Any]:
    # A key the server really signed, for a licence id that was never stored.
    lic = live.issue_license()
    ghost = dataclasses.replace(lic, id="lic_never_issued")
    services = live.services
    key = licensing.license_key(ghost, services.catalog, services.ring, ISSUER)
    return post(live, "validate", {"key": key})


def _product_mismatch(live: Live) -> dict[str, Any]:
    return post(live, "validate", {"key": live.issue(), "product": "desktop"})


def _too_many(live: Live) -> dict[str, Any]:
    key = live.issue()
    assert post(live, "activate", {"key": key, "machine_id": "m-1"})["code"] == "VALID"
    return post(live, "activate", {"key": key, "machine_id": "m-2"})


def _deactivated(live: Live) -> dict[str, Any]:
    key = live.issue()
    post(live, "activate", {"key": key, "machine_id": "m-1"})
    return post(live, "deactivate", {"key": key, "machine_id": "m-1"})


def _not_activated(live: Live) -> dict[str, Any]:
    return post(live, "deactivate", {"key": live.issue(), "machine_id": "m-never"})


SCENARIOS: dict[str, tuple[Callable[[Live], dict[str, Any]], bool]] = {
    "VALID": (_valid, True),
    "GRACE_PERIOD": (_grace, True),
    "EXPIRED": (_expired, False),
    "REVOKED": (_revoked, False),
    "SUSPENDED": (_suspended, False),
    "INVALID_KEY": (_invalid_key, False),
    "NOT_FOUND": (_not_found, False),
    "PRODUCT_MISMATCH": (_product_mismatch, False),
    "TOO_MANY_MACHINES": (_too_many, False),
    "DEACTIVATED": (_deactivated, True),
    "MACHINE_NOT_ACTIVATED": (_not_activated, True),
}


def test_every_code_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(licensing.ALL_CODES)


@pytest.mark.parametrize("code", sorted(SCENARIOS))
def test_each_code(live: Live, code: str) -> None:
    scenario, valid = SCENARIOS[code]
    body = scenario(live)
    assert body["code"] == code
    assert body["valid"] is valid
    if code in ("INVALID_KEY", "NOT_FOUND", "PRODUCT_MISMATCH"):
        assert "license" not in body and "key" not in body and "lease" not in body


def test_revoked_and_suspended_hand_out_nothing(live: Live) -> None:
    key = live.issue()
    post(live, "activate", {"key": key, "machine_id": "m-1"})
    for status, code in (("suspended", "SUSPENDED"), ("revoked", "REVOKED")):
        _set_status(live, key, status=status)
        body = post(live, "activate", {"key": key, "machine_id": "m-1"})
        assert body["code"] == code
        assert body["activated"] is False
        assert "lease" not in body and "key" not in body


def test_paused_subscription_is_suspended(live: Live) -> None:
    key = live.issue()
    _set_status(live, key, subscription_status="paused")
    assert post(live, "validate", {"key": key})["code"] == "SUSPENDED"


def test_activation_flow(live: Live) -> None:
    key = live.issue("pro-monthly", days=30)
    first = post(live, "activate", {"key": key, "machine_id": "m-1"})
    assert first["activated"] is True
    assert first["license"]["machines_used"] == 1
    assert "key" not in first  # the key presented is the current one
    lease = claims_of(first["lease"])
    assert lease["mid"] == keys.machine_hash("m-1")
    assert lease["sub"] == first["license"]["id"]

    again = post(live, "validate", {"key": key, "machine_id": "m-1"})
    assert again["code"] == "VALID" and again["license"]["machines_used"] == 1

    without_machine = post(live, "validate", {"key": key})
    assert without_machine["activated"] is False and "lease" not in without_machine

    assert post(live, "activate", {"key": key, "machine_id": "m-2"})["code"] == "TOO_MANY_MACHINES"
    assert post(live, "deactivate", {"key": key, "machine_id": "m-1"})["deactivated"] is True
    assert post(live, "deactivate", {"key": key, "machine_id": "m-1"})["code"] == "MACHINE_NOT_ACTIVATED"
    moved = post(live, "activate", {"key": key, "machine_id": "m-2"})
    assert moved["code"] == "VALID" and moved["license"]["machines_used"] == 1


def test_machine_ids_are_stored_only_hashed(live: Live) -> None:
    key = live.issue()
    post(live, "activate", {"key": key, "machine_id": "secret-machine-name"})
    lic_id = claims_of(split_key(key)[2])["sub"]
    assert [r["machine_hash"] for r in live.services.store.machine_rows(lic_id)] == [
        keys.machine_hash("secret-machine-name")
    ]
    dump = "\n".join(live.services.store.conn.iterdump())
    assert "secret-machine-name" not in dump
    assert key not in dump and split_key(key)[2] not in dump  # keys are never stored


# --- time: the exact boundaries -----------------------------------------------------------

GRACE = 7 * DAY  # pro-monthly's grace_days


@pytest.mark.parametrize(
    ("subscription_status", "offset", "code"),
    [
        (None, -1, "VALID"),
        (None, 0, "VALID"),
        (None, 1, "GRACE_PERIOD"),
        (None, GRACE, "GRACE_PERIOD"),
        (None, GRACE + 1, "EXPIRED"),
        ("active", GRACE, "GRACE_PERIOD"),
        ("past_due", 1, "GRACE_PERIOD"),
        ("past_due", GRACE, "GRACE_PERIOD"),
        ("past_due", GRACE + 1, "EXPIRED"),
        ("canceled", 0, "VALID"),
        ("canceled", 1, "EXPIRED"),
        ("unpaid", 1, "EXPIRED"),
        ("incomplete_expired", 1, "EXPIRED"),
    ],
)
def test_entitlement_boundaries(live: Live, subscription_status: str | None, offset: int, code: str) -> None:
    key = live.issue("pro-monthly", days=30)
    if subscription_status is not None:
        _set_status(live, key, subscription_status=subscription_status)
    paid_through = T0 + 30 * DAY
    live.clock.set(paid_through + offset)
    body = post(live, "validate", {"key": key, "machine_id": "m-1"})
    assert body["code"] == code
    assert body["license"]["paid_through"] == licensing.iso(paid_through)
    ended = subscription_status in ("canceled", "unpaid", "incomplete_expired")
    end = paid_through if ended else paid_through + GRACE
    assert body["license"]["expires_at"] == licensing.iso(end)
    assert ("lease" in body) is (code != "EXPIRED")


def test_one_time_plan_runs_its_duration(live: Live) -> None:
    key = live.issue("pro-year")
    live.clock.set(T0 + 365 * DAY)
    assert post(live, "validate", {"key": key})["code"] == "VALID"
    live.clock.advance(1)  # pro-year has no grace days
    assert post(live, "validate", {"key": key})["code"] == "EXPIRED"


def test_lifetime_never_expires(live: Live) -> None:
    key = live.issue("lifetime")
    for years in (0, 1, 50, 99):
        live.clock.set(T0 + years * 365 * DAY)
        body = post(live, "validate", {"key": key, "machine_id": "m-1"})
        assert body["code"] == "VALID"
        assert body["license"]["lifetime"] is True and body["license"]["expires_at"] is None
        lease = claims_of(body["lease"])
        assert lease["exp"] == live.services.now() + TTL
    # exp is mandatory, so a lifetime key carries a century.
    assert claims_of(split_key(key)[2])["exp"] == T0 + keys.LIFETIME_SECONDS


@pytest.mark.parametrize(
    ("subscription_status", "at", "lease_end"),
    [
        # Far from the end: the lease lives LEASE_TTL_HOURS.
        (None, T0, T0 + TTL),
        # In grace, less than a TTL before the end: the lease stops with the licence.
        (None, T0 + 30 * DAY + 1, T0 + 30 * DAY + GRACE),
        # Exactly one TTL before the end: both bounds agree.
        (None, T0 + 30 * DAY + GRACE - TTL, T0 + 30 * DAY + GRACE),
        # An ended subscription gets no grace: the lease stops at paid_through.
        ("canceled", T0 + 30 * DAY - 3600, T0 + 30 * DAY),
    ],
)
def test_lease_expiry(live: Live, subscription_status: str | None, at: int, lease_end: int) -> None:
    key = live.issue("pro-monthly", days=30)
    if subscription_status:
        _set_status(live, key, subscription_status=subscription_status)
    live.clock.set(at)
    body = post(live, "activate", {"key": key, "machine_id": "m-1"})
    lease = claims_of(body["lease"])
    assert lease["exp"] == lease_end
    assert lease["iat"] == at
    assert lease["tier"] == "PRO" and lease["ent"] == ["recipes", "sso"]
    assert lease["iss"] == ISSUER
    assert header_of(body["lease"]) == {
        "alg": "EdDSA",
        "typ": "JWT",
        "kid": live.services.ring.current.kid,
    }


def test_lease_ttl_follows_config(services: Any, clock: Any) -> None:
    flows = licensing.Licensing(services.store, services.ring, services.catalog, ISSUER, lease_ttl_hours=2)
    plan = services.catalog.plans["pro-monthly"]
    lic = licensing.issue_license(
        services.store, services.ring, plan, email="a@example.com", now=T0, actor="test", days=30
    )
    key = licensing.license_key(lic, services.catalog, services.ring, ISSUER)
    answer = flows.check(licensing.LicenseRequest(key=key, machine_id="m"), T0)
    assert claims_of(answer["lease"])["exp"] == T0 + 2 * 3600


def test_key_claims(live: Live) -> None:
    lic = live.issue_license("team-monthly", days=30)
    key = live.key_of(lic)
    prefix, tier, token = split_key(key)
    assert (prefix, tier) == ("DC", "TEAM")
    assert header_of(token) == {"alg": "EdDSA", "typ": "JWT", "kid": live.services.ring.current.kid}
    assert claims_of(token) == {
        "iss": ISSUER,
        "sub": lic.id,
        "prod": "dashcaddy",
        "tier": "TEAM",
        "ent": ["recipes", "sso", "swarm"],
        "max": 3,
        "iat": T0,
        "exp": T0 + 30 * DAY + GRACE,
    }
    # Deterministic: the same row gives the same key.
    assert live.key_of(lic) == key


# --- the other core routes -------------------------------------------------------------


def test_health(live: Live) -> None:
    answer = live.get("/health")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok"
    assert body["schema_version"] >= 1
    assert body["signing_kid"] == live.services.ring.current.kid
    assert body["time"] == licensing.iso(T0)
    assert answer.headers["Cache-Control"] == "no-store"


def test_public_config(live: Live) -> None:
    body = live.get("/api/public/config").json()
    assert body["jwks_url"] == f"{ISSUER}/.well-known/jwks.json"
    assert body["issuer"] == ISSUER
    assert body["publishable_key"] is None  # Stripe is not configured here
    assert {(p["id"], p["key_prefix"]) for p in body["products"]} == {("dashcaddy", "DC"), ("desktop", "DT")}


def test_public_plans(live: Live) -> None:
    plans = live.get("/api/public/plans").json()["plans"]
    by_id = {p["id"]: p for p in plans}
    catalog = live.services.catalog
    assert set(by_id) == {p.id for p in catalog.plans.values() if p.public}
    assert "lifetime" not in by_id  # public = false
    for plan in plans:
        assert {"id", "product", "name", "tier", "mode", "max_machines", "features"} <= set(plan)
    assert by_id["pro-monthly"]["mode"] == "subscription"
    assert by_id["pro-year"]["mode"] == "payment"
    assert by_id["team-monthly"]["max_machines"] == 3
    assert by_id["team-monthly"]["features"] == ["sso", "recipes", "swarm"]


def test_jwks(live: Live) -> None:
    answer = live.get("/.well-known/jwks.json")
    assert answer.status_code == 200
    assert "max-age" in answer.headers["Cache-Control"]
    (jwk,) = answer.json()["keys"]
    assert jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "kid": live.services.ring.current.kid,
        "alg": "EdDSA",
        "use": "sig",
        "x": jwk["x"],
    }
    assert len(jwk["x"]) == 43  # 32 bytes, unpadded base64url


def test_openapi_describes_every_route(live: Live) -> None:
    doc = live.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    wanted = {
        ("get", "/health"),
        ("get", "/api/public/config"),
        ("get", "/api/public/plans"),
        ("post", "/api/license/validate"),
        ("post", "/api/license/activate"),
        ("post", "/api/license/deactivate"),
        ("get", "/.well-known/jwks.json"),
        ("get", "/openapi.json"),
    }
    described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert wanted <= described
    # ... and nothing the server does not route (the document is built from the table).

    # The customer pages (HTML, for people) are routed but are no part of the API.
    routed = {(r.method.lower(), r.path) for r in App(live.services).router.routes if r.api}
    assert described == routed
    assert "/account" not in doc["paths"] and "/checkout/success" not in doc["paths"]
    validate = doc["paths"]["/api/license/validate"]["post"]
    assert validate["requestBody"]["content"]["application/json"]["schema"]["required"] == ["key"]
    codes = validate["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["code"]
    assert set(codes["enum"]) == set(licensing.ALL_CODES)
