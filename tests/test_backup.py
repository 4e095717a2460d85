"""``licensed backup``: a sound, consistent copy while writers keep writing; restore by copying back."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.clock import T0, FrozenClock
from support.live import issue_license
from support.server_proc import run_cli

from licensed import backup, keys, licensing
from licensed.errors import Conflict
from licensed.services import Services, build_services
from licensed.store import Store, integrity_check

ROOT = Path(__file__).resolve().parent.parent


def run_backup(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATA_DIR": str(services.config.data_dir), "PYTHONPATH": str(ROOT)}
    return run_cli(env, "backup", *args)


@dataclass
class Writer:
    """Keeps writing what a busy server writes; remembers what each commit made durable."""

    services: Services
    license_ids: list[str] = field(default_factory=list)
    machine_hashes: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    rounds: int = 0

    def committed(self) -> tuple[set[str], set[str], set[str]]:
        with self.lock:
            return set(self.license_ids), set(self.machine_hashes), set(self.event_ids)

    def step(self, seat_key: str, i: int) -> None:
        services = self.services
        now = services.now()
        machine = f"backup-machine-{i}"
        answer = services.licensing.check(licensing.LicenseRequest(key=seat_key, machine_id=machine), now)
        assert answer["activated"], answer
        lic = issue_license(services, "pro-year", email=f"buyer{i}@example.com")
        with services.store.atomic():
            services.store.execute(
                "INSERT INTO stripe_events (id, type, created, status, license_id, payload, received_at,"
                " processed_at) VALUES (?, 'invoice.paid', ?, 'applied', ?, '{}', ?, ?)",
                (f"evt_backup_{i}", now, lic.id, now, now),
            )
        with self.lock:
            self.machine_hashes.append(keys.machine_hash(machine))
            self.license_ids.append(lic.id)
            self.event_ids.append(f"evt_backup_{i}")
            self.rounds += 1

    def run(self, seat_key: str, limit: int = 100_000) -> None:
        try:
            for i in range(limit):
                if self.stop.is_set():
                    return
                self.step(seat_key, i)
        except BaseException as err:
            self.errors.append(err)


@pytest.fixture
def busy(services: Services) -> Writer:
    return Writer(services)


def seat_license(services: Services) -> str:
    lic = licensing.issue_license(
        services.store,
        services.ring,
        services.catalog.plans["team-monthly"],
        email="seats@example.com",
        now=services.now(),
        actor="test",
        days=30,
        max_machines=10_000,
    )
    return licensing.license_key(lic, services.catalog, services.ring, services.config.app_base_url)


def rows(path: Path, sql: str) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {str(r[0]) for r in conn.execute(sql)}
    finally:
        conn.close()


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["cli", "in-process"])
def test_backup_while_writers_keep_writing(
    how: str, services: Services, busy: Writer, tmp_path: Path
) -> None:
    key = seat_license(services)
    thread = threading.Thread(target=busy.run, args=(key,), name="writer", daemon=True)
    thread.start()
    try:
        wait_for(lambda: busy.rounds >= 100)
        licenses, machines, events = busy.committed()
        rounds_before = busy.rounds
        target = tmp_path / "copies" / "licensed-backup.sqlite3"
        target.parent.mkdir()
        if how == "cli":
            done = run_backup(services, str(target))
            assert done.returncode == 0, done.stderr
            assert "backed up" in done.stdout
        else:
            backup.backup(services.store, target)
        rounds_during = busy.rounds - rounds_before
    finally:
        busy.stop.set()
        thread.join(timeout=30)
    assert not busy.errors, busy.errors
    if how == "cli":
        assert rounds_during > 0  # the writer really kept writing while the copy was made

    assert integrity_check(target) == ["ok"]
    assert licenses <= rows(target, "SELECT id FROM licenses")
    assert machines <= rows(target, "SELECT machine_hash FROM machines")
    assert events <= rows(target, "SELECT id FROM stripe_events")
    assert rows(target, "PRAGMA journal_mode") == {"delete"}  # one self-contained file
    assert sorted(p.name for p in target.parent.iterdir()) == ["licensed-backup.sqlite3"]


def test_backup_refuses_to_overwrite_unless_forced(services: Services, tmp_path: Path) -> None:
    seat_license(services)
    target = tmp_path / "existing.sqlite3"
    target.write_bytes(b"keep me")

    refused = run_backup(services, str(target))
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [f"licensed: {target} exists; add --force to overwrite it"]
    assert target.read_bytes() == b"keep me"

    forced = run_backup(services, str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert integrity_check(target) == ["ok"]
    assert len(rows(target, "SELECT id FROM licenses")) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_backup_into_a_missing_directory_fails_cleanly(services: Services, tmp_path: Path) -> None:
    done = run_backup(services, str(tmp_path / "nowhere" / "copy.sqlite3"))
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1


class CorruptingStore(Store):
    """A store whose copies get damaged on the way, like a failing disk would."""

    def backup_to(self, target: Path) -> None:
        super().backup_to(target)
        with target.open("r+b") as handle:
            handle.seek(2 * 4096)
            handle.write(os.urandom(3 * 4096))


def test_a_copy_failing_integrity_check_is_never_published(services: Services, tmp_path: Path) -> None:
    for _ in range(30):
        seat_license(services)
    copies = tmp_path / "copies"
    copies.mkdir()
    target = copies / "copy.sqlite3"
    damaged = CorruptingStore(services.config.db_path)
    try:
        with pytest.raises(backup.BackupFailed, match="integrity_check"):
            backup.backup(damaged, target)
    finally:
        damaged.close()
    assert list(copies.iterdir()) == []
    # the same database copies soundly without the damage
    backup.backup(services.store, target)
    assert integrity_check(target) == ["ok"]
    with pytest.raises(Conflict):
        backup.backup(services.store, target)


def test_restore_by_copying_the_backup_back(services: Services, clock: FrozenClock, tmp_path: Path) -> None:
    key = seat_license(services)
    copy = tmp_path / "copy.sqlite3"
    backup.backup(services.store, copy)
    later = seat_license(services)  # written after the backup: gone after the restore
    config = services.config

    # restore: stop the server, put the copy in place (without the old WAL files), start again
    services.store.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{config.db_path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(copy, config.db_path)
    restored = build_services(config, clock)
    try:
        check = restored.licensing.check
        assert check(licensing.LicenseRequest(key=key), T0)["code"] == "VALID"
        assert check(licensing.LicenseRequest(key=later), T0)["code"] == "NOT_FOUND"
        restored.store.probe_writable()
    finally:
        restored.store.close()
