"""SQLite storage: PRAGMAs, migrations, transactions, and a database that cannot be written."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.clock import T0
from support.live import Live, issue_license

from licensed import store as store_module
from licensed.errors import Conflict, StorageUnavailable
from licensed.licensing import LicenseRequest
from licensed.services import Services
from licensed.store import MIGRATIONS, License, Store, open_store


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "data" / "licensed.sqlite3", T0)
    yield opened
    opened.close()


def pragmas(conn: sqlite3.Connection) -> dict[str, object]:
    return {
        name: conn.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
    }


WANTED = {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 5000}


def test_pragmas_on_every_connection(db: Store) -> None:
    assert pragmas(db.conn) == WANTED
    seen: list[dict[str, object]] = []
    worker = threading.Thread(target=lambda: seen.append(pragmas(db.conn)))
    worker.start()
    worker.join(timeout=10)
    assert seen == [WANTED]  # a second thread gets its own connection, set up the same way
    # WAL is a property of the file: a plain connection sees it too.
    with sqlite3.connect(db.path) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_foreign_keys_are_enforced(db: Store) -> None:
    with pytest.raises(Conflict):
        db.add_machine("lic_missing", "0" * 64, T0)


def test_migrations_are_recorded(db: Store) -> None:
    rows = [tuple(r) for r in db.all("SELECT version, name, applied_at FROM schema_migrations ORDER BY 1")]
    assert rows == [(n, name, T0) for n, (name, _) in enumerate(MIGRATIONS, start=1)]
    assert db.schema_version() == len(MIGRATIONS)
    tables = {r[0] for r in db.all("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"customers", "licenses", "machines", "stripe_events", "outbox", "audit_log", "settings"} <= tables


def test_reopening_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "licensed.sqlite3"
    first = open_store(path, T0)
    customer = first.upsert_customer(T0, email="a@example.com")
    first.close()
    for later in (T0 + 10, T0 + 20):
        again = Store(path)
        assert again.migrate(later) == []  # nothing left to apply
        assert again.get_customer(customer) is not None
        applied = again.all("SELECT applied_at FROM schema_migrations")
        assert {r[0] for r in applied} == {T0}
        again.close()


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "licensed.sqlite3"
    db = open_store(path, T0)
    db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', 0)")
    db.close()
    with pytest.raises(StorageUnavailable, match="newer"):
        open_store(path, T0)


def test_atomic_rolls_back_on_error(db: Store) -> None:
    with pytest.raises(RuntimeError), db.atomic():
        db.upsert_customer(T0, email="gone@example.com")
        raise RuntimeError("boom")
    assert db.all("SELECT * FROM customers") == []

    with db.atomic():
        kept = db.upsert_customer(T0, email="kept@example.com")
        with pytest.raises(RuntimeError), db.atomic():  # nested: a savepoint
            db.upsert_customer(T0, email="inner@example.com")
            raise RuntimeError("inner")
    assert [r["id"] for r in db.all("SELECT id FROM customers")] == [kept]


def test_integrity_errors_become_conflicts(db: Store) -> None:
    db.put_setting("k", "v", T0)
    with pytest.raises(Conflict), db.atomic():
        db.execute("INSERT INTO settings (key, value, updated_at) VALUES ('k', 'w', 0)")
    assert db.get_setting("k") == "v"


def test_unopenable_database_is_storage_unavailable(tmp_path: Path) -> None:
    (tmp_path / "licensed.sqlite3").mkdir()  # a directory where the file should be
    with pytest.raises(StorageUnavailable):
        open_store(tmp_path / "licensed.sqlite3", T0)


# --- a database that cannot be written ------------------------------------------------------------


def test_health_is_503_when_the_database_cannot_be_written(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = live.issue()
    assert live.get("/health").status_code == 200

    # Make every connection the server opens from now on read-only. Tests may run
    # as root, for whom a read-only file or directory is no obstacle, so file
    # modes would prove nothing. ``PRAGMA query_only`` makes SQLite itself refuse
    # every write with SQLITE_READONLY, the error a read-only file gives: it is
    # added to the store's PRAGMA list, and closing the open connections makes
    # each server thread reconnect with it. The app's code is not touched.
    monkeypatch.setattr(store_module, "PRAGMAS", (*store_module.PRAGMAS, ("query_only", "ON", 1)))
    live.services.store.close()

    answer = live.get("/health")
    assert answer.status_code == 503
    assert answer.json() == {
        "error": {"code": "STORAGE_UNAVAILABLE", "message": answer.json()["error"]["message"]}
    }
    assert "readonly" in answer.json()["error"]["message"]
    # A write on a licence route is the same clean 503, not a 500.
    activation = live.post("/api/license/activate", {"key": key, "machine_id": "m-1"})
    assert activation.status_code == 503
    assert activation.json()["error"]["code"] == "STORAGE_UNAVAILABLE"
    # Reading still works: validation without a machine writes nothing.
    assert live.post("/api/license/validate", {"key": key}).json()["code"] == "VALID"

    # Writable again: the server recovers without a restart.
    monkeypatch.undo()
    live.services.store.close()
    assert live.get("/health").status_code == 200
    assert live.post("/api/license/activate", {"key": key, "machine_id": "m-1"}).json()["code"] == "VALID"


def licence_and_request(
    services: Services, email: str, machine_id: str | None
) -> tuple[License, LicenseRequest]:
    """A one-seat licence issued now, and a validation of its key from ``machine_id``."""
    lic = issue_license(services, "pro-year", email=email)
    return lic, LicenseRequest(key=services.licensing.key(lic), machine_id=machine_id)


@pytest.mark.parametrize("machine_id", [None, "host-a"])
def test_a_validation_reads_in_one_statement(services: Services, machine_id: str | None) -> None:
    """Installations validate every few hours: one read each, with or without a machine
    already seated (seated within the hour, so no last-seen stamp is written)."""
    now = services.now()
    _, request = licence_and_request(services, "one-read@example.com", machine_id)
    assert services.licensing.check(request, now)["valid"]  # seats the machine, if any
    statements: list[str] = []
    services.store.conn.set_trace_callback(statements.append)
    try:
        answer = services.licensing.check(request, now)
    finally:
        services.store.conn.set_trace_callback(None)
    assert answer["code"] == "VALID"
    assert answer["license"]["machines_used"] == (1 if machine_id else 0)
    assert len(statements) == 1, statements


def test_writers_of_one_server_queue_on_its_own_lock(db: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second writer waits for the first without SQLite's sleeping busy handler, and gives
    up with STORAGE_UNAVAILABLE when the first holds on longer than the busy timeout."""
    holding, done = threading.Event(), threading.Event()

    def first_writer() -> None:
        with db.atomic() as conn:
            conn.execute("INSERT INTO settings (key, value, updated_at) VALUES ('first', '1', 0)")
            holding.set()
            done.wait(timeout=10)

    worker = threading.Thread(target=first_writer)
    worker.start()
    try:
        assert holding.wait(timeout=10)
        monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 100)
        too_long = "another write of this server held it too long"
        with pytest.raises(StorageUnavailable, match=too_long), db.atomic():
            pass
    finally:
        done.set()
        worker.join(timeout=10)
    with db.atomic() as conn:
        conn.execute("INSERT INTO settings (key, value, updated_at) VALUES ('second', '2', 0)")
    names = db.all("SELECT key FROM settings WHERE key IN ('first', 'second') ORDER BY 1")
    assert [r[0] for r in names] == ["first", "second"]


def synchronous(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


def test_a_write_that_may_be_lost_commits_without_waiting_for_the_disk_and_only_it(db: Store) -> None:
    with db.atomic(durable=False) as conn:
        assert synchronous(conn) == 1  # NORMAL
        with db.atomic() as inner:
            assert synchronous(inner) == 1  # a nested write belongs to its outer transaction
    assert synchronous(db.conn) == 2
    with db.atomic() as conn:
        assert synchronous(conn) == 2
        with db.atomic(durable=False) as inner:
            assert synchronous(inner) == 2  # inside a durable write, durable
    with pytest.raises(Conflict), db.atomic(durable=False):
        db.add_machine("lic_missing", "0" * 64, T0)
    assert synchronous(db.conn) == 2  # restored after a failed write too


def test_a_due_last_seen_stamp_is_the_one_write_not_waited_on(services: Services) -> None:
    """A new seat is committed durably; the hourly stamp of a seat already held, which
    every validation of an installation validating every few hours writes, is not."""
    now = services.now()
    lic, request = licence_and_request(services, "stamp@example.com", "host-a")
    statements: list[str] = []
    services.store.conn.set_trace_callback(statements.append)
    try:
        assert services.licensing.check(request, now)["activated"]
        seated = list(statements)
        statements.clear()
        later = now + 3 * 3600
        assert services.licensing.check(request, later)["activated"]
    finally:
        services.store.conn.set_trace_callback(None)
    assert not any("synchronous" in s for s in seated)
    assert any(s.startswith("INSERT INTO machines") for s in seated)
    writes = [s.split()[0] for s in statements if not s.startswith(("SELECT", "WITH"))]
    assert writes == ["PRAGMA", "BEGIN", "UPDATE", "COMMIT", "PRAGMA"], statements
    pragmas_set = [s for s in statements if s.startswith("PRAGMA")]
    assert pragmas_set == ["PRAGMA synchronous = NORMAL", "PRAGMA synchronous = FULL"]
    assert synchronous(services.store.conn) == 2
    row = services.store.one("SELECT last_seen_at FROM machines WHERE license_id = ?", (lic.id,))
    assert row is not None and row[0] == later
