"""Concurrent activations never exceed a licence's seats (real server, real threads)."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from support.forge import claims_of, split_key
from support.live import Live

CLIENTS = 32


def activate_all(live: Live, key: str, machines: list[str], route: str = "activate") -> list[dict[str, Any]]:
    """One request per machine, each from its own thread and HTTP session, released together."""
    start = threading.Barrier(len(machines), timeout=10)

    def one(machine: str) -> dict[str, Any]:
        with requests.Session() as session:
            # Connect first, so the barrier lines up requests rather than handshakes.
            assert session.get(live.url + "/api/public/plans", timeout=10).status_code == 200
            start.wait()
            answer = session.post(
                f"{live.url}/api/license/{route}", json={"key": key, "machine_id": machine}, timeout=30
            )
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

    with ThreadPoolExecutor(max_workers=len(machines)) as pool:
        return list(pool.map(one, machines))


def seats_taken(live: Live, key: str) -> int:
    return live.services.store.count_machines(claims_of(split_key(key)[2])["sub"])


@pytest.mark.parametrize(("plan", "seats"), [("pro-monthly", 1), ("team-monthly", 3)])
@pytest.mark.parametrize("route", ["activate", "validate"])
def test_concurrent_activations_respect_the_seat_limit(live: Live, plan: str, seats: int, route: str) -> None:
    key = live.issue(plan, days=30)
    answers = activate_all(live, key, [f"machine-{i}" for i in range(CLIENTS)], route)
    codes = Counter(a["code"] for a in answers)
    assert codes == {"VALID": seats, "TOO_MANY_MACHINES": CLIENTS - seats}
    assert sum(a["activated"] for a in answers) == seats
    assert sum("lease" in a for a in answers) == seats
    assert seats_taken(live, key) == seats
    # The winners' leases name their machines; the losers got none.
    winners = {claims_of(a["lease"])["mid"] for a in answers if "lease" in a}
    assert len(winners) == seats


def test_same_machine_concurrently_takes_one_seat(live: Live) -> None:
    key = live.issue("team-monthly", days=30)
    answers = activate_all(live, key, ["the-machine"] * CLIENTS)
    assert Counter(a["code"] for a in answers) == {"VALID": CLIENTS}
    assert seats_taken(live, key) == 1
    assert {a["license"]["machines_used"] for a in answers} == {1}


def test_same_machine_twice_stays_one_seat(live: Live) -> None:
    key = live.issue("pro-monthly", days=30)
    for _ in range(2):
        body = live.post("/api/license/activate", {"key": key, "machine_id": "m-1"}).json()
        assert body["code"] == "VALID" and body["license"]["machines_used"] == 1
    live.clock.advance(2 * 3600)  # past the hourly last-seen refresh: a write, still one seat
    body = live.post("/api/license/validate", {"key": key, "machine_id": "m-1"}).json()
    assert body["code"] == "VALID" and body["license"]["machines_used"] == 1
    assert seats_taken(live, key) == 1


def test_freed_seats_are_taken_once(live: Live) -> None:
    """Deactivate and a race for the freed seat: still exactly one winner."""
    key = live.issue("pro-monthly", days=30)
    live.post("/api/license/activate", {"key": key, "machine_id": "first"})
    live.post("/api/license/deactivate", {"key": key, "machine_id": "first"})
    answers = activate_all(live, key, [f"next-{i}" for i in range(16)])
    assert Counter(a["code"] for a in answers) == {"VALID": 1, "TOO_MANY_MACHINES": 15}
    assert seats_taken(live, key) == 1
