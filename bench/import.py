"""Import time: ``licensed admin import`` of a file of N licences (10,000 by default).

Writes a JSON Lines file like a vendor's export from the system used before
(every licence with an old key, most with one or two machines, one in five
linked to a Stripe subscription, some lifetime), then, on a fresh data dir each
run:

- times ``python -m licensed admin import FILE`` as a process (Python start-up
  included), then the same file again (every line skipped as already there),
  and ``--dry-run`` on a fresh data dir;
- in-process, times the check and the writing apart for several batch sizes
  (licences per transaction), and the longest a batch held the write lock,
  which is what a running server's webhooks and activations may wait.

Usage (from the repository root, with the project installed):
    python bench/import.py [--lines 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from licensed import importer
from licensed.config import Config
from licensed.server import init_data_dir
from licensed.services import build_services

DAY = 86400


def write_file(path: Path, lines: int, now: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for n in range(lines):
            record: dict[str, object] = {
                "email": f"customer{n}@example.com",
                "key": f"DCV1-{secrets.token_hex(16)}-{n}",
                "name": f"Customer {n}",
                "created_at": now - (n % 700) * DAY,
                "machines": [f"host-{n}-{i}-{secrets.token_hex(8)}" for i in range(n % 3)],
            }
            if n % 10 == 9:
                record.update(plan="dashcaddy-lifetime")
            elif n % 5 == 0:
                record.update(
                    plan="dashcaddy-pro-monthly",  # one seat
                    machines=record["machines"][:1],  # type: ignore[index]
                    expires_at=now + (n % 30 + 1) * DAY,
                    stripe_customer=f"cus_bench{n}",
                    stripe_subscription=f"sub_bench{n}",
                )
            else:
                record.update(plan="dashcaddy-pro-year", expires_at=now + (n % 365 + 1) * DAY, max_machines=2)
            handle.write(json.dumps(record) + "\n")


def fresh_data_dir(parent: Path) -> Path:
    data = Path(tempfile.mkdtemp(dir=parent)) / "data"
    config = Config(data_dir=data)
    init_data_dir(config, int(time.time()))
    return data


def run_cli(data: Path, *args: str) -> float:
    env = {**os.environ, "DATA_DIR": str(data), "LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "licensed", "admin", "import", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"import failed: {done.stderr.strip()}")
    print(f"    {done.stdout.strip().splitlines()[-1]}")
    return elapsed


def in_process(data: Path, path: Path, batch_lines: int) -> tuple[float, float, float]:
    """(check seconds, write seconds, longest batch seconds) of one import in this process."""
    services = build_services(Config(data_dir=data))
    marks: list[tuple[str, float]] = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "importing" or done >= total:
            marks.append((phase, time.perf_counter()))

    started = time.perf_counter()
    try:
        importer.import_licenses(
            services, "bench", int(time.time()), path, progress=progress, batch_lines=batch_lines
        )
    finally:
        services.store.close()
    ended = time.perf_counter()
    checked = next(t for phase, t in marks if phase == "checking")
    batch_ends = [t for phase, t in marks if phase == "importing"]
    batches = [b - a for a, b in zip([checked, *batch_ends], batch_ends, strict=False)]
    return checked - started, ended - checked, max(batches)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "licenses.jsonl"
        write_file(path, args.lines, int(time.time()))
        print(f"{args.lines} lines, {path.stat().st_size / 1e6:.1f} MB; {args.runs} runs, fresh data dirs")
        first, again, dry = [], [], []
        for run in range(1, args.runs + 1):
            print(f"  run {run}")
            data = fresh_data_dir(root)
            first.append(run_cli(data, str(path)))
            again.append(run_cli(data, str(path)))
            dry.append(run_cli(fresh_data_dir(root), str(path), "--dry-run"))
        print("licensed admin import, as a process (seconds: median, all runs)")
        for label, times in (("import", first), ("same file again", again), ("--dry-run", dry)):
            print(f"  {label:16} {statistics.median(times):6.2f}  {', '.join(f'{t:.2f}' for t in times)}")
        print("in-process, by licences per transaction (seconds: check, write, longest batch; median)")
        for batch in (100, importer.BATCH_LINES, args.lines):
            results = [in_process(fresh_data_dir(root), path, batch) for _ in range(args.runs)]
            check, write, longest = (statistics.median(r[i] for r in results) for i in range(3))
            print(f"  batch {batch:6}  check {check:5.2f}  write {write:5.2f}  longest batch {longest:5.3f}")


if __name__ == "__main__":
    main()
