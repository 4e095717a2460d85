"""Checkout and billing portal sessions, against a Stripe double over real HTTP."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.live import Live
from support.oidc_provider import AUDIENCE, Provider, ec_key
from support.ops_helpers import live_with
from support.plans import TEST_PLANS
from support.stripe_double import StripeDouble, stripe_double

from licensed.config import Config
from licensed.errors import ConfigError
from licensed.oidc import OidcVerifier
from licensed.plans import parse_catalog


@pytest.fixture
def double() -> Iterator[StripeDouble]:
    with stripe_double() as running:
        yield running


@pytest.fixture
def config(data_dir: Path, double: StripeDouble) -> Config:
    return Config(
        data_dir=data_dir,
        app_base_url="http://licensed.test",
        website_url="https://shop.example.com",
        stripe_secret_key="sk_test_double",
        stripe_api_base=double.url,
        stripe_webhook_secrets=("whsec_x",),
    )


@pytest.mark.parametrize(("plan", "mode"), [("pro-monthly", "subscription"), ("pro-year", "payment")])
def test_checkout_session_is_created_with_the_plan(
    live: Live, double: StripeDouble, plan: str, mode: str
) -> None:
    answer = live.post("/api/checkout/session", {"plan": plan, "email": "buyer@example.com"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"].startswith("cs_test") and body["url"].startswith("https://checkout.stripe.test/")
    [sent] = double.requests
    assert sent.path == "/v1/checkout/sessions"
    price = live.services.catalog.plans[plan].stripe_price
    assert sent.form["mode"] == mode
    assert sent.form["line_items[0][price]"] == price
    assert sent.form["line_items[0][quantity]"] == "1"
    # Stripe comes back to this server's own pages (APP_BASE_URL): the key, or "no payment taken".
    assert (
        sent.form["success_url"] == "http://licensed.test/checkout/success?session_id={CHECKOUT_SESSION_ID}"
    )
    assert sent.form["cancel_url"] == f"http://licensed.test/checkout/cancel?plan={plan}"
    assert sent.form["metadata[plan]"] == plan
    assert sent.form["customer_email"] == "buyer@example.com"
    assert sent.headers["Idempotency-Key"].startswith("checkout-")
    assert sent.headers["Authorization"] == "Bearer sk_test_double"
    if mode == "subscription":
        assert sent.form["subscription_data[metadata][plan]"] == plan


def test_success_and_cancel_urls_from_the_request_or_the_plan(
    live: Live, double: StripeDouble, data_dir: Path
) -> None:
    given = {
        "plan": "pro-monthly",
        "success_url": "https://shop.example.com/thanks?cs={CHECKOUT_SESSION_ID}",
        "cancel_url": "http://shop.example.com/pricing",
    }
    assert live.post("/api/checkout/session", given).status_code == 200
    sent = double.requests[-1].form
    assert (sent["success_url"], sent["cancel_url"]) == (given["success_url"], given["cancel_url"])
    # A plan's own success_url wins over the default, a request's over the plan's.
    plans = (
        (data_dir / "plans.toml")
        .read_text(encoding="utf-8")
        .replace(
            'stripe_price = "price_pro_year"',
            'stripe_price = "price_pro_year"\nsuccess_url = "https://shop.example.com/year-bought"',
        )
    )
    live.services.catalog = parse_catalog(tomllib.loads(plans))
    assert live.post("/api/checkout/session", {"plan": "pro-year"}).status_code == 200
    assert double.requests[-1].form["success_url"] == "https://shop.example.com/year-bought"
    assert double.requests[-1].form["cancel_url"] == "http://licensed.test/checkout/cancel?plan=pro-year"
    answer = live.post("/api/checkout/session", {"plan": "pro-year", "success_url": "https://a.example/x"})
    assert answer.status_code == 200 and double.requests[-1].form["success_url"] == "https://a.example/x"


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "ftp://shop.example.com/x",
        "https://",
        "//shop.example.com/x",
        "https://shop.example.com/a b",
        "https://shop.example.com/\nSet-Cookie:x",
        "https://shop.example.com/" + "x" * 2100,
    ],
)
def test_success_and_cancel_urls_must_be_http(live: Live, double: StripeDouble, url: str) -> None:
    for field in ("success_url", "cancel_url"):
        answer = live.post("/api/checkout/session", {"plan": "pro-monthly", field: url})
        assert (answer.status_code, answer.json()["error"]["code"]) == (400, "VALIDATION_ERROR")
    assert double.requests == []


@pytest.mark.parametrize("url", ["javascript:alert(1)", "shop.example.com/x", "https://"])
def test_a_plans_success_url_must_be_http(url: str) -> None:
    raw = tomllib.loads(TEST_PLANS)
    raw["plans"]["pro-year"]["success_url"] = url
    with pytest.raises(ConfigError, match=r"plans\.pro-year\.success_url: must be an http\(s\) URL"):
        parse_catalog(raw)


def test_client_idempotency_key_is_passed_on(live: Live, double: StripeDouble) -> None:
    for _ in range(2):
        live.post("/api/checkout/session", {"plan": "pro-monthly"}, headers={"Idempotency-Key": "click-1"})
    live.post("/api/checkout/session", {"plan": "pro-monthly"}, headers={"Idempotency-Key": "click-2"})
    keys = [r.headers["Idempotency-Key"] for r in double.requests]
    assert keys[0] == keys[1] != keys[2]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"plan": "nope"}, 404, "NOT_FOUND"),
        ({"plan": "lifetime"}, 404, "NOT_FOUND"),  # not public
        ({"plan": 5}, 400, "VALIDATION_ERROR"),
        ({}, 400, "VALIDATION_ERROR"),
        ({"plan": "pro-monthly", "email": "not an email"}, 400, "VALIDATION_ERROR"),
    ],
)
def test_checkout_bad_input(
    live: Live, double: StripeDouble, body: dict[str, object], status: int, code: str
) -> None:
    answer = live.post("/api/checkout/session", body)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code
    assert double.requests == []


def test_stripe_failure_is_503_not_500(live: Live, double: StripeDouble) -> None:
    double.fail_with = 500
    answer = live.post("/api/checkout/session", {"plan": "pro-monthly"})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "STRIPE_UNAVAILABLE"


# --- signed-in buyers (OIDC bearer) ---------------------------------------------------------------


@pytest.fixture
def provider() -> Iterator[Provider]:
    idp = Provider(ec_key("shop-es384"))
    yield idp
    idp.stop()


@pytest.fixture
def oidc_live(live: Live, provider: Provider) -> Live:
    live.services.config = dataclasses.replace(
        live.services.config,
        oidc_issuer=provider.issuer,
        oidc_audience=AUDIENCE,
        oidc_jwks_url=provider.jwks_url,
    )
    live.services.oidc = OidcVerifier.from_config(live.services.config)
    return live


def test_checkout_with_bearer_records_the_user(
    oidc_live: Live, double: StripeDouble, provider: Provider
) -> None:
    token = provider.token(
        oidc_live.services.now(), sub="user-42", email="u42@example.com", email_verified=True
    )
    answer = oidc_live.post(
        "/api/checkout/session", {"plan": "pro-monthly"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 200, answer.text
    [sent] = double.requests
    assert sent.form["client_reference_id"] == "user-42"
    assert sent.form["customer_email"] == "u42@example.com"


def test_checkout_with_a_bad_bearer_is_401(oidc_live: Live, double: StripeDouble) -> None:
    answer = oidc_live.post(
        "/api/checkout/session", {"plan": "pro-monthly"}, headers={"Authorization": "Bearer not.a.token"}
    )
    assert answer.status_code == 401
    assert double.requests == []


def test_billing_portal_for_a_signed_in_user(
    oidc_live: Live, double: StripeDouble, provider: Provider
) -> None:
    lic = oidc_live.issue_license("pro-monthly", days=30, email="owner@example.com")
    store = oidc_live.services.store
    store.execute("UPDATE customers SET stripe_customer_id = 'cus_owner' WHERE id = ?", (lic.customer_id,))
    token = provider.token(
        oidc_live.services.now(), sub="owner", email="owner@example.com", email_verified=True
    )
    answer = oidc_live.post("/api/billing/portal", {}, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    assert double.requests[-1].form["customer"] == "cus_owner"
    stranger = provider.token(oidc_live.services.now(), sub="stranger")
    answer = oidc_live.post("/api/billing/portal", {}, headers={"Authorization": f"Bearer {stranger}"})
    assert (answer.status_code, answer.json()["error"]["code"]) == (409, "NO_STRIPE_CUSTOMER")
    answer = oidc_live.post("/api/billing/portal", {})
    assert answer.status_code == 401


def test_a_license_key_alone_does_not_open_the_billing_portal(oidc_live: Live, double: StripeDouble) -> None:
    """Keys live on installations and get shared: the portal is for the signed-in customer."""
    lic = oidc_live.issue_license("pro-monthly", days=30)
    store = oidc_live.services.store
    store.execute(
        "UPDATE customers SET stripe_customer_id = 'cus_keyholder' WHERE id = ?", (lic.customer_id,)
    )
    answer = oidc_live.post("/api/billing/portal", {"key": oidc_live.key_of(lic)})
    assert (answer.status_code, answer.json()["error"]["code"]) == (401, "UNAUTHORIZED")
    assert double.requests == []


def test_the_billing_portal_is_rate_limited(live: Live, double: StripeDouble) -> None:
    """Each portal call holds a worker on a Stripe call: one address gets a limited budget."""
    with live_with(live.services, live.clock, rate_limit_per_minute=3) as server:
        codes = [server.post("/api/billing/portal", {}).status_code for _ in range(4)]
    assert codes[-1] == 429 and 429 not in codes[:3]


def test_plan_found_from_line_items_fetched_from_stripe(live: Live, double: StripeDouble) -> None:
    """A session without our metadata (made elsewhere, e.g. a payment link): its line items name the price."""
    from support import stripe_events as se

    session = se.checkout_session(session_id=se.uid("cs"), mode="payment", payment_intent="pi_items")
    item = {
        "object": "item",
        "id": "li_1",
        "quantity": 1,
        "price": {
            **se.fixture("price"),
            "id": "price_not_listed",
            "metadata": {},
            "product": {**se.fixture("product"), "metadata": {"license_plan": "pro-year"}},
        },
    }

    def on_get(path: str, query: dict[str, str]) -> tuple[int, dict[str, object]]:
        if path == f"/v1/checkout/sessions/{session['id']}/line_items":
            return 200, {"object": "list", "data": [item], "has_more": False}
        return 404, {"error": {"type": "invalid_request_error", "message": "no"}}

    double.on_get = on_get
    body, headers = se.signed(
        se.event("checkout.session.completed", session, live.services.now()),
        live.services.now(),
        secret="whsec_x",
    )
    answer = live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    lic = live.services.store.find_license("stripe_checkout_session_id", session["id"])
    assert lic is not None and lic.plan == "pro-year"
    assert double.requests[-1].form == {"expand[]": "data.price.product"}
