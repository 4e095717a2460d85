"""Webhook throughput with durable commits, and refund-to-revoked latency.

Starts a real ``licensed serve`` (SQLite WAL, synchronous=FULL) on a free
127.0.0.1 port, then from this process:

1. sends N signed ``customer.subscription.created`` events (each creates a
   licence and queues a mail) from C concurrent keep-alive clients and reports
   events/s;
2. for R licences, sends a signed full ``charge.refunded`` and, the moment its
   200 arrives, validates the key; reports how long until validate says
   ``REVOKED`` (the revocation is committed before the 200, so one request).

Usage: python bench/webhooks.py [--events 2000] [--clients 8] [--refunds 50]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from harness import (
    BASE_URL,
    WEBHOOK_SECRET,
    charge,
    event,
    invoice,
    make_data_dir,
    signed,
    start_server,
    subscription,
)

from licensed.config import Config
from licensed.services import build_services


def subscription_event(sub_id: str, now: int) -> dict[str, Any]:
    sub = subscription(
        sub_id=sub_id, customer=f"cus_{sub_id}", price="price_pro_monthly", period_end=now + 30 * 86400
    )
    return event("customer.subscription.created", sub, now, event_id=f"evt_{sub_id}_created")


def send_all(url: str, bodies: list[tuple[bytes, dict[str, str]]], clients: int) -> float:
    local = threading.local()

    def post(item: tuple[bytes, dict[str, str]]) -> int:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        return session.post(
            url + "/api/stripe/webhook", data=item[0], headers=item[1], timeout=30
        ).status_code

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(post, bodies))
    elapsed = time.perf_counter() - started
    bad = [s for s in statuses if s != 200]
    if bad:
        raise SystemExit(f"{len(bad)} events were not acknowledged: {sorted(set(bad))}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--refunds", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = make_data_dir(Path(tmp) / "data")
        server = start_server(data, {"STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET})
        url = server.url
        try:
            now = int(time.time())
            bodies = [signed(subscription_event(f"sub_bench_{i}", now), now) for i in range(args.events)]
            elapsed = send_all(url, bodies, args.clients)
            print(
                f"webhooks: {args.events} signed events, {args.clients} clients, {elapsed:.2f} s, "
                f"{args.events / elapsed:.0f} events/s (each committed with fsync before its 200)"
            )

            services = build_services(Config(data_dir=data, app_base_url=BASE_URL))
            latencies = []
            session = requests.Session()
            for i in range(args.refunds):
                sub_id = f"sub_bench_{i}"
                lic = services.store.find_license("stripe_subscription_id", sub_id)
                assert lic is not None
                key = services.licensing.key(lic)
                pi = f"pi_bench_{i}"
                inv = invoice(
                    customer=f"cus_{sub_id}",
                    sub_id=sub_id,
                    period_end=now + 30 * 86400,
                    payment_intent=pi,
                )
                now = int(time.time())
                body, headers = signed(event("invoice.paid", inv, now, f"evt_bench_{i}_paid"), now)
                assert (
                    session.post(url + "/api/stripe/webhook", data=body, headers=headers).status_code == 200
                )
                refund = charge(charge_id=f"ch_bench_{i}", payment_intent=pi, refunded_amount=2000)
                body, headers = signed(event("charge.refunded", refund, now, f"evt_bench_{i}_refund"), now)
                assert (
                    session.post(url + "/api/stripe/webhook", data=body, headers=headers).status_code == 200
                )
                acked = time.perf_counter()
                code = session.post(url + "/api/license/validate", json={"key": key}).json()["code"]
                latencies.append((time.perf_counter() - acked) * 1000)
                if code != "REVOKED":
                    raise SystemExit(f"refund {i}: validate said {code} right after the 200")
            services.store.close()
            latencies.sort()
            print(
                f"refund→revoked: {args.refunds} refunds, validate answered REVOKED on the first request "
                f"after each 200; time from 200 to REVOKED p50 {statistics.median(latencies):.2f} ms, "
                f"max {latencies[-1]:.2f} ms"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
