"""Start-up time: from exec of ``licensed serve`` to the first 200 of ``GET /health``.

Measured for a first start (data dir created: signing key, example plans,
migrations) and for a restart on that data, N times each; prints the median
and the worst, and the server's RSS once it answers.

Usage: python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.emulator import healthy  # noqa: E402
from support.server_proc import free_port  # noqa: E402


def start_once(data: Path) -> tuple[float, int]:
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data), "PORT": str(port), "LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "licensed", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = started + 60
        while not healthy(f"http://127.0.0.1:{port}"):
            if time.perf_counter() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        rss = next(
            int(line.split()[1])
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        return elapsed, rss
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
