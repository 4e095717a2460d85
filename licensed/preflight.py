"""Going live: will a purchase turn into a license? Read-only checks of every link.

A buyer pays at Stripe for a price; Stripe sends events to
``APP_BASE_URL/api/stripe/webhook``; the server verifies them with
``STRIPE_WEBHOOK_SECRET`` and maps the price to a plan. Each link can be wrong
in a way nobody notices until a buyer pays and gets no key: a mistyped price
id, a price from the other mode, an archived product, an endpoint that misses
an event type, a public URL that does not reach the server, a server still
running with the settings it had before the last edit. These checks look at
each link without changing anything at Stripe (GET requests only) and say,
for each, what to do. Printing and exit codes are the command line's business.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import ipaddress
import json
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from . import __version__, mailer
from .config import Config
from .errors import (
    ConfigError,
    MailUnavailable,
    NotFound,
    ServerUnreachable,
    StripeKeyRefused,
    StripeUnavailable,
)
from .plans import Catalog, Plan
from .stripe_api import sign_payload
from .stripe_sync import HANDLED_EVENTS, webhook_url

SERVER_TIMEOUT = 10.0
MAX_ANSWER_BYTES = 1024 * 1024
RESTART = "restart it so it reads these settings (systemctl restart licensed)"


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One finding: what was looked at, and what was found or what to do."""

    status: Status
    subject: str
    message: str


def ok(subject: str, message: str) -> Check:
    return Check(Status.OK, subject, message)


def warn(subject: str, message: str) -> Check:
    return Check(Status.WARN, subject, message)


def fail(subject: str, message: str) -> Check:
    return Check(Status.FAIL, subject, message)


class StripeReader(Protocol):
    """What the checks may do at Stripe: read. :class:`stripe_api.StripeGateway` is one."""

    def get(self, path: str, **params: Any) -> dict[str, Any]: ...

    def list_all(
        self, path: str, *, limit: int = 100, max_pages: int = 1000, **params: Any
    ) -> Iterator[dict[str, Any]]: ...


def key_mode(key: str | None) -> str | None:
    """``test`` or ``live`` from a Stripe key's prefix (secret, restricted or publishable)."""
    if not key:
        return None
    for kind in ("sk", "rk", "pk"):
        for mode in ("test", "live"):
            if key.startswith(f"{kind}_{mode}_"):
                return mode
    return None


# --- the running server, through its public URL ----------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    """The JSON object answered, or ``{}``."""

    @property
    def code(self) -> str | None:
        error = self.body.get("error")
        return str(error.get("code")) if isinstance(error, dict) else None


class ServerClient:
    """HTTP to this server at ``APP_BASE_URL``, the way Stripe and buyers reach it."""

    def __init__(self, base_url: str, admin_token: str | None = None, timeout: float = SERVER_TIMEOUT):
        self.base_url = base_url.rstrip("/")
        self.admin_token = admin_token
        self.timeout = timeout
        self._opener = urllib.request.build_opener()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        admin: bool = False,
    ) -> Answer:
        url = self.base_url + path
        sent = {"Accept": "application/json", "User-Agent": f"licensed/{__version__} (stripe check)"}
        if body is not None:
            sent["Content-Type"] = "application/json"
        if admin and self.admin_token:
            sent["Authorization"] = f"Bearer {self.admin_token}"
        sent.update(headers or {})
        request = urllib.request.Request(url, data=body, method=method, headers=sent)  # noqa: S310 - http(s) from APP_BASE_URL
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return Answer(response.status, _object(response.read(MAX_ANSWER_BYTES)))
        except urllib.error.HTTPError as err:
            with err:
                return Answer(err.code, _object(err.read(MAX_ANSWER_BYTES)))
        except urllib.error.URLError as err:
            raise ServerUnreachable(f"cannot reach {url}: {_reason(err.reason)}") from err
        except (OSError, http.client.HTTPException) as err:
            raise ServerUnreachable(f"cannot reach {url}: {_reason(err)}") from err

    def get(self, path: str, *, admin: bool = False) -> Answer:
        return self.request("GET", path, admin=admin)

    def post_json(self, path: str, value: Any) -> Answer:
        return self.request("POST", path, body=json.dumps(value).encode())


def _object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "no answer (timed out)"
    text = str(reason) or type(reason).__name__
    return " ".join(text.split())[:300]


# --- the checks ------------------------------------------------------------------------------------


def run(
    config: Config,
    catalog: Catalog,
    stripe: StripeReader | None,
    server: ServerClient,
    *,
    smtp_tls: ssl.SSLContext | None = None,
) -> Iterator[Check]:
    """Every check, in the order a purchase meets them. ``stripe`` is None without a secret key."""
    mode = yield from check_keys(config, stripe)
    if mode is not None and stripe is not None:
        yield from check_plans(config, catalog, stripe, mode)
        yield check_endpoint(config, stripe)
    yield from check_server(config, server, mode or key_mode(config.stripe_secret_key))
    yield from check_mail(config, smtp_tls)


def check_keys(config: Config, stripe: StripeReader | None) -> Generator[Check, None, str | None]:
    """The secret key works; its mode (read from Stripe) matches the publishable key's.

    Returns the mode, or None when the key does not work (nothing else at Stripe can be read).
    """
    subject = "secret key"
    secret = config.stripe_secret_key
    if not secret or stripe is None:
        yield fail(
            subject, "STRIPE_SECRET_KEY is not set: copy it from the Stripe Dashboard (Developers → API keys)"
        )
        return None
    declared = key_mode(secret)
    if declared is None or secret.startswith("pk_"):
        yield fail(
            subject,
            "STRIPE_SECRET_KEY is not a Stripe secret key (sk_test_…, sk_live_…, or a restricted rk_…)",
        )
        return None
    try:
        balance = stripe.get("/v1/balance")
    except StripeKeyRefused as err:
        yield fail(
            subject,
            f"{err.message}: copy STRIPE_SECRET_KEY again from the Dashboard (a rolled or deleted key"
            " stops working), or give a restricted key read access to Balance, Prices, Products and"
            " Webhook endpoints",
        )
        return None
    except StripeUnavailable as err:
        yield fail(subject, f"cannot check it: {err.message}")
        return None
    livemode = balance.get("livemode")
    mode = ("live" if livemode else "test") if isinstance(livemode, bool) else declared
    yield ok(subject, f"works ({mode} mode)")

    subject = "publishable key"
    public = config.stripe_publishable_key
    public_mode = key_mode(public)
    if not public:
        yield warn(
            subject,
            "STRIPE_PUBLISHABLE_KEY is not set: /api/public/config gives shop pages no key"
            " (only Stripe.js on your site needs it)",
        )
    elif not public.startswith("pk_") or public_mode is None:
        yield fail(subject, "STRIPE_PUBLISHABLE_KEY is not a publishable key (pk_test_… or pk_live_…)")
    elif public_mode != mode:
        yield fail(
            subject,
            f"STRIPE_PUBLISHABLE_KEY is a {public_mode}-mode key but the secret key is a {mode}-mode key:"
            " take both from the same mode of the Dashboard",
        )
    else:
        yield ok(subject, f"{mode} mode, like the secret key")
    return mode


def check_plans(config: Config, catalog: Catalog, stripe: StripeReader, mode: str) -> Iterator[Check]:
    """Every plan's price exists, is active, belongs to an active product and fits the plan."""
    if not any(plan.stripe_price for plan in catalog.plans.values()):
        yield fail("plans", f"no plan in {config.plans_path} has a stripe_price: nothing can be bought")
    for plan in catalog.plans.values():
        if plan.stripe_price:
            yield check_price(config, plan, stripe, mode)
        elif plan.public:
            yield warn(
                f"plan {plan.id}",
                "listed in /api/public/plans but has no stripe_price: it cannot be bought",
            )


def check_price(config: Config, plan: Plan, stripe: StripeReader, mode: str) -> Check:
    subject = f"plan {plan.id}"
    price_id = str(plan.stripe_price)
    fix = f"fix stripe_price in {config.plans_path}"
    try:
        price = stripe.get(f"/v1/prices/{price_id}", expand=["product"])
    except NotFound:
        return fail(
            subject,
            f"price {price_id} does not exist in Stripe's {mode} mode: create it there, or {fix}"
            " (test mode and live mode have different prices)",
        )
    except StripeUnavailable as err:
        return fail(subject, f"cannot read price {price_id}: {err.message}")
    if not price.get("active"):
        return fail(
            subject,
            f"price {price_id} is archived, so nobody can pay it: restore it in the Dashboard, or {fix}",
        )
    recurring = price.get("type") == "recurring" if price.get("type") else price.get("recurring") is not None
    if recurring != (plan.mode == "subscription"):
        found = "recurring" if recurring else "one-time"
        needed = (
            "a recurring price (it is a subscription plan)"
            if plan.mode == "subscription"
            else "a one-time price (it has duration_days or lifetime)"
        )
        return fail(subject, f"price {price_id} is {found}, but the plan needs {needed}: {fix}")
    product = price.get("product")
    if isinstance(product, str):
        try:
            product = stripe.get(f"/v1/products/{product}")
        except StripeUnavailable as err:
            return fail(subject, f"cannot read the product of price {price_id}: {err.message}")
        except NotFound:
            return fail(subject, f"the product {product} of price {price_id} does not exist")
    product = product if isinstance(product, dict) else {}
    name = f'"{product.get("name")}" ({product.get("id")})'
    if not product.get("active"):
        return fail(
            subject,
            f"product {name} of price {price_id} is archived, so Checkout refuses it: restore it in the"
            f" Dashboard, or {fix}",
        )
    return ok(subject, f"price {price_id} active, {_kind(price)}; product {name} active")


def _kind(price: dict[str, Any]) -> str:
    recurring = price.get("recurring")
    if not isinstance(recurring, dict):
        return "one-time"
    interval = recurring.get("interval") or "period"
    count = recurring.get("interval_count") or 1
    return f"recurring every {interval}" if count == 1 else f"recurring every {count} {interval}s"


def check_endpoint(config: Config, stripe: StripeReader) -> Check:
    """An enabled endpoint for this server's webhook URL that subscribes to every handled type."""
    subject = "webhook endpoint"
    url = webhook_url(config.app_base_url)
    try:
        endpoints = list(stripe.list_all("/v1/webhook_endpoints"))
    except (StripeUnavailable, NotFound) as err:
        return fail(subject, f"cannot list webhook endpoints: {err.message}")
    matching = [e for e in endpoints if e.get("url") == url]
    if not matching:
        others = sorted({str(e.get("url")) for e in endpoints})
        known = f" (Stripe has endpoints for {', '.join(others)})" if others else ""
        return fail(subject, f"no endpoint for {url}{known}: run `licensed stripe setup`")
    problems = []
    for endpoint in matching:
        missing = missing_events(endpoint)
        status = endpoint.get("status")
        if status == "enabled" and not missing:
            return ok(
                subject,
                f"{endpoint.get('id')} for {url}: enabled, sends every event type licensed acts on"
                f" ({len(HANDLED_EVENTS)})",
            )
        found = []
        if status != "enabled":
            found.append(f"is {status}")
        if missing:
            found.append(f"does not send {', '.join(missing)}")
        problems.append(f"{endpoint.get('id')} {' and '.join(found)}")
    return fail(
        subject,
        f"{'; '.join(problems)}: run `licensed stripe setup` (it adds the missing event types and"
        " enables the endpoint)",
    )


def missing_events(endpoint: dict[str, Any]) -> list[str]:
    """The handled event types an endpoint does not send (``*`` sends all)."""
    enabled = set(endpoint.get("enabled_events") or [])
    if "*" in enabled:
        return []
    return [name for name in HANDLED_EVENTS if name not in enabled]


def check_server(config: Config, server: ServerClient, mode: str | None) -> Iterator[Check]:
    """The public URL reaches this server, which verifies events with these settings' secret."""
    subject = "public URL"
    base = config.app_base_url
    parts = urlsplit(base)
    if mode == "live" and parts.scheme != "https":
        yield fail(
            subject,
            f"APP_BASE_URL is {base}: Stripe sends live events to https only; serve it behind TLS"
            " (deploy/Caddyfile) and set APP_BASE_URL=https://…",
        )
    if _loopback(parts.hostname):
        message = (
            f"{base} is this machine only: Stripe cannot deliver events to it (in test mode,"
            f" `stripe listen --forward-to {webhook_url(base)}` can)"
        )
        yield fail(subject, message) if mode == "live" else warn(subject, message)
    try:
        health = server.get("/health")
    except ServerUnreachable as err:
        dns = "" if _is_address(parts.hostname) else f", does DNS for {parts.hostname} point at it"
        yield fail(
            subject, f"{err.message}: is the server running{dns}, and does the proxy pass requests on?"
        )
        return
    if health.status != 200 or health.body.get("status") != "ok":
        yield fail(
            subject,
            f"{base}/health answers {health.status}"
            + (f" {health.code}" if health.code else "")
            + ": not a healthy licensed server (see journalctl -u licensed)",
        )
        return
    yield ok(
        subject, f"{base}/health answers 200 through the network (licensed {health.body.get('version')})"
    )
    yield check_webhook_secret(config, server)
    settings = check_running_settings(config, server)
    if settings is not None:
        yield settings


def _is_address(host: str | None) -> bool:
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_webhook_secret(config: Config, server: ServerClient, now: float | None = None) -> Check:
    """The webhook route answers through the public URL and accepts these settings' secret.

    The probe is signed with each configured secret but is not an event, so
    the server verifies its signature and then refuses it as malformed (400
    ``VALIDATION_ERROR``) without recording anything. A signature error means
    the running server has another secret: not restarted after an edit.
    """
    subject = "webhook secret"
    secrets = config.stripe_webhook_secrets
    if not secrets:
        return fail(
            subject,
            "STRIPE_WEBHOOK_SECRET is not set, so the server refuses every event: `licensed stripe setup`"
            " prints it when it creates the endpoint (or reveal it in the Dashboard: Developers →"
            " Webhooks → the endpoint → Signing secret)",
        )
    path = "/api/stripe/webhook"
    body = json.dumps({"licensed": "stripe check probe: not an event"}).encode()
    for number, secret in enumerate(secrets, start=1):
        stamp = int(time.time() if now is None else now)
        which = f"secret {number} of {len(secrets)}" if len(secrets) > 1 else "STRIPE_WEBHOOK_SECRET"
        try:
            answer = server.request(
                "POST", path, body=body, headers={"Stripe-Signature": sign_payload(body, secret, stamp)}
            )
        except ServerUnreachable as err:
            return fail(subject, err.message)
        if answer.status == 400 and answer.code == "VALIDATION_ERROR":
            continue
        if answer.code == "INVALID_SIGNATURE":
            return fail(
                subject,
                f"the running server refuses events signed with {which} of these settings: {RESTART}",
            )
        if answer.code == "STRIPE_NOT_CONFIGURED":
            return fail(subject, f"the running server has no webhook secret: {RESTART}")
        return fail(
            subject,
            f"POST {server.base_url}{path} answers {answer.status}"
            + (f" {answer.code}" if answer.code else "")
            + ": the proxy does not pass webhooks to licensed unchanged",
        )
    return ok(
        subject, f"POST {server.base_url}{path} reaches the server, which accepts STRIPE_WEBHOOK_SECRET"
    )


def check_running_settings(config: Config, server: ServerClient) -> Check | None:
    """The server answering at the public URL runs with these settings (not older ones)."""
    try:
        answer = server.get("/api/public/config")
    except ServerUnreachable as err:
        return fail("running server", err.message)
    if answer.status != 200:
        return fail("running server", f"/api/public/config answers {answer.status}")
    differences = []
    if answer.body.get("issuer") != config.app_base_url:
        differences.append(f"APP_BASE_URL {answer.body.get('issuer')}")
    served_key = answer.body.get("publishable_key")
    if config.stripe_publishable_key and served_key != config.stripe_publishable_key:
        described = f"a {key_mode(served_key)}-mode key" if served_key else "none"
        differences.append(f"another STRIPE_PUBLISHABLE_KEY ({described})")
    if differences:
        return fail("running server", f"it runs with {' and '.join(differences)}: {RESTART}")
    return None


def check_mail(config: Config, tls_context: ssl.SSLContext | None = None) -> Iterator[Check]:
    """Warnings only: without mail a buyer still sees the key on the success page."""
    subject = "mail"
    if not config.smtp_url:
        yield warn(
            subject,
            "SMTP_URL is not set: license keys wait in the outbox instead of being mailed (buyers see"
            " theirs on the checkout success page only)",
        )
    else:
        try:
            settings = mailer.parse_smtp_url(config.smtp_url)
            local_hostname = urlsplit(config.app_base_url).hostname or "localhost"
            smtp = mailer.connect(settings, local_hostname, tls_context)
        except (MailUnavailable, ConfigError) as err:
            yield warn(subject, f"{err.message}: license keys wait in the outbox until it works")
        else:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()
            login = ", login accepted" if settings.username else ""
            yield ok(subject, f"SMTP server {settings.where} answers{login}")
    if not config.mail_from:
        yield warn(subject, "MAIL_FROM is not set: no license key mail can be sent")


def failures(checks: list[Check]) -> int:
    return sum(1 for check in checks if check.status is Status.FAIL)
