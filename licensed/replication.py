"""What Litestream says about the database's replica, read from its control socket.

Litestream 0.5 publishes no replica position in its own metrics, but its
control socket (``socket:`` in ``deploy/litestream.yml``) answers ``GET
/list`` with the time of the last successful upload to the replica for each
database. Litestream uploads every ``sync-interval`` even when nothing
changed, so the age of that time is a cheap and honest staleness figure: it
stays below the interval while the replica keeps up and grows without bound
when uploads fail or Litestream stops. It says nothing about Litestream's
own local stage (WAL to LTX files): that stage's errors are Litestream's
``litestream_sync_error_count``.

Read once per ``/metrics`` scrape, never on a request's path.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT = 1.0
"""Seconds a scrape waits for Litestream; a hung Litestream reads as down."""


@dataclass(frozen=True)
class ReplicaStatus:
    up: bool
    """Litestream answered and replicates this database."""
    last_sync_at: float | None
    """Epoch seconds of the last successful upload to the replica; None before the first."""
    problem: str | None = None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("litestream", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _get(path: Path, url: str, timeout: float) -> Any:
    conn = _UnixConnection(path, timeout)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        body = response.read(1 << 20)
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        return json.loads(body)
    finally:
        conn.close()


def _same_file(a: str, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def replica_status(socket_path: Path, db_path: Path, timeout: float = TIMEOUT) -> ReplicaStatus:
    """Ask Litestream at ``socket_path`` about ``db_path``; never raises."""
    try:
        listing = _get(socket_path, "/list", timeout)
        entries = listing["databases"]
        entry = next((e for e in entries if _same_file(str(e["path"]), db_path)), None)
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as err:
        return ReplicaStatus(up=False, last_sync_at=None, problem=f"control socket: {err}")
    if entry is None:
        return ReplicaStatus(up=False, last_sync_at=None, problem=f"Litestream does not list {db_path}")
    last: float | None = None
    raw = entry.get("last_sync_at")
    if isinstance(raw, str):
        try:
            last = dt.datetime.fromisoformat(raw).timestamp()
        except ValueError:
            last = None
    replicating = entry.get("status") == "replicating"
    return ReplicaStatus(
        up=replicating,
        last_sync_at=last,
        problem=None if replicating else f"Litestream status {entry.get('status')!r}",
    )
