"""HTML for people: the customer pages' templates, stylesheet, script, headers and error pages.

Templates are jinja2 with autoescaping always on: every value a page shows
(labels, addresses, keys, messages) is escaped by the engine, never by hand.
Templates, the stylesheet and the copy button's few lines of script are
package data (``licensed/templates``, ``licensed/static``), served from
``/assets/…`` with a content hash in the URL so browsers may keep them.

Every page carries a Content-Security-Policy of its own: scripts and styles
only from this server (no inline code), forms only to this server and to
Stripe's billing portal (the one place a form's redirect leads), no framing,
no referrer (links carry one-time tokens and checkout ids in their query).
Pages answer their own errors as pages (:func:`error_page`), the API as JSON.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jinja2

from ..errors import LicensedError, NotFound
from ..services import Services
from ..web import Request, Response, Route, first_values, media_type

HTML_TYPE = "text/html; charset=utf-8"
PAGE_PREFIXES = ("/account/", "/checkout/")
PAGE_PATHS = frozenset({"/account"})

BILLING_ORIGIN = "https://billing.stripe.com"
"""Where the billing form's redirect leads (Stripe's hosted portal); forms go nowhere else."""
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    f"form-action 'self' {BILLING_ORIGIN}; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", PAGE_CSP),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)

ASSET_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def is_page(path: str) -> bool:
    """Whether ``path`` belongs to the customer pages (errors there are answered as pages)."""
    return path in PAGE_PATHS or path.startswith(PAGE_PREFIXES)


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    version: str


@functools.cache
def assets() -> dict[str, Asset]:
    """The files of ``licensed/static``, read once from the installed package."""
    found: dict[str, Asset] = {}
    for entry in resources.files("licensed").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in ASSET_TYPES:
            body = entry.read_bytes()
            found[entry.name] = Asset(body, ASSET_TYPES[suffix], hashlib.sha256(body).hexdigest()[:12])
    return found


def asset_url(name: str) -> str:
    return f"/assets/{name}?v={assets()[name].version}"


def _moment(value: int | str | None) -> dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(value, dt.UTC)


def day(value: int | str | None) -> str:
    """``15 January 2027`` (UTC)."""
    moment = _moment(value)
    return "" if moment is None else f"{moment.day} {moment:%B %Y}"


def when(value: int | str | None) -> str:
    """``15 Jan 2027, 08:00 UTC``."""
    moment = _moment(value)
    return "" if moment is None else f"{moment.day} {moment:%b %Y, %H:%M} UTC"


def ago(value: int | str | None, now: int) -> str:
    """How long ago, in words a person says: ``just now``, ``3 hours ago``, ``12 days ago``."""
    moment = _moment(value)
    if moment is None:
        return ""
    seconds = max(0, now - int(moment.timestamp()))
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'} ago"
    return "just now"


@functools.cache
def environment() -> jinja2.Environment:
    """One template environment per process: autoescaping on, undefined names are errors."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("licensed", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(day=day, when=when)
    env.globals.update(asset=asset_url, ago=ago)
    return env


def site(services: Services) -> dict[str, Any]:
    """What every page shows of the shop: its name and where it lives."""
    config = services.config
    products = list(services.catalog.products.values())
    if len(products) == 1:
        name = products[0].name
    elif config.website_url:
        name = urlsplit(config.website_url).hostname or "Licenses"
    else:
        name = "Licenses"
    return {"name": name, "website_url": config.website_url}


def page(
    services: Services,
    template: str,
    *,
    status: int = 200,
    headers: Sequence[tuple[str, str]] = (),
    **context: Any,
) -> Response:
    """A rendered page with the pages' security headers."""
    body = environment().get_template(template).render(site=site(services), now=services.now(), **context)
    return Response(
        status=status,
        raw=body.encode("utf-8"),
        content_type=HTML_TYPE,
        headers=[*PAGE_HEADERS, *headers],
    )


def redirect(location: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """303 See Other: after a form, the browser fetches ``location`` with GET."""
    return Response(
        status=303,
        raw=b"",
        content_type=HTML_TYPE,
        headers=[("Location", location), *PAGE_HEADERS, *headers],
    )


ERROR_TEXT = {
    404: ("Page not found", "There is nothing at this address."),
    405: ("Not possible here", "This page cannot be used that way."),
    413: ("Too much data", "What was sent is larger than this page accepts."),
    429: ("Too many requests", "Too many requests came from your address. Wait a minute, then try again."),
    500: ("Something went wrong", "Something went wrong on our side. Try again in a minute."),
    503: ("Temporarily unavailable", "This service is briefly unavailable. Try again in a minute."),
}


def error_page(services: Services, err: LicensedError) -> Response:
    """An error on a page route, as a page that says what happened and what to do next."""
    if err.status in ERROR_TEXT:
        title, text = ERROR_TEXT[err.status]
    elif err.status >= 500:
        title, text = ERROR_TEXT[500]
    else:
        title, text = "That did not work", err.message
    try:
        return page(
            services, "message.html", status=err.status, headers=err.headers(), title=title, text=text
        )
    except Exception:
        # The page cannot be rendered (templates missing): plain text says the same.
        return Response(
            status=err.status,
            raw=f"{title}. {text}\n".encode(),
            content_type="text/plain; charset=utf-8",
            headers=[*PAGE_HEADERS, *err.headers()],
        )


def read_form(request: Request) -> dict[str, str]:
    """An HTML form's fields (``application/x-www-form-urlencoded``; of a repeated name the
    first counts); anything else reads as an empty form."""
    if media_type(request.header("Content-Type")) != "application/x-www-form-urlencoded":
        return {}
    return first_values(request.body().decode("utf-8", "replace"))


def routes(services: Services) -> list[Route]:
    def asset(request: Request) -> Response:
        found = assets().get(request.params["name"])
        if found is None:
            return error_page(services, NotFound("no such file"))
        return Response(
            raw=found.body,
            content_type=found.content_type,
            headers=[
                ("Cache-Control", "public, max-age=31536000, immutable"),
                ("X-Content-Type-Options", "nosniff"),
            ],
        )

    return [Route("GET", "/assets/{name}", asset, "The pages' stylesheet and script", tag="pages", api=False)]
