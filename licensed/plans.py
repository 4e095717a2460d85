"""Products and plans, read from a TOML file.

The file is the vendor's catalogue: which products exist (and their key
prefix), which plans sell them, and what each plan entitles. Any error stops
start-up with the file and the offending key (or line, for TOML syntax) named.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

MAX_MACHINES = 10_000
"""The most seats a licence can have, from any source: plan, quantity, admin."""

_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_UPPER = re.compile(r"^[A-Z0-9]{1,16}$")
_FEATURE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

EXAMPLE_PLANS = """\
# Products and plans of this license server.
# A product gives license keys their prefix: <key_prefix>-<TIER>-<signed token>.
[products.dashcaddy]
name = "DashCaddy"
key_prefix = "DC"

# A subscription plan: paid_through follows the Stripe subscription's period.
[plans.dashcaddy-pro-monthly]
product = "dashcaddy"
name = "DashCaddy Pro, monthly"
tier = "PRO"
stripe_price = "price_dashcaddy_pro_monthly"   # one Stripe price maps to one plan
max_machines = 1
features = ["sso", "recipes", "swarm"]
grace_days = 7                                  # after the paid period, while the subscription lives
release_after_days = 30                         # a machine not seen for 30 days frees its seat

# A one-time purchase valid for a year.
[plans.dashcaddy-pro-year]
product = "dashcaddy"
name = "DashCaddy Pro, one year"
tier = "PRO"
stripe_price = "price_dashcaddy_pro_year"
max_machines = 1
features = ["sso", "recipes", "swarm"]
duration_days = 365
release_after_days = 30

# A lifetime licence, issued by hand (licensed admin issue --plan dashcaddy-lifetime).
[plans.dashcaddy-lifetime]
product = "dashcaddy"
name = "DashCaddy Lifetime"
tier = "LIFETIME"
max_machines = 3
features = ["sso", "recipes", "swarm"]
lifetime = true
public = false
release_after_days = 30
"""


MAX_URL_LENGTH = 2048


def is_redirect_url(value: str) -> bool:
    """An absolute http(s) URL with a host, no white space or control characters: where a
    Checkout may send its buyer."""
    if not 0 < len(value) <= MAX_URL_LENGTH:
        return False
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    key_prefix: str


@dataclass(frozen=True)
class Plan:
    id: str
    product: str
    name: str
    tier: str
    stripe_price: str | None
    max_machines: int
    features: tuple[str, ...]
    grace_days: int
    duration_days: int | None
    lifetime: bool
    public: bool
    revoke_on_partial_refund: bool
    release_after_days: int | None = None
    """A machine not seen for this many days holds no seat (None: seats are held until released)."""
    success_url: str | None = None
    """Where Stripe Checkout sends the buyer after paying (None: this server's success page)."""
    cancel_url: str | None = None
    """Where Stripe Checkout sends a buyer who goes back (None: this server's cancel page)."""

    @property
    def mode(self) -> str:
        """Stripe Checkout mode: one-time purchases are ``payment``."""
        return "payment" if self.lifetime or self.duration_days else "subscription"

    def public_view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "product": self.product,
            "name": self.name,
            "tier": self.tier,
            "mode": self.mode,
            "max_machines": self.max_machines,
            "features": list(self.features),
            "grace_days": self.grace_days,
            "duration_days": self.duration_days,
            "lifetime": self.lifetime,
            "release_after_days": self.release_after_days,
            "purchasable": self.stripe_price is not None,
        }


@dataclass(frozen=True)
class Catalog:
    products: dict[str, Product]
    plans: dict[str, Plan]

    def plan_for_price(self, price_id: str) -> Plan | None:
        for plan in self.plans.values():
            if plan.stripe_price == price_id:
                return plan
        return None

    def plan_for_tier(self, product: str, tier: str) -> Plan | None:
        for plan in self.plans.values():
            if plan.product == product and plan.tier == tier:
                return plan
        return None

    def display_names(self, product_id: str, plan_id: str) -> tuple[str, str]:
        """The names a person reads for a product and a plan: each one's name in the
        catalogue, else its id (a plan or product since removed from the file)."""
        product = self.products.get(product_id)
        plan = self.plans.get(plan_id)
        return (product.name if product else product_id, plan.name if plan else plan_id)

    def product_for_key(self, key: str) -> Product | None:
        """The product whose exact ``PREFIX-`` starts ``key`` (longest prefix wins)."""
        best: Product | None = None
        for product in self.products.values():
            if key.startswith(product.key_prefix + "-") and (
                best is None or len(product.key_prefix) > len(best.key_prefix)
            ):
                best = product
        return best


def load_catalog(path: Path) -> Catalog:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read plans file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text") from err
    return parse_catalog(raw, str(path))


def parse_catalog(raw: dict[str, Any], source: str = "plans") -> Catalog:
    reader = _Reader(source)
    extra = set(raw) - {"products", "plans"}
    if extra:
        raise ConfigError(f"{source}: unknown table {sorted(extra)[0]!r}")
    products = {pid: reader.product(pid, t) for pid, t in reader.table(raw, "products").items()}
    if not products:
        raise ConfigError(f"{source}: at least one [products.<id>] is required")
    by_prefix: dict[str, str] = {}
    for product in products.values():
        if product.key_prefix in by_prefix:
            raise ConfigError(
                f"{source}: products.{by_prefix[product.key_prefix]} and products.{product.id}"
                f" share the key_prefix {product.key_prefix!r}"
            )
        by_prefix[product.key_prefix] = product.id
    plans = {pid: reader.plan(pid, t, products) for pid, t in reader.table(raw, "plans").items()}
    by_price: dict[str, str] = {}
    for plan in plans.values():
        if plan.stripe_price is None:
            continue
        if plan.stripe_price in by_price:
            raise ConfigError(
                f"{source}: plans.{by_price[plan.stripe_price]} and plans.{plan.id}"
                f" share the stripe_price {plan.stripe_price!r}"
            )
        by_price[plan.stripe_price] = plan.id
    return Catalog(products=products, plans=plans)


class _Reader:
    """Checks one table at a time so each message names the exact key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}")

    def table(self, raw: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table")
        for key, sub in value.items():
            if not _ID.match(key):
                raise self.fail(f"{name}.{key}", "id must be lower-case letters, digits, . _ -")
            if not isinstance(sub, dict):
                raise self.fail(f"{name}.{key}", "must be a table")
        return value

    def get(self, where: str, table: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
        if key not in table:
            if default is ...:
                raise self.fail(where, f"{key} is required")
            return default
        value = table[key]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise self.fail(f"{where}.{key}", f"must be {kind.__name__}")
        return value

    def product(self, pid: str, t: dict[str, Any]) -> Product:
        where = f"products.{pid}"
        self.no_extra(where, t, {"name", "key_prefix"})
        prefix = self.get(where, t, "key_prefix", str)
        if not _UPPER.match(prefix):
            raise self.fail(f"{where}.key_prefix", "must be 1-16 upper-case letters or digits")
        return Product(id=pid, name=self.get(where, t, "name", str, pid), key_prefix=prefix)

    def plan(self, pid: str, t: dict[str, Any], products: dict[str, Product]) -> Plan:
        where = f"plans.{pid}"
        self.no_extra(
            where,
            t,
            {
                "product",
                "name",
                "tier",
                "stripe_price",
                "max_machines",
                "features",
                "grace_days",
                "duration_days",
                "lifetime",
                "public",
                "revoke_on_partial_refund",
                "release_after_days",
                "success_url",
                "cancel_url",
            },
        )
        product = self.get(where, t, "product", str)
        if product not in products:
            raise self.fail(f"{where}.product", f"no product {product!r}")
        tier = self.get(where, t, "tier", str)
        if not _UPPER.match(tier):
            raise self.fail(f"{where}.tier", "must be 1-16 upper-case letters or digits")
        max_machines = self.get(where, t, "max_machines", int, 1)
        if not 1 <= max_machines <= MAX_MACHINES:
            raise self.fail(f"{where}.max_machines", f"must be 1..{MAX_MACHINES}")
        features = self.get(where, t, "features", list, [])
        if not all(isinstance(f, str) and _FEATURE.match(f) for f in features):
            raise self.fail(f"{where}.features", "must be a list of short names")
        grace = self.get(where, t, "grace_days", int, 0)
        if not 0 <= grace <= 365:
            raise self.fail(f"{where}.grace_days", "must be 0..365")
        duration = self.get(where, t, "duration_days", int, None)
        if duration is not None and not 1 <= duration <= 36_500:
            raise self.fail(f"{where}.duration_days", "must be 1..36500")
        lifetime = self.get(where, t, "lifetime", bool, False)
        if lifetime and duration is not None:
            raise self.fail(where, "lifetime and duration_days exclude each other")
        release = self.get(where, t, "release_after_days", int, None)
        if release is not None and not 1 <= release <= 3650:
            raise self.fail(f"{where}.release_after_days", "must be 1..3650")
        price = self.get(where, t, "stripe_price", str, None)
        return Plan(
            id=pid,
            product=product,
            name=self.get(where, t, "name", str, pid),
            tier=tier,
            stripe_price=price,
            max_machines=max_machines,
            features=tuple(features),
            grace_days=grace,
            duration_days=duration,
            lifetime=lifetime,
            public=self.get(where, t, "public", bool, True),
            revoke_on_partial_refund=self.get(where, t, "revoke_on_partial_refund", bool, False),
            release_after_days=release,
            success_url=self.redirect_url(where, t, "success_url"),
            cancel_url=self.redirect_url(where, t, "cancel_url"),
        )

    def redirect_url(self, where: str, table: dict[str, Any], key: str) -> str | None:
        url: str | None = self.get(where, table, key, str, None)
        if url is not None and not is_redirect_url(url):
            raise self.fail(f"{where}.{key}", "must be an http(s) URL")
        return url

    def no_extra(self, where: str, table: dict[str, Any], allowed: set[str]) -> None:
        extra = sorted(set(table) - allowed)
        if extra:
            raise self.fail(f"{where}.{extra[0]}", "unknown key")
