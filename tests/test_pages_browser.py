"""The customer pages in a real browser (headless Chromium, Selenium) against the real server:
buy, see the key, sign in through the mailed link, release a dead machine, activate a new one.

Screenshots of the success and account pages (1280 px and 375 px wide) are taken on the
way; ``make screenshots`` keeps them in docs/screenshots (``LICENSED_SCREENSHOTS``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from support import stripe_events as se
from support.browser import screenshots
from support.clock import DAY, FrozenClock
from support.live import Live, start_server
from support.pages import paid_checkout, sign_in_links
from support.smtp_sink import SmtpSink
from support.stripe_double import StripeDouble, stripe_double

from licensed import mailer
from licensed.config import Config
from licensed.plans import EXAMPLE_PLANS
from licensed.server import init_data_dir
from licensed.services import build_services

PLAN = "dashcaddy-pro-year"
EMAIL = "ada@example.com"
WAIT = 10.0


@dataclass
class Shop:
    live: Live
    sink: SmtpSink
    double: StripeDouble


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """A server whose APP_BASE_URL is its real address (links in mail and Checkout's success URL
    lead back to it), with the example plans, mail to aiosmtpd and Stripe's double."""
    data = tmp_path_factory.mktemp("pages") / "data"
    data.mkdir(mode=0o700)
    (data / "plans.toml").write_text(EXAMPLE_PLANS, encoding="utf-8")
    clock = FrozenClock()
    sink = SmtpSink().start()
    try:
        with stripe_double() as double:
            port = free_port()
            config = Config(
                data_dir=data,
                port=port,
                app_base_url=f"http://127.0.0.1:{port}",
                website_url="https://shop.example.com",
                smtp_url=sink.url,
                mail_from="DashCaddy <licenses@shop.example.com>",
                stripe_secret_key="sk_test_double",
                stripe_api_base=double.url,
                stripe_webhook_secrets=(se.SECRET,),
            )
            init_data_dir(config, int(clock()))
            services = build_services(config, clock)
            running = start_server(services, port)
            try:
                with requests.Session() as http:
                    yield Shop(Live(running.url, services, clock, http), sink, double)
            finally:
                running.stop()
                services.store.close()
    finally:
        sink.stop()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: docs/screenshots under ``make screenshots``, else a temporary dir."""
    given = os.environ.get("LICENSED_SCREENSHOTS")
    return Path(given).resolve() if given else tmp_path


def h1(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "h1").text)


def wait_for(driver: Any, condition: Any, timeout: float = WAIT) -> Any:
    """Until ``condition`` holds; a page replaced under the condition (a form's answer, a
    reload) is looked at again: an element of the page going away raises a stale element,
    or, with scripts off, a WebDriverException naming a node gone from the document."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (WebDriverException,)
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=ignored).until(condition)


def activate(live: Live, key: str, machine: str, label: str | None = None) -> dict[str, Any]:
    body = {"key": key, "machine_id": machine, **({"label": label} if label else {})}
    answer = live.post("/api/license/activate", body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def sign_in(driver: Any, shop: Shop, shots: Path | None = None) -> list[Path]:
    """Through the form, the mailed link and its page's button, as a buyer does; with
    ``shots``, screenshots of the page the link opens."""
    from selenium.webdriver.common.by import By

    live = shop.live
    driver.get(live.url + "/account")
    assert h1(driver) == "Your licenses"
    field = driver.find_element(By.ID, "email")
    field.clear()
    field.send_keys(EMAIL)
    driver.find_element(By.CSS_SELECTOR, "form[action='/account/sign-in'] button").click()
    wait_for(driver, lambda d: h1(d) == "Check your mail")
    before = len(sign_in_links(shop.sink))
    mailer.send_due(live.services, live.services.now())
    links = sign_in_links(shop.sink)
    assert len(links) == before + 1
    assert links[-1].startswith(live.url + "/account/auth?token=")
    driver.get(links[-1])
    assert h1(driver) == "Sign in" and EMAIL in driver.page_source
    made = screenshots(driver, shots, "sign-in") if shots is not None else []
    driver.find_element(By.CSS_SELECTOR, "form[action='/account/auth'] button").click()
    wait_for(driver, lambda d: "Signed in as" in d.page_source)
    assert driver.current_url == live.url + "/account"
    return made


def test_buy_see_the_key_sign_in_release_the_dead_machine_activate_a_new_one(
    browser: Any, shop: Shop, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    driver, live = browser, shop.live
    driver.delete_all_cookies()
    session_id = se.uid("cs_test")

    # Back from Checkout before the webhook: the page waits, and reloads itself.
    driver.get(f"{live.url}/checkout/success?session_id={session_id}")
    assert h1(driver) == "Finishing your purchase…"
    paid_checkout(live, session_id=session_id, email=EMAIL, plan=PLAN, customer="cus_ada")
    wait_for(driver, lambda d: "license is ready" in h1(d))
    assert "&n=" in driver.current_url  # reloaded by its own meta refresh, not by the test
    lic = live.services.store.find_license("stripe_checkout_session_id", session_id)
    assert lic is not None
    key = live.key_of(lic)
    assert driver.find_element(By.ID, "key").text == key
    # The stylesheet and the script both pass the page's Content-Security-Policy.
    background = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(245, 247, 250)"
    copy = driver.find_element(By.CSS_SELECTOR, "button[data-copy='key']")
    assert copy.is_displayed()
    made = screenshots(driver, shots, "success")

    driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": live.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    copy.click()
    wait_for(driver, lambda d: copy.text == "Copied")
    pasted = driver.execute_async_script(
        "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done('error: ' + e))"
    )
    assert pasted == key

    # The server that ran the key died; a new one cannot take the only seat.
    activate(live, key, "old-server-7f3a", label="old-server")
    live.clock.advance(12 * DAY)
    refused = live.post("/api/license/activate", {"key": key, "machine_id": "new-server-91c2"})
    assert refused.json()["code"] == "TOO_MANY_MACHINES"

    made += sign_in(driver, shop, shots)
    [cookie] = [c for c in driver.get_cookies() if c["name"] == "licensed_session"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax" and cookie["secure"] is False
    assert driver.execute_script("return document.cookie") == ""
    page = driver.page_source
    assert key in page and "old-server" in page and "12 days ago" in page
    assert driver.find_element(By.CSS_SELECTOR, "form[action='/account/billing'] button").is_displayed()
    made += screenshots(driver, shots, "account")

    driver.find_element(By.XPATH, "//li[.//span[text()='old-server']]//button[text()='Release']").click()
    wait_for(driver, lambda d: "The machine was released" in d.page_source)
    assert "old-server" not in driver.page_source
    assert activate(live, key, "new-server-91c2", label="new-server")["activated"] is True
    driver.refresh()
    assert "new-server" in driver.page_source

    driver.find_element(By.CSS_SELECTOR, "form[action='/account/sign-out'] button").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "email"))
    assert not [c for c in driver.get_cookies() if c["name"] == "licensed_session"]

    assert sorted(p.name for p in made) == [
        "account-desktop.png",
        "account-phone.png",
        "sign-in-desktop.png",
        "sign-in-phone.png",
        "success-desktop.png",
        "success-phone.png",
    ]
    for path in made:
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 10_000


def test_the_pages_work_without_javascript(browser: Any, shop: Shop) -> None:
    from selenium.webdriver.common.by import By

    driver, live = browser, shop.live
    driver.delete_all_cookies()
    session_id = paid_checkout(live, email="nojs@example.com", plan=PLAN, customer="cus_nojs")
    lic = live.services.store.find_license("stripe_checkout_session_id", session_id)
    assert lic is not None
    key = live.key_of(lic)
    activate(live, key, "spare-box-1", label="spare-box")
    driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        driver.get(f"{live.url}/checkout/success?session_id={session_id}")
        assert driver.find_element(By.ID, "key").text == key
        assert not driver.find_element(By.CSS_SELECTOR, "button[data-copy]").is_displayed()
        driver.get(live.url + "/account")
        driver.find_element(By.ID, "email").send_keys("nojs@example.com")
        driver.find_element(By.CSS_SELECTOR, "form[action='/account/sign-in'] button").click()
        wait_for(driver, lambda d: h1(d) == "Check your mail")
        mailer.send_due(live.services, live.services.now())
        driver.get(sign_in_links(shop.sink)[-1])
        driver.find_element(
            By.CSS_SELECTOR, "form[action='/account/auth'] button"
        ).click()  # no script needed
        wait_for(driver, lambda d: "spare-box" in d.page_source)
        driver.find_element(By.XPATH, "//li[.//span[text()='spare-box']]//button[text()='Release']").click()
        wait_for(driver, lambda d: "The machine was released" in d.page_source)
    finally:
        driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})
    assert activate(live, key, "spare-box-2")["activated"] is True
