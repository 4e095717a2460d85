"""The crash test, longer: SIGKILL ``licensed serve`` many times under webhooks and validations.

Runs ``tests/crash_harness.py`` for several rounds (a fresh data dir each),
prints one line per round and a total, and exits non-zero if any event or
acknowledged activation was lost or any check failed.

Usage: python bench/crash.py [--rounds 3] [--subscriptions 40] [--spread 40] [--kills 15] [--seed N]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.crash_harness import run_crash  # noqa: E402


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
        with tempfile.TemporaryDirectory() as tmp:
            report = run_crash(
                Path(tmp),
                seed,
                subscriptions=args.subscriptions,
                spread=args.spread,
                max_seconds=args.max_seconds,
                min_kills=args.kills,
            )
        print(report.line(), flush=True)
        for problem in report.problems:
            print(f"  problem: {problem}", flush=True)
        failed = failed or bool(report.problems)
        totals["events"] += report.events
        totals["deliveries"] += report.deliveries
        totals["kills"] += report.kills
        totals["cut"] += report.cut_requests + report.validations_cut
        totals["lost"] += report.lost
        totals["activations"] += report.activations_acked
        totals["activations_lost"] += report.activations_lost
    print(
        f"total: {args.rounds} rounds, {totals['events']} events, {totals['deliveries']} deliveries, "
        f"{totals['kills']} SIGKILLs ({totals['cut']} requests cut in flight), events lost {totals['lost']}, "
        f"activations acknowledged {totals['activations']}, lost {totals['activations_lost']}"
        + ("; FAILED" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
