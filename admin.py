"""Support tooling: the admin verbs, their HTTP routes and their command line.

Each verb is one function taking ``services``, the ``actor`` (who acts: the
token's name over HTTP, ``cli:$USER`` from the command line), ``now`` and its
arguments, and returning a JSON-ready dict. The HTTP routes and the
``licensed admin`` sub-commands are thin shells over these functions, so both
ways in behave the same. Every change writes an audit row with the licence as
it was before and after, in the same transaction as the change.

Also here: ``POST /api/licenses/generate`` (other services issuing licences
with ``INTERNAL_API_KEY``) and ``GET /api/admin/debug/store``, a streamed
export of the database without keys, secrets or raw machine ids.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import hmac
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

import keys
import licensing
import openapi
import stripe_sync
from errors import Conflict, Forbidden, NotFound, Unauthorized, ValidationFailed
from plans import Plan
from services import Services
from store import License, Store
from web import Request, Response, Route

ADMIN_ACTOR = "admin-token"
INTERNAL_ACTOR = "internal-api-key"

EMAIL_PATTERN = r"^[^@\s<>\"',;]{1,64}@[^@\s<>\"',;]{1,255}\.[^@\s<>\"',;]{2,63}$"
_EMAIL = re.compile(EMAIL_PATTERN)
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
    record = licensing.license_view(lic, store.count_machines(lic.id))
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


def _check_email(email: str) -> str:
    if not _EMAIL.match(email):
        raise ValidationFailed(f"{email!r} is not an e-mail address")
    return email


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
    if field == "q":
        field = _classify(value)
    store = services.store
    found: list[License]
    if field == "email":
        found = store.licenses_by_email(value)
    elif field == "key":
        parsed = keys.parse_license_key(value, services.catalog, services.ring)
        one = store.get_license(parsed.claims["sub"])
        found = [one] if one else []
    elif field == "license_id":
        one = store.get_license(value)
        found = [one] if one else []
    elif field == "customer_id":
        found = store.licenses_where("customer_id", value) or store.licenses_by_stripe_customer(value)
    elif field == "subscription_id":
        found = store.licenses_where("stripe_subscription_id", value)
    else:
        found = store.licenses_where("stripe_checkout_session_id", value)
    return {"by": field, "count": len(found), "licenses": [license_record(store, x, now) for x in found]}


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
    config = services.config
    gateway = (
        stripe_sync.StripeGateway(config.stripe_secret_key, config.stripe_api_base)
        if config.stripe_secret_key
        else None
    )
    try:
        outcome = stripe_sync.EventProcessor(services, gateway).replay(event_id, now)
    except stripe_sync.WebhookFailed as err:
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
    _check_email(email)
    _check_range(days, "days", 1, MAX_DAYS)
    _check_range(max_machines, "max_machines", 1, 10_000)
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
        mail_id = store.enqueue_mail(lic.id, "license_key", email, None, now) if send_email else None
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
    wanted = keys.machine_hash(machine_id) if machine_id is not None else str(machine_hash).lower()
    store = services.store

    def mutate(lic: License) -> dict[str, Any]:
        if not store.remove_machine(lic.id, wanted):
            raise NotFound(f"machine {wanted} is not activated on {lic.id}", code="MACHINE_NOT_FOUND")
        return {"removed": wanted}

    return _change(services, actor, now, license_id, "license.remove_machine", mutate)


def resend(services: Services, actor: str, now: int, license_id: str) -> dict[str, Any]:
    """Queue the licence key mail again, to the customer's address on file."""
    store = services.store

    def mutate(lic: License) -> dict[str, Any]:
        customer = store.get_customer(lic.customer_id)
        if customer is None or not customer["email"]:
            raise Conflict(f"license {lic.id} has no e-mail address on file", code="NO_EMAIL")
        mail_id = store.enqueue_mail(lic.id, "license_key", customer["email"], customer["name"], now)
        return {"mail": {"id": mail_id, "to": customer["email"]}}

    return _change(services, actor, now, license_id, "license.resend", mutate)


# --- the debug export -------------------------------------------------------------------

EXPORT_TABLES: dict[str, tuple[str, ...]] = {
    "schema_migrations": ("version", "name", "applied_at"),
    "settings": ("key", "updated_at"),
    "customers": ("id", "email", "name", "stripe_customer_id", "oidc_sub", "created_at", "updated_at"),
    "licenses": (
        "id",
        "customer_id",
        "product",
        "plan",
        "tier",
        "features",
        "max_machines",
        "status",
        "status_reason",
        "paid_through",
        "grace_days",
        "lifetime",
        "subscription_status",
        "cancel_at_period_end",
        "source",
        "stripe_customer_id",
        "stripe_subscription_id",
        "stripe_checkout_session_id",
        "stripe_payment_intent_id",
        "stripe_charge_id",
        "stripe_price_id",
        "stripe_state_at",
        "key_kid",
        "key_iat",
        "created_at",
        "updated_at",
    ),
    "machines": ("id", "license_id", "machine_hash", "activated_at", "last_seen_at"),
    "stripe_events": (
        "id",
        "type",
        "created",
        "status",
        "attempts",
        "error",
        "license_id",
        "payload",
        "received_at",
        "processed_at",
    ),
    "outbox": (
        "id",
        "license_id",
        "kind",
        "to_addr",
        "to_name",
        "status",
        "attempts",
        "next_attempt_at",
        "claimed_until",
        "last_error",
        "message_id",
        "created_at",
        "sent_at",
    ),
    "audit_log": ("id", "at", "actor", "action", "license_id", "before", "after"),
}
"""Exported columns per table. Setting values are left out (they may hold secrets);
tables not named here (added later) are only counted."""

JSON_COLUMNS = {("stripe_events", "payload"), ("audit_log", "before"), ("audit_log", "after")}
REDACTED = "[redacted]"
_SECRET_NAME = re.compile(r"secret|password|passwd|token|api_?key|private|seed|signature", re.IGNORECASE)
_KEY_LIKE = re.compile(r"(?:^[A-Z0-9]{1,16}-[A-Z0-9]{1,16}-)?eyJ[\w-]*\.[\w-]*\.[\w-]*|^(?:sk|rk|whsec)_\w+")


def scrub(value: Any) -> Any:
    """Drop anything secret-looking: fields named like secrets, strings shaped like keys or JWTs."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_NAME.search(str(k)) else scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str) and _KEY_LIKE.search(value):
        return REDACTED
    return value


def _export_row(table: str, row: dict[str, Any]) -> dict[str, Any]:
    for column, value in row.items():
        if (table, column) in JSON_COLUMNS and isinstance(value, str):
            try:
                row[column] = json.loads(value)
            except ValueError:
                row[column] = REDACTED
    return {k: scrub(v) for k, v in row.items()}


class Export:
    """The database as one JSON document, produced in chunks from one consistent snapshot.

    A WSGI body: the snapshot is opened here, so a database that cannot be read
    still gets a JSON error answer; ``close()`` (called by the server, even for
    a client that went away) releases it.
    """

    def __init__(self, services: Services, actor: str, now: int, chunk_rows: int = 200) -> None:
        self._stack = ExitStack()
        self._snap = self._stack.enter_context(services.store.snapshot())
        self._chunks = self._generate(actor, now, chunk_rows)

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        self._chunks.close()
        self._stack.close()

    def _generate(self, actor: str, now: int, chunk_rows: int) -> Generator[bytes, None, None]:
        snap = self._snap
        present = snap.tables()
        head = {"exported_at": _iso(now), "exported_by": actor}
        yield json.dumps(head)[:-1].encode() + b',"tables":{'
        first_table = True
        for table, columns in EXPORT_TABLES.items():
            if table not in present:
                continue
            yield (b"" if first_table else b",") + json.dumps(table).encode() + b":["
            first_table = False
            batch: list[str] = []
            first_row = True
            for row in snap.rows(table, columns):
                batch.append(json.dumps(_export_row(table, row), separators=(",", ":")))
                if len(batch) >= chunk_rows:
                    yield (b"" if first_row else b",") + ",".join(batch).encode()
                    first_row, batch = False, []
            if batch:
                yield (b"" if first_row else b",") + ",".join(batch).encode()
            yield b"]"
        others = {t: snap.count(t) for t in present if t not in EXPORT_TABLES}
        yield b'},"not_exported":' + json.dumps(others).encode() + b"}"
        self._stack.close()


def export(services: Services, actor: str, now: int, chunk_rows: int = 200) -> Export:
    """Export the store (a bulk read of personal data, so it goes on record too)."""
    with services.store.atomic():
        services.store.audit(now, actor, "store.export", None)
    return Export(services, actor, now, chunk_rows)


# --- HTTP -------------------------------------------------------------------------------------


def bearer_guard(
    token_of: Callable[[], str | None], disabled_code: str, setting: str
) -> Callable[[Request], None]:
    """A route guard: 403 while ``setting`` is unset, 401 unless the bearer token equals it."""

    def guard(request: Request) -> None:
        expected = token_of()
        if not expected:
            raise Forbidden(f"this route is off: {setting} is not set", code=disabled_code)
        given = request.bearer()
        if given is None or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
            raise Unauthorized()

    return guard


_INT = {"type": "integer"}
_TIME: openapi.Schema = {
    "type": ["string", "integer"],
    "description": "epoch seconds or ISO 8601 (UTC unless an offset is given)",
}
_EMAIL_FIELD = openapi.string(3, 320, pattern=EMAIL_PATTERN)
ISSUE_BODY = openapi.obj(
    {
        "email": _EMAIL_FIELD,
        "plan": openapi.string(1, 64),
        "days": {**_INT, "minimum": 1, "maximum": MAX_DAYS},
        "expires_at": _TIME,
        "lifetime": {"type": "boolean"},
        "max_machines": {**_INT, "minimum": 1, "maximum": 10_000},
        "send_email": {"type": "boolean"},
    },
    required=["email", "plan"],
)
GENERATE_BODY = openapi.obj(
    {
        "email": _EMAIL_FIELD,
        "plan": openapi.string(1, 64),
        "product": openapi.string(1, 64),
        "tier": openapi.string(1, 16),
        "expires_at": _TIME,
        "max_machines": {**_INT, "minimum": 1, "maximum": 10_000},
        "send_email": {"type": "boolean"},
    },
    required=["email"],
)
EXTEND_BODY = openapi.obj({"days": {**_INT, "minimum": 1, "maximum": MAX_DAYS}, "paid_through": _TIME})
REMOVE_MACHINE_BODY = openapi.obj(
    {
        "machine_id": openapi.string(1, 256),
        "machine_hash": openapi.string(64, 64, pattern="^[0-9a-fA-F]{64}$"),
    }
)
GENERATE_ANSWER: openapi.Schema = {
    "type": "object",
    "required": ["license"],
    "properties": {"license": {"type": "object", "required": ["id", "key"]}},
}


def _query_int(query: dict[str, str], name: str, default: int | None) -> int | None:
    if name not in query:
        return default
    try:
        return int(query[name])
    except ValueError as err:
        raise ValidationFailed(f"{name} must be an integer") from err


def _only(query: dict[str, str], allowed: Iterable[str]) -> dict[str, str]:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ValidationFailed(f"unknown query parameter {unknown[0]}")
    return query


class AdminApi:
    """The HTTP shell: each handler unpacks the request and calls one verb."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def _now(self) -> int:
        return self.services.now()

    def find(self, request: Request) -> Response:
        query = _only(request.query, FIND_FIELDS)
        return Response(find(self.services, ADMIN_ACTOR, self._now(), **query))

    def show(self, request: Request) -> Response:
        return Response(show(self.services, ADMIN_ACTOR, self._now(), request.params["license_id"]))

    def issue(self, request: Request) -> Response:
        body = request.parsed
        answer = issue(
            self.services,
            ADMIN_ACTOR,
            self._now(),
            email=body["email"],
            plan=body["plan"],
            days=body.get("days"),
            expires_at=body.get("expires_at"),
            lifetime=body.get("lifetime"),
            max_machines=body.get("max_machines"),
            send_email=bool(body.get("send_email")),
        )
        return Response(answer, status=201)

    def extend(self, request: Request) -> Response:
        body = request.parsed
        return Response(
            extend(
                self.services,
                ADMIN_ACTOR,
                self._now(),
                request.params["license_id"],
                days=body.get("days"),
                paid_through=body.get("paid_through"),
            )
        )

    def remove_machine(self, request: Request) -> Response:
        body = request.parsed
        return Response(
            remove_machine(
                self.services,
                ADMIN_ACTOR,
                self._now(),
                request.params["license_id"],
                machine_id=body.get("machine_id"),
                machine_hash=body.get("machine_hash"),
            )
        )

    def simple(
        self, verb: Callable[[Services, str, int, str], dict[str, Any]]
    ) -> Callable[[Request], Response]:
        def handler(request: Request) -> Response:
            return Response(verb(self.services, ADMIN_ACTOR, self._now(), request.params["license_id"]))

        return handler

    def events(self, request: Request) -> Response:
        query = _only(request.query, ("status", "limit"))
        limit = _query_int(query, "limit", 100)
        assert limit is not None
        return Response(
            events(self.services, ADMIN_ACTOR, self._now(), status=query.get("status", "failed"), limit=limit)
        )

    def replay(self, request: Request) -> Response:
        return Response(replay(self.services, ADMIN_ACTOR, self._now(), request.params["event_id"]))

    def stats(self, request: Request) -> Response:
        _only(request.query, ())
        return Response(stats(self.services, ADMIN_ACTOR, self._now()))

    def audit(self, request: Request) -> Response:
        query = _only(request.query, ("license_id", "actor", "before_id", "limit"))
        limit = _query_int(query, "limit", 100)
        assert limit is not None
        return Response(
            audit_trail(
                self.services,
                ADMIN_ACTOR,
                self._now(),
                license_id=query.get("license_id"),
                by=query.get("actor"),
                before_id=_query_int(query, "before_id", None),
                limit=limit,
            )
        )

    def debug_store(self, request: Request) -> Response:
        _only(request.query, ())
        return Response(stream=export(self.services, ADMIN_ACTOR, self._now()))

    def generate(self, request: Request) -> Response:
        body = request.parsed
        answer = generate(
            self.services,
            INTERNAL_ACTOR,
            self._now(),
            email=body["email"],
            plan=body.get("plan"),
            product=body.get("product"),
            tier=body.get("tier"),
            expires_at=body.get("expires_at"),
            max_machines=body.get("max_machines"),
            send_email=bool(body.get("send_email")),
        )
        return Response(answer, status=201)


def routes(services: Services) -> list[Route]:
    """The admin and internal routes, for the app's routing table."""
    api = AdminApi(services)
    admin_guard = bearer_guard(lambda: services.config.admin_token, "ADMIN_DISABLED", "ADMIN_TOKEN")
    internal_guard = bearer_guard(
        lambda: services.config.internal_api_key, "INTERNAL_API_DISABLED", "INTERNAL_API_KEY"
    )
    base = "/api/admin/licenses/{license_id}"

    def admin(
        method: str, path: str, handler: Callable[[Request], Response], summary: str, **kw: Any
    ) -> Route:
        return Route(method, path, handler, summary, tag="admin", auth="admin", guard=admin_guard, **kw)

    return [
        admin(
            "GET",
            "/api/admin/licenses",
            api.find,
            "Find licenses by e-mail, key, license id or Stripe customer, subscription or session id",
            query=FIND_FIELDS,
        ),
        admin(
            "POST",
            "/api/admin/licenses",
            api.issue,
            "Issue a license (any plan)",
            body=ISSUE_BODY,
            status=201,
        ),
        admin("GET", base, api.show, "A license with machines, Stripe events, mail and audit trail"),
        admin(
            "POST", f"{base}/extend", api.extend, "Extend paid_through (re-issues the key)", body=EXTEND_BODY
        ),
        admin("POST", f"{base}/suspend", api.simple(suspend), "Suspend a license"),
        admin("POST", f"{base}/reinstate", api.simple(reinstate), "Reinstate a suspended or revoked license"),
        admin("POST", f"{base}/revoke", api.simple(revoke), "Revoke a license"),
        admin("POST", f"{base}/reset-machines", api.simple(reset_machines), "Free every machine seat"),
        admin(
            "POST",
            f"{base}/remove-machine",
            api.remove_machine,
            "Free one seat by machine id or machine hash",
            body=REMOVE_MACHINE_BODY,
        ),
        admin("POST", f"{base}/resend", api.simple(resend), "Queue the license key mail again"),
        admin(
            "GET",
            "/api/admin/events",
            api.events,
            "Stripe events by status (failed by default)",
            query=("status", "limit"),
        ),
        admin(
            "POST",
            "/api/admin/events/{event_id}/replay",
            api.replay,
            "Apply a failed or ignored Stripe event again (fetched from Stripe when configured)",
        ),
        admin("GET", "/api/admin/stats", api.stats, "Licenses by plan and state, events today, mail backlog"),
        admin(
            "GET",
            "/api/admin/audit",
            api.audit,
            "The audit trail, newest first",
            query=("license_id", "actor", "before_id", "limit"),
        ),
        admin("GET", "/api/admin/debug/store", api.debug_store, "Streamed export without keys or secrets"),
        Route(
            "POST",
            "/api/licenses/generate",
            api.generate,
            "Issue a license for another service",
            tag="internal",
            auth="internal",
            guard=internal_guard,
            body=GENERATE_BODY,
            response=GENERATE_ANSWER,
            status=201,
        ),
    ]


# --- the command line -----------------------------------------------------------------------


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli:unknown"


def add_commands(admin_cmd: Any) -> None:
    """Add every verb to the ``licensed admin`` sub-command parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of readable lines")

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = admin_cmd.add_parser(name, help=help_text, parents=[common])
        return parser

    def with_license(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = verb(name, help_text)
        parser.add_argument("license_id", help="lic_…")
        return parser

    find_cmd = verb("find", "find licenses; QUERY is guessed: e-mail, key, lic_, cus_, sub_, cs_")
    find_cmd.add_argument("query", nargs="?")
    for field in FIND_FIELDS[1:]:
        find_cmd.add_argument(f"--{field.replace('_', '-')}", dest=field)

    with_license("show", "a license with machines, Stripe events, mail and audit trail")

    issue_cmd = verb("issue", "issue a license by hand and print its key")
    issue_cmd.add_argument("--email", required=True)
    issue_cmd.add_argument("--plan", required=True)
    span = issue_cmd.add_mutually_exclusive_group()
    span.add_argument("--lifetime", action="store_true", help="never expires")
    span.add_argument("--days", type=int, help="valid for this many days")
    span.add_argument("--until", help="valid until this date/time (ISO 8601 or epoch seconds)")
    issue_cmd.add_argument("--max-machines", type=int)
    issue_cmd.add_argument("--send-email", action="store_true", help="queue the license key mail")

    extend_cmd = with_license("extend", "extend paid_through (the client gets a new key)")
    how = extend_cmd.add_mutually_exclusive_group(required=True)
    how.add_argument("--days", type=int, help="add days to the later of now and the current end")
    how.add_argument("--until", help="new paid_through (ISO 8601 or epoch seconds)")

    with_license("suspend", "suspend a license")
    with_license("reinstate", "reinstate a suspended or revoked license")
    with_license("revoke", "revoke a license")
    with_license("reset-machines", "free every machine seat")
    remove_cmd = with_license("remove-machine", "free one machine seat")
    which = remove_cmd.add_mutually_exclusive_group(required=True)
    which.add_argument("--machine-id")
    which.add_argument("--hash", dest="machine_hash")
    with_license("resend", "queue the license key mail again")

    events_cmd = verb("events", "Stripe events by status")
    events_cmd.add_argument("--status", default="failed", choices=EVENT_STATUSES)
    events_cmd.add_argument("--limit", type=int, default=100)

    replay_cmd = verb("replay", "apply a failed or ignored Stripe event again")
    replay_cmd.add_argument("event_id", help="evt_…")

    verb("stats", "licenses by plan and state, events today, mail backlog")

    audit_cmd = verb("audit", "the audit trail, newest first")
    audit_cmd.add_argument("--license", dest="license_id")
    audit_cmd.add_argument("--actor")
    audit_cmd.add_argument("--before-id", type=int)
    audit_cmd.add_argument("--limit", type=int, default=100)


def run_command(services: Services, args: argparse.Namespace, actor: str, now: int) -> dict[str, Any]:
    """Call the verb the parsed command line names."""
    name = args.admin_command
    if name == "find":
        criteria = {f: getattr(args, f) for f in FIND_FIELDS[1:]}
        return find(services, actor, now, q=args.query, **criteria)
    if name == "issue":
        return issue(
            services,
            actor,
            now,
            email=args.email,
            plan=args.plan,
            days=args.days,
            expires_at=args.until,
            lifetime=True if args.lifetime else None,
            max_machines=args.max_machines,
            send_email=args.send_email,
        )
    if name == "extend":
        return extend(services, actor, now, args.license_id, days=args.days, paid_through=args.until)
    if name == "remove-machine":
        return remove_machine(
            services,
            actor,
            now,
            args.license_id,
            machine_id=args.machine_id,
            machine_hash=args.machine_hash,
        )
    if name == "events":
        return events(services, actor, now, status=args.status, limit=args.limit)
    if name == "stats":
        return stats(services, actor, now)
    if name == "replay":
        return replay(services, actor, now, args.event_id)
    if name == "audit":
        return audit_trail(
            services,
            actor,
            now,
            license_id=args.license_id,
            by=args.actor,
            before_id=args.before_id,
            limit=args.limit,
        )
    simple: dict[str, Callable[[Services, str, int, str], dict[str, Any]]] = {
        "show": show,
        "suspend": suspend,
        "reinstate": reinstate,
        "revoke": revoke,
        "reset-machines": reset_machines,
        "resend": resend,
    }
    return simple[name](services, actor, now, args.license_id)


def run_cli(services: Services, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    """``licensed admin <verb>``: straight on the database, JSON or readable lines out."""
    try:
        result = run_command(services, args, cli_actor(), services.now())
    finally:
        services.store.close()
    if args.json:
        out(json.dumps(result, indent=2, ensure_ascii=False))
    elif args.admin_command == "issue":
        out(result["key"])
        if "mail_id" in result:
            print(f"licensed: key mail queued for {args.email}", file=sys.stderr)
    elif args.admin_command in _LISTS:
        field, columns = _LISTS[args.admin_command]
        for item in result[field]:
            out("  ".join(_scalar(item.get(c)) for c in columns))
        out(f"({result['count']} found)")
    else:
        for line in readable(result):
            out(line)


_LISTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "find": ("licenses", ("id", "plan", "entitlement", "email", "paid_through", "machines_used")),
    "events": ("events", ("received_at", "id", "type", "status", "license_id", "error")),
    "audit": ("entries", ("at", "actor", "action", "license_id")),
}
"""Verbs whose readable output is one line per item: (list field, columns)."""


def readable(value: Any, indent: str = "") -> Iterator[str]:
    """Readable lines: ``name: value`` for scalars, nested blocks for objects and lists."""
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(item, dict | list) and item:
                yield f"{indent}{name}:"
                yield from readable(item, indent + "  ")
            else:
                yield f"{indent}{name}: {_scalar(item)}"
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield f"{indent}-"
                yield from readable(item, indent + "  ")
            else:
                yield f"{indent}- {_scalar(item)}"
    else:
        yield f"{indent}{_scalar(value)}"


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return "none" if not value else json.dumps(value)
    return str(value)
