"""Validate latency at a fixed offered load (open loop).

A real ``licensed serve`` on a free 127.0.0.1 port; from this process, requests
are sent on a fixed schedule (request i at t0 + i / rate), whatever the server's
pace, by enough threads that none waits for another. Latency is counted from
each request's scheduled time, so a slow server cannot hide its queue
(coordinated omission). Each rate runs for a fixed time and stops by itself.

Usage: python bench/latency.py [--rates 100,200,400] [--seconds 10] [--licences 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.server_proc import ServerProcess, issue_keys, make_data_dir  # noqa: E402

WORKERS = 64


def bodies(data: Path, count: int) -> list[bytes]:
    keys = issue_keys(data, count, days=30, tag="latency")
    return [json.dumps({"key": key, "machine_id": f"machine-{i}"}).encode() for i, key in enumerate(keys)]


def offered(url: str, payloads: list[bytes], rate: float, seconds: float) -> dict[str, float]:
    total = int(rate * seconds)
    next_index = 0
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0
    t0 = time.perf_counter() + 0.2

    def worker() -> None:
        nonlocal next_index, errors
        session = requests.Session()
        while True:
            with lock:
                index = next_index
                next_index += 1
            if index >= total:
                return
            due = t0 + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                answer = session.post(
                    url + "/api/license/validate",
                    data=payloads[index % len(payloads)],
                    headers={"Content-Type": "application/json"},
                    timeout=30,
                )
                ok = answer.status_code == 200 and answer.json().get("code") == "VALID"
            except requests.RequestException:
                ok = False
            finished = time.perf_counter()
            with lock:
                latencies.append((finished - due) * 1000)
                if not ok:
                    errors += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "sent": len(latencies),
        "errors": errors,
        "achieved": len(latencies) / elapsed,
        "p50": statistics.median(latencies),
        "p99": latencies[int(len(latencies) * 0.99) - 1],
        "max": latencies[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="100,200,400")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--licences", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data_dir(Path(tmp) / "data")
        payloads = bodies(data, args.licences)
        server = ServerProcess(data, extra_env={"LOG_LEVEL": "WARNING"})
        server.start()
        url = server.url
        try:
            heading = f"validate with machine_id, {args.licences} licences, open loop"
            print(f"{heading}, {args.seconds:.0f} s per rate")
            for rate in (float(r) for r in args.rates.split(",")):
                r = offered(url, payloads, rate, args.seconds)
                print(
                    f"offered {rate:.0f}/s: sent {r['sent']:.0f}, errors {r['errors']:.0f}, "
                    f"achieved {r['achieved']:.0f}/s, p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, "
                    f"max {r['max']:.1f} ms"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
