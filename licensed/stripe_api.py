"""Stripe's side: the API client, webhook signatures, and readers of its payloads.

Everything that knows how Stripe speaks lives here: explicit timeouts and
retries, ``stripe`` exceptions translated into :mod:`errors` classes, both the
older and the current API shapes of subscriptions and invoices. What an event
means for a licence is :mod:`stripe_sync`'s business.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import (
    BadRequest,
    NotFound,
    StripeKeyRefused,
    StripeRateLimited,
    StripeUnavailable,
    ValidationFailed,
    WebhookSignatureError,
)

SIGNATURE_TOLERANCE = 300
STRIPE_TIMEOUT = 15.0
STRIPE_RETRIES = 2


# --- webhook signatures ---------------------------------------------------------------


def sign_payload(payload: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header Stripe would send (used by tests and tools)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(payload: bytes, header: str | None, secrets: tuple[str, ...], now: int) -> None:
    """Accept the payload only if a ``v1`` signature matches one configured secret
    and its timestamp lies within the tolerance of ``now`` (both directions)."""
    if not header:
        raise WebhookSignatureError("the Stripe-Signature header is missing")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        # isascii first: "²".isdigit() is true, and int("²") raises.
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1" and value and value.isascii():
            # hmac.compare_digest refuses non-ASCII text with a TypeError.
            signatures.append(value)
    if timestamp is None or not signatures:
        raise WebhookSignatureError("the Stripe-Signature header is malformed")
    if abs(now - timestamp) > SIGNATURE_TOLERANCE:
        raise WebhookSignatureError("the signature timestamp is outside the tolerance")
    signed = f"{timestamp}.".encode() + payload
    for secret in secrets:
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        if any(hmac.compare_digest(expected, given) for given in signatures):
            return
    raise WebhookSignatureError()


# --- the Stripe API ------------------------------------------------------------------------


class StripeGateway:
    """The one Stripe client: explicit timeouts and retries; answers plain dicts.

    ``stripe`` exceptions are translated here: a missing object is NotFound,
    anything else StripeUnavailable.
    """

    RATE_LIMIT_TRIES = 5

    def __init__(
        self, secret_key: str, api_base: str | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        # Imported here: the library takes a quarter of a second to import, and a
        # server without Stripe keys (or one that only validates) never needs it.
        import stripe

        self._stripe = stripe
        http = stripe.new_default_http_client(timeout=STRIPE_TIMEOUT)
        bases: Any = {"api": api_base} if api_base else None
        self.client = stripe.StripeClient(
            secret_key,
            base_addresses=bases,
            max_network_retries=STRIPE_RETRIES,
            http_client=http,
        )
        self.calls = 0
        self.sleep = sleep

    def request(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        """One API call; a rate limit (429) is waited out with exponential backoff."""
        for attempt in range(self.RATE_LIMIT_TRIES):
            try:
                return self._request_once(method, path, **params)
            except StripeRateLimited:
                if attempt == self.RATE_LIMIT_TRIES - 1:
                    raise
                self.sleep(min(8.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def _request_once(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        stripe = self._stripe
        self.calls += 1
        try:
            response = self.client.raw_request(method, path, **params)
        except stripe.RateLimitError as err:
            raise StripeRateLimited("Stripe rate limit") from err
        except stripe.AuthenticationError as err:
            raise StripeKeyRefused(f"Stripe refused the secret key ({err.http_status})") from err
        except stripe.PermissionError as err:
            raise StripeKeyRefused(
                f"the key may not {method.upper()} {path} (403): a restricted key needs that permission"
            ) from err
        except stripe.StripeError as err:
            if err.http_status == 404:
                raise NotFound(f"Stripe has no {path}") from err
            if isinstance(err, stripe.InvalidRequestError | stripe.CardError):
                raise StripeUnavailable(
                    f"Stripe refused {method.upper()} {path}: {err.user_message}"
                ) from err
            raise StripeUnavailable(f"Stripe call failed: {type(err).__name__}") from err
        data = response.data
        if not isinstance(data, dict):
            raise StripeUnavailable("Stripe answered something that is not an object")
        return data

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return self.request("get", path, **params)

    def post(self, path: str, **params: Any) -> dict[str, Any]:
        return self.request("post", path, **params)

    def delete(self, path: str, **params: Any) -> dict[str, Any]:
        return self.request("delete", path, **params)

    def list_all(
        self, path: str, *, limit: int = 100, max_pages: int = 1000, **params: Any
    ) -> Iterator[dict[str, Any]]:
        """Every object of a list endpoint, page by page (bounded)."""
        after: str | None = None
        for _ in range(max_pages):
            page_params = dict(params, limit=limit)
            if after:
                page_params["starting_after"] = after
            page = self.get(path, **page_params)
            items = page.get("data") or []
            yield from items
            if not page.get("has_more") or not items:
                return
            after = items[-1]["id"]


def id_of(value: Any) -> str | None:
    """An expandable Stripe field: an id string or an object with an id."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


# --- payload readers (both Stripe API shapes) ------------------------------------------------


def subscription_period(sub: dict[str, Any]) -> tuple[int | None, int | None]:
    """The current period, ``(start, end)``: top-level fields (older API) or the items' (current API)."""
    start, end = sub.get("current_period_start"), sub.get("current_period_end")
    if isinstance(end, int):
        return (int(start) if isinstance(start, int) else None), int(end)
    items = (sub.get("items") or {}).get("data") or []
    starts = [i["current_period_start"] for i in items if isinstance(i.get("current_period_start"), int)]
    ends = [i["current_period_end"] for i in items if isinstance(i.get("current_period_end"), int)]
    return (min(starts) if starts else None), (max(ends) if ends else None)


def subscription_price(sub: dict[str, Any]) -> dict[str, Any]:
    """The first item's price (or legacy plan) object, or ``{"id": …}``."""
    items = (sub.get("items") or {}).get("data") or []
    first = items[0] if items else {}
    price = first.get("price") or first.get("plan") or sub.get("plan") or {}
    if isinstance(price, str):
        return {"id": price}
    return dict(price)


def subscription_quantity(sub: dict[str, Any]) -> int:
    items = (sub.get("items") or {}).get("data") or []
    quantity = (items[0].get("quantity") if items else None) or sub.get("quantity") or 1
    return max(1, int(quantity))


def invoice_subscription(inv: dict[str, Any]) -> str | None:
    """``invoice.subscription`` (older API) or ``parent.subscription_details.subscription``."""
    found = id_of(inv.get("subscription"))
    if found:
        return found
    details = (inv.get("parent") or {}).get("subscription_details") or {}
    return id_of(details.get("subscription"))


def invoice_period_end(inv: dict[str, Any]) -> int | None:
    """The end of the period an invoice pays for: its lines' latest end."""
    ends = []
    for line in (inv.get("lines") or {}).get("data") or []:
        period = line.get("period") or {}
        if isinstance(period.get("end"), int):
            ends.append(int(period["end"]))
    return max(ends) if ends else None


def invoice_is_paid(inv: dict[str, Any]) -> bool:
    """``status: paid`` (current API), or the older boolean ``paid``."""
    return inv.get("status") == "paid" or inv.get("paid") is True


def invoice_payment_ids(inv: dict[str, Any]) -> list[str]:
    """Payment intent and charge ids that paid an invoice (both shapes)."""
    found = [id_of(inv.get("payment_intent")), id_of(inv.get("charge"))]
    for payment in (inv.get("payments") or {}).get("data") or []:
        inner = payment.get("payment") or {}
        found += [id_of(inner.get("payment_intent")), id_of(inner.get("charge"))]
    return [f for f in found if f]


def amount(value: Any) -> int | None:
    """An amount in the currency's smallest unit, or None."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def parse_event(raw: bytes) -> dict[str, Any]:
    """A verified body must still be a well-formed event envelope."""
    try:
        event = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BadRequest("the event is not JSON", code="INVALID_JSON") from err
    if not isinstance(event, dict):
        raise ValidationFailed("the event must be an object")
    if not (isinstance(event.get("id"), str) and event["id"].startswith("evt_") and len(event["id"]) <= 255):
        raise ValidationFailed("the event has no id")
    if not isinstance(event.get("type"), str) or not isinstance(event.get("created"), int):
        raise ValidationFailed("the event has no type or created time")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise ValidationFailed("the event has no data.object")
    if not isinstance(data["object"].get("id"), str):
        raise ValidationFailed("the event's object has no id")
    return event
