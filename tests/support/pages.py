"""Helpers for the customer pages' tests: a paid checkout by signed webhook, the sign-in link
out of the mail aiosmtpd received, the CSRF token out of a page, a signed-in customer."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import requests

from licensed import mailer
from support import stripe_events as se
from support.live import Live
from support.smtp_sink import SmtpSink

LINK = re.compile(r"https?://[^\s\"'<>]+/account/auth\?token=[A-Za-z0-9_-]+")
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
MACHINE_FORM = re.compile(r'action="/account/machines/(mch_[A-Za-z0-9_-]+)/release"')


def deliver(live: Live, evt: dict[str, Any], secret: str = se.SECRET) -> requests.Response:
    body, headers = se.signed(evt, int(live.clock()), secret)
    return live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)


def paid_checkout(
    live: Live,
    *,
    email: str = "ada@example.com",
    plan: str = "pro-year",
    customer: str | None = "cus_ada",
    session_id: str | None = None,
) -> str:
    """A paid one-time Checkout whose ``checkout.session.completed`` has landed; its session id."""
    session = se.checkout_session(
        session_id=session_id or se.uid("cs_test"),
        mode="payment",
        email=email,
        customer=customer,
        payment_intent=se.uid("pi"),
        plan=plan,
    )
    answer = deliver(live, se.event("checkout.session.completed", session, int(live.clock())))
    assert answer.status_code == 200, answer.text
    return str(session["id"])


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def sign_in_links(sink: SmtpSink) -> list[str]:
    """Every sign-in link in the mail received so far, oldest first."""
    with sink.lock:
        messages = [r.message for r in sink.received]
    return [m for message in messages for m in LINK.findall(text_of(message))]


def hidden_token(page: str) -> str:
    """The sign-in token the confirmation page's form sends."""
    found = re.search(
        r'<form method="post" action="/account/auth">\s*<input type="hidden" name="token" value="([^"]+)">',
        page,
    )
    assert found, page
    return found.group(1)


def csrf_of(page: str) -> str:
    found = CSRF.search(page)
    assert found, "no CSRF field on the page"
    return html.unescape(found.group(1))


def machine_ids(page: str) -> list[str]:
    return MACHINE_FORM.findall(page)


@dataclass
class Customer:
    """A browser-less customer of a live server: its own cookies, signed in through the mail."""

    live: Live
    sink: SmtpSink
    http: requests.Session = field(default_factory=requests.Session)

    def url(self, path: str) -> str:
        return self.live.url + path

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.url(path), timeout=10, allow_redirects=False, **kwargs)

    def post(self, path: str, data: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        return self.http.post(self.url(path), data=data or {}, timeout=10, allow_redirects=False, **kwargs)

    def ask_for_link(self, email: str) -> requests.Response:
        return self.post("/account/sign-in", {"email": email})

    def send_mail(self) -> None:
        mailer.send_due(self.live.services, self.live.services.now())

    def sign_in(self, email: str) -> str:
        """Ask for a link, have the mail sent, follow the link; returns the account page."""
        before = len(sign_in_links(self.sink))
        assert self.ask_for_link(email).status_code == 200
        self.send_mail()
        links = sign_in_links(self.sink)
        assert len(links) == before + 1, "no sign-in mail arrived"
        answer = self.follow(links[-1])
        assert answer.status_code == 303 and answer.headers["Location"] == "/account", answer.text
        page = self.get("/account")
        assert page.status_code == 200 and "Signed in as" in page.text
        return page.text

    def open_link(self, link: str) -> requests.Response:
        """Open a link from a mail on this server (the mail names APP_BASE_URL), as a mail
        scanner does: nothing pressed."""
        return self.get(link[link.index("/account/") :])

    def follow(self, link: str) -> requests.Response:
        """Open a sign-in link and press the page's button, as a person does; the page's
        refusal when it has no button."""
        shown = self.open_link(link)
        if shown.status_code != 200:
            return shown
        return self.post("/account/auth", {"token": hidden_token(shown.text)})

    def account(self) -> str:
        answer = self.get("/account")
        assert answer.status_code == 200
        return answer.text

    def csrf(self) -> str:
        return csrf_of(self.account())
