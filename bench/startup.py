"""Start-up time: from exec of ``licensed serve`` to the first 200 of ``GET /health``.

Measured for a first start (data dir created: signing key, example plans,
migrations) and for a restart on that data, N times each; prints the median
and the worst, and the server's RSS once it answers.

Usage: python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from harness import free_port, start_server


def start_once(data: Path) -> tuple[float, int]:
    port = free_port()
    started = time.perf_counter()
    server = start_server(data, port=port, poll=0.005)
    try:
        return time.perf_counter() - started, server.rss_kib()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    first, again, rss = [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            seconds, kib = start_once(data)
            first.append(seconds)
            seconds, kib = start_once(data)
            again.append(seconds)
            rss.append(kib)
    for name, values in (("first start", first), ("restart", again)):
        print(
            f"{name}: median {statistics.median(values) * 1000:.0f} ms, worst {max(values) * 1000:.0f} ms "
            f"({args.runs} runs, exec to first 200 of /health)"
        )
    print(f"RSS once answering: median {statistics.median(rss) / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
