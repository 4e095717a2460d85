"""SIGKILL ``licensed serve`` at random moments under Stripe webhooks and validations: nothing is lost.

Set ``CRASH_SEED`` to replay a scenario (the seed is printed and named in
every failure). ``bench/crash.py`` runs this test for longer through the
other knobs: ``CRASH_SUBSCRIPTIONS``, ``CRASH_SPREAD`` (seconds over which
first sends are spread), ``CRASH_KILLS`` (at least this many SIGKILLs),
``CRASH_MAX_SECONDS``, and ``CRASH_REPORT`` (a file the report is written
to, as JSON, before the checks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

from support.crash_harness import run_crash


def knob(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def test_sigkill_during_webhooks_and_validations_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash seed {seed} (replay with CRASH_SEED={seed})")
    min_kills = int(knob("CRASH_KILLS", 4))
    report = run_crash(
        tmp_path,
        seed,
        subscriptions=int(knob("CRASH_SUBSCRIPTIONS", 16)),
        spread=knob("CRASH_SPREAD", 8.0),
        max_seconds=knob("CRASH_MAX_SECONDS", 40.0),
        min_kills=min_kills,
    )
    print(report.line())
    if os.environ.get("CRASH_REPORT"):
        written = {**dataclasses.asdict(report), "line": report.line()}
        Path(os.environ["CRASH_REPORT"]).write_text(json.dumps(written), encoding="utf-8")
    assert report.problems == [], f"CRASH_SEED={seed}: {report.problems}"
    assert report.lost == 0
    assert report.activations_lost == 0
    enough = min(3, min_kills)
    assert report.kills_mid_stream >= enough, f"CRASH_SEED={seed}: {report.kills_mid_stream} kills mid-stream"
    assert report.validations > 0 and report.activations_acked > 0
