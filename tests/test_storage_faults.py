"""A database that cannot be written: write routes answer 503, reads go on, nothing is half-written.

Two ways to take the writes away, because the tests may run as root, where
``chmod`` stops nothing:

* **Real faults** (``licensed serve`` subprocess). *Disk full*: DATA_DIR on a
  size-limited tmpfs mounted for the test; the WAL is truncated, then a filler
  file takes every free block, so the next commit cannot grow the WAL and the
  kernel answers ENOSPC. *Read-only file*: ``chattr +i`` on the database and
  its WAL makes the kernel refuse every write, even through descriptors the
  server already holds open, on ext4 (this one runs in the test's own tmp
  dir, not on tmpfs: tmpfs lets writes through open descriptors go on, which
  is checked, and skipped, rather than trusted). A read-only remount is
  refused while files are open for writing, and a read-only bind mount would
  not reach those open descriptors. The ``-shm`` index is left alone: SQLite
  maps it into memory, and an immutable mapped file kills the process with
  SIGBUS. These need ``mount`` and ``chattr`` privileges; without them they
  are skipped.
* **SQLite's own means** (in-process ``live`` server, always run):
  ``PRAGMA query_only`` on every connection for a read-only database, and
  ``PRAGMA max_page_count`` pinned to the current size for a full one. The
  latter only refuses writes that need a new page (a large event does; a
  small update may still fit), so it is checked with a webhook.

Either way every refused write is answered with the spec's error body, and
after the fault is cleared the same requests succeed and the database passes
``PRAGMA integrity_check``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from support import stripe_events as se
from support.clock import DAY
from support.live import Live
from support.server_proc import ServerProcess, make_data_dir

from licensed import keys
from licensed import store as store_module
from licensed.config import Config
from licensed.errors import StorageUnavailable

# --- what is checked, whichever way the fault is made ------------------------------------------


@dataclass
class Target:
    url: str
    db_path: Path
    now: Callable[[], int]
    key: str
    http: requests.Session
    rotate: Callable[[], None]

    def post(self, path: str, body: Any) -> requests.Response:
        return self.http.post(self.url + path, json=body, timeout=15)

    def webhook(self, event: dict[str, Any]) -> requests.Response:
        body, headers = se.signed(event, self.now())
        return self.http.post(self.url + "/api/stripe/webhook", data=body, headers=headers, timeout=15)


def snapshot(db_path: Path) -> list[str]:
    """Every row of the database as SQL."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def integrity(db_path: Path) -> list[str]:
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def assert_error(answer: requests.Response, status: int | None, code: str | None) -> None:
    """The spec's error body, JSON, never a traceback."""
    assert answer.headers["Content-Type"].startswith("application/json"), answer.text
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert "Traceback" not in answer.text
    if status is not None:
        assert answer.status_code == status, answer.text
    if code is not None:
        assert body["error"]["code"] == code, body


def new_subscription_event(now: int) -> dict[str, Any]:
    sub = se.subscription(
        sub_id=se.uid("sub"), customer=se.uid("cus"), price="price_pro_monthly", period_end=now + 30 * DAY
    )
    return se.event("customer.subscription.created", sub, now)


def prepare(target: Target, *, age_and_rotate: bool = True) -> None:
    """Seats taken before the fault, so known installations can be re-validated during it.

    One was last seen two hours ago, so validating it would normally refresh its
    stamp (a write). Then the signing key is rotated, so validating the key would
    normally re-issue it under the new key (a write too). Neither may stop a
    validation while the database cannot be written.
    """
    for machine in ("installed-machine", "machine-seen-long-ago"):
        answer = target.post("/api/license/validate", {"key": target.key, "machine_id": machine})
        assert answer.status_code == 200 and answer.json()["activated"] is True, answer.text
    assert target.webhook(new_subscription_event(target.now())).status_code == 200
    if not age_and_rotate:
        return
    conn = sqlite3.connect(target.db_path, timeout=10)
    try:
        with conn:
            conn.execute(
                "UPDATE machines SET last_seen_at = last_seen_at - 7200 WHERE machine_hash = ?",
                (hashlib.sha256(b"machine-seen-long-ago").hexdigest(),),
            )
    finally:
        conn.close()
    target.rotate()


def check_refused_writes(target: Target, *, all_writes: bool) -> dict[str, Any]:
    """Under the fault: writes refused with 503 (webhooks 5xx), reads answered, nothing changed."""
    before = snapshot(target.db_path)
    event = new_subscription_event(target.now())

    hook = target.webhook(event)
    assert hook.status_code >= 500, "Stripe must be told to retry"
    assert_error(hook, None, None)

    if all_writes:
        assert_error(target.http.get(target.url + "/health", timeout=15), 503, "STORAGE_UNAVAILABLE")
        for path, body in (
            ("/api/license/validate", {"key": target.key, "machine_id": "new-machine"}),
            ("/api/license/activate", {"key": target.key, "machine_id": "new-machine"}),
            ("/api/license/deactivate", {"key": target.key, "machine_id": "installed-machine"}),
        ):
            assert_error(target.post(path, body), 503, "STORAGE_UNAVAILABLE")

    # Reads go on: a validation without a machine id, an installation already seated,
    # the public routes.
    plain = target.post("/api/license/validate", {"key": target.key})
    assert plain.status_code == 200 and plain.json()["code"] == "VALID", plain.text
    for machine in ("installed-machine", "machine-seen-long-ago"):
        seated = target.post("/api/license/validate", {"key": target.key, "machine_id": machine})
        assert seated.status_code == 200 and seated.json()["activated"] is True, seated.text
    for path in ("/api/public/plans", "/.well-known/jwks.json", "/openapi.json"):
        assert target.http.get(target.url + path, timeout=15).status_code == 200

    assert snapshot(target.db_path) == before, "a refused write left something behind"
    return event


def check_recovered(target: Target, event: dict[str, Any], *, all_writes: bool) -> None:
    """After the fault: the same requests succeed, the event is applied once, the file is sound."""
    deadline = time.monotonic() + 10
    health = target.http.get(target.url + "/health", timeout=15)
    while health.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
        health = target.http.get(target.url + "/health", timeout=15)
    assert health.status_code == 200, health.text
    assert target.webhook(event).status_code == 200
    assert target.webhook(event).status_code == 200  # Stripe's duplicate: no second effect
    conn = sqlite3.connect(target.db_path, timeout=10)
    try:
        row = conn.execute(
            "SELECT status, attempts FROM stripe_events WHERE id = ?", (event["id"],)
        ).fetchone()
        licences = conn.execute(
            "SELECT COUNT(*) FROM licenses WHERE stripe_subscription_id = ?",
            (event["data"]["object"]["id"],),
        ).fetchone()[0]
    finally:
        conn.close()
    # The refused delivery could not even record its failure, so this is the first attempt.
    assert tuple(row) == ("applied", 1)
    assert licences == 1
    if all_writes:
        # Several writes, so that every server thread that met the fault writes again.
        for n in range(16):
            body = {"key": target.key, "machine_id": f"after-{n}"}
            answer = target.post("/api/license/activate", body)
            assert answer.status_code == 200 and answer.json()["activated"] is True, answer.text
            answer = target.post("/api/license/deactivate", body)
            assert answer.status_code == 200 and answer.json()["deactivated"] is True, answer.text
    assert integrity(target.db_path) == ["ok"]


# --- real faults: tmpfs and chattr, on a licensed serve subprocess ------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of the test's own; skipped where mounting needs privileges we lack."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the SQLite-level tests still run")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def running(data_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(make_data_dir(data_dir), {"STRIPE_WEBHOOK_SECRET": se.SECRET})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
    log = proc.stderr()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


@pytest.fixture
def server_on_tmpfs(tmpfs: Path) -> Iterator[ServerProcess]:
    yield from running(tmpfs / "data")


@pytest.fixture
def server_on_disk(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from running(tmp_path / "data")


def real_target(server: ServerProcess, http: requests.Session) -> Target:
    def rotate() -> None:
        done = server.cli("keys", "rotate")
        assert done.returncode == 0, done.stderr
        time.sleep(keys.KeyRing.RELOAD_EVERY + 0.2)  # the server notices new keys this often

    key = server.issue("team-monthly")
    return Target(server.url, server.db_path, lambda: int(time.time()), key, http, rotate)


def fill(directory: Path) -> Path:
    """Take every free block of the file system with one file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as err:
                    assert err.errno == errno.ENOSPC, err
                    break
    finally:
        os.close(fd)
    return filler


def truncate_wal(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        conn.close()
    assert db_path.with_name(db_path.name + "-wal").stat().st_size == 0


def test_disk_full_refuses_writes_and_keeps_reading(server_on_tmpfs: ServerProcess, tmpfs: Path) -> None:
    server = server_on_tmpfs
    with requests.Session() as http:
        target = real_target(server, http)
        prepare(target)
        # Writes that still fit in the WAL's existing blocks would succeed (and be durable);
        # truncating it first means the next commit needs a block the disk no longer has.
        truncate_wal(server.db_path)
        filler = fill(tmpfs)
        try:
            event = check_refused_writes(target, all_writes=True)
        finally:
            filler.unlink()
        check_recovered(target, event, all_writes=True)


def immutable(files: list[Path]) -> Callable[[], None]:
    """``chattr +i`` the files; returns the undo. Skips where it is not allowed or not effective.

    The flag must also stop writes through descriptors opened before it was set
    (the server's connections): ext4 refuses them, tmpfs does not, so this is
    checked on a descriptor of our own first.
    """
    probe = files[0].with_name("immutable-probe")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        targets = [*map(str, files), str(probe)]
        done = subprocess.run(["chattr", "+i", *targets], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not allowed here: {done.stderr.strip()}")
        try:
            os.write(fd, b"x")
        except PermissionError:
            pass
        else:
            subprocess.run(["chattr", "-i", *targets], check=True)
            pytest.skip("chattr +i does not stop writes through open descriptors on this file system")
    finally:
        os.close(fd)

    def undo() -> None:
        subprocess.run(["chattr", "-i", *targets], check=True)

    return undo


def test_read_only_database_refuses_writes_and_keeps_reading(server_on_disk: ServerProcess) -> None:
    server = server_on_disk
    with requests.Session() as http:
        target = real_target(server, http)
        prepare(target)
        undo = immutable([server.db_path, server.db_path.with_name(server.db_path.name + "-wal")])
        try:
            event = check_refused_writes(target, all_writes=True)
        finally:
            undo()
        check_recovered(target, event, all_writes=True)


# --- SQLite's own means, in-process -------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_unhandled_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """In-process, the server's log is captured here: no error may escape untranslated."""
    yield
    unhandled = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert not unhandled, [getattr(r, "trace", "") for r in unhandled]


@pytest.fixture
def config(data_dir: Path) -> Config:
    return Config(data_dir=data_dir, app_base_url="http://licensed.test", stripe_webhook_secrets=(se.SECRET,))


def live_target(live: Live) -> Target:
    def rotate() -> None:
        keys.create_key(live.services.config.keys_dir)
        live.services.ring._load()  # at once, rather than after the ring's reload interval

    return Target(
        live.url,
        live.services.config.db_path,
        lambda: int(live.clock()),
        live.issue("team-monthly"),
        live.http,
        rotate,
    )


@contextlib.contextmanager
def pragma_everywhere(
    live: Live, monkeypatch: pytest.MonkeyPatch, name: str, value: str, undo: str
) -> Iterator[None]:
    """Set a pragma on every connection the server holds and on those it opens later."""
    store = live.services.store
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "PRAGMAS", (*store_module.PRAGMAS, (name, value, int(value))))
        for conn in list(store._all):
            conn.execute(f"PRAGMA {name} = {value}")
        try:
            yield
        finally:
            for conn in list(store._all):
                conn.execute(f"PRAGMA {name} = {undo}")


def test_query_only_database_refuses_writes_and_keeps_reading(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = live_target(live)
    prepare(target)
    with pragma_everywhere(live, monkeypatch, "query_only", "1", "0"):
        event = check_refused_writes(target, all_writes=True)
    check_recovered(target, event, all_writes=True)


def test_page_limit_refuses_a_webhook_and_keeps_reading(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    target = live_target(live)
    # Only writes that need a new page fail here; re-stamping a key or a seat would not.
    prepare(target, age_and_rotate=False)
    pages = int(live.services.store.one("PRAGMA page_count")[0])
    with pragma_everywhere(live, monkeypatch, "max_page_count", str(pages), str(2**30)):
        event = check_refused_writes(target, all_writes=False)
    check_recovered(target, event, all_writes=False)


def write(store: store_module.Store, n: int) -> None:
    """One small committed write."""
    with store.atomic():
        store.put_setting("test.written", str(n), n)


def test_a_connection_that_met_a_storage_error_is_replaced(services: Any) -> None:
    """A connection stuck read-only (here: query_only; in life: opened while the file was
    immutable) is dropped after its failed write, so the next write gets a fresh one."""
    store = services.store
    store.conn.execute("PRAGMA query_only = 1")
    with pytest.raises(StorageUnavailable):
        write(store, 1)
    write(store, 2)
    assert store.get_setting("test.written") == "2"
    store.conn.execute("PRAGMA query_only = 1")
    with pytest.raises(StorageUnavailable):
        store.put_setting("outside.transaction", "x", 3)
    store.put_setting("outside.transaction", "y", 4)
    assert store.get_setting("outside.transaction") == "y"


def test_a_connection_opened_read_only_is_reopened_for_the_next_write(services: Any) -> None:
    """Reads during a fault open read-only connections; the first write after it must not fail."""
    store = services.store
    write(store, 1)
    store.close()  # the last connection: SQLite folds the WAL back in and removes it
    files = [f for f in (store.path, store.path.with_name(store.path.name + "-wal")) if f.exists()]
    if os.geteuid() == 0:
        undo = immutable(files)
    else:
        modes = [f.stat().st_mode for f in files]
        for f in files:
            f.chmod(0o444)

        def undo() -> None:
            for f, mode in zip(files, modes, strict=True):
                f.chmod(mode)

    try:
        assert store.get_setting("test.written") == "1"  # a read opens the connection
        with pytest.raises(StorageUnavailable):
            write(store, 2)
        assert store.get_setting("test.written") == "1"
    finally:
        undo()
    write(store, 3)  # the very first write after the fault
    assert store.get_setting("test.written") == "3"


def test_health_never_commits(live: Live) -> None:
    """A flood of health checks writes nothing: another connection sees no new commit and the
    WAL does not grow (each check used to commit a timestamp, slowing validations fourfold)."""
    db = live.services.store.path
    live.issue_license()
    watcher = sqlite3.connect(db, timeout=10)
    try:
        version = watcher.execute("PRAGMA data_version").fetchone()[0]
        wal = db.with_name(db.name + "-wal")
        size = wal.stat().st_size
        for _ in range(200):
            assert live.get("/health").status_code == 200
        assert watcher.execute("PRAGMA data_version").fetchone()[0] == version
        assert wal.stat().st_size == size
    finally:
        watcher.close()
