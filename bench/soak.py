"""Load soak: minutes of mixed traffic against a real ``licensed serve``; errors, memory, latency.

Starts ``licensed serve`` as a subprocess (SQLite on disk, synchronous=FULL,
a webhook secret), issues licences, then from this process sends validate
(with and without machine ids), activate, deactivate and signed Stripe
webhook traffic from several client threads until the time is up (or the
request cap is reached). Every few seconds it samples the server's RSS from
/proc/<pid>/status.

Reports: requests and error responses per kind (anything but a 200, or no
answer, is an error and must be 0), p50/p99/max latency per kind, and the
server's RSS first/max/last (flat memory means no leak under load). Exits
non-zero if any request failed.

Usage: python bench/soak.py [--minutes 3] [--clients 4] [--licences 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from harness import (
    WEBHOOK_SECRET,
    Server,
    event,
    invoice,
    issue_keys,
    make_data_dir,
    signed,
    start_server,
    subscription,
)

KINDS = ("validate", "validate+machine", "activate", "deactivate", "webhook")
WEIGHTS = (30, 30, 15, 15, 10)


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    codes: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, ms: float, error: str | None, code: str | None) -> None:
        with self.lock:
            self.latencies[kind].append(ms)
            if error is not None:
                self.errors[kind].append(error)
            if code is not None:
                self.codes[kind][code] += 1

    def total(self) -> int:
        return sum(len(v) for v in self.latencies.values())


class Traffic:
    def __init__(self, server: Server, keys: list[str], seed: int, deadline: float, cap: int) -> None:
        self.server = server
        self.keys = keys
        self.seed = seed
        self.deadline = deadline
        self.cap = cap
        self.tally = Tally()
        self.events = itertools.count()
        self.subscriptions = [f"sub_soak_{seed}_{n}" for n in range(50)]
        self.renewals: dict[str, int] = {}
        self.lock = threading.Lock()

    def _webhook_event(self, rng: random.Random) -> dict[str, Any]:
        sub_id = rng.choice(self.subscriptions)
        now = int(time.time())
        number = next(self.events)
        with self.lock:
            seen = sub_id in self.renewals
            months = self.renewals[sub_id] = self.renewals.get(sub_id, 0) + 1
        period_end = now + 30 * 86400 * months
        customer = f"cus_{sub_id}"
        if not seen:
            obj = subscription(
                sub_id=sub_id, customer=customer, price="price_pro_monthly", period_end=period_end
            )
            return event("customer.subscription.created", obj, now, event_id=f"evt_soak_{number}")
        obj = invoice(
            customer=customer,
            sub_id=sub_id,
            period_end=period_end,
            payment_intent=f"pi_soak_{number}",
        )
        return event("invoice.paid", obj, now, event_id=f"evt_soak_{number}")

    def client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        session = requests.Session()
        url = self.server.url
        while time.monotonic() < self.deadline and self.tally.total() < self.cap:
            kind = rng.choices(KINDS, WEIGHTS)[0]
            key = rng.choice(self.keys)
            machine = f"soak-machine-{rng.randrange(4)}"
            if kind == "webhook":
                body, headers = signed(self._webhook_event(rng), int(time.time()))
                send = {"data": body, "headers": headers}
                path = "/api/stripe/webhook"
            else:
                payload: dict[str, Any] = {"key": key}
                if kind != "validate":
                    payload["machine_id"] = machine
                send = {"json": payload}
                path = "/api/license/" + kind.split("+")[0]
            started = time.perf_counter()
            error: str | None = None
            code: str | None = None
            try:
                answer = session.post(url + path, timeout=30, **send)
                if answer.status_code != 200:
                    error = f"{answer.status_code} {answer.text[:200]}"
                else:
                    code = answer.json().get("code")
            except requests.RequestException as err:
                error = f"no answer: {type(err).__name__}"
                session = requests.Session()
            self.tally.record(kind, (time.perf_counter() - started) * 1000, error, code)
        session.close()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--licences", type=int, default=200)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--max-requests", type=int, default=5_000_000, help="stop after this many requests")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = make_data_dir(Path(tmp) / "data")
        keys = issue_keys(data, args.licences, days=365, tag="soak")
        server = start_server(data, {"STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET})
        samples: list[tuple[float, int]] = []
        try:
            started = time.monotonic()
            deadline = started + args.minutes * 60
            traffic = Traffic(server, keys, args.seed, deadline, args.max_requests)
            threads = [
                threading.Thread(target=traffic.client, args=(n,), daemon=True) for n in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                samples.append((time.monotonic() - started, server.rss_kib()))
                for thread in threads:
                    thread.join(timeout=args.sample_every / len(threads))
            samples.append((time.monotonic() - started, server.rss_kib()))
            elapsed = time.monotonic() - started
            alive = server.alive()
        finally:
            server.stop()
        log = server.stderr()

    tally = traffic.tally
    total = tally.total()
    errors = sum(len(v) for v in tally.errors.values())
    rss = [kib for _, kib in samples]
    figures: dict[str, Any] = {
        "seconds": round(elapsed, 1),
        "clients": args.clients,
        "requests": total,
        "requests_per_second": round(total / elapsed, 1),
        "errors": errors,
        "server_alive_at_end": alive,
        "tracebacks_in_log": log.count("Traceback"),
        "rss_kib": {
            "first": rss[0],
            "max": max(rss),
            "last": rss[-1],
            "samples": len(rss),
            "series": [[round(t, 1), kib] for t, kib in samples],
        },
        "kinds": {},
    }
    print(
        f"soak: {elapsed:.0f} s, {args.clients} clients, {total} requests ({total / elapsed:.0f}/s), "
        f"errors {errors}"
    )
    for kind in KINDS:
        values = tally.latencies.get(kind, [])
        if not values:
            continue
        row = {
            "requests": len(values),
            "errors": len(tally.errors.get(kind, [])),
            "p50_ms": round(statistics.median(values), 2),
            "p99_ms": round(percentile(values, 0.99), 2),
            "max_ms": round(max(values), 2),
            "codes": dict(tally.codes.get(kind, {})),
        }
        figures["kinds"][kind] = row
        print(
            f"  {kind:17s} {row['requests']:7d} requests, errors {row['errors']}, "
            f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, max {row['max_ms']:.1f} ms  "
            f"{row['codes']}"
        )
        for sample in tally.errors.get(kind, [])[:3]:
            print(f"    error: {sample}")
    print(
        f"  server RSS: first {rss[0] / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB, "
        f"last {rss[-1] / 1024:.1f} MiB ({len(rss)} samples, every {args.sample_every:g} s)"
    )
    minute_marks = [kib for t, kib in samples if int(t) % 60 < args.sample_every]
    print("  RSS about each minute (MiB): " + " ".join(f"{kib / 1024:.1f}" for kib in minute_marks))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    failed = errors or not alive or figures["tracebacks_in_log"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
