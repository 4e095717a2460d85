"""``GET /api/admin/debug/store``: the database as one JSON document, for support.

Every column of the tables below is exported as the schema has it now (so a
column added by a migration is never forgotten), except setting values, which
may hold secrets. Each value then goes through the same masking rules as the
logs (:mod:`redact`): keys, leases, tokens, Stripe secrets and checkout session
ids (which fetch a key) never leave, however deep in a stored payload they sit.
Machine ids were never stored; only their hashes are.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from contextlib import ExitStack
from typing import Any

from .licensing import iso
from .redact import MASK, Redactor
from .services import Services

EXPORTED = (
    "schema_migrations",
    "settings",
    "customers",
    "customer_identities",
    "licenses",
    "machines",
    "payments",
    "disputes",
    "stripe_events",
    "outbox",
    "audit_log",
    "superseded_keys",
    "imported_keys",
)
"""Tables exported row by row; any other table is only counted."""
LEFT_OUT = {("settings", "value"), ("imported_keys", "key_hash")}
"""Setting values may hold secrets; an old key's hash, unlike a machine's, could be
reversed by guessing when the system that made the keys made short ones."""
JSON_COLUMNS = {("stripe_events", "payload"), ("audit_log", "before"), ("audit_log", "after")}
NAMES_KEPT = {("settings", "key")}
"""Columns whose name alone would mask them, though their values are plain (setting names)."""


def export_row(redactor: Redactor, table: str, row: dict[str, Any]) -> dict[str, Any]:
    """One row as exported: JSON columns parsed, every value masked like a log line's."""
    out: dict[str, Any] = {}
    for column, value in row.items():
        if (table, column) in JSON_COLUMNS and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = MASK
        out[column] = redactor.clean(value, None if (table, column) in NAMES_KEPT else column)
    return out


class Export:
    """The database as one JSON document, produced in chunks from one consistent snapshot.

    A WSGI body: the snapshot is opened here, so a database that cannot be read
    still gets a JSON error answer; ``close()`` (called by the server, even for
    a client that went away) releases it.
    """

    def __init__(self, services: Services, actor: str, now: int, chunk_rows: int = 200) -> None:
        self._stack = ExitStack()
        self._snap = self._stack.enter_context(services.store.snapshot())
        self._redactor = Redactor()
        self._chunks = self._generate(actor, now, chunk_rows)

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        self._chunks.close()
        self._stack.close()

    def _generate(self, actor: str, now: int, chunk_rows: int) -> Generator[bytes, None, None]:
        snap = self._snap
        present = snap.tables()
        head = {"exported_at": iso(now), "exported_by": actor}
        yield json.dumps(head)[:-1].encode() + b',"tables":{'
        first_table = True
        for table in EXPORTED:
            if table not in present:
                continue
            columns = [c for c in snap.columns(table) if (table, c) not in LEFT_OUT]
            yield (b"" if first_table else b",") + json.dumps(table).encode() + b":["
            first_table = False
            batch: list[str] = []
            first_row = True
            for row in snap.rows(table, columns):
                batch.append(json.dumps(export_row(self._redactor, table, row), separators=(",", ":")))
                if len(batch) >= chunk_rows:
                    yield (b"" if first_row else b",") + ",".join(batch).encode()
                    first_row, batch = False, []
            if batch:
                yield (b"" if first_row else b",") + ",".join(batch).encode()
            yield b"]"
        others = {t: snap.count(t) for t in present if t not in EXPORTED}
        yield b'},"not_exported":' + json.dumps(others).encode() + b"}"
        self._stack.close()


def export(services: Services, actor: str, now: int, chunk_rows: int = 200) -> Export:
    """Export the store (a bulk read of personal data, so it goes on record too)."""
    with services.store.atomic():
        services.store.audit(now, actor, "store.export", None)
    return Export(services, actor, now, chunk_rows)
