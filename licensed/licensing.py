"""Entitlement: what a licence allows now, and the validate/activate/deactivate flows.

Everything here takes ``now`` (epoch seconds) from the caller, so tests freeze
time at the exact paid-through, grace and expiry boundaries.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

from . import addresses, keys, outbox
from .errors import InvalidToken, NotFound, StorageUnavailable, ValidationFailed
from .keys import KeyRing
from .plans import Catalog, Plan
from .store import License, Store, new_id

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


def iso(ts: int | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC."""
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
        release_after_days=plan.release_after_days,
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
    email = addresses.check_address(email)
    name = addresses.check_display_name(name)
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
            outbox.queue_mail(store, lic.id, outbox.KIND_LICENSE_KEY, email, name, now)
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


def canonical_machine_id(machine_id: str) -> str:
    """Surrounding white space trimmed, NFC: ``"host-A "`` and ``"host-A"`` are one machine."""
    canonical = unicodedata.normalize("NFC", machine_id.strip())
    if not canonical:
        raise ValidationFailed("machine_id is blank")
    return canonical


def machine_hashes(machine_id: str) -> tuple[str, ...]:
    """The hash a machine is stored under, then (for a machine id that was not canonical)
    the hash of the id as given, which rows written before ids were canonical hold."""
    canonical = keys.machine_hash(canonical_machine_id(machine_id))
    raw = keys.machine_hash(machine_id)
    return (canonical,) if raw == canonical else (canonical, raw)


@dataclass(frozen=True)
class LicenseRequest:
    """What a licence route was asked."""

    key: str
    machine_id: str | None = None
    product: str | None = None
    label: str | None = None
    """What the installation calls its machine (e.g. the host name), shown to the customer."""
    machine: str | None = None
    """A machine's public id (from the machines list), naming a machine other than the caller's."""

    @classmethod
    def from_body(cls, body: dict[str, Any], machine_required: bool) -> LicenseRequest:
        """The request from a body the route's schema passed (types, lengths, and the
        machine id's :data:`MACHINE_ID_PATTERN`)."""
        machine_id = body.get("machine_id")
        if machine_required and machine_id is None:
            raise ValidationFailed("machine_id is required")
        label = body.get("label")
        return cls(
            key=body["key"],
            machine_id=machine_id,
            product=body.get("product"),
            label=label.strip() or None if isinstance(label, str) else None,
            machine=body.get("machine"),
        )


class Licensing:
    """The licence routes' logic over one store, key ring and catalogue.

    A request is parsed, read in one statement (the licence, this machine's
    seat, the seats taken), judged by :func:`entitlement`, and writes at most
    once: a new seat, or a seat's hourly last-seen stamp.
    """

    def __init__(
        self, store: Store, ring: KeyRing, catalog: Catalog, issuer: str, lease_ttl_hours: int
    ) -> None:
        self.store = store
        self.ring = ring
        self.catalog = catalog
        self.issuer = issuer
        self.lease_ttl = lease_ttl_hours * 3600

    def key(self, lic: License) -> str:
        """The licence's current key, re-derived from its row."""
        return license_key(lic, self.catalog, self.ring, self.issuer)

    def _read(
        self, req: LicenseRequest, now: int
    ) -> tuple[License, keys.ParsedKey | None, Seat | None, int] | dict[str, Any]:
        """The licence a key names, the machine's seat and the seats taken, or the outcome
        that stops the request.

        The parsed key is None for a key imported from the system used before
        (``licensed admin import``), found by its SHA-256 instead of a signature.
        """
        parsed: keys.ParsedKey | None
        try:
            parsed = keys.parse_license_key(req.key, self.catalog, self.ring)
        except InvalidToken:
            parsed = None
        if parsed is not None:
            license_id = parsed.claims["sub"]
            if req.product is not None and req.product != parsed.product.id:
                return {"valid": False, "code": PRODUCT_MISMATCH}
        else:
            imported = self.store.imported_key_license(keys.imported_key_hash(req.key))
            if imported is None:
                return {"valid": False, "code": INVALID_KEY}
            license_id = imported
        hashes = machine_hashes(req.machine_id) if req.machine_id is not None else ()
        lic, seen_hash, seen_at, used = self.store.license_seats(license_id, hashes, now)
        if lic is None or (parsed is not None and lic.product != parsed.product.id):
            return {"valid": False, "code": NOT_FOUND}
        if parsed is None and req.product is not None and req.product != lic.product:
            return {"valid": False, "code": PRODUCT_MISMATCH}
        seat = Seat(hashes[0], seen_hash, seen_at) if hashes else None
        return lic, parsed, seat, used

    def check(self, req: LicenseRequest, now: int) -> dict[str, Any]:
        """Validate (and, with a machine id, activate when a seat is free)."""
        read = self._read(req, now)
        if isinstance(read, dict):
            return read
        lic, parsed, seat, used = read
        code = entitlement(lic, now)
        activated = False
        if code in VALID_CODES:
            if lic.key_kid != self.ring.current.kid:
                lic = self._restamped(lic, now)
            if seat is not None:
                activated, used = self._seat(lic, seat, used, now, req.label)
                if not activated:
                    code = TOO_MANY_MACHINES
        answer: dict[str, Any] = {
            "valid": code in VALID_CODES,
            "code": code,
            "activated": activated,
            "license": license_view(lic, used),
        }
        if code in VALID_CODES:
            # Signing is deterministic and only this server signs: a verified key with
            # the row's claims and kid is the current key, so it is re-derived only
            # when the entitlement has moved on (renewal, upgrade, rotation). An imported
            # key always gets the signed one: the client stores it and verifies offline.
            if parsed is None or parsed.kid != lic.key_kid or parsed.claims != key_claims(lic, self.issuer):
                answer["key"] = self.key(lic)
            if activated and seat is not None:
                answer["lease"] = lease(lic, seat.machine_hash, self.ring, self.issuer, self.lease_ttl, now)
        return answer

    def _restamped(self, lic: License, now: int) -> License:
        """The licence with its key re-issued by the current signing key, when the database allows."""
        try:
            with self.store.atomic():
                fresh = self.store.get_license(lic.id)
                if fresh is None:
                    return lic
                if fresh.key_kid != self.ring.current.kid:
                    restamp_key(fresh, self.ring, now)
                    self.store.save_license(fresh, now)
                return fresh
        except StorageUnavailable:
            # The key the row holds still verifies: answer from reads, re-issue later.
            log.warning("key not re-issued: the database cannot be written", extra={"license": lic.id})
            return lic

    def _seat(self, lic: License, seat: Seat, used: int, now: int, label: str | None) -> tuple[bool, int]:
        """Take a seat for the machine, or confirm it has one; never over the limit.

        ``used``: the seats taken as read with ``seat``. Returns whether the
        machine has a seat, and how many seats are taken. A
        write re-reads the seats inside its transaction (``BEGIN IMMEDIATE``
        serialises writers), so concurrent activations never exceed the limit.
        A seat is stamped seen at most hourly, its label with it; machines not
        seen for the plan's ``release_after_days`` are released before a new
        seat is counted.
        """
        if (
            seat.seen_at is not None
            and seat.seen_hash == seat.machine_hash
            and now - seat.seen_at < SEEN_WRITE_INTERVAL
        ):
            return True, used
        if seat.seen_at is not None:
            stamped = self._stamp(lic, seat, used, now, label)
            if stamped is not None:
                return True, stamped
        try:
            with self.store.atomic():
                seated_since = lic.seated_since(now)
                seen_hash, taken = self.store.machine_state(lic.id, seat.hashes(), seated_since)
                if seen_hash is not None:
                    self.store.touch_machine(lic.id, seen_hash, seat.machine_hash, now, label)
                    return True, taken
                if taken >= lic.max_machines:
                    return False, taken
                if seated_since:
                    self.store.release_stale_machines(lic.id, seated_since)
                self.store.add_machine(lic.id, seat.machine_hash, now, label)
                return True, taken + 1
        except StorageUnavailable:
            if seat.seen_at is None:
                raise  # a new seat needs the write
            # Already seated: only the last-seen stamp is lost, and it can wait.
            return True, used

    def _stamp(self, lic: License, seat: Seat, used: int, now: int, label: str | None) -> int | None:
        """Stamp the seat the machine holds; the seats taken, or None if it holds none now.

        Installations validating every few hours each write this stamp, so it is
        committed without waiting for the disk: a power cut may take it back to
        its previous value, and the machine's next validation writes it again.
        A store that cannot write loses only the stamp (``used`` is answered).
        """
        try:
            with self.store.atomic(durable=False):
                seen_hash, taken = self.store.machine_state(lic.id, seat.hashes(), lic.seated_since(now))
                if seen_hash is None:
                    return None  # released or removed since the read: taken again, durably
                self.store.touch_machine(lic.id, seen_hash, seat.machine_hash, now, label)
                return taken
        except StorageUnavailable:
            return used

    def deactivate(self, req: LicenseRequest, now: int) -> dict[str, Any]:
        """Free a seat: the caller's machine (``machine_id``), or another one named by its
        public id (``machine``, from :meth:`machines`), e.g. a server that died."""
        read = self._read(req, now)
        if isinstance(read, dict):
            return {**read, "deactivated": False}
        lic, parsed, seat, _ = read
        with self.store.atomic():
            if seat is not None:
                removed = self.store.remove_machine(lic.id, seat.hashes())
            elif req.machine is not None:
                removed = self.store.remove_machine_by_public_id(lic.id, req.machine)
            else:
                raise ValidationFailed("give machine_id or machine")
            used = self.store.count_machines(lic.id, lic.seated_since(now))
        answer: dict[str, Any] = {
            "valid": entitlement(lic, now) in VALID_CODES,
            "code": DEACTIVATED if removed else MACHINE_NOT_ACTIVATED,
            "deactivated": removed,
            "license": license_view(lic, used),
        }
        if parsed is None and answer["valid"]:
            answer["key"] = self.key(lic)  # an imported key: hand over the signed one
        return answer

    def machines(self, req: LicenseRequest, now: int) -> dict[str, Any]:
        """The machines holding the licence's seats, as its customer may see them."""
        read = self._read(req, now)
        if isinstance(read, dict):
            return {**read, "machines": []}
        lic = read[0]
        code = entitlement(lic, now)
        return {"valid": code in VALID_CODES, "code": code, "machines": machine_views(self.store, lic, now)}

    def require_plan(self, plan_id: str) -> Plan:
        plan = self.catalog.plans.get(plan_id)
        if plan is None:
            raise NotFound(f"no plan {plan_id!r}")
        return plan


def machine_views(store: Store, lic: License, now: int) -> list[dict[str, Any]]:
    """The machines holding seats: public id, label, when activated and last seen."""
    return [
        {
            "id": row["public_id"],
            "label": row["label"],
            "activated_at": iso(int(row["activated_at"])),
            "last_seen_at": iso(int(row["last_seen_at"])),
        }
        for row in store.machines_of(lic.id, lic.seated_since(now))
    ]


def release_machine(store: Store, lic: License, public_id: str, now: int, actor: str) -> bool:
    """Free one seat by the machine's public id (the account page's Release button); audited."""
    with store.atomic():
        removed = store.remove_machine_by_public_id(lic.id, public_id)
        if removed:
            store.audit(now, actor, "license.release_machine", lic.id, None, {"machine": public_id})
    return removed


@dataclass(frozen=True)
class Seat:
    """A machine named by a request, as read: its hash, and the seat it holds (if any)."""

    machine_hash: str
    """The canonical machine id's hash: what a new seat is stored under."""
    seen_hash: str | None
    """The hash of the row that seats it (the canonical one, or an older spelling's)."""
    seen_at: int | None

    def hashes(self) -> tuple[str, ...]:
        """The hashes this machine's row may carry."""
        if self.seen_hash is None or self.seen_hash == self.machine_hash:
            return (self.machine_hash,)
        return (self.machine_hash, self.seen_hash)
