"""Reconcile cost: Stripe API calls and time, cold and with nothing changed.

For each size N: a fresh localstripe gets N
customers with a paid subscription while no webhook reaches the server (they
are all lost). Then, in one process:

- cold: ``Reconciler.events`` from an empty cursor: every license created;
- warm: the same again once the overlap window has passed: nothing changed,
  so it should cost one page of events whatever N is;
- full: ``Reconciler.full``, which walks every subscription (nightly).

The emulator is the tests' (``tests/support/emulator.py``: localstripe in a
child process, bound to 127.0.0.1, its pickle file off, the plans' prices made).

Usage: python bench/reconcile.py [--sizes 100,1000] [--overlap 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import make_data_dir
from support.emulator import Emulator, run_emulator

from licensed.config import Config
from licensed.server import init_data_dir
from licensed.services import build_services
from licensed.stripe_api import StripeGateway
from licensed.stripe_sync import Reconciler

SECRET_KEY = "sk_test_bench"


def populate(emu: Emulator, n: int) -> None:
    """``n`` customers, each with a paid subscription to ``price_pro_monthly``."""
    for i in range(n):
        customer = emu.customer(f"buyer{i}@example.com")
        emu.call("post", "/v1/subscriptions", customer=customer["id"], items=[{"plan": "price_pro_monthly"}])


def run(size: int, overlap: int) -> dict[str, Any]:
    with run_emulator() as emu:
        started = time.perf_counter()
        populate(emu, size)
        populate_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            data = make_data_dir(Path(tmp) / "data")
            config = Config(data_dir=data, stripe_secret_key=SECRET_KEY, stripe_api_base=emu.url)
            init_data_dir(config, int(time.time()))
            services = build_services(config)
            reconciler = Reconciler(services, StripeGateway(SECRET_KEY, emu.url))

            t0 = time.perf_counter()
            cold = reconciler.events(int(time.time()), overlap=overlap)
            cold_s = time.perf_counter() - t0
            counted = services.store.one("SELECT COUNT(*) FROM licenses")
            licenses = int(counted[0]) if counted else 0
            time.sleep(overlap + 1.5)
            t0 = time.perf_counter()
            warm = reconciler.events(int(time.time()), overlap=overlap)
            warm_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            full = reconciler.full(int(time.time()))
            full_s = time.perf_counter() - t0
            services.store.close()
        return {
            "size": size,
            "populate_s": populate_s,
            "licenses": licenses,
            "cold": cold,
            "cold_s": cold_s,
            "warm": warm,
            "warm_s": warm_s,
            "full": full,
            "full_s": full_s,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--overlap", type=int, default=2)
    args = parser.parse_args()
    print("size | licenses made | cold: events, calls, s | warm: events, calls, repaired, s | full: calls, s")
    for size in (int(s) for s in args.sizes.split(",")):
        r = run(size, args.overlap)
        cold, warm, full = r["cold"], r["warm"], r["full"]
        print(
            f"{size} | {r['licenses']} | {cold.checked}, {cold.calls}, {r['cold_s']:.2f} | "
            f"{warm.checked}, {warm.calls}, {warm.repaired}, {r['warm_s']:.3f} | "
            f"{full.calls}, {r['full_s']:.2f}"
        )


if __name__ == "__main__":
    main()
