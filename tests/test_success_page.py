"""The checkout success and cancel pages over real HTTP, the licence made by a signed webhook."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import stripe_events as se
from support.clock import DAY
from support.live import Live
from support.pages import paid_checkout

from licensed import checkout
from licensed.config import Config
from licensed.routes import html, purchase

REFRESH = re.compile(r'<meta http-equiv="refresh" content="(\d+); url=([^"]+)">')


@pytest.fixture
def config(data_dir: Path) -> Config:
    return Config(
        data_dir=data_dir,
        app_base_url="http://licensed.test",
        website_url="https://shop.example.com",
        stripe_webhook_secrets=(se.SECRET,),
    )


def success(live: Live, session_id: str, n: int | None = None) -> tuple[int, str]:
    params = {"session_id": session_id} if n is None else {"session_id": session_id, "n": str(n)}
    answer = live.get("/checkout/success", params=params)
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    return answer.status_code, answer.text


def test_pending_until_the_webhook_lands_then_the_key_and_what_next(live: Live) -> None:
    session_id = se.uid("cs_test")
    status, page = success(live, session_id)
    assert status == 200 and "Finishing your purchase" in page
    [(seconds, url)] = REFRESH.findall(page)
    assert int(seconds) == purchase.REFRESH_SECONDS
    assert url.replace("&amp;", "&") == f"?session_id={session_id}&n=1"
    paid_checkout(live, session_id=session_id, plan="pro-year")
    status, page = success(live, session_id, n=1)
    lic = live.services.store.find_license("stripe_checkout_session_id", session_id)
    assert lic is not None and status == 200
    assert live.key_of(lic) in page and "DashCaddy Pro, one year" in page
    assert "What to do next" in page and "Enter it in DashCaddy" in page and 'href="/account"' in page
    assert REFRESH.search(page) is None
    assert 'data-copy="key" hidden' in page
    assert re.search(r'<script src="/assets/copy\.js\?v=\w+" defer>', page)


def test_the_pending_page_stops_refreshing_after_a_few_minutes(live: Live) -> None:
    session_id = se.uid("cs_test")
    _, page = success(live, session_id, n=purchase.REFRESH_LIMIT - 1)
    assert REFRESH.search(page)
    _, page = success(live, session_id, n=purchase.REFRESH_LIMIT)
    assert REFRESH.search(page) is None
    assert "taking longer than usual" in page and "no need to pay again" in page
    assert f'href="?session_id={session_id}"' in page


def test_the_key_is_shown_for_24_hours_then_the_page_points_to_the_account(live: Live) -> None:
    session_id = paid_checkout(live, plan="pro-year")
    lic = live.services.store.find_license("stripe_checkout_session_id", session_id)
    assert lic is not None
    key = live.key_of(lic)
    live.clock.advance(checkout.KEY_SHOWN_SECONDS)
    assert key in success(live, session_id)[1]
    live.clock.advance(1)
    status, page = success(live, session_id)
    assert status == 200 and key not in page and "eyJ" not in page
    assert "first 24 hours" in page and 'href="/account"' in page and "DashCaddy Pro, one year" in page


@pytest.mark.parametrize("session_id", ["", "nope", "cs_", "cs_x/../y", "cs_" + "a" * 300, "<b>cs_1</b>"])
def test_no_purchase_named_gets_a_page_that_says_what_to_do(live: Live, session_id: str) -> None:
    status, page = success(live, session_id)
    assert status == 404 and "could not find this purchase" in page and 'href="/account"' in page
    assert "<b>" not in page


def test_the_cancel_page_says_nothing_was_charged_and_leads_back(live: Live) -> None:
    answer = live.get("/checkout/cancel", params={"plan": "pro-monthly"})
    assert answer.status_code == 200
    assert "No payment was taken" in answer.text and "DashCaddy Pro, monthly" in answer.text
    assert 'href="https://shop.example.com"' in answer.text
    assert "No payment was taken" in live.get("/checkout/cancel", params={"plan": "<nope>"}).text


def test_the_success_page_is_rate_limited_like_the_api_poll(live: Live) -> None:
    from support.ops_helpers import live_with

    with live_with(live.services, live.clock, rate_limit_per_minute=2) as limited:
        codes = [limited.get(f"/checkout/success?session_id=cs_test_{n}").status_code for n in range(3)]
        assert limited.get("/account").status_code == 200  # the account page itself is not counted
    assert codes == [200, 200, 429]


def test_a_one_time_key_is_valid_for_its_days(live: Live) -> None:
    session_id = paid_checkout(live, plan="pro-year")
    _, page = success(live, session_id)
    lic = live.services.store.find_license("stripe_checkout_session_id", session_id)
    assert lic is not None and lic.paid_through == live.services.now() + 365 * DAY
    assert "Paid through" in page and html.day(lic.paid_through) in page
