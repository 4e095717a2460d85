"""Remembered validation reads: served from memory, forgotten at the next commit of any process."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import T0, issue_license
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_proc import ServerProcess, make_data_dir

import changes
import keys
import licensing
import store as store_module
from services import Services
from store import Store


@pytest.fixture
def other(services: Services) -> Iterator[Store]:
    """A second store on the same file, with its own mapping of the counter: another process, in effect."""
    second = Store(services.config.db_path)
    yield second
    second.close()


def set_status(target: Store, license_id: str, status: str) -> None:
    with target.atomic():
        target.execute("UPDATE licenses SET status = ? WHERE id = ?", (status, license_id))


# --- the counter -----------------------------------------------------------------------


def test_the_counter_is_shared_through_its_file(tmp_path: Path) -> None:
    path = tmp_path / "db-changes"
    first = changes.ChangeCounter(path)
    for _ in range(3):
        first.bump()
    second = changes.ChangeCounter(path)  # the file exists: opened as it is, never zeroed
    assert second.read() == 3
    second.bump()
    assert first.read() == 4
    assert path.stat().st_size == changes.SIZE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    first.close()
    second.close()


def test_a_short_counter_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db-changes"
    path.write_bytes(b"\0\0")
    with pytest.raises(OSError, match="shorter"):
        changes.ChangeCounter(path)


def test_commits_that_change_rows_bump_the_counter(services: Services) -> None:
    db = services.store
    lic = issue_license(services)
    counter = changes.ChangeCounter(db.changes_path)
    before = counter.read()
    db.get_license(lic.id)
    with db.atomic():
        db.execute("SELECT COUNT(*) FROM licenses")
    with db.atomic():
        db.execute("UPDATE licenses SET status = status WHERE id = 'lic_nobody'")
    assert counter.read() == before  # reads, and a write that changed nothing
    with pytest.raises(RuntimeError), db.atomic():
        db.execute("UPDATE licenses SET status = 'revoked' WHERE id = ?", (lic.id,))
        raise RuntimeError("rolled back")
    assert counter.read() == before
    set_status(db, lic.id, "suspended")
    assert counter.read() == before + 1
    db.execute("UPDATE licenses SET status = 'active' WHERE id = ?", (lic.id,))  # autocommit
    assert counter.read() == before + 2
    counter.close()


# --- the memo ----------------------------------------------------------------------------


def test_a_repeated_read_comes_from_memory(services: Services) -> None:
    db = services.store
    lic = issue_license(services)
    first = db.license_seats_recent(lic.id, None)
    # An edit behind licensed's back (the sqlite3 shell) does not bump the counter:
    with sqlite3.connect(db.path) as plain:
        plain.execute("UPDATE licenses SET status = 'revoked' WHERE id = ?", (lic.id,))
    assert db.license_seats_recent(lic.id, None) is first
    assert db.license_seats(lic.id, None)[0].status == "revoked"  # type: ignore[union-attr]


def test_a_remembered_read_lasts_at_most_its_bound(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = services.store
    lic = issue_license(services)
    moment = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: moment[0])
    db.license_seats_recent(lic.id, None)
    with sqlite3.connect(db.path) as plain:
        plain.execute("UPDATE licenses SET status = 'revoked' WHERE id = ?", (lic.id,))
    moment[0] += store_module.RECENT_READ_SECONDS - 0.01
    assert db.license_seats_recent(lic.id, None)[0].status == "active"  # type: ignore[union-attr]
    moment[0] += 0.02
    assert db.license_seats_recent(lic.id, None)[0].status == "revoked"  # type: ignore[union-attr]


def test_a_commit_in_another_store_ends_the_memo(services: Services, other: Store) -> None:
    db = services.store
    lic = issue_license(services)
    assert db.license_seats_recent(lic.id, None)[0].status == "active"  # type: ignore[union-attr]
    set_status(other, lic.id, "revoked")
    assert db.license_seats_recent(lic.id, None)[0].status == "revoked"  # type: ignore[union-attr]


def test_seats_are_remembered_per_machine_and_forgotten_on_any_seat_change(
    services: Services, other: Store
) -> None:
    db = services.store
    lic = issue_license(services)
    assert db.license_seats_recent(lic.id, "m1")[1:] == (None, 0)
    with other.atomic():
        other.add_machine(lic.id, "m2", T0)
    assert db.license_seats_recent(lic.id, "m1")[1:] == (None, 1)
    assert db.license_seats_recent(lic.id, "m2")[1:] == (T0, 1)
    with other.atomic():
        other.remove_machine(lic.id, "m2")
    assert db.license_seats_recent(lic.id, "m2")[1:] == (None, 0)


Operation = tuple[str, int, str]
OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["read", "status", "seat", "unseat", "plain-read"]),
        st.integers(0, 1),  # which store does it
        st.sampled_from(["active", "suspended", "revoked", "m1", "m2"]),
    ),
    max_size=25,
)


# Each example issues its own licence, so sharing the database between examples is safe.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS)
def test_a_remembered_read_always_equals_a_fresh_one(services: Services, operations: list[Operation]) -> None:
    """Whatever two stores (two processes) commit, in any order, the memo never lags."""
    second = Store(services.config.db_path)
    stores = (services.store, second)
    lic = issue_license(services, email=f"p{len(operations)}-{os.urandom(4).hex()}@example.com")
    try:
        for action, which, value in operations:
            target = stores[which]
            if action == "status" and value in ("active", "suspended", "revoked"):
                set_status(target, lic.id, value)
            elif action == "seat":
                with target.atomic():
                    if target.machine_state(lic.id, value)[0] is None:
                        target.add_machine(lic.id, value, T0)
            elif action == "unseat":
                with target.atomic():
                    target.remove_machine(lic.id, value)
            for reader in stores:
                for machine in (None, "m1", "m2"):
                    assert reader.license_seats_recent(lic.id, machine) == reader.license_seats(
                        lic.id, machine
                    )
    finally:
        second.close()


VALIDATIONS = st.lists(
    st.tuples(
        st.sampled_from(["validate", "status", "seat", "unseat", "deactivate", "later"]),
        st.sampled_from(["active", "suspended", "revoked", "m1", "m2", "m3"]),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=VALIDATIONS)
def test_a_remembered_validation_answers_as_a_fresh_one(
    services: Services, operations: list[tuple[str, str]]
) -> None:
    """The licensing layer remembers whole reads per request: whatever another process
    commits, and whatever validations write themselves, its answer is the one a
    licensing layer with nothing remembered gives at the same moment."""
    second = Store(services.config.db_path)
    lic = issue_license(services, email=f"v{len(operations)}-{os.urandom(4).hex()}@example.com")

    def layer(store: Store) -> licensing.Licensing:
        return licensing.Licensing(store, services.ring, services.catalog, "http://test", 24)

    remembering = layer(services.store)
    key = remembering.key(lic)
    now = T0
    try:
        for action, value in operations:
            machine = value if value.startswith("m") else "m1"
            if action == "status" and not value.startswith("m"):
                set_status(second, lic.id, value)
            elif action == "seat":
                with second.atomic():
                    if second.machine_state(lic.id, keys.machine_hash(machine))[0] is None:
                        second.add_machine(lic.id, keys.machine_hash(machine), now)
            elif action == "unseat":
                with second.atomic():
                    second.remove_machine(lic.id, keys.machine_hash(machine))
            elif action == "deactivate":
                remembering.deactivate(licensing.LicenseRequest(key, machine), now)
            elif action == "later":
                now += licensing.SEEN_WRITE_INTERVAL
            elif action == "validate":
                remembering.check(licensing.LicenseRequest(key, machine), now)
            for asked in (None, "m1", "m2"):
                request = licensing.LicenseRequest(key, asked)
                fresh = Store(services.config.db_path)  # nothing remembered, at any level
                try:
                    assert remembering.check(request, now) == layer(fresh).check(request, now)
                finally:
                    fresh.close()
    finally:
        second.close()


# --- across real processes ----------------------------------------------------------------


def test_a_revocation_from_the_command_line_reaches_a_busy_server_at_once(tmp_path: Path) -> None:
    """The server keeps validating one key (so its read is remembered); ``licensed admin
    revoke`` in another process commits; the very next validation answers REVOKED."""
    server = ServerProcess(make_data_dir(tmp_path / "data"))
    server.start()
    try:
        key = server.issue()
        body = {"key": key, "machine_id": "busy-machine"}
        with requests.Session() as http:
            for _ in range(20):
                answer = http.post(server.url + "/api/license/validate", json=body, timeout=10)
                assert answer.json()["code"] == "VALID", answer.text
            license_id = str(server.rows("SELECT id FROM licenses")[0][0])
            done = server.cli("admin", "revoke", license_id)
            assert done.returncode == 0, done.stderr
            answer = http.post(server.url + "/api/license/validate", json=body, timeout=10)
            assert answer.json()["code"] == "REVOKED", answer.text
    finally:
        server.stop()
