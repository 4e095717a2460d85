"""``licensed admin import``: licences sold before licensed, with the keys their buyers hold.

A vendor arrives with customers whose installations hold keys from the system
used before; those keys are not ours to re-sign. Each line of a JSON Lines
file is one licence. The whole file is checked before anything is written: one
bad line (unknown plan, malformed field, a key already imported for another
licence, a duplicate in the file…) refuses the file with every offending line,
and nothing is imported. Importing the same file again changes nothing: a key
already imported for the same e-mail and plan is skipped.

An old key is stored only as the SHA-256 of its text (``imported_keys``); the
licence it stands for is an ordinary row, so validation, seats, revocation,
webhooks and the reconciler treat it like any other, and validation hands the
client the licence's signed key to store instead.

The checked lines are written in batches of :data:`BATCH_LINES`, one
transaction each, so a running server's webhooks and activations wait for one
batch at most, never for the whole file. Each batch checks its lines again
inside its transaction: a key or subscription taken meanwhile by another writer
stops the import there, and running it again finishes it (what was written is
skipped).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from . import addresses, keys, licensing
from .admin import parse_time
from .errors import Conflict, ImportRefused, InvalidToken, NotFound, ValidationFailed
from .plans import MAX_MACHINES, Plan
from .services import Services
from .store import Store

FIELDS = (
    "email",
    "plan",
    "key",
    "expires_at",
    "lifetime",
    "max_machines",
    "machines",
    "name",
    "created_at",
    "stripe_customer",
    "stripe_subscription",
)
REQUIRED = ("email", "plan", "key")
MAX_KEY_LENGTH = 8192
"""The longest key the licence routes accept."""
MAX_LINE_BYTES = 1 << 20
"""A longer line is refused unread: one licence, even with many machines, is far smaller."""
BATCH_LINES = 1000
"""Licences written per transaction (see BENCHMARKS.md for what one batch costs)."""
PROGRESS_EVERY = 500

_STRIPE_IDS = {
    "stripe_customer": re.compile(r"^cus_[A-Za-z0-9_]{1,250}$"),
    "stripe_subscription": re.compile(r"^sub_[A-Za-z0-9_]{1,250}$"),
}
_MACHINE_ID = re.compile(licensing.MACHINE_ID_PATTERN)

Progress = Callable[[str, int, int], None]
"""Called as ``(phase, done, total)``: ``checking`` counts bytes read, ``importing`` licences written."""


@dataclass(frozen=True)
class Entry:
    """One checked line: everything the licence needs, and no raw key or machine id."""

    line: int
    email: str
    name: str | None
    plan: Plan
    key_hash: str
    owner: str
    """SHA-256 of the e-mail and plan: the same line imported again is recognised by it."""
    paid_through: int | None
    lifetime: bool
    max_machines: int
    machines: tuple[str, ...]
    """Machine hashes, as validation stores them."""
    created_at: int | None
    stripe_customer: str | None
    stripe_subscription: str | None


@dataclass
class Report:
    file: str
    sha256: str = ""
    lines: int = 0
    imported: int = 0
    skipped: int = 0
    dry_run: bool = False
    problems: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        problems = self.problems or []
        return {
            "file": self.file,
            "sha256": self.sha256,
            "lines": self.lines,
            "imported": self.imported,
            "skipped": self.skipped,
            "refused": len(problems),
            "dry_run": self.dry_run,
            "problems": problems,
        }


# --- one line ------------------------------------------------------------------------------


class _Fields:
    """Reads one line's fields, collecting every problem instead of stopping at the first."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.errors: list[str] = []

    def get(self, name: str, read: Callable[[Any], Any]) -> Any:
        value = self.data.get(name)
        if value is None:
            if name in REQUIRED:
                self.errors.append(f"{name} is required")
            return None
        try:
            return read(value)
        except ValidationFailed as err:
            self.errors.append(err.message if err.message.startswith(name) else f"{name}: {err.message}")
            return None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationFailed("must be a string")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationFailed("must be true or false")
    return value


def _seats(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_MACHINES:
        raise ValidationFailed(f"must be a whole number 1..{MAX_MACHINES}")
    return value


def _time(name: str) -> Callable[[Any], int]:
    def read(value: Any) -> int:
        if isinstance(value, bool):
            raise ValidationFailed(f"{name} must be epoch seconds or an ISO 8601 date/time")
        return parse_time(value, name)

    return read


def _stripe_id(name: str) -> Callable[[Any], str]:
    def read(value: Any) -> str:
        if not isinstance(value, str) or not _STRIPE_IDS[name].match(value):
            prefix = "cus_" if name == "stripe_customer" else "sub_"
            raise ValidationFailed(f"must be a Stripe id ({prefix}…)")
        return value

    return read


def _machine_hashes(value: Any) -> tuple[str, ...]:
    """The seats' hashes: each id trimmed and NFC-normalised like validation does; one
    machine written twice (``"host-A "`` and ``"host-A"``) is one seat."""
    if not isinstance(value, list):
        raise ValidationFailed("must be a list of machine ids")
    hashes: dict[str, None] = {}
    for number, machine_id in enumerate(value, start=1):
        # The raw id is never echoed: it is as private here as in a request.
        if not isinstance(machine_id, str) or not 1 <= len(machine_id) <= 256:
            raise ValidationFailed(f"machine {number} is not a string of 1-256 characters")
        if not _MACHINE_ID.match(machine_id) or not machine_id.strip():
            raise ValidationFailed(f"machine {number} has characters a machine id cannot have")
        hashes[licensing.machine_hashes(machine_id)[0]] = None
    return tuple(hashes)


def read_line(raw: bytes, number: int, services: Services, now: int) -> Entry | list[str]:
    """One line as an :class:`Entry`, or every problem it has (never quoting its key)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return ["not UTF-8 text"]
    except json.JSONDecodeError as err:
        return [f"not JSON: {err.msg} at column {err.colno}"]
    if not isinstance(data, dict):
        return ["not a JSON object"]
    unknown = sorted(str(name) for name in data if name not in FIELDS)
    if unknown:
        return [f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})"]
    fields = _Fields(data)
    email = fields.get("email", addresses.check_address)
    name = fields.get("name", addresses.check_display_name)
    plan_id = fields.get("plan", _text)
    plan = services.catalog.plans.get(plan_id) if plan_id is not None else None
    if plan_id is not None and plan is None:
        fields.errors.append(f"unknown plan {plan_id!r}")
    key = fields.get("key", _text)
    if key is not None:
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            fields.errors.append(f"key must be 1..{MAX_KEY_LENGTH} characters")
        elif _is_signed_key(key, services):
            fields.errors.append("key is already a key of this server: nothing to import")
    expires_at = fields.get("expires_at", _time("expires_at"))
    lifetime = fields.get("lifetime", _flag)
    max_machines = fields.get("max_machines", _seats)
    machines = fields.get("machines", _machine_hashes) or ()
    created_at = fields.get("created_at", _time("created_at"))
    if created_at is not None and created_at > now:
        fields.errors.append("created_at is in the future")
    stripe_customer = fields.get("stripe_customer", _stripe_id("stripe_customer"))
    stripe_subscription = fields.get("stripe_subscription", _stripe_id("stripe_subscription"))
    if lifetime and expires_at is not None:
        fields.errors.append("a lifetime license has no expires_at")
    if lifetime and stripe_subscription is not None:
        fields.errors.append("a lifetime license has no stripe_subscription")
    is_lifetime = (
        bool(lifetime) if lifetime is not None else bool(plan and plan.lifetime and expires_at is None)
    )
    if plan is not None and expires_at is None and not is_lifetime:
        fields.errors.append(f"plan {plan.id} is not lifetime: give expires_at, or lifetime: true")
    seats = max_machines or (plan.max_machines if plan else None)
    if seats is not None and len(machines) > seats:
        fields.errors.append(
            f"{len(machines)} machines but max_machines is {seats}: raise it or drop machines"
        )
    if fields.errors:
        return fields.errors
    assert email is not None and plan is not None and key is not None
    return Entry(
        line=number,
        email=email,
        name=name,
        plan=plan,
        key_hash=keys.imported_key_hash(key),
        owner=hashlib.sha256(f"{email.lower()}\n{plan.id}".encode()).hexdigest(),
        paid_through=None if is_lifetime else expires_at,
        lifetime=is_lifetime,
        max_machines=seats or plan.max_machines,
        machines=machines,
        created_at=created_at,
        stripe_customer=stripe_customer,
        stripe_subscription=stripe_subscription,
    )


def _is_signed_key(key: str, services: Services) -> bool:
    try:
        keys.parse_license_key(key, services.catalog, services.ring)
    except InvalidToken:
        return False
    return True


# --- the file ----------------------------------------------------------------------------------


def _lines(handle: BinaryIO, digest: Any) -> Iterator[tuple[int, bytes | None]]:
    """``(number, bytes)`` for each line that is not blank; bytes None for one too long.

    Reads one bounded line at a time, so a file of any size streams.
    """
    number = 0
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        digest.update(raw)
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of it
                raw = handle.readline(MAX_LINE_BYTES)
                digest.update(raw)
            yield number, None
            continue
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.strip():
            yield number, raw


SKIP = "skip"
NEW = "new"


def _judge(store: Store, entry: Entry) -> str:
    """NEW, SKIP (imported before from the same line), or the problem it has with the database."""
    existing = store.imported_key(entry.key_hash)
    if existing is not None:
        license_id, owner = existing
        if owner == entry.owner:
            return SKIP
        return f"the key is already imported for another license ({license_id})"
    if entry.stripe_subscription is not None:
        taken = store.find_license("stripe_subscription_id", entry.stripe_subscription)
        if taken is not None:
            return f"subscription {entry.stripe_subscription} already belongs to license {taken.id}"
    return NEW


def _check(
    services: Services, path: Path, report: Report, now: int, progress: Progress | None
) -> list[Entry]:
    """Every line checked against the plans, the rest of the file and the database."""
    problems: list[dict[str, Any]] = []
    fresh: list[Entry] = []
    first_key: dict[str, int] = {}
    first_sub: dict[str, int] = {}
    digest = hashlib.sha256()
    try:
        handle = path.open("rb")
    except OSError as err:
        raise NotFound(f"cannot read {path}: {err.strerror or err}") from err
    with handle:
        size = path.stat().st_size
        for number, raw in _lines(handle, digest):
            report.lines += 1
            if progress is not None and report.lines % PROGRESS_EVERY == 0:
                progress("checking", handle.tell(), size)
            if raw is None:
                problems.append({"line": number, "errors": [f"longer than {MAX_LINE_BYTES} bytes"]})
                continue
            entry = read_line(raw, number, services, now)
            if isinstance(entry, list):
                problems.append({"line": number, "errors": entry})
                continue
            errors = []
            if entry.key_hash in first_key:
                errors.append(f"the same key as line {first_key[entry.key_hash]}")
            first_key.setdefault(entry.key_hash, number)
            sub = entry.stripe_subscription
            if sub is not None:
                if sub in first_sub:
                    errors.append(f"the same stripe_subscription as line {first_sub[sub]}")
                first_sub.setdefault(sub, number)
            verdict = _judge(services.store, entry)
            if verdict == SKIP:
                report.skipped += 1
            elif verdict == NEW:
                fresh.append(entry)
            else:
                errors.append(verdict)
            if errors:
                problems.append({"line": number, "errors": errors})
        if progress is not None:
            progress("checking", size, size)
    report.sha256 = digest.hexdigest()
    report.problems = problems
    return fresh


def _write(services: Services, actor: str, entry: Entry, now: int) -> None:
    store = services.store
    customer_id = store.import_customer(
        now, email=entry.email, name=entry.name, stripe_customer_id=entry.stripe_customer
    )
    lic = licensing.new_license(
        plan=entry.plan,
        customer_id=customer_id,
        ring=services.ring,
        now=now,
        source="import",
        paid_through=entry.paid_through,
        lifetime=entry.lifetime,
        max_machines=entry.max_machines,
    )
    lic.created_at = entry.created_at or now
    lic.stripe_customer_id = entry.stripe_customer
    lic.stripe_subscription_id = entry.stripe_subscription
    if entry.stripe_subscription is not None:
        lic.stripe_price_id = entry.plan.stripe_price
    store.insert_license(lic)
    store.insert_imported_key(entry.key_hash, lic.id, entry.owner, now)
    for machine in entry.machines:
        store.add_machine(lic.id, machine, now)
    after = {**licensing.license_view(lic, len(entry.machines)), "line": entry.line}
    store.audit(now, actor, "license.import", lic.id, None, after)


def import_licenses(
    services: Services,
    actor: str,
    now: int,
    path: Path,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    batch_lines: int = BATCH_LINES,
) -> dict[str, Any]:
    """Import the licences of a JSON Lines file (see the module's docstring); audited.

    Raises :class:`errors.ImportRefused` (nothing imported) when any line is bad.
    """
    report = Report(file=path.name, dry_run=dry_run)
    fresh = _check(services, path, report, now, progress)
    if report.problems:
        count = len(report.problems)
        raise ImportRefused(
            f"{count} bad line{'s' if count > 1 else ''} in {path.name}; nothing imported", report.as_dict()
        )
    if report.lines == 0:
        raise ValidationFailed(f"{path.name} holds no licenses")
    if dry_run or not fresh:
        if dry_run:
            report.imported = len(fresh)
        return report.as_dict()
    store = services.store
    for start in range(0, len(fresh), batch_lines):
        written = skipped = 0
        with store.atomic():
            for entry in fresh[start : start + batch_lines]:
                verdict = _judge(store, entry)
                if verdict == SKIP:  # another import wrote it since the check
                    skipped += 1
                    continue
                if verdict != NEW:
                    raise Conflict(
                        f"line {entry.line}: {verdict} (written since the check); {report.imported} licenses"
                        " were imported before it: run the import again to finish",
                        code="IMPORT_INTERRUPTED",
                    )
                _write(services, actor, entry, now)
                written += 1
        report.imported += written
        report.skipped += skipped
        if progress is not None:
            progress("importing", report.imported + report.skipped, len(fresh))
    with store.atomic():
        summary = {k: v for k, v in report.as_dict().items() if k != "problems"}
        store.audit(now, actor, "licenses.import", None, None, summary)
    return report.as_dict()
