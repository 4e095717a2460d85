"""CORS: the shop site (WEBSITE_URL) may call the checkout and public routes, and nothing else may."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.clock import FrozenClock
from support.live import Live
from support.ops_helpers import live_with

from licensed.cors import Cors, origin_of
from licensed.services import Services

SHOP = "https://shop.example.com"


@pytest.fixture
def shop_live(services: Services, clock: FrozenClock) -> Iterator[Live]:
    with live_with(services, clock, website_url=SHOP + "/pricing") as live:
        yield live


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://shop.example.com/pricing", "https://shop.example.com"),
        ("https://Shop.Example.COM:443/", "https://shop.example.com"),
        ("http://shop.example.com:80", "http://shop.example.com"),
        ("http://127.0.0.1:8080/x?y", "http://127.0.0.1:8080"),
        ("https://[::1]:8443", "https://[::1]:8443"),
        ("ftp://shop.example.com", None),
        ("https://", None),
        ("https://shop.example.com:99999", None),
        ("null", None),
    ],
)
def test_origin_of(url: str, origin: str | None) -> None:
    assert origin_of(url) == origin


def test_allowed_origin_gets_the_grant(shop_live: Live) -> None:
    answer = shop_live.get("/api/public/plans", headers={"Origin": SHOP})
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == SHOP
    assert "Origin" in answer.headers["Vary"]
    assert "Retry-After" in answer.headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "http://shop.example.com", "https://shop.example.com:8443", "null"]
)
def test_other_origins_get_no_grant(shop_live: Live, origin: str) -> None:
    answer = shop_live.get("/api/public/config", headers={"Origin": origin})
    assert answer.status_code == 200
    assert not any(h.lower().startswith("access-control-") for h in answer.headers)
    assert "Origin" in answer.headers["Vary"]  # caches keep origins apart


def test_preflight_of_allowed_origin(shop_live: Live) -> None:
    answer = shop_live.http.options(
        shop_live.url + "/api/public/plans",
        headers={
            "Origin": SHOP,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=10,
    )
    assert answer.status_code == 204
    assert answer.content == b""
    assert answer.headers["Access-Control-Allow-Origin"] == SHOP
    assert "GET" in answer.headers["Access-Control-Allow-Methods"]
    assert "content-type" in answer.headers["Access-Control-Allow-Headers"].lower()
    assert int(answer.headers["Access-Control-Max-Age"]) > 0


def test_preflight_of_other_origin_is_not_granted(shop_live: Live) -> None:
    answer = shop_live.http.options(
        shop_live.url + "/api/public/plans",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        timeout=10,
    )
    assert answer.status_code == 204
    assert not any(h.lower().startswith("access-control-") for h in answer.headers)


def test_preflight_of_unknown_path_is_404(shop_live: Live) -> None:
    answer = shop_live.http.options(
        shop_live.url + "/api/public/nothing-here",
        headers={"Origin": SHOP, "Access-Control-Request-Method": "GET"},
        timeout=10,
    )
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/license/validate"),
        ("OPTIONS", "/api/license/validate"),
        ("GET", "/health"),
        ("GET", "/.well-known/jwks.json"),
        ("GET", "/metrics"),
        ("POST", "/api/stripe/webhook"),
        ("OPTIONS", "/api/admin/licenses"),
    ],
)
def test_other_routes_never_carry_cors(shop_live: Live, method: str, path: str) -> None:
    answer = shop_live.http.request(
        method,
        shop_live.url + path,
        headers={"Origin": SHOP, "Access-Control-Request-Method": "POST"},
        json={"key": "x"} if method == "POST" else None,
        timeout=10,
    )
    assert not any(h.lower().startswith("access-control-") for h in answer.headers)
    if method == "OPTIONS":
        assert answer.status_code in (404, 405)


def test_errors_on_cors_paths_are_readable_by_the_shop(services: Services, clock: FrozenClock) -> None:
    with live_with(services, clock, website_url=SHOP, rate_limit_per_minute=1) as live:
        assert live.get("/api/public/plans", headers={"Origin": SHOP}).status_code == 200
        limited = live.get("/api/public/plans", headers={"Origin": SHOP})
        assert limited.status_code == 429
        assert limited.headers["Access-Control-Allow-Origin"] == SHOP
        assert limited.headers["Retry-After"]


def test_no_website_url_means_no_cors(live: Live) -> None:
    answer = live.get("/api/public/plans", headers={"Origin": SHOP})
    assert not any(h.lower().startswith("access-control-") for h in answer.headers)
    assert "Vary" not in answer.headers


def test_checkout_preflight_grants_the_route_methods() -> None:
    policy = Cors(SHOP)
    answer = policy.preflight("/api/checkout/session", SHOP, ["POST"])
    headers = dict(answer.headers)
    assert answer.status == 204
    assert headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert policy.headers("/api/checkout/session/cs_1", SHOP)[0] == ("Access-Control-Allow-Origin", SHOP)
    assert policy.headers("/api/license/validate", SHOP) == []
