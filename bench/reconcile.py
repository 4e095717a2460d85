"""Reconcile cost: Stripe API calls and time, cold and with nothing changed.

For each size N: a fresh localstripe on 127.0.0.1 (pickle file off) gets N
customers with a paid subscription while no webhook reaches the server (they
are all lost). Then, in one process:

- cold: ``Reconciler.events`` from an empty cursor: every license created;
- warm: the same again once the overlap window has passed: nothing changed,
  so it should cost one page of events whatever N is;
- full: ``Reconciler.full``, which walks every subscription (nightly).

The emulator runs in a child process: this script again, with the hidden
``--localstripe PORT`` (localstripe bound to 127.0.0.1, its pickle file off).

Usage: python bench/reconcile.py [--sizes 100,1000] [--overlap 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import stripe
from harness import HOST, free_port, make_data_dir

from licensed.config import Config
from licensed.server import init_data_dir
from licensed.services import build_services
from licensed.stripe_api import StripeGateway
from licensed.stripe_sync import Reconciler

SECRET_KEY = "sk_test_bench"


def serve_localstripe(port: int) -> None:
    """localstripe on 127.0.0.1 only (it binds every interface by default), saving nothing:
    it would otherwise write its store to /tmp/localstripe.pickle after each change and
    load it at the next start."""
    from aiohttp import web
    from localstripe import resources, server

    resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]
    resources.Store.try_load_from_disk = lambda self: None  # type: ignore[method-assign]
    web.run_app(server.app, host=HOST, port=port, print=None, access_log=None)


@dataclass
class Emulator:
    url: str
    client: stripe.StripeClient

    def call(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.client.raw_request(method, path, **params).data
        return data

    def customer(self, email: str) -> dict[str, Any]:
        token = self.call(
            "post",
            "/v1/tokens",
            card={"number": "4242424242424242", "exp_month": "12", "exp_year": "2030", "cvc": "123"},
        )
        return self.call("post", "/v1/customers", email=email, name="Grace Buyer", source=token["id"])


def start_emulator() -> tuple[subprocess.Popen[bytes], Emulator]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--localstripe", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{HOST}:{port}"
    client = stripe.StripeClient(
        SECRET_KEY, base_addresses={"api": url}, http_client=stripe.new_default_http_client(timeout=30)
    )
    emu = Emulator(url, client)
    deadline = time.monotonic() + 20
    while True:
        try:
            emu.call("get", "/v1/customers", limit=1)
            return proc, emu
        except stripe.StripeError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("localstripe did not start") from None
            time.sleep(0.05)


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
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--localstripe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.localstripe:
        serve_localstripe(args.localstripe)
        return
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
