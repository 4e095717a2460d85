"""``licensed stripe check --e2e`` end to end: localstripe delivers signed events to a real
``licensed serve``, and the command buys, validates, refunds and cleans up through both.

localstripe lacks parts of the API this uses; ``--current-api`` (see
support/localstripe_server.py) answers them from its own objects: Prices
(its Plans), webhook endpoints (its registered webhooks), subscription items
by ``price``, and a ``charge.refunded`` event for each refund, signed and
delivered by localstripe like its other events. What it cannot do at all:
Checkout (the --e2e purchase does not use it), ``invoice.paid`` (it sends
``invoice.payment_succeeded``, which licensed treats alike) and webhook
endpoint secrets of Stripe's own (the test registers the server's).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe
from support import stripe_events as se
from support.emulator import Emulator, Served, run_emulator, serve
from support.plans import SOLD_PLANS
from support.stripe_double import stripe_double

from licensed import stripe_sync
from licensed.plans import load_catalog
from licensed.preflight import ServerClient
from licensed.stripe_api import StripeGateway
from licensed.trial_purchase import Step, TrialPurchase, choose_plan

ADMIN_TOKEN = "e2e-admin-token-0123456789abcdefghij"
PLANS = (
    SOLD_PLANS
    + """
[plans.lifetime]
product = "dashcaddy"
name = "DashCaddy Lifetime"
tier = "LIFE"
max_machines = 2
lifetime = true
public = false
"""
)
"""Every plan sold has its price in the emulator; the lifetime plan is sold by no price."""
STEP = re.compile(r"^(ok|FAIL)  +([a-zA-Z -]+): (.*) \((\d+\.\d\d) s\)$")


@pytest.fixture(scope="module")
def stripe_emulator() -> Iterator[Emulator]:
    with run_emulator("--current-api") as emu:
        yield emu


@pytest.fixture
def shop(tmp_path: Path, stripe_emulator: Emulator) -> Iterator[Served]:
    """A server at its own public URL, with the settings an operator would have before going live."""
    settings = {"STRIPE_PUBLISHABLE_KEY": "pk_test_e2e", "ADMIN_TOKEN": ADMIN_TOKEN}
    with serve(stripe_emulator, tmp_path / "data", plans=PLANS, public_url=True, settings=settings) as server:
        yield server


def steps(stdout: str) -> list[tuple[str, str, str, float]]:
    """(status, step, detail, seconds) of each step line."""
    found = []
    for line in stdout.splitlines():
        match = STEP.match(line)
        if match:
            found.append((match[1], match[2], match[3], float(match[4])))
    return found


def gone(emulator: Emulator, path: str) -> bool:
    try:
        emulator.call("get", path)
    except stripe.InvalidRequestError as err:
        return err.http_status == 404
    return False


def test_a_test_purchase_becomes_a_license_and_its_refund_revokes_it(
    stripe_emulator: Emulator, shop: Served
) -> None:
    stripe_emulator.hook(stripe_sync.webhook_url(shop.url))
    run = shop.cli("stripe", "check", "--e2e", "--email", "ops@example.com", "--timeout", "20")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
    assert (
        f"test purchase of pro-monthly (price_pro_monthly) by ops@example.com, through {shop.url}:"
        in run.stdout
    )
    done = steps(run.stdout)
    assert [(status, name) for status, name, _, _ in done] == [
        ("ok", "admin API"),
        ("ok", "test customer"),
        ("ok", "subscription"),
        ("ok", "license"),
        ("ok", "key"),
        ("ok", "refund"),
        ("ok", "revoked"),
        ("ok", "clean-up"),
        ("ok", "clean-up"),
    ]
    assert (
        run.stdout.rstrip()
        .splitlines()[-1]
        .startswith("a test purchase became a license, and its refund revoked it (")
    )
    customer = re.search(r"(cus_\w+)", done[1][2])
    subscription = re.search(r"(sub_\w+)", done[2][2])
    assert customer and subscription
    assert "answers VALID" in done[4][2]

    lic = shop.license_of(subscription[1])
    assert lic is not None and lic["status"] == "revoked"
    assert lic["stripe_customer_id"] == customer[1]
    refunded = shop.rows("SELECT status FROM stripe_events WHERE type = 'charge.refunded'")
    assert [r["status"] for r in refunded] == ["applied"]
    mail = shop.rows("SELECT to_addr FROM outbox WHERE license_id = ?", (lic["id"],))
    assert [m["to_addr"] for m in mail] == ["ops@example.com"]
    # Nothing left at Stripe: the subscription canceled, the test customer deleted.
    assert stripe_emulator.call("get", f"/v1/subscriptions/{subscription[1]}")["status"] == "canceled"
    assert gone(stripe_emulator, f"/v1/customers/{customer[1]}")


def test_events_the_server_refuses_fail_the_purchase_and_it_still_cleans_up(
    stripe_emulator: Emulator, shop: Served
) -> None:
    """The endpoint signs with a secret the server does not have (the one thing no read can
    check): no license comes, the command says so within its timeout, and cleans up."""
    stripe_emulator.hook(stripe_sync.webhook_url(shop.url), secret="whsec_of_another_endpoint")
    run = shop.cli("stripe", "check", "--e2e", "--timeout", "3")
    assert run.returncode == 1
    assert "all checks passed" in run.stdout  # every read-only check passes: only a purchase shows it
    assert run.stderr == "licensed: the test purchase did not go through (see FAIL above)\n"
    done = steps(run.stdout)
    assert [(status, name) for status, name, _, _ in done] == [
        ("ok", "admin API"),
        ("ok", "test customer"),
        ("ok", "subscription"),
        ("FAIL", "license"),
        ("ok", "clean-up"),
        ("ok", "clean-up"),
    ]
    message = done[3][2]
    assert message.startswith("no license for sub_") and " after 3 s: " in message
    assert "STRIPE_WEBHOOK_SECRET is not that endpoint's signing secret" in message
    assert 3.0 <= done[3][3] < 10.0
    customer = re.search(r"(cus_\w+)", done[1][2])
    assert customer and gone(stripe_emulator, f"/v1/customers/{customer[1]}")


def test_an_interrupted_purchase_still_cleans_up(stripe_emulator: Emulator, shop: Served) -> None:
    """Ctrl-C while waiting for the license: the subscription is canceled and the customer
    deleted before the interrupt goes on."""
    stripe_emulator.hook(f"{shop.url}/nowhere")  # no event will come

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    purchase = TrialPurchase(
        StripeGateway("sk_test_e2e", stripe_emulator.url),
        ServerClient(shop.url, ADMIN_TOKEN),
        choose_plan(load_catalog(shop.db.parent / "plans.toml"), "team-monthly"),
        "interrupted@example.com",
        sleep=interrupted,
    )
    shown: list[Step] = []
    with pytest.raises(KeyboardInterrupt):
        purchase.run(shown.append)
    assert [(s.ok, s.name) for s in shown] == [
        (True, "admin API"),
        (True, "test customer"),
        (True, "subscription"),
        (True, "clean-up"),
        (True, "clean-up"),
    ]
    assert purchase.customer_id and gone(stripe_emulator, f"/v1/customers/{purchase.customer_id}")
    sub = stripe_emulator.call("get", f"/v1/subscriptions/{purchase.subscription_id}")
    assert sub["status"] == "canceled"


def test_the_payment_to_refund_is_listed_when_the_invoice_came_without_it(tmp_path: Path) -> None:
    """An invoice without its payments: the charge and the payment intent come from
    ``GET /v1/invoice_payments``, read like the payments an invoice carries."""
    (tmp_path / "plans.toml").write_text(PLANS, encoding="utf-8")
    listed = [
        {**se.fixture("invoice_payment"), "payment": {"type": "payment_intent", "payment_intent": "pi_e2e"}},
        {**se.fixture("invoice_payment"), "payment": {"type": "charge", "charge": "ch_e2e"}},
    ]

    def on_get(path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        assert (path, query) == ("/v1/invoice_payments", {"invoice": "in_e2e"})
        return 200, {"object": "list", "data": listed, "has_more": False}

    with stripe_double() as double:
        double.on_get = on_get
        purchase = TrialPurchase(
            StripeGateway("sk_test_double", double.url),
            ServerClient("http://127.0.0.1:9"),
            choose_plan(load_catalog(tmp_path / "plans.toml"), "team-monthly"),
            "listed@example.com",
        )
        purchase.invoice = {**se.fixture("invoice"), "id": "in_e2e", "payments": None}
        assert purchase._payment() == ("ch_e2e", "pi_e2e")
        assert [r.path for r in double.requests] == ["/v1/invoice_payments"]
