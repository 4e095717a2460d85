"""SIGKILL ``licensed serve`` at random moments under Stripe webhooks and validations: nothing is lost.

Set ``CRASH_SEED`` to replay a scenario (the seed is printed and named in
every failure). ``bench/crash.py`` runs the same harness for longer.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from support.crash_harness import run_crash


def test_sigkill_during_webhooks_and_validations_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash seed {seed} (replay with CRASH_SEED={seed})")
    report = run_crash(tmp_path, seed, subscriptions=16, spread=8.0, max_seconds=40.0, min_kills=4)
    print(report.line())
    assert report.problems == [], f"CRASH_SEED={seed}: {report.problems}"
    assert report.lost == 0
    assert report.activations_lost == 0
    assert report.kills_mid_stream >= 3, f"CRASH_SEED={seed}: {report.kills_mid_stream} kills mid-stream"
    assert report.validations > 0 and report.activations_acked > 0
