"""Support tooling: the admin verbs.

Each verb is one function taking ``services``, the ``actor`` (who acts: the
token's name over HTTP, ``cli:$USER`` from the command line), ``now`` and its
arguments, and returning a JSON-ready dict. The HTTP routes
(:mod:`licensed.routes.admin`) and the ``licensed admin`` sub-commands
(:mod:`licensed.cli`) are thin shells over these functions, so both ways in
behave the same. Every change writes an audit row with the licence as it was
before and after, in the same transaction as the change.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from . import addresses, identities, keys, licensing, outbox, stripe_sync
from .errors import Conflict, InvalidToken, NotFound, ValidationFailed, WebhookFailed
from .plans import MAX_MACHINES, Plan
from .services import Services
from .store import License, Store

ADMIN_ACTOR = "admin-token"
INTERNAL_ACTOR = "internal-api-key"

_MACHINE_HASH = re.compile(r"^[0-9a-fA-F]{64}$")
MAX_DAYS = 36_500
EVENT_STATUSES = ("failed", "ignored", "applied")

# --- views ------------------------------------------------------------------------


def _iso(ts: int | None) -> str | None:
    return licensing.iso(ts)


def license_record(store: Store, lic: License, now: int) -> dict[str, Any]:
    """What support sees of a licence: the public view plus state, owner and Stripe ids.

    Never the key: these records also go into the audit trail and the export.
    """
    customer = store.get_customer(lic.customer_id)
    record = licensing.license_view(lic, store.count_machines(lic.id, lic.seated_since(now)))
    record.update(
        {
            "entitlement": licensing.entitlement(lic, now),
            "license_status": lic.status,
            "status_reason": lic.status_reason,
            "subscription_status": lic.subscription_status,
            "grace_days": lic.grace_days,
            "source": lic.source,
            "customer_id": lic.customer_id,
            "email": customer["email"] if customer else None,
            "name": customer["name"] if customer else None,
            "stripe_customer_id": lic.stripe_customer_id,
            "stripe_subscription_id": lic.stripe_subscription_id,
            "stripe_checkout_session_id": lic.stripe_checkout_session_id,
            "stripe_payment_intent_id": lic.stripe_payment_intent_id,
            "stripe_charge_id": lic.stripe_charge_id,
            "stripe_price_id": lic.stripe_price_id,
            "key_kid": lic.key_kid,
            "key_issued_at": _iso(lic.key_iat),
            "created_at": _iso(lic.created_at),
            "updated_at": _iso(lic.updated_at),
        }
    )
    return record


def _key(services: Services, lic: License) -> str:
    return licensing.license_key(lic, services.catalog, services.ring, services.config.app_base_url)


def _get(store: Store, license_id: str) -> License:
    lic = store.get_license(license_id)
    if lic is None:
        raise NotFound(f"no license {license_id}", code="LICENSE_NOT_FOUND")
    return lic


def parse_time(value: Any, name: str) -> int:
    """Epoch seconds from an integer or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 < value < 1 << 40:
            raise ValidationFailed(f"{name} is out of range")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return parse_time(int(text), name)
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError as err:
            raise ValidationFailed(f"{name} must be epoch seconds or an ISO 8601 date/time") from err
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return int(when.timestamp())
    raise ValidationFailed(f"{name} must be epoch seconds or an ISO 8601 date/time")


def _check_range(value: int | None, name: str, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise ValidationFailed(f"{name} must be {low}..{high}")


# --- read verbs ---------------------------------------------------------------------

FIND_FIELDS = ("q", "email", "key", "license_id", "customer_id", "subscription_id", "session_id")


def _classify(query: str) -> str:
    """Which field a bare search term names, by its shape."""
    if "@" in query:
        return "email"
    for prefix, field in (
        ("lic_", "license_id"),
        ("cus_", "customer_id"),
        ("sub_", "subscription_id"),
        ("cs_", "session_id"),
    ):
        if query.startswith(prefix):
            return field
    return "key"


def find(services: Services, actor: str, now: int, **criteria: str | None) -> dict[str, Any]:
    """Licences matching exactly one criterion (``q`` guesses the field from its shape)."""
    given = {k: v for k, v in criteria.items() if v is not None}
    unknown = sorted(set(given) - set(FIND_FIELDS))
    if unknown:
        raise ValidationFailed(f"cannot search by {unknown[0]}")
    if len(given) != 1:
        raise ValidationFailed(f"give exactly one of {', '.join(FIND_FIELDS)}")
    ((field, value),) = given.items()
    value = value.strip()
    if not value:
        raise ValidationFailed(f"{field} is empty")
    guessed = field == "q"
    if guessed:
        field = _classify(value)
    store = services.store
    found: list[License]
    if field == "email":
        found = store.licenses_by_email(value)
    elif field == "key":
        found = _by_key(services, value)
    elif field == "license_id":
        one = store.get_license(value)
        found = [one] if one else []
    elif field == "customer_id":
        found = store.licenses_where("customer_id", value) or store.licenses_by_stripe_customer(value)
    elif field == "subscription_id":
        found = store.licenses_where("stripe_subscription_id", value)
    else:
        found = store.licenses_where("stripe_checkout_session_id", value)
    if not found and guessed and field != "key":
        # A key sold before licensed may be any text, even shaped like an e-mail or an id.
        imported = _by_imported_key(store, value)
        if imported is not None:
            field, found = "key", imported
    return {"by": field, "count": len(found), "licenses": [license_record(store, x, now) for x in found]}


def _present(lic: License | None) -> list[License]:
    return [lic] if lic is not None else []


def _by_imported_key(store: Store, value: str) -> list[License] | None:
    """The licence of a key imported from the system used before, found by its SHA-256
    (None: no imported key is that string)."""
    license_id = store.imported_key_license(keys.imported_key_hash(value))
    return None if license_id is None else _present(store.get_license(license_id))


def _by_key(services: Services, value: str) -> list[License]:
    """The licence of a signed key, or of a key imported from the system used before
    (found by its SHA-256); a string that is neither is an invalid key."""
    try:
        parsed = keys.parse_license_key(value, services.catalog, services.ring)
    except InvalidToken:
        imported = _by_imported_key(services.store, value)
        if imported is None:
            raise
        return imported
    return _present(services.store.get_license(parsed.claims["sub"]))


def _row(row: Any, times: Iterable[str]) -> dict[str, Any]:
    data = dict(row)
    for name in times:
        if name in data:
            data[name] = _iso(data[name])
    return data


def _audit_entry(row: Any) -> dict[str, Any]:
    entry = _row(row, ("at",))
    for side in ("before", "after"):
        entry[side] = json.loads(entry[side]) if entry[side] is not None else None
    return entry


def show(services: Services, actor: str, now: int, license_id: str) -> dict[str, Any]:
    """One licence with its key, machines, Stripe events, outbox rows and audit trail."""
    store = services.store
    lic = _get(store, license_id)
    return {
        "license": license_record(store, lic, now),
        "key": _key(services, lic),
        "imported_keys": store.imported_key_count(lic.id),
        "machines": [_row(m, ("activated_at", "last_seen_at")) for m in store.machine_rows(lic.id)],
        "stripe_events": [
            _row(e, ("created", "received_at", "processed_at"))
            for e in store.stripe_events_for_license(lic.id)
        ],
        "outbox": [
            _row(o, ("next_attempt_at", "created_at", "sent_at")) for o in store.outbox_for_license(lic.id)
        ],
        "audit": [
            _audit_entry(a)
            for a in store.audit_entries(license_id=lic.id, actor=None, before_id=None, limit=1000)
        ],
    }


def events(
    services: Services, actor: str, now: int, *, status: str = "failed", limit: int = 100
) -> dict[str, Any]:
    """Stripe events in one state (failed by default), newest first."""
    if status not in EVENT_STATUSES:
        raise ValidationFailed(f"status must be one of {', '.join(EVENT_STATUSES)}")
    _check_range(limit, "limit", 1, 1000)
    rows = services.store.stripe_events_with_status(status, limit)
    return {
        "status": status,
        "count": len(rows),
        "events": [_row(e, ("created", "received_at", "processed_at")) for e in rows],
    }


def replay(services: Services, actor: str, now: int, event_id: str) -> dict[str, Any]:
    """Apply a failed or ignored Stripe event again, through the webhook's own code.

    The event is fetched afresh from Stripe when Stripe is configured, else its
    recorded copy is used. Audited; a replay that fails again is a 409.
    """
    if not event_id.startswith("evt_") or len(event_id) > 255:
        raise ValidationFailed("event ids start with evt_")
    try:
        outcome = stripe_sync.EventProcessor(services, services.stripe).replay(event_id, now)
    except WebhookFailed as err:
        raise Conflict(err.message, code="REPLAY_FAILED") from err
    answer = {
        "event_id": event_id,
        "outcome": outcome.status,
        "license_id": outcome.license_id,
        "detail": outcome.detail,
    }
    with services.store.atomic():
        services.store.audit(now, actor, "event.replay", outcome.license_id, None, answer)
    return answer


def stats(services: Services, actor: str, now: int) -> dict[str, Any]:
    """Licences by plan and entitlement state, today's Stripe events, the mail backlog."""
    store = services.store
    by_plan: Counter[str] = Counter()
    by_state: Counter[str] = Counter()
    for lic in store.iter_licenses():
        by_plan[lic.plan] += 1
        by_state[licensing.entitlement(lic, now)] += 1
    day_start = now - now % 86400
    today = store.event_counts_since(day_start)
    return {
        "at": _iso(now),
        "licenses": {
            "total": sum(by_plan.values()),
            "by_plan": dict(sorted(by_plan.items())),
            "by_state": dict(sorted(by_state.items())),
        },
        "machines": store.machine_total(),
        "stripe_events_today": {
            "since": _iso(day_start),
            "total": sum(today.values()),
            "by_status": dict(sorted(today.items())),
        },
        "outbox": dict(sorted(store.outbox_counts().items())),
        "unmapped_purchases": unmapped_purchases(store),
    }


def unmapped_purchases(store: Store) -> dict[str, Any]:
    """Paid checkouts that made no licence because their price maps to no plan."""
    count, newest = store.unmapped_purchases()
    return {"count": count, "newest_events": newest}


def unmapped_purchases_warning(store: Store) -> str | None:
    """The one line /health shows while buyers have paid and got nothing."""
    count, newest = store.unmapped_purchases(1)
    if not count:
        return None
    return (
        f"{count} paid checkout(s) map to no plan (newest {newest[0]}): add the price to the plans file,"
        " then replay the events (GET /api/admin/events?status=ignored)"
    )


def audit_trail(
    services: Services,
    actor: str,
    now: int,
    *,
    license_id: str | None = None,
    by: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """Audit entries, newest first; ``before_id`` pages backwards."""
    _check_range(limit, "limit", 1, 1000)
    rows = services.store.audit_entries(license_id=license_id, actor=by, before_id=before_id, limit=limit)
    entries = [_audit_entry(r) for r in rows]
    return {"count": len(entries), "entries": entries}


# --- changes --------------------------------------------------------------------------


def _change(
    services: Services,
    actor: str,
    now: int,
    license_id: str,
    action: str,
    mutate: Callable[[License], dict[str, Any] | None],
) -> dict[str, Any]:
    """Load, change, save and audit one licence in one transaction."""
    store = services.store
    with store.atomic():
        lic = _get(store, license_id)
        before = license_record(store, lic, now)
        extra = mutate(lic) or {}
        store.save_license(lic, now)
        after = license_record(store, lic, now)
        store.audit(now, actor, action, lic.id, before, after)
    return {"license": after, **extra}


def _plan_for(services: Services, plan: str | None, product: str | None, tier: str | None) -> Plan:
    if plan is not None:
        if product is not None or tier is not None:
            raise ValidationFailed("give plan, or product and tier, not both")
        return services.licensing.require_plan(plan)
    if product is None or tier is None:
        raise ValidationFailed("give plan, or product and tier")
    found = services.catalog.plan_for_tier(product, tier)
    if found is None:
        raise NotFound(f"no plan for product {product!r} tier {tier!r}")
    return found


def _issue(
    services: Services,
    actor: str,
    now: int,
    plan: Plan,
    *,
    email: str,
    days: int | None,
    expires_at: Any,
    lifetime: bool | None,
    max_machines: int | None,
    send_email: bool,
    source: str,
) -> tuple[License, int | None]:
    email = addresses.check_address(email)
    _check_range(days, "days", 1, MAX_DAYS)
    _check_range(max_machines, "max_machines", 1, MAX_MACHINES)
    until = None if expires_at is None else parse_time(expires_at, "expires_at")
    if until is not None and until <= now:
        raise ValidationFailed("expires_at must be in the future")
    store = services.store
    with store.atomic():
        lic = licensing.issue_license(
            store,
            services.ring,
            plan,
            email=email,
            now=now,
            actor=actor,
            days=days,
            lifetime=lifetime or None,
            expires_at=until,
            max_machines=max_machines,
            source=source,
        )
        mail_id = None
        if send_email:
            mail_id = outbox.queue_mail(store, lic.id, outbox.KIND_LICENSE_KEY, email, None, now)
    return lic, mail_id


def issue(
    services: Services,
    actor: str,
    now: int,
    *,
    email: str,
    plan: str,
    days: int | None = None,
    expires_at: Any = None,
    lifetime: bool | None = None,
    max_machines: int | None = None,
    send_email: bool = False,
) -> dict[str, Any]:
    """Issue a licence of any plan, public or not (lifetime licences included)."""
    chosen = services.licensing.require_plan(plan)
    lic, mail_id = _issue(
        services,
        actor,
        now,
        chosen,
        email=email,
        days=days,
        expires_at=expires_at,
        lifetime=lifetime,
        max_machines=max_machines,
        send_email=send_email,
        source="admin",
    )
    answer: dict[str, Any] = {"license": license_record(services.store, lic, now), "key": _key(services, lic)}
    if mail_id is not None:
        answer["mail_id"] = mail_id
    return answer


def generate(
    services: Services,
    actor: str,
    now: int,
    *,
    email: str,
    plan: str | None = None,
    product: str | None = None,
    tier: str | None = None,
    expires_at: Any = None,
    max_machines: int | None = None,
    send_email: bool = False,
) -> dict[str, Any]:
    """``POST /api/licenses/generate``: a licence for another service, key included."""
    chosen = _plan_for(services, plan, product, tier)
    lic, _mail_id = _issue(
        services,
        actor,
        now,
        chosen,
        email=email,
        days=None,
        expires_at=expires_at,
        lifetime=None,
        max_machines=max_machines,
        send_email=send_email,
        source="internal",
    )
    view = licensing.license_view(lic, 0)
    view["key"] = _key(services, lic)
    return {"license": view}


def extend(
    services: Services,
    actor: str,
    now: int,
    license_id: str,
    *,
    days: int | None = None,
    paid_through: Any = None,
) -> dict[str, Any]:
    """Move ``paid_through``: by ``days`` from the later of now and its current end, or to a date.

    The key is re-stamped, so the client receives its new key at the next validation.
    """
    if (days is None) == (paid_through is None):
        raise ValidationFailed("give days or paid_through")
    _check_range(days, "days", 1, MAX_DAYS)
    until = None if paid_through is None else parse_time(paid_through, "paid_through")
    if until is not None and until <= now:
        raise ValidationFailed("paid_through must be in the future")

    def mutate(lic: License) -> dict[str, Any]:
        if lic.lifetime:
            raise Conflict("a lifetime license does not expire")
        if days is not None:
            lic.paid_through = max(lic.paid_through or now, now) + days * 86400
        else:
            lic.paid_through = until
        licensing.restamp_key(lic, services.ring, now)
        return {"key": _key(services, lic)}

    return _change(services, actor, now, license_id, "license.extend", mutate)


def _set_status(to: str, reason: str | None, allowed_from: tuple[str, ...]) -> Callable[[License], None]:
    def mutate(lic: License) -> None:
        if lic.status not in allowed_from:
            raise Conflict(f"license {lic.id} is {lic.status}", code="WRONG_STATE")
        lic.status = to
        lic.status_reason = reason

    return mutate


def suspend(services: Services, actor: str, now: int, license_id: str) -> dict[str, Any]:
    """Stop a licence until reinstated (status ``suspended``, reason ``admin``)."""
    mutate = _set_status("suspended", "admin", ("active",))
    return _change(services, actor, now, license_id, "license.suspend", mutate)


def reinstate(services: Services, actor: str, now: int, license_id: str) -> dict[str, Any]:
    """Undo a suspension or revocation, whoever made it (admin, dispute, refund)."""
    mutate = _set_status("active", None, ("suspended", "revoked"))
    return _change(services, actor, now, license_id, "license.reinstate", mutate)


def revoke(services: Services, actor: str, now: int, license_id: str) -> dict[str, Any]:
    """End a licence for good (until an admin reinstates it)."""
    mutate = _set_status("revoked", "admin", ("active", "suspended"))
    return _change(services, actor, now, license_id, "license.revoke", mutate)


def reset_machines(services: Services, actor: str, now: int, license_id: str) -> dict[str, Any]:
    """Free every seat: each installation re-activates at its next validation."""
    store = services.store

    def mutate(lic: License) -> dict[str, Any]:
        return {"removed": store.remove_all_machines(lic.id)}

    return _change(services, actor, now, license_id, "license.reset_machines", mutate)


def remove_machine(
    services: Services,
    actor: str,
    now: int,
    license_id: str,
    *,
    machine_id: str | None = None,
    machine_hash: str | None = None,
) -> dict[str, Any]:
    """Free one seat, named by the machine id the client sent or by its SHA-256."""
    if (machine_id is None) == (machine_hash is None):
        raise ValidationFailed("give machine_id or machine_hash")
    if machine_hash is not None and not _MACHINE_HASH.match(machine_hash):
        raise ValidationFailed("machine_hash must be 64 hex digits")
    hashes = licensing.machine_hashes(machine_id) if machine_id is not None else (str(machine_hash).lower(),)
    store = services.store

    def mutate(lic: License) -> dict[str, Any]:
        if not store.remove_machine(lic.id, hashes):
            raise NotFound(f"machine {hashes[0]} is not activated on {lic.id}", code="MACHINE_NOT_FOUND")
        return {"removed": hashes[0]}

    return _change(services, actor, now, license_id, "license.remove_machine", mutate)


def resend(services: Services, actor: str, now: int, license_id: str) -> dict[str, Any]:
    """Queue the licence key mail again ("sent again", not "thank you for buying"), to the
    customer's address on file."""
    store = services.store

    def mutate(lic: License) -> dict[str, Any]:
        customer = store.get_customer(lic.customer_id)
        if customer is None or not customer["email"]:
            raise Conflict(f"license {lic.id} has no e-mail address on file", code="NO_EMAIL")
        mail_id = outbox.queue_mail(
            store, lic.id, outbox.KIND_LICENSE_KEY_RESEND, customer["email"], customer["name"], now
        )
        return {"mail": {"id": mail_id, "to": customer["email"]}}

    return _change(services, actor, now, license_id, "license.resend", mutate)


def link_identity(services: Services, actor: str, now: int, *, sub: str, email: str) -> dict[str, Any]:
    """Link a signed-in user (the identity provider's ``sub``) to the customers with ``email``.

    For users whose access tokens carry no e-mail (Logto's default): once
    linked, their licences show in ``/api/subscriptions/status`` and the
    billing portal opens for them. Customers another user owns are left alone.
    """
    sub = sub.strip()
    if not 0 < len(sub) <= 255:
        raise ValidationFailed("sub must be 1..255 characters")
    email = addresses.check_address(email)
    store = services.store
    with store.atomic():
        candidates = store.unlinked_customer_ids_by_email(email)
        if not candidates and not store.licenses_by_email(email):
            raise NotFound(f"no customer with the e-mail {email}", code="CUSTOMER_NOT_FOUND")
        linked = [c for c in candidates if identities.link_customer(store, c, sub, now, via=f"admin:{actor}")]
        owned = store.customer_ids_for_sub(sub)
        licenses = store.licenses_of_customers(owned)
    return {"sub": sub, "email": email, "linked": linked, "licenses": [x.id for x in licenses]}
