"""The account pages: sign in by a link in the mail, then see and manage every licence of the address.

The rules (links, sessions, CSRF tokens, what a customer may change) live in
:mod:`licensed.accounts`; this module reads forms and cookies and answers
pages. Every form of a signed-in page carries the session's CSRF token
(``csrf``); a form without it, or with another session's, changes nothing and
gets a 403 page. After a change the browser is sent back to ``/account``
(303) with a short ``done`` code that the page turns into a sentence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import accounts, checkout, licensing
from ..errors import InvalidEmail, NotFound, SignInLinkRefused
from ..services import Services
from ..store import License
from ..web import Request, Response, Route
from .html import page, read_form, redirect

NOTICES = {
    "released": ("ok", "The machine was released: its seat is free. Activate the new machine now."),
    "not-yours": (
        "warn",
        "That machine is not on your licenses (it may have been released already). Nothing was changed.",
    ),
    "resent": ("ok", "The key is on its way to your e-mail address."),
    "resend-limit": (
        "warn",
        "That key was mailed several times in the last hour. Check your spam folder, or try again later.",
    ),
    "resend-not-yours": ("warn", "That license is not on your account. Nothing was sent."),
    "no-billing": (
        "warn",
        "Nothing on this account was bought through Stripe, so there is no billing portal to open.",
    ),
}
"""What ``/account?done=…`` says; any other code says nothing."""

STATUS = {
    licensing.VALID: ("ok", "Active"),
    licensing.GRACE_PERIOD: ("warn", "Payment overdue"),
    licensing.EXPIRED: ("bad", "Expired"),
    licensing.SUSPENDED: ("warn", "Suspended"),
    licensing.REVOKED: ("bad", "Revoked"),
}


def routes(services: Services) -> list[Route]:
    store = services.store
    config = services.config
    secure = config.app_base_url.startswith("https://")
    # __Host-: only this exact origin can set it (not a sibling subdomain), which needs Secure.
    cookie_name = "__Host-licensed_session" if secure else "licensed_session"
    account_url = f"{config.app_base_url}/account"
    valid_minutes = accounts.LINK_VALID_SECONDS // 60

    def secret() -> bytes:
        return accounts.load_secret(config.data_dir)

    def cookie(request: Request) -> str | None:
        for part in (request.header("Cookie") or "").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name == cookie_name:
                return value.strip()
        return None

    def set_cookie(value: str, max_age: int) -> tuple[str, str]:
        flags = f"Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax"
        return ("Set-Cookie", f"{cookie_name}={value}; {flags}{'; Secure' if secure else ''}")

    def current(request: Request) -> accounts.Session | None:
        return accounts.session(store, secret(), cookie(request), services.now())

    def signed_out(status: int = 200, **context: Any) -> Response:
        context.setdefault("email", "")
        context.setdefault("notice", None)
        context.setdefault("error", None)
        context.setdefault("link_problem", None)
        return page(services, "signin.html", status=status, valid_minutes=valid_minutes, **context)

    def refuse_signed_out() -> Response:
        return signed_out(403, notice="You are signed out, so nothing was changed. Sign in again.")

    def guarded(
        request: Request, if_signed_out: Callable[[], Response] = refuse_signed_out
    ) -> tuple[accounts.Session, dict[str, str]] | Response:
        """The session and form of a signed-in page's POST, or the page that refuses it: without
        a session ``if_signed_out()`` (by default the 403 sign-in page), without the session's
        CSRF token the 403 refused page."""
        form = read_form(request)
        session = current(request)
        if session is None:
            return if_signed_out()
        if not session.csrf_ok(form.get("csrf")):
            return page(services, "refused.html", status=403)
        return session, form

    def license_card(lic: License, now: int) -> dict[str, Any]:
        product_name, plan_name = services.catalog.display_names(lic.product, lic.plan)
        state = licensing.entitlement(lic, now)
        tone, label = STATUS[state]
        return {
            "id": lic.id,
            "key": services.licensing.key(lic),
            "plan_name": plan_name,
            "product_name": product_name,
            "state": state,
            "status_label": label,
            "tone": tone,
            "lifetime": lic.lifetime,
            "paid_through": lic.paid_through,
            "expires_at": lic.expires_at,
            "subscription": bool(lic.stripe_subscription_id),
            "cancel_at_period_end": lic.cancel_at_period_end,
            "max_machines": lic.max_machines,
            "release_after_days": lic.release_after_days,
            "machines": licensing.machine_views(store, lic, now),
        }

    def account(request: Request) -> Response:
        session = current(request)
        if session is None:
            return signed_out()
        now = services.now()
        licenses = accounts.licenses_of(store, session.email)
        notice = NOTICES.get(request.query.get("done", ""))
        return page(
            services,
            "account.html",
            email=session.email,
            csrf=session.csrf,
            licenses=[license_card(lic, now) for lic in licenses],
            billing=services.stripe is not None and bool(accounts.stripe_customers(store, licenses)),
            notice=notice,
        )

    def sign_in(request: Request) -> Response:
        typed = read_form(request).get("email", "")
        try:
            email = accounts.normal_email(typed)
        except InvalidEmail:
            error = (
                "Enter the e-mail address you bought with."
                if not typed.strip()
                else ("That does not look like an e-mail address. Check it and try again.")
            )
            return signed_out(400, email=typed[:254], error=error)
        accounts.request_link(store, secret(), email, services.now())
        return page(
            services,
            "check_mail.html",
            email=email,
            valid_minutes=valid_minutes,
            per_hour=accounts.LINKS_PER_HOUR,
        )

    def confirm(request: Request) -> Response:
        token = request.query.get("token", "")
        try:
            email = accounts.link_email(store, token, services.now())
        except SignInLinkRefused as refused:
            return signed_out(400, link_problem=refused.reason)
        return page(services, "confirm_sign_in.html", email=email, token=token)

    def auth(request: Request) -> Response:
        now = services.now()
        try:
            email = accounts.consume_link(store, read_form(request).get("token", ""), now)
        except SignInLinkRefused as refused:
            return signed_out(400, link_problem=refused.reason)
        previous = current(request)
        if previous is not None:
            accounts.end_session(store, previous.id_hash)
        session_id = accounts.start_session(store, email, now)
        return redirect("/account", [set_cookie(session_id, accounts.SESSION_SECONDS)])

    def release(request: Request) -> Response:
        checked = guarded(request)
        if isinstance(checked, Response):
            return checked
        session, _ = checked
        released = accounts.release_machine(store, session.email, request.params["id"], services.now())
        return redirect("/account?done=released" if released else "/account?done=not-yours")

    def resend(request: Request) -> Response:
        checked = guarded(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        try:
            sent = accounts.resend_key(store, session.email, form.get("license", ""), services.now())
        except NotFound:
            return redirect("/account?done=resend-not-yours")
        return redirect("/account?done=resent" if sent else "/account?done=resend-limit")

    def billing(request: Request) -> Response:
        checked = guarded(request)
        if isinstance(checked, Response):
            return checked
        session, _ = checked
        customers = accounts.stripe_customers(store, accounts.licenses_of(store, session.email))
        if not customers:
            return redirect("/account?done=no-billing")
        return redirect(checkout.portal_url(services, customers, return_url=account_url))

    def sign_out(request: Request) -> Response:
        def cleared() -> Response:
            return redirect("/account", [set_cookie("", 0)])

        checked = guarded(request, if_signed_out=cleared)
        if isinstance(checked, Response):
            return checked
        session, _ = checked
        accounts.end_session(store, session.id_hash)
        return cleared()

    def route(method: str, path: str, handler: Any, summary: str) -> Route:
        return Route(method, path, handler, summary, tag="pages", media_type="text/html", api=False)

    return [
        route("GET", "/account", account, "The customer's licences, or the sign-in form"),
        route("POST", "/account/sign-in", sign_in, "Mail a one-time sign-in link"),
        route("GET", "/account/auth", confirm, "The page a sign-in link opens: a button that signs in"),
        route("POST", "/account/auth", auth, "Sign in with the token of a link from the mail"),
        route("POST", "/account/machines/{id}/release", release, "Release a machine's seat"),
        route("POST", "/account/billing", billing, "Open the Stripe billing portal"),
        route("POST", "/account/resend", resend, "Mail a licence key again"),
        route("POST", "/account/sign-out", sign_out, "End the session"),
    ]
