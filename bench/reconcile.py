"""Reconcile cost: Stripe API calls and time, cold and with nothing changed.

For each size N: a fresh localstripe on 127.0.0.1 (pickle file off) gets N
customers with a paid subscription while no webhook reaches the server (they
are all lost). Then, in one process:

- cold: ``Reconciler.events`` from an empty cursor: every license created;
- warm: the same again once the overlap window has passed: nothing changed,
  so it should cost one page of events whatever N is;
- full: ``Reconciler.full``, which walks every subscription (nightly).

Usage: python bench/reconcile.py [--sizes 100,1000] [--overlap 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import stripe  # noqa: E402
import stripe_sync  # noqa: E402
from config import Config  # noqa: E402
from conftest import TEST_PLANS  # noqa: E402
from localstripe_fixtures import Emulator, free_port, wait_for  # noqa: E402

import licensed  # noqa: E402


def start_emulator() -> tuple[subprocess.Popen[bytes], Emulator]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "localstripe_server.py"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    client = stripe.StripeClient(
        "sk_test_bench", base_addresses={"api": url}, http_client=stripe.new_default_http_client(timeout=30)
    )
    emu = Emulator(url, client)

    def up() -> bool:
        try:
            emu.call("get", "/v1/customers", limit=1)
            return True
        except stripe.StripeError:
            return False

    wait_for(up, 20, "localstripe")
    return proc, emu


def populate(emu: Emulator, n: int) -> None:
    product = emu.call("post", "/v1/products", name="DashCaddy")
    emu.call(
        "post",
        "/v1/plans",
        id="price_pro_monthly",
        product=product["id"],
        amount=1000,
        currency="usd",
        interval="month",
    )
    for i in range(n):
        customer = emu.customer(f"buyer{i}@example.com")
        emu.call("post", "/v1/subscriptions", customer=customer["id"], items=[{"plan": "price_pro_monthly"}])


def run(size: int, overlap: int) -> dict[str, Any]:
    proc, emu = start_emulator()
    try:
        started = time.perf_counter()
        populate(emu, size)
        populate_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp)
            (data / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
            config = Config(data_dir=data, stripe_secret_key="sk_test_bench", stripe_api_base=emu.url)
            licensed.init_data_dir(config, int(time.time()))
            services = licensed.build_services(config)
            gateway = stripe_sync.StripeGateway("sk_test_bench", emu.url)
            reconciler = stripe_sync.Reconciler(services, gateway)

            t0 = time.perf_counter()
            cold = reconciler.events(int(time.time()), overlap=overlap)
            cold_s = time.perf_counter() - t0
            licenses = services.store.one("SELECT COUNT(*) FROM licenses")[0]
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
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
