"""Entitlement: what a licence allows now, and the validate/activate/deactivate flows.

Everything here takes ``now`` (epoch seconds) from the caller, so tests freeze
time at the exact paid-through, grace and expiry boundaries.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, NamedTuple

import keys
import mailer
from errors import InvalidToken, NotFound, StorageUnavailable, ValidationFailed
from keys import KeyRing
from memo import BoundedCache
from plans import Catalog, Plan
from store import License, Store, new_id

VALID = "VALID"
GRACE_PERIOD = "GRACE_PERIOD"
EXPIRED = "EXPIRED"
REVOKED = "REVOKED"
SUSPENDED = "SUSPENDED"
INVALID_KEY = "INVALID_KEY"
NOT_FOUND = "NOT_FOUND"
PRODUCT_MISMATCH = "PRODUCT_MISMATCH"
TOO_MANY_MACHINES = "TOO_MANY_MACHINES"
DEACTIVATED = "DEACTIVATED"
MACHINE_NOT_ACTIVATED = "MACHINE_NOT_ACTIVATED"

VALID_CODES = frozenset({VALID, GRACE_PERIOD})
ALL_CODES = (
    VALID,
    GRACE_PERIOD,
    INVALID_KEY,
    NOT_FOUND,
    PRODUCT_MISMATCH,
    EXPIRED,
    REVOKED,
    SUSPENDED,
    TOO_MANY_MACHINES,
    DEACTIVATED,
    MACHINE_NOT_ACTIVATED,
)

log = logging.getLogger("licensed.licensing")

SEEN_WRITE_INTERVAL = 3600
"""A machine's ``last_seen_at`` is rewritten at most hourly, so validation stays read-only."""


@functools.lru_cache(maxsize=4096)
def iso(ts: int | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC; remembered, since a licence's dates repeat in every answer."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def entitlement(lic: License, now: int) -> str:
    """The spec's table: revoked, suspended, then paid-through and grace."""
    if lic.status == "revoked":
        return REVOKED
    if lic.status == "suspended" or lic.subscription_status == "paused":
        return SUSPENDED
    if lic.lifetime:
        return VALID
    if lic.paid_through is None:
        return EXPIRED
    if now <= lic.paid_through:
        return VALID
    end = lic.expires_at
    if end is not None and now <= end:
        return GRACE_PERIOD
    return EXPIRED


def public_status(lic: License) -> str:
    if lic.status != "active":
        return lic.status
    return lic.subscription_status or "active"


def license_view(lic: License, machines_used: int) -> dict[str, Any]:
    """What installations may see: no e-mail, no Stripe ids, no personal data."""
    return {
        "id": lic.id,
        "product": lic.product,
        "plan": lic.plan,
        "tier": lic.tier,
        "status": public_status(lic),
        "features": list(lic.features),
        "max_machines": lic.max_machines,
        "machines_used": machines_used,
        "paid_through": iso(lic.paid_through),
        "expires_at": iso(lic.expires_at),
        "lifetime": lic.lifetime,
        "cancel_at_period_end": lic.cancel_at_period_end,
    }


# --- keys derived from a licence row ----------------------------------------


def key_claims(lic: License, issuer: str) -> dict[str, Any]:
    exp = lic.expires_at
    if exp is None:
        exp = lic.key_iat + keys.LIFETIME_SECONDS
    return {
        "iss": issuer,
        "sub": lic.id,
        "prod": lic.product,
        "tier": lic.tier,
        "ent": sorted(lic.features),
        "max": lic.max_machines,
        "iat": lic.key_iat,
        "exp": exp,
    }


def license_key(lic: License, catalog: Catalog, ring: KeyRing, issuer: str) -> str:
    """Re-derive the licence key from its row (the database never stores keys)."""
    product = catalog.products.get(lic.product)
    prefix = product.key_prefix if product else lic.product.upper()
    token = keys.sign_claims(ring, key_claims(lic, issuer), kid=lic.key_kid)
    return keys.format_license_key(prefix, lic.tier, token)


def restamp_key(lic: License, ring: KeyRing, now: int) -> None:
    """Mark the licence's key as re-issued now by the current signing key.

    Call whenever a claim changes (renewal, tier, seats, features) so the next
    validation hands the client its new key.
    """
    lic.key_kid = ring.current.kid
    lic.key_iat = now


def lease(
    lic: License, machine_hash: str, ring: KeyRing, issuer: str, ttl: int, now: int, kid: str | None = None
) -> str:
    """A lease for the machine, signed by ``kid`` (default: the ring's current key)."""
    end = lic.expires_at
    exp = now + ttl if end is None else min(end, now + ttl)
    claims = {
        "iss": issuer,
        "sub": lic.id,
        "mid": machine_hash,
        "prod": lic.product,
        "tier": lic.tier,
        "ent": sorted(lic.features),
        "iat": now,
        "exp": exp,
    }
    return keys.sign_claims(ring, claims, kid=kid)


# --- issuing ------------------------------------------------------------------


def new_license(
    *,
    plan: Plan,
    customer_id: str,
    ring: KeyRing,
    now: int,
    source: str,
    paid_through: int | None = None,
    lifetime: bool | None = None,
    max_machines: int | None = None,
) -> License:
    """A licence row for ``plan``; one-time plans run ``duration_days`` from now."""
    is_lifetime = plan.lifetime if lifetime is None else lifetime
    if paid_through is None and not is_lifetime and plan.duration_days:
        paid_through = now + plan.duration_days * 86400
    return License(
        id=new_id("lic"),
        customer_id=customer_id,
        product=plan.product,
        plan=plan.id,
        tier=plan.tier,
        features=list(plan.features),
        max_machines=max_machines or plan.max_machines,
        status="active",
        status_reason=None,
        paid_through=None if is_lifetime else paid_through,
        grace_days=plan.grace_days,
        lifetime=is_lifetime,
        subscription_status=None,
        cancel_at_period_end=False,
        source=source,
        stripe_customer_id=None,
        stripe_subscription_id=None,
        stripe_checkout_session_id=None,
        stripe_payment_intent_id=None,
        stripe_charge_id=None,
        stripe_price_id=None,
        snapshot_version="",
        status_version="",
        ended_at=None,
        key_kid=ring.current.kid,
        key_iat=now,
        created_at=now,
        updated_at=now,
    )


def issue_license(
    store: Store,
    ring: KeyRing,
    plan: Plan,
    *,
    email: str,
    now: int,
    actor: str,
    days: int | None = None,
    lifetime: bool | None = None,
    expires_at: int | None = None,
    max_machines: int | None = None,
    source: str = "admin",
    send_email: bool = False,
    name: str | None = None,
) -> License:
    """Issue a licence by hand (admin, internal services); audited.

    With ``send_email`` the key mail is queued in the same transaction, so the
    licence and its mail exist together or not at all.
    """
    email = mailer.check_address(email)
    name = mailer.check_display_name(name)
    if days is not None and expires_at is not None:
        raise ValidationFailed("give days or an expiry, not both")
    paid_through = (
        expires_at if expires_at is not None else (now + days * 86400 if days is not None else None)
    )
    if paid_through is None and not (lifetime or plan.lifetime or plan.duration_days):
        raise ValidationFailed(
            f"plan {plan.id} is a subscription: give a number of days, an expiry or lifetime"
        )
    if paid_through is not None and lifetime:
        raise ValidationFailed("a lifetime licence has no expiry")
    if max_machines is not None and max_machines < 1:
        # new_license reads 0 as "the plan's number"; a negative one breaks the schema.
        raise ValidationFailed("max_machines must be at least 1")
    with store.atomic():
        customer_id = store.upsert_customer(now, email=email, name=name)
        lic = new_license(
            plan=plan,
            customer_id=customer_id,
            ring=ring,
            now=now,
            source=source,
            paid_through=paid_through,
            lifetime=lifetime if lifetime is not None else (plan.lifetime and paid_through is None),
            max_machines=max_machines,
        )
        store.insert_license(lic)
        store.audit(now, actor, "license.issue", lic.id, None, license_view(lic, 0))
        if send_email:
            mailer.queue_mail(store, lic.id, mailer.KIND_LICENSE_KEY, email, name, now)
    return lic


# --- validate, activate, deactivate --------------------------------------------


MACHINE_ID_PATTERN = (
    "^[^\\x00-\\x1f\\x7f-\\xa0\\xad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u1680\\u180e"
    "\\u2000-\\u200f\\u2028-\\u202f\\u205f-\\u206f\\u3000\\ue000-\\uf8ff\\ufeff\\ufff9-\\ufffb]+$"
)
"""What ``/openapi.json`` says a machine id is, and exactly what the server accepts:
printable characters, i.e. no controls, no invisible format or separator characters
(zero-width, bidi overrides, line separators), no private use. One rule for the
document and the check, so generated clients and the server agree on every string."""


class LicenseRequest(NamedTuple):
    """What a licence route was asked (a tuple: built on every validation)."""

    key: str
    machine_id: str | None = None
    product: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any], machine_required: bool) -> LicenseRequest:
        """The request from a body the route's schema passed (types, lengths, and the
        machine id's :data:`MACHINE_ID_PATTERN`)."""
        machine_id = body.get("machine_id")
        if machine_required and machine_id is None:
            raise ValidationFailed("machine_id is required")
        return cls(body["key"], machine_id, body.get("product"))  # positional: quicker to build


class Loaded:
    """A request's licence as read: the row, the verified key, and its machine's seat.

    Remembered for the request that read it (see :class:`store.RecentReads`:
    until the next commit anywhere), so an installation validating again and
    again costs no SQLite step, no signature check and no hashing, and what
    follows from the row alone (the public view, whether the presented key is
    current, this second's lease) is worked out once. Nothing here changes once
    computed: two threads computing a value at once store equal values.
    """

    def __init__(
        self,
        lic: License,
        seen: int | None,
        used: int,
        parsed: keys.ParsedKey,
        machine_hash: str | None,
        issuer: str,
        generation: int,
    ) -> None:
        self.license = lic
        self.seen = seen
        """The machine's ``last_seen_at``: None when it holds no seat (or none was named)."""
        self.used = used
        self.parsed = parsed
        self.machine_hash = machine_hash
        self.issuer = issuer
        self.generation = generation
        """The key ring's generation the key was verified under."""
        self._lease: tuple[int, str, str] | None = None

    def with_license(self, lic: License) -> Loaded:
        """The same read with the row replaced (after a write), remembered nowhere."""
        return Loaded(lic, self.seen, self.used, self.parsed, self.machine_hash, self.issuer, self.generation)

    @functools.cached_property
    def view(self) -> dict[str, Any]:
        """:func:`license_view` with the seats as read. Shared by answers: read only."""
        return license_view(self.license, self.used)

    def view_with(self, machines_used: int) -> dict[str, Any]:
        return self.view if machines_used == self.used else license_view(self.license, machines_used)

    @functools.cached_property
    def key_is_current(self) -> bool:
        """Whether the presented key is the one the row would sign now.

        Signing is deterministic and only this server signs: a verified key
        with the row's claims and kid IS the current key, so it is re-derived
        (one Ed25519 signature) only when the entitlement has moved on.
        """
        lic = self.license
        return self.parsed.kid == lic.key_kid and self.parsed.claims == key_claims(lic, self.issuer)

    def lease(self, ring: KeyRing, kid: str, ttl: int, now: int) -> str:
        """:func:`lease` for this machine signed by ``kid`` (the ring's current key),
        remembered for the second it was signed in."""
        assert self.machine_hash is not None
        memo = self._lease
        if memo is not None and memo[0] == now and memo[1] == kid:
            return memo[2]
        token = lease(self.license, self.machine_hash, ring, self.issuer, ttl, now, kid)
        self._lease = (now, kid, token)
        return token


class Licensing:
    """The licence routes' logic over one store, key ring and catalogue."""

    def __init__(
        self, store: Store, ring: KeyRing, catalog: Catalog, issuer: str, lease_ttl_hours: int
    ) -> None:
        self.store = store
        self.ring = ring
        self.catalog = catalog
        self.issuer = issuer
        self.lease_ttl = lease_ttl_hours * 3600
        self._loaded = store.recent_reads(4096)
        """:class:`Loaded` by the request that read it."""
        self._parsed = BoundedCache()
        """Keys parsed and verified, by their exact text: the memo of ``keys._verified``
        taken one step further, to the product and tier read from the text. A
        remembered key still needs its signing key in the ring. Shared: read only."""

    def _parse(self, key: str) -> keys.ParsedKey:
        """:func:`keys.parse_license_key` against this catalogue and ring, remembered."""
        parsed: keys.ParsedKey | None = self._parsed.get(key) if type(key) is str else None
        if parsed is None or self.ring.get(parsed.kid) is None:
            parsed = keys.parse_license_key(key, self.catalog, self.ring)
            self._parsed.put(key, parsed)
        return parsed

    def key(self, lic: License) -> str:
        """The licence's current key, re-derived from its row."""
        return license_key(lic, self.catalog, self.ring, self.issuer)

    def _load(self, req: LicenseRequest) -> Loaded | dict[str, Any]:
        """The licence a key names, with its seats, or the outcome that stops the request."""
        loaded: Loaded | None = self._loaded.get(req)
        if loaded is not None and loaded.generation == self.ring.generation:
            return loaded
        mark = self._loaded.mark()
        outcome = self._read(req)
        if isinstance(outcome, Loaded):
            self._loaded.put(req, mark, outcome)
        return outcome

    def _read(self, req: LicenseRequest) -> Loaded | dict[str, Any]:
        generation = self.ring.generation
        try:
            parsed = self._parse(req.key)
        except InvalidToken:
            return {"valid": False, "code": INVALID_KEY}
        if req.product is not None and req.product != parsed.product.id:
            return {"valid": False, "code": PRODUCT_MISMATCH}
        machine_hash = keys.machine_hash(req.machine_id) if req.machine_id else None
        lic, seen, used = self.store.license_seats_recent(parsed.claims["sub"], machine_hash)
        if lic is None or lic.product != parsed.product.id:
            return {"valid": False, "code": NOT_FOUND}
        return Loaded(lic, seen, used, parsed, machine_hash, self.issuer, generation)

    def check(self, req: LicenseRequest, now: int) -> dict[str, Any]:
        """Validate (and, with a machine id, activate when a seat is free)."""
        loaded = self._load(req)
        if not isinstance(loaded, Loaded):
            return loaded
        machine_hash = loaded.machine_hash
        code = entitlement(loaded.license, now)
        activated = False
        machines_used = loaded.used
        kid = self.ring.current.kid
        if code in VALID_CODES:
            if loaded.license.key_kid != kid:
                loaded = self._restamped(loaded, now)
            if machine_hash is not None:
                activated, machines_used = self._seat(
                    loaded.license, machine_hash, now, loaded.seen, loaded.used
                )
                if not activated:
                    code = TOO_MANY_MACHINES
        answer: dict[str, Any] = {
            "valid": code in VALID_CODES,
            "code": code,
            "activated": activated,
            "license": loaded.view_with(machines_used),
        }
        if code in VALID_CODES:
            if not loaded.key_is_current:
                answer["key"] = license_key(loaded.license, self.catalog, self.ring, self.issuer)
            if activated:
                answer["lease"] = loaded.lease(self.ring, kid, self.lease_ttl, now)
        return answer

    def _restamped(self, loaded: Loaded, now: int) -> Loaded:
        """The read with its key re-issued by the current signing key, when the database allows."""
        try:
            lic = self._restamp(loaded.license.id, now)
        except StorageUnavailable:
            # The key the row holds still verifies: answer from reads, re-issue later.
            log.warning(
                "key not re-issued: the database cannot be written", extra={"license": loaded.license.id}
            )
            return loaded
        return loaded.with_license(lic) if lic is not None else loaded

    def _restamp(self, license_id: str, now: int) -> License | None:
        """Re-issue a key signed by a retired key, so that key can leave the JWKS."""
        with self.store.atomic():
            lic = self.store.get_license(license_id)
            if lic is not None and lic.key_kid != self.ring.current.kid:
                restamp_key(lic, self.ring, now)
                self.store.save_license(lic, now)
        return lic

    def _seat(
        self, lic: License, machine_hash: str, now: int, seen: int | None, used: int
    ) -> tuple[bool, int]:
        """Take a seat for the machine, or confirm it has one; never over the limit.

        ``seen`` and ``used`` are what the request read; a write re-reads them
        inside its transaction. Returns whether the machine has a seat, and how
        many seats are taken.
        """
        if seen is not None and now - seen < SEEN_WRITE_INTERVAL:
            return True, used
        try:
            with self.store.atomic():
                seen, used = self.store.machine_state(lic.id, machine_hash)
                if seen is not None:
                    self.store.touch_machine(lic.id, machine_hash, now)
                    return True, used
                if used >= lic.max_machines:
                    return False, used
                self.store.add_machine(lic.id, machine_hash, now)
                return True, used + 1
        except StorageUnavailable:
            if seen is None:
                raise  # a new seat needs the write
            # Already seated: only the last-seen stamp is lost, and it can wait.
            return True, used

    def deactivate(self, req: LicenseRequest, now: int) -> dict[str, Any]:
        assert req.machine_id is not None
        loaded = self._load(req)
        if not isinstance(loaded, Loaded):
            return {**loaded, "deactivated": False}
        assert loaded.machine_hash is not None  # a machine id was given
        with self.store.atomic():
            removed = self.store.remove_machine(loaded.license.id, loaded.machine_hash)
        return {
            "valid": entitlement(loaded.license, now) in VALID_CODES,
            "code": DEACTIVATED if removed else MACHINE_NOT_ACTIVATED,
            "deactivated": removed,
            "license": license_view(loaded.license, self.store.count_machines(loaded.license.id)),
        }

    def require_plan(self, plan_id: str) -> Plan:
        plan = self.catalog.plans.get(plan_id)
        if plan is None:
            raise NotFound(f"no plan {plan_id!r}")
        return plan
