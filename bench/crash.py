"""The crash test, longer: SIGKILL ``licensed serve`` many times under webhooks and validations.

Each round runs ``tests/test_crash.py`` with pytest in a child process, with
a fresh data dir, its seed (``CRASH_SEED``) and this script's sizes passed
through the test's environment knobs (``CRASH_SUBSCRIPTIONS``,
``CRASH_SPREAD``, ``CRASH_KILLS``, ``CRASH_MAX_SECONDS``); the test writes
its report to the file named by ``CRASH_REPORT``. This script prints one
line per round and a total, and exits non-zero if any round failed: an event
or acknowledged activation lost, or any other of the test's checks.

Why pytest in a child process: the harness (tests/support/crash_harness.py,
~450 lines) is test code that builds on the tests' helpers; running the test
itself keeps one copy of it and one set of checks, without this script
reaching into ``tests/`` through ``sys.path``. Needs the test dependencies
(``pip install -e '.[test]'``, as ``make bench`` does).

Usage: python bench/crash.py [--rounds 3] [--subscriptions 40] [--spread 40] [--kills 15] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEST = ROOT / "tests" / "test_crash.py"
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def run_round(
    seed: int, args: argparse.Namespace
) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    """One run of the crash test; its report (None if it stopped before writing one) and the run."""
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        env = {
            **os.environ,
            "CRASH_SEED": str(seed),
            "CRASH_SUBSCRIPTIONS": str(args.subscriptions),
            "CRASH_SPREAD": str(args.spread),
            "CRASH_KILLS": str(args.kills),
            "CRASH_MAX_SECONDS": str(args.max_seconds),
            "CRASH_REPORT": str(report_path),
        }
        done = subprocess.run(
            [*PYTEST, "--basetemp", str(Path(tmp) / "pytest"), str(TEST)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.max_seconds + 300,
        )
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else None
    return report, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subscriptions", type=int, default=40)
    parser.add_argument(
        "--spread", type=float, default=40.0, help="seconds over which first sends are spread"
    )
    parser.add_argument("--kills", type=int, default=15, help="at least this many SIGKILLs per round")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="per round")
    parser.add_argument("--seed", type=int, help="first round's seed (the next rounds add 1)")
    args = parser.parse_args()

    first = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    totals = dict.fromkeys(
        ("events", "deliveries", "kills", "cut", "lost", "activations", "activations_lost"), 0
    )
    failed = False
    for round_no in range(args.rounds):
        seed = first + round_no
        report, done = run_round(seed, args)
        if report is None:
            print(
                f"seed {seed}: the test stopped before its report (pytest exit {done.returncode}):",
                flush=True,
            )
            print(done.stdout[-4000:] + done.stderr[-2000:], flush=True)
            failed = True
            continue
        print(report["line"], flush=True)
        for problem in report["problems"]:
            print(f"  problem: {problem}", flush=True)
        if done.returncode != 0:
            print(f"  the test failed (pytest exit {done.returncode})", flush=True)
            if not report["problems"]:  # another of its checks: show which
                print(done.stdout[-4000:], flush=True)
            failed = True
        totals["events"] += report["events"]
        totals["deliveries"] += report["deliveries"]
        totals["kills"] += report["kills"]
        totals["cut"] += report["cut_requests"] + report["validations_cut"]
        totals["lost"] += report["lost"]
        totals["activations"] += report["activations_acked"]
        totals["activations_lost"] += report["activations_lost"]
    print(
        f"total: {args.rounds} rounds, {totals['events']} events, {totals['deliveries']} deliveries, "
        f"{totals['kills']} SIGKILLs ({totals['cut']} requests cut in flight), events lost {totals['lost']}, "
        f"activations acknowledged {totals['activations']}, lost {totals['activations_lost']}"
        + ("; FAILED" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
