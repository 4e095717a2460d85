"""SQLite storage: schema migrations, transactions and every query.

One file in WAL mode. ``synchronous=FULL`` because a Stripe webhook is
acknowledged only after its effect is committed: in WAL mode FULL fsyncs the
log at every commit, so a 200 never precedes a commit that a power cut could
take back (NORMAL would only survive a process crash). Writers take the lock
up front (``BEGIN IMMEDIATE``) so seat counting and event de-duplication are
serialised; readers never block them.

Every value goes through ``?``. ``sqlite3`` errors are translated here into
:mod:`errors` classes and never leak upward.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import Conflict, StorageUnavailable

BUSY_TIMEOUT_MS = 5000
PROBE_SECONDS = 2.0
"""How long a successful writability probe is trusted (health checks come often)."""
MIN_FREE_BYTES = 1024 * 1024
"""Below this much free disk a commit may fail to grow the WAL: the probe says so first."""

PRAGMAS: tuple[tuple[str, str, object], ...] = (
    # (pragma, value set, value expected when read back)
    ("journal_mode", "WAL", "wal"),
    ("synchronous", "FULL", 2),
    ("foreign_keys", "ON", 1),
    ("busy_timeout", str(BUSY_TIMEOUT_MS), BUSY_TIMEOUT_MS),
)

MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "core tables",
        """
        CREATE TABLE customers (
            id TEXT PRIMARY KEY,
            email TEXT,
            name TEXT,
            stripe_customer_id TEXT UNIQUE,
            oidc_sub TEXT UNIQUE,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX customers_email ON customers (email COLLATE NOCASE);

        CREATE TABLE licenses (
            id TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL REFERENCES customers (id),
            product TEXT NOT NULL,
            plan TEXT NOT NULL,
            tier TEXT NOT NULL,
            features TEXT NOT NULL DEFAULT '[]',
            max_machines INTEGER NOT NULL CHECK (max_machines >= 1),
            status TEXT NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'suspended', 'revoked')),
            status_reason TEXT,
            paid_through INTEGER,
            grace_days INTEGER NOT NULL DEFAULT 0,
            lifetime INTEGER NOT NULL DEFAULT 0,
            subscription_status TEXT,
            cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
            source TEXT NOT NULL,
            stripe_customer_id TEXT,
            stripe_subscription_id TEXT UNIQUE,
            stripe_checkout_session_id TEXT UNIQUE,
            stripe_payment_intent_id TEXT,
            stripe_charge_id TEXT,
            stripe_price_id TEXT,
            snapshot_version TEXT NOT NULL DEFAULT '',
            status_version TEXT NOT NULL DEFAULT '',
            ended_at INTEGER,
            key_kid TEXT NOT NULL,
            key_iat INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX licenses_customer ON licenses (customer_id);
        CREATE INDEX licenses_payment_intent ON licenses (stripe_payment_intent_id);
        CREATE INDEX licenses_charge ON licenses (stripe_charge_id);
        CREATE INDEX licenses_key_kid ON licenses (key_kid);

        CREATE TABLE machines (
            id INTEGER PRIMARY KEY,
            license_id TEXT NOT NULL REFERENCES licenses (id) ON DELETE CASCADE,
            machine_hash TEXT NOT NULL,
            activated_at INTEGER NOT NULL,
            last_seen_at INTEGER NOT NULL,
            UNIQUE (license_id, machine_hash)
        );

        CREATE TABLE stripe_events (
            id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            created INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('applied', 'ignored', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 1,
            error TEXT,
            license_id TEXT,
            payload TEXT NOT NULL,
            received_at INTEGER NOT NULL,
            processed_at INTEGER NOT NULL
        );
        CREATE INDEX stripe_events_status ON stripe_events (status, received_at);
        CREATE INDEX stripe_events_license ON stripe_events (license_id);

        CREATE TABLE payments (
            ref TEXT PRIMARY KEY,
            license_id TEXT NOT NULL REFERENCES licenses (id) ON DELETE CASCADE
        );

        CREATE TABLE disputes (
            id TEXT PRIMARY KEY,
            license_id TEXT NOT NULL REFERENCES licenses (id) ON DELETE CASCADE,
            status TEXT NOT NULL,
            version TEXT NOT NULL
        );

        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            license_id TEXT REFERENCES licenses (id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            to_addr TEXT NOT NULL,
            to_name TEXT,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at INTEGER NOT NULL,
            claimed_until INTEGER,
            last_error TEXT,
            message_id TEXT,
            created_at INTEGER NOT NULL,
            sent_at INTEGER
        );
        CREATE INDEX outbox_due ON outbox (status, next_attempt_at);

        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            at INTEGER NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            license_id TEXT,
            before TEXT,
            after TEXT
        );
        CREATE INDEX audit_log_license ON audit_log (license_id, at);

        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at INTEGER NOT NULL
        );
        """,
    ),
    (
        "customer identities",
        # A customer belongs to at most one identity-provider user (sub); one user
        # may own several customers (an admin-issued licence and a Stripe purchase
        # under the same e-mail are two customer rows).
        """
        CREATE TABLE customer_identities (
            customer_id TEXT PRIMARY KEY REFERENCES customers (id) ON DELETE CASCADE,
            oidc_sub TEXT NOT NULL,
            via TEXT NOT NULL,
            linked_at INTEGER NOT NULL
        );
        CREATE INDEX customer_identities_sub ON customer_identities (oidc_sub);
        """,
    ),
    (
        "signers of re-issued keys",
        # A licence re-issued under a new signing key leaves its old key in the
        # customer's hands, valid offline until its exp: the old signer must stay
        # in the JWKS until then (until NULL: a lifetime key, kept for good).
        """
        CREATE TABLE superseded_keys (
            kid TEXT PRIMARY KEY,
            until INTEGER
        );
        """,
    ),
    (
        "entitlement follows money",
        # The subscription's current period is remembered apart from paid_through:
        # a period is paid for only once an invoice (or the checkout) pays it.
        # An event that changes nothing keeps the reason; a payment keeps its amount,
        # so that a refund can be judged full or partial.
        """
        ALTER TABLE licenses ADD COLUMN period_start INTEGER;
        ALTER TABLE licenses ADD COLUMN period_end INTEGER;
        ALTER TABLE stripe_events ADD COLUMN reason TEXT;
        ALTER TABLE stripe_events ADD COLUMN subject TEXT;
        CREATE INDEX stripe_events_reason ON stripe_events (reason, status, received_at);
        ALTER TABLE payments ADD COLUMN amount INTEGER;
        ALTER TABLE customers ADD COLUMN stripe_version TEXT NOT NULL DEFAULT '';
        """,
    ),
    (
        "keys from the system used before",
        # Keys sold before licensed (admin import) keep working: each is kept only as
        # the SHA-256 of its text, pointing at the licence it now stands for. owner is
        # the SHA-256 of the imported line's e-mail and plan, so the same line imported
        # again is recognised (skipped) and the same key on another line is refused.
        """
        CREATE TABLE imported_keys (
            key_hash TEXT PRIMARY KEY,
            license_id TEXT NOT NULL REFERENCES licenses (id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            imported_at INTEGER NOT NULL
        );
        CREATE INDEX imported_keys_license ON imported_keys (license_id);
        """,
    ),
    (
        "machine labels and public ids",
        # A machine is named to its customer by an opaque id (never its machine id or
        # hash) and the label its installation gave, e.g. the host name.
        """
        ALTER TABLE machines ADD COLUMN public_id TEXT;
        ALTER TABLE machines ADD COLUMN label TEXT;
        ALTER TABLE licenses ADD COLUMN release_after_days INTEGER;
        UPDATE machines SET public_id = 'mch_' || lower(hex(randomblob(10))) WHERE public_id IS NULL;
        CREATE UNIQUE INDEX machines_public_id ON machines (public_id);
        """,
    ),
    (
        "customer sign-in links and sessions",
        # The account pages (accounts.py): a sign-in link is a row whose token is never
        # stored, only its SHA-256; it works from when its mail is built (expires_at set
        # then) until expires_at, once (used_at). keep_until says when the row may go
        # (rows also count towards the per-address limit of links an hour). A session is
        # kept as the SHA-256 of the cookie's value. A sign-in mail's outbox row points at
        # its link and goes with it.
        """
        CREATE TABLE sign_ins (
            id TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            token_hash TEXT NOT NULL UNIQUE,
            created_at INTEGER NOT NULL,
            expires_at INTEGER,
            used_at INTEGER,
            keep_until INTEGER NOT NULL
        );
        CREATE INDEX sign_ins_email ON sign_ins (email, created_at);
        CREATE INDEX sign_ins_keep_until ON sign_ins (keep_until);

        CREATE TABLE account_sessions (
            id_hash TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        );
        CREATE INDEX account_sessions_expires ON account_sessions (expires_at);

        ALTER TABLE outbox ADD COLUMN sign_in_id TEXT REFERENCES sign_ins (id) ON DELETE CASCADE;
        CREATE INDEX outbox_sign_in ON outbox (sign_in_id);
        """,
    ),
)


ENDED_SUBSCRIPTION = frozenset({"canceled", "unpaid", "incomplete_expired"})
"""Stripe subscription states after which no grace is given."""


def new_id(prefix: str) -> str:
    """A random public id such as ``lic_4fK…``: unguessable, URL-safe."""
    return f"{prefix}_{secrets.token_urlsafe(15)}"


@dataclass
class License:
    id: str
    customer_id: str
    product: str
    plan: str
    tier: str
    features: list[str]
    max_machines: int
    status: str
    status_reason: str | None
    paid_through: int | None
    grace_days: int
    lifetime: bool
    subscription_status: str | None
    cancel_at_period_end: bool
    source: str
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    stripe_checkout_session_id: str | None
    stripe_payment_intent_id: str | None
    stripe_charge_id: str | None
    stripe_price_id: str | None
    snapshot_version: str
    status_version: str
    ended_at: int | None
    key_kid: str
    key_iat: int
    created_at: int
    updated_at: int
    period_start: int | None = None
    """The subscription's current period as Stripe last said (not necessarily paid)."""
    period_end: int | None = None
    release_after_days: int | None = None
    """From the plan: a machine not seen for this many days holds no seat."""

    def seated_since(self, now: int) -> int:
        """Machines last seen before this hold no seat."""
        return 0 if self.release_after_days is None else now - self.release_after_days * 86400

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> License:
        """A licence from a row that starts with :data:`LICENSE_SELECT` (more columns may follow)."""
        data = dict(zip(LICENSE_COLUMNS, row, strict=False))
        data["features"] = json.loads(data["features"])
        data["lifetime"] = bool(data["lifetime"])
        data["cancel_at_period_end"] = bool(data["cancel_at_period_end"])
        return cls(**data)

    def to_row(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["features"] = json.dumps(list(self.features))
        data["lifetime"] = int(self.lifetime)
        data["cancel_at_period_end"] = int(self.cancel_at_period_end)
        return data

    @property
    def subscription_ended(self) -> bool:
        return self.subscription_status in ENDED_SUBSCRIPTION

    @property
    def expires_at(self) -> int | None:
        """End of the entitlement, grace included while the subscription lives.

        None for lifetime licences. Grace never extends an ended subscription.
        """
        if self.lifetime or self.paid_through is None:
            return None
        if self.subscription_ended:
            return self.paid_through
        return self.paid_through + self.grace_days * 86400


LICENSE_COLUMNS = tuple(f.name for f in fields(License))
LICENSE_SELECT = ", ".join(f"licenses.{name}" for name in LICENSE_COLUMNS)
"""The columns :meth:`License.from_row` reads, in its order, whatever order the table has."""


class Store:
    """The database of one server. Thread-safe: one connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._writer = threading.Lock()
        self._probed_at = -PROBE_SECONDS

    # --- connections and transactions ---------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            self._local.opened_read_only = not self._writable()
        return conn

    def _writable(self) -> bool:
        """Whether SQLite can open the database and its WAL for writing right now."""
        wal = self.path.with_name(self.path.name + "-wal")
        return os.access(self.path, os.W_OK) and (not wal.exists() or os.access(wal, os.W_OK))

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
            )
            conn.row_factory = sqlite3.Row
            for name, value, expected in PRAGMAS:
                conn.execute(f"PRAGMA {name} = {value}")
                actual = conn.execute(f"PRAGMA {name}").fetchone()[0]
                if actual != expected:
                    raise StorageUnavailable(f"PRAGMA {name} is {actual!r}, wanted {expected!r}")
        except sqlite3.Error as err:
            raise StorageUnavailable(f"cannot open database {self.path}: {err}") from err
        with self._all_lock:
            self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
        self._probed_at = -PROBE_SECONDS

    @contextmanager
    def atomic(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``); nested calls use savepoints.

        Commits on success, rolls back on any exception, and turns ``sqlite3``
        errors into :class:`errors.StorageUnavailable` or :class:`errors.Conflict`.
        This server's writers queue on a lock of their own before SQLite's: a
        writer waiting in SQLite's busy handler sleeps in steps of up to 100 ms and
        so waits long after the lock is free. ``durable=False`` commits without
        waiting for the disk (``synchronous=NORMAL``, for writes a power cut may
        take back: a seat's last-seen stamp); a later durable commit carries it
        to the disk as well.
        """
        conn = self.conn
        nested = conn.in_transaction
        if not nested and getattr(self._local, "opened_read_only", False):
            # SQLite opened this connection read-only (the file could not be written
            # then) and it stays so: open afresh for the write, in case that has changed.
            self._discard(conn)
            conn = self.conn
        savepoint = f"sp_{secrets.token_hex(4)}"
        with self._queued(nested), self._relaxed(conn, not durable and not nested):
            try:
                conn.execute(f"SAVEPOINT {savepoint}" if nested else "BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if nested:
                        conn.execute(f"ROLLBACK TO {savepoint}")
                        conn.execute(f"RELEASE {savepoint}")
                    elif conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute(f"RELEASE {savepoint}" if nested else "COMMIT")
            except sqlite3.IntegrityError as err:
                raise Conflict(f"conflicting write: {err}") from err
            except sqlite3.Error as err:
                if not nested and conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if not nested:
                    self._discard(conn)
                raise StorageUnavailable(f"database write failed: {err}") from err
            except StorageUnavailable:
                if not nested:
                    self._discard(conn)
                raise

    @contextmanager
    def _queued(self, nested: bool) -> Iterator[None]:
        """An outermost write waits for this server's other writers here, before SQLite's lock."""
        if nested:
            yield
            return
        if not self._writer.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
            raise StorageUnavailable("database write failed: another write of this server held it too long")
        try:
            yield
        finally:
            self._writer.release()

    @contextmanager
    def _relaxed(self, conn: sqlite3.Connection, relaxed: bool) -> Iterator[None]:
        """``synchronous=NORMAL`` for the write inside, when ``relaxed``; FULL again after it."""
        if not relaxed:
            yield
            return
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as err:
            self._discard(conn)
            raise StorageUnavailable(f"database write failed: {err}") from err
        try:
            yield
        finally:
            self._restore_synchronous(conn)

    def _restore_synchronous(self, conn: sqlite3.Connection) -> None:
        """Back to every other write's ``synchronous=FULL``; a connection that cannot be is dropped."""
        if getattr(self._local, "conn", None) is not conn:
            return  # already dropped after an error
        try:
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error:
            self._discard(conn)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        conn = self.conn
        try:
            return conn.execute(sql, params)
        except sqlite3.IntegrityError as err:
            raise Conflict(f"conflicting write: {err}") from err
        except sqlite3.Error as err:
            if not conn.in_transaction:
                self._discard(conn)
            raise StorageUnavailable(f"database error: {err}") from err

    def _discard(self, conn: sqlite3.Connection) -> None:
        """Forget this thread's connection after a storage error; the next use opens a fresh one.

        A connection opened while the file could not be written (an immutable
        file, a read-only file system) stays read-only for its whole life, so
        without this a fault that has been cleared would go on failing the
        writes of whichever threads met it.
        """
        self._probed_at = -PROBE_SECONDS  # a storage error: the next probe looks again
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._all_lock:
            if conn in self._all:
                self._all.remove(conn)
        with suppress(sqlite3.Error):
            conn.close()

    def one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.execute(sql, params).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(self.execute(sql, params).fetchall())

    # --- schema ---------------------------------------------------------------

    def migrate(self, now: int) -> list[str]:
        """Apply pending migrations in order, each recorded in its own transaction."""
        self.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        applied = {r[0] for r in self.all("SELECT version FROM schema_migrations")}
        if applied - set(range(1, len(MIGRATIONS) + 1)):
            raise StorageUnavailable("the database was written by a newer licensed; refusing to downgrade it")
        done = []
        for version, (name, sql) in enumerate(MIGRATIONS, start=1):
            if version in applied:
                continue
            with self.atomic() as conn:
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, now),
                )
            done.append(name)
        return done

    def schema_version(self) -> int:
        row = self.one("SELECT MAX(version) FROM schema_migrations")
        return int(row[0] or 0) if row else 0

    # --- settings ---------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        row = self.one("SELECT value FROM settings WHERE key = ?", (key,))
        return str(row[0]) if row else None

    def put_setting(self, key: str, value: str, now: int) -> None:
        self.execute(
            "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (key, value, now),
        )

    RECONCILE_CURSOR = "reconcile.cursor"
    LAST_RECONCILE = "reconcile.last_success_at"

    def reconcile_cursor(self) -> int:
        """Epoch seconds up to which the reconciler has applied Stripe's events (0: never)."""
        value = self.get_setting(self.RECONCILE_CURSOR)
        return int(value) if value and value.isdigit() else 0

    def set_reconcile_cursor(self, cursor: int, now: int) -> None:
        self.put_setting(self.RECONCILE_CURSOR, str(cursor), now)

    def last_reconcile_at(self) -> int | None:
        """When a reconcile last ran without a failure."""
        value = self.get_setting(self.LAST_RECONCILE)
        return int(value) if value and value.isdigit() else None

    def set_last_reconcile_at(self, now: int) -> None:
        self.put_setting(self.LAST_RECONCILE, str(now), now)

    def probe_writable(self) -> None:
        """Raise :class:`errors.StorageUnavailable` unless a write would succeed now, writing nothing.

        The checks a commit would meet, without committing: the database and
        its WAL writable by this process (an immutable or read-only file), room
        on the disk for the WAL to grow, and the write lock obtainable
        (``BEGIN IMMEDIATE``, then ``ROLLBACK``: a connection that can only
        read fails here). A success is remembered for :data:`PROBE_SECONDS`, so
        a flood of health checks takes the write lock at most that often.
        """
        if time.monotonic() - self._probed_at < PROBE_SECONDS:
            return
        wal = self.path.with_name(self.path.name + "-wal")
        for path in (self.path, wal):
            if path.exists() and not os.access(path, os.W_OK):
                raise StorageUnavailable(f"{path.name} cannot be written")
        try:
            disk = os.statvfs(self.path.parent)
        except OSError as err:
            raise StorageUnavailable(f"cannot read the data dir's file system: {err}") from err
        if disk.f_bavail * disk.f_frsize < MIN_FREE_BYTES:
            raise StorageUnavailable("the disk holding the database is full")
        conn = self.conn
        if conn.in_transaction:
            return  # this thread is inside a write already
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite3.Error as err:
            self._discard(conn)
            raise StorageUnavailable(f"the database cannot be written: {err}") from err
        self._probed_at = time.monotonic()

    # --- Stripe events, payments, disputes ------------------------------------------

    def stripe_event_status(self, event_id: str) -> str | None:
        row = self.one("SELECT status FROM stripe_events WHERE id = ?", (event_id,))
        return str(row[0]) if row else None

    def stripe_event_payload(self, event_id: str) -> dict[str, Any] | None:
        row = self.one("SELECT payload FROM stripe_events WHERE id = ?", (event_id,))
        if row is None:
            return None
        payload: dict[str, Any] = json.loads(row[0])
        return payload

    def reopen_ignored_event(self, event_id: str) -> None:
        """Let an ignored event be applied again (a replay after the plans changed)."""
        self.execute(
            "UPDATE stripe_events SET status = 'failed' WHERE id = ? AND status = 'ignored'", (event_id,)
        )

    def record_stripe_event(
        self,
        event: dict[str, Any],
        *,
        status: str,
        error: str | None,
        reason: str | None,
        subject: str | None,
        license_id: str | None,
        now: int,
    ) -> None:
        """Record an event with its outcome; a repeat of a failed one counts an attempt."""
        self.execute(
            "INSERT INTO stripe_events (id, type, created, status, attempts, error, reason, subject,"
            " license_id, payload, received_at, processed_at) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET status = excluded.status, attempts = attempts + 1,"
            " error = excluded.error, reason = excluded.reason, subject = excluded.subject,"
            " license_id = COALESCE(excluded.license_id, license_id), processed_at = excluded.processed_at",
            (
                event["id"],
                event["type"],
                int(event["created"]),
                status,
                error,
                reason,
                subject,
                license_id,
                json.dumps(event, separators=(",", ":")),
                now,
                now,
            ),
        )

    def payment_license(self, ref: str) -> str | None:
        """The licence a payment (charge or payment intent id) paid for."""
        row = self.one("SELECT license_id FROM payments WHERE ref = ?", (ref,))
        return str(row[0]) if row else None

    def payment_amount(self, ref: str) -> int | None:
        row = self.one("SELECT amount FROM payments WHERE ref = ?", (ref,))
        return int(row[0]) if row and row[0] is not None else None

    def remember_payment(self, ref: str, license_id: str, amount: int | None) -> None:
        self.execute(
            "INSERT INTO payments (ref, license_id, amount) VALUES (?, ?, ?)"
            " ON CONFLICT (ref) DO UPDATE SET amount = COALESCE(payments.amount, excluded.amount)",
            (ref, license_id, amount),
        )

    def dispute(self, dispute_id: str) -> sqlite3.Row | None:
        return self.one("SELECT status, version FROM disputes WHERE id = ?", (dispute_id,))

    def insert_dispute(self, dispute_id: str, license_id: str, status: str, version: str) -> None:
        self.execute(
            "INSERT INTO disputes (id, license_id, status, version) VALUES (?, ?, ?, ?)",
            (dispute_id, license_id, status, version),
        )

    def update_dispute(self, dispute_id: str, status: str, version: str) -> None:
        self.execute(
            "UPDATE disputes SET status = ?, version = ? WHERE id = ?", (status, version, dispute_id)
        )

    def dispute_statuses(self, license_id: str) -> list[str]:
        return [
            str(r[0]) for r in self.all("SELECT status FROM disputes WHERE license_id = ?", (license_id,))
        ]

    # --- customers ---------------------------------------------------------------

    def _customer_for(self, stripe_customer_id: str | None, email: str | None) -> str | None:
        """The customer with that Stripe customer id or, without one, the oldest with that
        e-mail (any case) and no Stripe id."""
        if stripe_customer_id:
            row = self.one("SELECT id FROM customers WHERE stripe_customer_id = ?", (stripe_customer_id,))
        elif email:
            # "+" keeps SQLite on the e-mail index: left to itself it walks the unique index
            # of stripe_customer_id through every customer without one (measured: 0.44 ms a
            # look-up on average, most of a 10,000-line import's time; BENCHMARKS.md).
            row = self.one(
                "SELECT id FROM customers WHERE email = ? COLLATE NOCASE"
                " AND +stripe_customer_id IS NULL ORDER BY created_at LIMIT 1",
                (email,),
            )
        else:
            row = None
        return str(row[0]) if row else None

    def upsert_customer(
        self,
        now: int,
        *,
        email: str | None,
        name: str | None = None,
        stripe_customer_id: str | None = None,
        oidc_sub: str | None = None,
    ) -> str:
        """The customer id for a Stripe customer (or, without one, an e-mail)."""
        found = self._customer_for(stripe_customer_id, email)
        if found is not None:
            self.execute(
                "UPDATE customers SET email = COALESCE(?, email), name = COALESCE(?, name),"
                " oidc_sub = COALESCE(oidc_sub, ?), updated_at = ? WHERE id = ?",
                (email, name, oidc_sub, now, found),
            )
            return found
        customer_id = new_id("cus")
        self.execute(
            "INSERT INTO customers (id, email, name, stripe_customer_id, oidc_sub, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (customer_id, email, name, stripe_customer_id, oidc_sub, now, now),
        )
        return customer_id

    def get_customer(self, customer_id: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM customers WHERE id = ?", (customer_id,))

    def customer_by_stripe_id(self, stripe_customer_id: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM customers WHERE stripe_customer_id = ?", (stripe_customer_id,))

    def fill_customer_contact(self, customer_id: str, email: str | None, name: str | None, now: int) -> None:
        """Set the e-mail address and name where the customer has none yet."""
        self.execute(
            "UPDATE customers SET email = COALESCE(email, ?), name = COALESCE(name, ?), updated_at = ?"
            " WHERE id = ?",
            (email, name, now, customer_id),
        )

    def update_customer_contact(
        self, customer_id: str, email: str | None, name: str | None, stripe_version: str, now: int
    ) -> None:
        """The contact Stripe's newest ``customer.updated`` (``stripe_version``) gave."""
        self.execute(
            "UPDATE customers SET email = ?, name = ?, stripe_version = ?, updated_at = ? WHERE id = ?",
            (email, name, stripe_version, now, customer_id),
        )

    # --- licenses ---------------------------------------------------------------

    def insert_license(self, lic: License) -> None:
        row = lic.to_row()
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.execute(f"INSERT INTO licenses ({columns}) VALUES ({marks})", list(row.values()))

    def save_license(self, lic: License, now: int) -> None:
        before = self.get_license(lic.id)
        if before is not None and before.key_kid != lic.key_kid:
            self.keep_signer(before.key_kid, before.expires_at)
        lic.updated_at = now
        row = lic.to_row()
        row.pop("id")
        assignments = ", ".join(f"{column} = ?" for column in row)
        self.execute(f"UPDATE licenses SET {assignments} WHERE id = ?", [*row.values(), lic.id])

    def get_license(self, license_id: str) -> License | None:
        row = self.one(f"SELECT {LICENSE_SELECT} FROM licenses WHERE id = ?", (license_id,))
        return License.from_row(row) if row else None

    def find_license(self, column: str, value: str) -> License | None:
        if column not in LICENSE_COLUMNS:
            raise ValueError(column)
        row = self.one(
            f"SELECT {LICENSE_SELECT} FROM licenses WHERE {column} = ? ORDER BY created_at LIMIT 1", (value,)
        )
        return License.from_row(row) if row else None

    def kids_in_use(self, now: int) -> set[str]:
        """Signing key ids that signed a licence key that has not yet expired."""
        rows = self.all(
            "SELECT DISTINCT key_kid FROM licenses WHERE lifetime = 1 OR paid_through IS NULL"
            " OR paid_through + grace_days * 86400 > ?"
            " UNION SELECT kid FROM superseded_keys WHERE until IS NULL OR until > ?",
            (now, now),
        )
        return {str(r[0]) for r in rows}

    # --- keys imported from the system used before ----------------------------------

    def imported_key_license(self, key_hash: str) -> str | None:
        """The licence an imported key (by its hash) stands for: one primary-key read."""
        found = self.imported_key(key_hash)
        return found[0] if found else None

    def imported_key(self, key_hash: str) -> tuple[str, str] | None:
        """(licence id, owner) of an imported key, or None when it was never imported."""
        row = self.one("SELECT license_id, owner FROM imported_keys WHERE key_hash = ?", (key_hash,))
        return (str(row[0]), str(row[1])) if row else None

    def insert_imported_key(self, key_hash: str, license_id: str, owner: str, now: int) -> None:
        self.execute(
            "INSERT INTO imported_keys (key_hash, license_id, owner, imported_at) VALUES (?, ?, ?, ?)",
            (key_hash, license_id, owner, now),
        )

    def imported_key_count(self, license_id: str) -> int:
        row = self.one("SELECT COUNT(*) FROM imported_keys WHERE license_id = ?", (license_id,))
        return int(row[0]) if row else 0

    def import_customer(
        self, now: int, *, email: str, name: str | None, stripe_customer_id: str | None
    ) -> str:
        """The customer an imported licence belongs to: the one with that Stripe customer id
        (or, without one, that e-mail and no Stripe id), else a new one.

        An existing customer keeps its contact (Stripe's, or an earlier line's); only
        what it lacks is filled in.
        """
        found = self._customer_for(stripe_customer_id, email)
        if found is not None:
            self.fill_customer_contact(found, email, name, now)
            return found
        customer_id = new_id("cus")
        self.execute(
            "INSERT INTO customers (id, email, name, stripe_customer_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (customer_id, email, name, stripe_customer_id, now, now),
        )
        return customer_id

    # --- machines ---------------------------------------------------------------

    def count_machines(self, license_id: str, seated_since: int = 0) -> int:
        """Seats taken: machines seen at or after ``seated_since`` (see :meth:`license_seats`)."""
        row = self.one(
            "SELECT COUNT(*) FROM machines WHERE license_id = ? AND last_seen_at >= ?",
            (license_id, seated_since),
        )
        return int(row[0]) if row else 0

    def add_machine(self, license_id: str, machine_hash: str, now: int, label: str | None = None) -> str:
        """Seat a machine; returns its public id."""
        public_id = new_id("mch")
        self.execute(
            "INSERT INTO machines (license_id, machine_hash, public_id, label, activated_at, last_seen_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (license_id, machine_hash, public_id, label, now, now),
        )
        return public_id

    def touch_machine(
        self, license_id: str, seen_hash: str, machine_hash: str, now: int, label: str | None = None
    ) -> None:
        """Stamp the machine seen now (and its new label, if it sent one); a row stored under an
        older spelling's hash takes the canonical one."""
        self.execute(
            "UPDATE machines SET last_seen_at = ?, machine_hash = ?, label = COALESCE(?, label)"
            " WHERE license_id = ? AND machine_hash = ?",
            (now, machine_hash, label, license_id, seen_hash),
        )

    def release_stale_machines(self, license_id: str, seated_since: int) -> int:
        """Free the seats of machines not seen since ``seated_since``."""
        cursor = self.execute(
            "DELETE FROM machines WHERE license_id = ? AND last_seen_at < ?", (license_id, seated_since)
        )
        return cursor.rowcount

    def machines_of(self, license_id: str, seated_since: int = 0) -> list[sqlite3.Row]:
        """The machines holding seats, as their customer may see them (no hashes)."""
        return self.all(
            "SELECT public_id, label, activated_at, last_seen_at FROM machines"
            " WHERE license_id = ? AND last_seen_at >= ? ORDER BY activated_at, id",
            (license_id, seated_since),
        )

    def remove_machine_by_public_id(self, license_id: str, public_id: str) -> bool:
        cursor = self.execute(
            "DELETE FROM machines WHERE license_id = ? AND public_id = ?", (license_id, public_id)
        )
        return cursor.rowcount > 0

    def remove_machine(self, license_id: str, hashes: Sequence[str]) -> bool:
        """Free the seat of the machine stored under any of ``hashes``."""
        cursor = self.execute(
            f"DELETE FROM machines WHERE license_id = ? AND machine_hash IN ({_marks(hashes)})",
            (license_id, *hashes),
        )
        return cursor.rowcount > 0

    def remove_all_machines(self, license_id: str) -> int:
        return self.execute("DELETE FROM machines WHERE license_id = ?", (license_id,)).rowcount

    # --- outbox ---------------------------------------------------------------------

    def enqueue_mail(self, license_id: str, kind: str, to_addr: str, to_name: str | None, now: int) -> int:
        """Queue a message about a licence; call inside the transaction that changes it.

        Only the licence id and the kind of message are stored: the body, and
        the key in it, are rendered from the licence row when the mail is sent.
        """
        cursor = self.execute(
            "INSERT INTO outbox (license_id, kind, to_addr, to_name, next_attempt_at, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (license_id, kind, to_addr, to_name, now, now),
        )
        return int(cursor.lastrowid or 0)

    def enqueue_sign_in_mail(self, sign_in_id: str, to_addr: str, now: int) -> int:
        """Queue the mail of a sign-in link; its token is recomputed when the mail is built."""
        cursor = self.execute(
            "INSERT INTO outbox (kind, sign_in_id, to_addr, next_attempt_at, created_at)"
            " VALUES ('sign_in_link', ?, ?, ?, ?)",
            (sign_in_id, to_addr, now, now),
        )
        return int(cursor.lastrowid or 0)

    def mail_count_since(self, license_id: str, kind: str, since: int) -> int:
        """Messages of ``kind`` queued for the licence at or after ``since``."""
        row = self.one(
            "SELECT COUNT(*) FROM outbox WHERE license_id = ? AND kind = ? AND created_at >= ?",
            (license_id, kind, since),
        )
        return int(row[0]) if row else 0

    # --- customer accounts: sign-in links and sessions (accounts.py) ---------------

    def count_sign_ins(self, email: str, since: int) -> int:
        """Sign-in links asked for ``email`` (lower case) at or after ``since``."""
        row = self.one("SELECT COUNT(*) FROM sign_ins WHERE email = ? AND created_at >= ?", (email, since))
        return int(row[0]) if row else 0

    def insert_sign_in(self, sign_in_id: str, email: str, token_hash: str, now: int, keep_until: int) -> None:
        self.execute(
            "INSERT INTO sign_ins (id, email, token_hash, created_at, keep_until) VALUES (?, ?, ?, ?, ?)",
            (sign_in_id, email, token_hash, now, keep_until),
        )

    def arm_sign_in(self, sign_in_id: str, expires_at: int) -> bool:
        """Start (or restart) an unused link's validity as its mail is built; False when it is
        gone or used."""
        with self.atomic():
            cursor = self.execute(
                "UPDATE sign_ins SET expires_at = ?, keep_until = MAX(keep_until, ?)"
                " WHERE id = ? AND used_at IS NULL",
                (expires_at, expires_at, sign_in_id),
            )
        return cursor.rowcount > 0

    def sign_in_by_hash(self, token_hash: str) -> sqlite3.Row | None:
        return self.one(
            "SELECT id, email, expires_at, used_at FROM sign_ins WHERE token_hash = ?", (token_hash,)
        )

    def consume_sign_in(self, token_hash: str, now: int) -> str | None:
        """Mark a live link used, in the statement that checks it (so it works once);
        its e-mail, or None when it is unknown, unsent, expired or used."""
        rows = self.all(
            "UPDATE sign_ins SET used_at = ? WHERE token_hash = ? AND used_at IS NULL"
            " AND expires_at IS NOT NULL AND expires_at >= ? RETURNING email",
            (now, token_hash, now),
        )
        return str(rows[0][0]) if rows else None

    def insert_account_session(self, id_hash: str, email: str, now: int, expires_at: int) -> None:
        self.execute(
            "INSERT INTO account_sessions (id_hash, email, created_at, expires_at) VALUES (?, ?, ?, ?)",
            (id_hash, email, now, expires_at),
        )

    def account_session_email(self, id_hash: str, now: int) -> str | None:
        row = self.one(
            "SELECT email FROM account_sessions WHERE id_hash = ? AND expires_at > ?", (id_hash, now)
        )
        return str(row[0]) if row else None

    def delete_account_session(self, id_hash: str) -> bool:
        return self.execute("DELETE FROM account_sessions WHERE id_hash = ?", (id_hash,)).rowcount > 0

    def purge_account_rows(self, now: int, limit: int) -> int:
        """Delete up to ``limit`` sign-in links past their keep time and as many ended sessions
        (a link's outbox row goes with it); how many rows went."""
        links = self.execute(
            "DELETE FROM sign_ins WHERE id IN (SELECT id FROM sign_ins WHERE keep_until < ? LIMIT ?)",
            (now, limit),
        ).rowcount
        sessions = self.execute(
            "DELETE FROM account_sessions WHERE id_hash IN"
            " (SELECT id_hash FROM account_sessions WHERE expires_at <= ? LIMIT ?)",
            (now, limit),
        ).rowcount
        return links + sessions

    # --- audit trail ------------------------------------------------------------

    def audit(
        self,
        now: int,
        actor: str,
        action: str,
        license_id: str | None,
        before: Any = None,
        after: Any = None,
    ) -> None:
        self.execute(
            "INSERT INTO audit_log (at, actor, action, license_id, before, after) VALUES (?, ?, ?, ?, ?, ?)",
            (
                now,
                actor,
                action,
                license_id,
                None if before is None else json.dumps(before, sort_keys=True),
                None if after is None else json.dumps(after, sort_keys=True),
            ),
        )

    # --- customer identities (OIDC) ------------------------------------------------
    # The link lives in customer_identities; customers.oidc_sub (written by
    # upsert_customer) is honoured too, so either way of linking is found.

    def customer_ids_for_sub(self, sub: str) -> list[str]:
        rows = self.all(
            "SELECT id FROM customers WHERE oidc_sub = ?"
            " UNION SELECT customer_id FROM customer_identities WHERE oidc_sub = ?"
            " ORDER BY 1",
            (sub, sub),
        )
        return [str(r[0]) for r in rows]

    def oidc_sub_of(self, customer_id: str) -> str | None:
        row = self.one(
            "SELECT COALESCE(i.oidc_sub, c.oidc_sub) FROM customers c"
            " LEFT JOIN customer_identities i ON i.customer_id = c.id WHERE c.id = ?",
            (customer_id,),
        )
        return None if row is None or row[0] is None else str(row[0])

    def unlinked_customer_ids_by_email(self, email: str) -> list[str]:
        """Customers with this e-mail (ASCII case-insensitive) that no identity owns yet."""
        rows = self.all(
            "SELECT c.id FROM customers c LEFT JOIN customer_identities i ON i.customer_id = c.id"
            " WHERE c.email = ? COLLATE NOCASE AND c.oidc_sub IS NULL AND i.customer_id IS NULL"
            " ORDER BY c.created_at, c.id",
            (email,),
        )
        return [str(r[0]) for r in rows]

    def insert_customer_identity(self, customer_id: str, sub: str, via: str, now: int) -> None:
        self.execute(
            "INSERT INTO customer_identities (customer_id, oidc_sub, via, linked_at) VALUES (?, ?, ?, ?)",
            (customer_id, sub, via, now),
        )

    def licenses_of_customers(self, customer_ids: Sequence[str]) -> list[License]:
        if not customer_ids:
            return []
        rows = self.all(
            f"SELECT {LICENSE_SELECT} FROM licenses WHERE customer_id IN ({_marks(customer_ids)})"
            " ORDER BY created_at, id",
            list(customer_ids),
        )
        return [License.from_row(r) for r in rows]

    # --- mail sending (mailer.py) -------------------------------------------------
    # A row is owned by the sender whose claim set its current ``attempts``: the
    # retry and failure marks check it, so a sender whose lease ran out cannot
    # overwrite the outcome of the one that took the row over.

    _DUE_MAIL = (
        "(status = 'pending' AND next_attempt_at <= ?)"
        " OR (status = 'sending' AND claimed_until <= ? AND attempts < ?)"
    )

    def count_due_mail(self, now: int, max_attempts: int) -> int:
        row = self.one(f"SELECT COUNT(*) FROM outbox WHERE {self._DUE_MAIL}", (now, now, max_attempts))
        return int(row[0]) if row else 0

    def claim_mail(
        self, now: int, claimed_until: int, max_attempts: int, message_id: str
    ) -> sqlite3.Row | None:
        """Atomically take the next due row (pending, or a claim whose lease ran out).

        The row becomes ``sending`` until ``claimed_until``, its attempt is
        counted, and it keeps the Message-ID of its first claim (``message_id``
        is used only when it has none yet).
        """
        with self.atomic():
            row = self.one(
                f"SELECT id FROM outbox WHERE {self._DUE_MAIL} ORDER BY next_attempt_at, id LIMIT 1",
                (now, now, max_attempts),
            )
            if row is None:
                return None
            claimed = self.all(
                "UPDATE outbox SET status = 'sending', claimed_until = ?, attempts = attempts + 1,"
                " message_id = COALESCE(message_id, ?) WHERE id = ? RETURNING *",
                (claimed_until, message_id, row[0]),
            )
            return claimed[0] if claimed else None

    def mark_mail_sent(self, outbox_id: int, now: int) -> None:
        """Delivered is delivered: recorded whoever holds the claim now."""
        with self.atomic():
            self.execute(
                "UPDATE outbox SET status = 'sent', sent_at = ?, claimed_until = NULL, last_error = NULL"
                " WHERE id = ? AND status != 'sent'",
                (now, outbox_id),
            )

    def retry_mail(self, outbox_id: int, attempts: int, next_attempt_at: int, error: str) -> bool:
        with self.atomic():
            cursor = self.execute(
                "UPDATE outbox SET status = 'pending', next_attempt_at = ?, claimed_until = NULL,"
                " last_error = ? WHERE id = ? AND status = 'sending' AND attempts = ?",
                (next_attempt_at, error, outbox_id, attempts),
            )
        return cursor.rowcount > 0

    def fail_mail(self, outbox_id: int, attempts: int, error: str) -> bool:
        with self.atomic():
            cursor = self.execute(
                "UPDATE outbox SET status = 'failed', claimed_until = NULL, last_error = ?"
                " WHERE id = ? AND status = 'sending' AND attempts = ?",
                (error, outbox_id, attempts),
            )
        return cursor.rowcount > 0

    def fail_abandoned_mail(self, now: int, max_attempts: int) -> int:
        """Give up on rows whose last allowed attempt was cut short (lease expired)."""
        with self.atomic():
            cursor = self.execute(
                "UPDATE outbox SET status = 'failed', claimed_until = NULL,"
                " last_error = 'the last attempt was interrupted; it may have been delivered'"
                " WHERE status = 'sending' AND claimed_until <= ? AND attempts >= ?",
                (now, max_attempts),
            )
        return cursor.rowcount

    def has_mail(self, license_id: str, kind: str) -> bool:
        """Whether a message of ``kind`` was ever queued for the licence."""
        row = self.one("SELECT 1 FROM outbox WHERE license_id = ? AND kind = ? LIMIT 1", (license_id, kind))
        return row is not None

    def mail_for_license(self, license_id: str) -> list[sqlite3.Row]:
        return self.all("SELECT * FROM outbox WHERE license_id = ? ORDER BY id", (license_id,))

    # --- metrics ------------------------------------------------------------------

    def outbox_backlog(self) -> dict[str, int]:
        """Outbox rows not yet sent, counted by status."""
        rows = self.all(
            "SELECT status, COUNT(*) FROM outbox WHERE status IN ('pending', 'sending', 'failed')"
            " GROUP BY status"
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def outbox_oldest_unsent(self) -> int | None:
        """``created_at`` of the oldest mail still waiting to go out, if any."""
        row = self.one("SELECT MIN(created_at) FROM outbox WHERE status IN ('pending', 'sending')")
        return int(row[0]) if row and row[0] is not None else None

    # --- core: signers of re-issued keys, one-read seat check -----------------------

    def keep_signer(self, kid: str, until: int | None) -> None:
        """Remember that ``kid`` signed a key valid until ``until`` (None: for good)."""
        self.execute(
            "INSERT INTO superseded_keys (kid, until) VALUES (?, ?) ON CONFLICT (kid) DO UPDATE SET"
            " until = CASE WHEN until IS NULL OR excluded.until IS NULL THEN NULL"
            " ELSE MAX(until, excluded.until) END",
            (kid, until),
        )

    def license_seats(
        self, license_id: str, hashes: Sequence[str], now: int
    ) -> tuple[License | None, str | None, int | None, int]:
        """The licence, the hash and ``last_seen_at`` of the row that seats a machine stored
        under any of ``hashes`` (the first preferred; None: no seat), and the seats taken.

        A machine not seen for the licence's ``release_after_days`` holds no seat:
        it is neither counted nor found. One statement: a validation needs all of it.
        """
        row = self.one(
            f"WITH l AS (SELECT {LICENSE_SELECT}, {_SEATED_SINCE} AS seated_since FROM licenses WHERE id = ?)"
            f" SELECT l.*, m.machine_hash, m.last_seen_at,"
            " (SELECT COUNT(*) FROM machines WHERE license_id = l.id AND last_seen_at >= l.seated_since)"
            " FROM l LEFT JOIN machines m ON m.license_id = l.id"
            f" AND m.machine_hash IN ({_marks(hashes)}) AND m.last_seen_at >= l.seated_since"
            " ORDER BY m.machine_hash = ? DESC LIMIT 1",
            (now, license_id, *hashes, hashes[0] if hashes else None),
        )
        if row is None:
            return None, None, None, 0
        seen_hash, seen_at, used = row[-3], row[-2], row[-1]
        return (
            License.from_row(row),
            None if seen_hash is None else str(seen_hash),
            None if seen_at is None else int(seen_at),
            int(used),
        )

    def machine_state(
        self, license_id: str, hashes: Sequence[str], seated_since: int
    ) -> tuple[str | None, int]:
        """The hash of the row that seats the machine (the first of ``hashes`` preferred;
        None: no seat) and the seats taken, in one read; machines last seen before
        ``seated_since`` hold none."""
        row = self.one(
            "SELECT (SELECT machine_hash FROM machines WHERE license_id = ?1 AND last_seen_at >= ?3"
            f" AND machine_hash IN ({_marks(hashes, start=4)}) ORDER BY machine_hash = ?2 DESC LIMIT 1),"
            " (SELECT COUNT(*) FROM machines WHERE license_id = ?1 AND last_seen_at >= ?3)",
            (license_id, hashes[0], seated_since, *hashes),
        )
        if row is None:
            return None, 0
        return (None if row[0] is None else str(row[0])), int(row[1])

    # --- support tooling: look-ups, stats, export and backup -------------------

    def licenses_where(self, column: str, value: str) -> list[License]:
        """Every licence whose ``column`` equals ``value``, oldest first."""
        if column not in LICENSE_COLUMNS:
            raise ValueError(column)
        rows = self.all(
            f"SELECT {LICENSE_SELECT} FROM licenses WHERE {column} = ? ORDER BY created_at, id", (value,)
        )
        return [License.from_row(r) for r in rows]

    def licenses_by_email(self, email: str) -> list[License]:
        rows = self.all(
            f"SELECT {LICENSE_SELECT} FROM licenses JOIN customers ON customers.id = licenses.customer_id"
            " WHERE customers.email = ? COLLATE NOCASE ORDER BY licenses.created_at, licenses.id",
            (email,),
        )
        return [License.from_row(r) for r in rows]

    def licenses_by_stripe_customer(self, stripe_customer_id: str) -> list[License]:
        rows = self.all(
            f"SELECT {LICENSE_SELECT} FROM licenses JOIN customers ON customers.id = licenses.customer_id"
            " WHERE licenses.stripe_customer_id = ? OR customers.stripe_customer_id = ?"
            " ORDER BY licenses.created_at, licenses.id",
            (stripe_customer_id, stripe_customer_id),
        )
        return [License.from_row(r) for r in rows]

    def iter_licenses(self) -> Iterator[License]:
        for row in self.execute(f"SELECT {LICENSE_SELECT} FROM licenses ORDER BY created_at, id"):
            yield License.from_row(row)

    def machine_rows(self, license_id: str) -> list[sqlite3.Row]:
        return self.all(
            "SELECT id, public_id, label, machine_hash, activated_at, last_seen_at FROM machines"
            " WHERE license_id = ? ORDER BY activated_at, id",
            (license_id,),
        )

    _EVENT_COLUMNS = (
        "id, type, created, status, attempts, error, reason, subject, license_id, received_at, processed_at"
    )

    def stripe_events_for_license(self, license_id: str) -> list[sqlite3.Row]:
        return self.all(
            f"SELECT {self._EVENT_COLUMNS} FROM stripe_events WHERE license_id = ?"
            " ORDER BY created, received_at",
            (license_id,),
        )

    def stripe_events_with_status(self, status: str, limit: int) -> list[sqlite3.Row]:
        return self.all(
            f"SELECT {self._EVENT_COLUMNS} FROM stripe_events WHERE status = ?"
            " ORDER BY received_at DESC, id LIMIT ?",
            (status, limit),
        )

    def outbox_for_license(self, license_id: str) -> list[sqlite3.Row]:
        return self.all(
            "SELECT id, kind, to_addr, to_name, status, attempts, next_attempt_at, last_error, message_id,"
            " created_at, sent_at FROM outbox WHERE license_id = ? ORDER BY id",
            (license_id,),
        )

    def audit_entries(
        self, *, license_id: str | None, actor: str | None, before_id: int | None, limit: int
    ) -> list[sqlite3.Row]:
        """Audit rows, newest first; ``before_id`` pages backwards."""
        return self.all(
            "SELECT id, at, actor, action, license_id, before, after FROM audit_log"
            " WHERE (?1 IS NULL OR license_id = ?1) AND (?2 IS NULL OR actor = ?2)"
            " AND (?3 IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?4",
            (license_id, actor, before_id, limit),
        )

    def unmapped_purchases(self, limit: int = 5) -> tuple[int, list[str]]:
        """Paid checkouts whose price maps to no plan and that no replay has fixed:
        how many, and the newest event ids."""
        where = (
            "FROM stripe_events WHERE reason = 'no_plan' AND status = 'ignored'"
            " AND type LIKE 'checkout.session.%'"
        )
        row = self.one(f"SELECT COUNT(*) {where}")
        rows = self.all(f"SELECT id {where} ORDER BY created DESC, id LIMIT ?", (limit,))
        return (int(row[0]) if row else 0), [str(r[0]) for r in rows]

    def event_counts_since(self, since: int) -> dict[str, int]:
        rows = self.all(
            "SELECT status, COUNT(*) FROM stripe_events WHERE received_at >= ? GROUP BY status", (since,)
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def outbox_counts(self) -> dict[str, int]:
        rows = self.all("SELECT status, COUNT(*) FROM outbox GROUP BY status")
        return {str(r[0]): int(r[1]) for r in rows}

    def machine_total(self) -> int:
        row = self.one("SELECT COUNT(*) FROM machines")
        return int(row[0]) if row else 0

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """A read-only view of the whole database as of one instant (its own connection).

        WAL keeps the view stable while writers go on, so a long export never
        mixes states and never blocks a webhook.
        """
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
        except sqlite3.Error as err:
            raise StorageUnavailable(f"cannot open database {self.path}: {err}") from err
        try:
            conn.execute("PRAGMA query_only = ON")
            conn.execute("BEGIN")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            yield Snapshot(conn)
        except sqlite3.Error as err:
            raise StorageUnavailable(f"database read failed: {err}") from err
        finally:
            conn.close()

    def backup_to(self, target: Path) -> None:
        """Copy the database into the new file ``target`` as one consistent snapshot.

        One backup step (all pages) runs inside a single read transaction: a
        copy made in several steps would restart whenever another connection
        writes. The copy is switched out of WAL so it is one self-contained file.
        """
        private_file(target)
        try:
            dest = sqlite3.connect(target, isolation_level=None)
            try:
                self.conn.backup(dest)
                dest.execute("PRAGMA journal_mode = DELETE").fetchone()
            finally:
                dest.close()
        except sqlite3.Error as err:
            raise StorageUnavailable(f"backup failed: {err}") from err


class Snapshot:
    """Rows of a consistent read-only view; table and column names come from the caller's allowlist."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def tables(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
        return [str(r[0]) for r in rows]

    def count(self, table: str) -> int:
        return int(self.conn.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0])

    def columns(self, table: str) -> list[str]:
        """The table's columns as the schema has them now."""
        return [str(r[1]) for r in self.conn.execute(f'PRAGMA table_info("{table}")').fetchall()]

    def rows(self, table: str, columns: Sequence[str], batch: int = 500) -> Iterator[dict[str, Any]]:
        names = ", ".join(f'"{c}"' for c in columns)
        cursor = self.conn.execute(f'SELECT {names} FROM "{table}" ORDER BY rowid')
        while chunk := cursor.fetchmany(batch):
            for row in chunk:
                yield dict(row)


def integrity_check(path: Path) -> list[str]:
    """``PRAGMA integrity_check`` of the file at ``path``: ``["ok"]`` when sound."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            return [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.Error as err:
        return [str(err)]


_SEATED_SINCE = (
    "CASE WHEN licenses.release_after_days IS NULL THEN 0 ELSE ?1 - licenses.release_after_days * 86400 END"
)
"""SQL of :meth:`License.seated_since` for the row, with ``now`` as parameter 1."""


def _marks(values: Sequence[Any], start: int = 0) -> str:
    """``?, ?, …`` for ``values`` (numbered from ``start`` when given); ``NULL`` for none."""
    if not values:
        return "NULL"
    if start:
        return ", ".join(f"?{n}" for n in range(start, start + len(values)))
    return ", ".join("?" for _ in values)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def private_file(path: Path) -> None:
    """Make ``path`` (created empty if missing) readable by its owner only, whatever the umask.

    SQLite gives the WAL and shared-memory files the database file's mode, so
    a private database keeps its companions private too.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError as err:
        raise StorageUnavailable(f"cannot make {path} private: {err.strerror or err}") from err


def open_store(path: Path, now: int) -> Store:
    """Open (creating if needed) and migrate the database; it and its WAL are kept 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if companion == path or companion.exists():
            private_file(companion)
    store = Store(path)
    store.migrate(now)
    return store
