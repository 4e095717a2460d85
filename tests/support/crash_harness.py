"""Kill ``licensed serve`` with SIGKILL at random moments under webhook and validate traffic.

The harness plays Stripe: it delivers a stream of signed events (several
subscriptions' lifecycles, interleaved) and resends every event that did not
get a 200, with backoff, until all are acknowledged or a deadline passes. At
the same time clients validate licence keys with machine ids. A controller
kills the server with SIGKILL at random moments and starts it again on the
same port and data dir.

Afterwards the database must hold every event exactly once ('applied' or
'ignored', never 'failed'), attempts that match the failures the sender saw,
the licence states that the same events give when applied in order to a fresh
store, every activation that was acknowledged, and pass ``PRAGMA
integrity_check``.

One seed fixes the events, their schedule, the kill times and the clients'
choices; thread timing still varies, so a replay repeats the scenario, not
the exact interleaving.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from licensed.keys import KeyRing
from licensed.plans import Catalog
from licensed.store import License
from support import stripe_events as se
from support.clock import DAY
from support.server_proc import ServerProcess, make_data_dir

KINDS = ("full", "living", "refund", "lost", "past_due")


# --- the events ---------------------------------------------------------------------------


def lifecycle(kind: str, n: int, base: int, tag: str) -> list[dict[str, Any]]:
    """One subscription's events in causal order; ``kind`` picks the story.

    ``full``/``living`` is the lifecycle the order property test proves
    order-independent (buy, renew, upgrade, fail, recover, dispute won, partial
    refund, cancel); ``refund`` ends revoked by a full refund; ``lost`` by a lost
    dispute; ``past_due`` stays in grace. Payments are mapped to the licence by
    ``invoice.paid``, so a refund or dispute that overtakes it fails and is retried.
    """
    sub_id, cus = f"sub_{tag}_{n}", f"cus_{tag}_{n}"
    p1, p2 = base + 30 * DAY, base + 60 * DAY
    step = iter(range(1000))

    def eid() -> str:
        return f"evt_{tag}_{n}_{next(step)}"

    def sub(created: int, what: str, **kw: Any) -> dict[str, Any]:
        kw.setdefault("price", "price_pro_monthly")
        kw.setdefault("period_end", p1)
        obj = se.subscription(sub_id=sub_id, customer=cus, **kw)
        return se.event(f"customer.subscription.{what}", obj, base + created, event_id=eid())

    def inv(created: int, what: str, period_end: int, pi: str | None = None) -> dict[str, Any]:
        obj = se.invoice(sub_id=sub_id, period_end=period_end, payment_intent=pi, customer=cus)
        return se.event(what, obj, base + created, event_id=eid())

    def dispute(created: int, what: str, status: str, pi: str) -> dict[str, Any]:
        obj = se.dispute(
            dispute_id=f"dp_{tag}_{n}", charge_id=f"ch_{tag}_{n}", payment_intent=pi, status=status
        )
        return se.event(what, obj, base + created, event_id=eid())

    def refund(created: int, pi: str, amount: int) -> dict[str, Any]:
        obj = se.charge(charge_id=f"ch_{tag}_{n}", payment_intent=pi, refunded_amount=amount)
        return se.event("charge.refunded", obj, base + created, event_id=eid())

    pi1, pi2 = f"pi_{tag}_{n}_1", f"pi_{tag}_{n}_2"
    noise = se.event("plan.created", se.fixture("plan"), base + 150, event_id=eid())
    if kind in ("full", "living"):
        team = {"price": "price_team_monthly", "quantity": 2}
        events = [
            sub(100, "created"),
            inv(101, "invoice.paid", p1, pi1),
            noise,
            sub(200, "updated", **team),
            inv(300, "invoice.payment_failed", p2),
            sub(301, "updated", **team, status="past_due", period_end=p2),
            inv(400, "invoice.paid", p2, pi2),
            sub(401, "updated", **team, period_end=p2, cancel_at_period_end=True),
            dispute(450, "charge.dispute.created", "needs_response", pi2),
            refund(460, pi2, 300),
            dispute(500, "charge.dispute.closed", "won", pi2),
        ]
        if kind == "full":
            events.append(
                sub(
                    600,
                    "deleted",
                    **team,
                    status="canceled",
                    period_end=p2,
                    ended_at=p2,
                    cancel_at_period_end=True,
                )
            )
        return events
    if kind == "refund":
        return [
            sub(100, "created"),
            inv(101, "invoice.paid", p1, pi1),
            sub(200, "updated", cancel_at_period_end=True),
            noise,
            refund(300, pi1, 2000),
        ]
    if kind == "lost":
        return [
            sub(100, "created", price="price_basic_monthly"),
            inv(101, "invoice.paid", p1, pi1),
            dispute(200, "charge.dispute.created", "needs_response", pi1),
            dispute(300, "charge.dispute.closed", "lost", pi1),
        ]
    if kind == "past_due":
        return [
            sub(100, "created", price="price_team_monthly", quantity=3),
            inv(101, "invoice.paid", p1, pi1),
            inv(200, "invoice.payment_failed", p2),
            sub(201, "updated", price="price_team_monthly", quantity=3, status="past_due"),
        ]
    raise ValueError(kind)


def build_stream(rng: random.Random, subscriptions: int, base: int, tag: str) -> list[dict[str, Any]]:
    """Every subscription's lifecycle, merged at random (each keeps its own order)."""
    lanes = [lifecycle(KINDS[n % len(KINDS)], n, base, tag) for n in range(subscriptions)]
    stream: list[dict[str, Any]] = []
    while any(lanes):
        lane = rng.choice([lane for lane in lanes if lane])
        stream.append(lane.pop(0))
    return stream


def expected_states(events: list[dict[str, Any]], now: int) -> dict[str, dict[str, Any]]:
    """Apply the events in order to a fresh store in-process, retrying failures as Stripe would."""
    with se.replayed(events, now) as services:
        rows = services.store.all("SELECT * FROM licenses")
        return {str(r["stripe_subscription_id"]): state_of(r) for r in rows}


def state_of(row: sqlite3.Row) -> dict[str, Any]:
    return se.license_state(License.from_row(row))


# --- delivery bookkeeping --------------------------------------------------------------------


@dataclass
class Delivery:
    event: dict[str, Any]
    sends: int = 0
    failed_500: int = 0
    no_answer: int = 0
    refused: int = 0
    other: list[int] = field(default_factory=list)
    acked: bool = False


@dataclass
class CrashReport:
    seed: int
    events: int = 0
    deliveries: int = 0
    acked: int = 0
    kills: int = 0
    kills_mid_stream: int = 0
    cut_requests: int = 0
    refused_requests: int = 0
    retried_500: int = 0
    validations: int = 0
    validations_cut: int = 0
    activations_acked: int = 0
    activations_lost: int = 0
    lost: int = 0
    duplicates_in_db: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"seed {self.seed}: {self.events} events, {self.deliveries} deliveries "
            f"({self.cut_requests} cut in flight by a kill, {self.refused_requests} refused while down, "
            f"{self.retried_500} answered 500 and retried), "
            f"{self.kills} SIGKILLs ({self.kills_mid_stream} with events unacknowledged), "
            f"{self.validations} validations ({self.validations_cut} cut in flight, "
            f"{self.activations_acked} activations acknowledged, {self.activations_lost} lost), "
            f"events lost {self.lost}, applied twice {self.duplicates_in_db}, {self.seconds:.1f} s"
        )


class Stripe:
    """Delivers events like Stripe: each until a 200, retries with backoff."""

    def __init__(self, server: ServerProcess, stream: list[dict[str, Any]], spread: float, seed: int) -> None:
        self.server = server
        self.deliveries = {evt["id"]: Delivery(evt) for evt in stream}
        self.lock = threading.Lock()
        start = time.monotonic()
        gap = spread / max(1, len(stream))
        self.queue: list[tuple[float, int, str]] = [
            (start + i * gap, i, evt["id"]) for i, evt in enumerate(stream)
        ]
        heapq.heapify(self.queue)
        self.order = len(stream)
        self.rng = random.Random(seed)
        self.halt = threading.Event()

    def first_sends_done(self) -> bool:
        with self.lock:
            return all(d.sends > 0 for d in self.deliveries.values())

    def all_acked(self) -> bool:
        with self.lock:
            return all(d.acked for d in self.deliveries.values())

    def _next(self) -> str | None:
        with self.lock:
            if self.queue and self.queue[0][0] <= time.monotonic():
                return heapq.heappop(self.queue)[2]
        return None

    def _again(self, event_id: str, tries: int) -> None:
        with self.lock:
            delay = min(1.0, 0.05 * 2 ** min(tries, 5)) * (0.5 + self.rng.random())
            self.order += 1
            heapq.heappush(self.queue, (time.monotonic() + delay, self.order, event_id))

    def sender(self) -> None:
        session = requests.Session()
        while not self.halt.is_set():
            event_id = self._next()
            if event_id is None:
                time.sleep(0.005)
                continue
            delivery = self.deliveries[event_id]
            body, headers = se.signed(delivery.event, int(time.time()))
            try:
                answer = session.post(
                    self.server.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10
                )
                status = answer.status_code
            except requests.RequestException as err:
                # Refused: the server was down, so the event cannot have been seen. Cut: it was
                # in flight when the server died, and may or may not have been committed.
                status = -1 if "refused" in str(err).lower() else 0
                session.close()
                session = requests.Session()
            with self.lock:
                delivery.sends += 1
                if status == 200:
                    delivery.acked = True
                elif status == 500:
                    delivery.failed_500 += 1
                elif status == 0:
                    delivery.no_answer += 1
                elif status == -1:
                    delivery.refused += 1
                else:
                    delivery.other.append(status)
            if status != 200:
                self._again(event_id, delivery.sends)
        session.close()


class Validators:
    """Clients validating keys with machine ids; remembers every acknowledged activation."""

    def __init__(self, server: ServerProcess, seed: int) -> None:
        self.server = server
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.activated: set[tuple[str, str]] = set()
        self.count = 0
        self.cut = 0
        self.bad: list[str] = []
        self.halt = threading.Event()
        self.ring: KeyRing | None = None
        self.catalog: Catalog = server.catalog()

    def _licences(self) -> list[sqlite3.Row]:
        try:
            conn = sqlite3.connect(f"file:{self.server.db_path}?mode=ro", uri=True, timeout=2)
            conn.row_factory = sqlite3.Row
            try:
                return list(conn.execute("SELECT * FROM licenses"))
            finally:
                conn.close()
        except sqlite3.Error:
            return []

    def client(self) -> None:
        session = requests.Session()
        while not self.halt.is_set():
            rows = self._licences()
            if not rows:
                time.sleep(0.05)
                continue
            if self.ring is None:
                self.ring = KeyRing(self.server.data_dir / "keys")
            with self.lock:
                row = self.rng.choice(rows)
                machine = f"machine-{row['id']}-{self.rng.randrange(4)}"
            key = self.server.key_for(row, self.ring, self.catalog)
            try:
                answer = session.post(
                    self.server.url + "/api/license/validate",
                    json={"key": key, "machine_id": machine},
                    timeout=10,
                )
            except requests.RequestException as err:
                if "refused" not in str(err).lower():
                    with self.lock:
                        self.cut += 1
                session.close()
                session = requests.Session()
                continue
            with self.lock:
                self.count += 1
                if answer.status_code != 200:
                    self.bad.append(f"validate answered {answer.status_code}: {answer.text[:200]}")
                elif answer.json().get("activated"):
                    self.activated.add((str(row["id"]), hashlib.sha256(machine.encode()).hexdigest()))
            time.sleep(0.01)
        session.close()


def run_crash(
    workdir: Path,
    seed: int,
    *,
    subscriptions: int = 10,
    spread: float = 10.0,
    max_seconds: float = 25.0,
    uptime: tuple[float, float] = (0.2, 1.0),
    senders: int = 3,
    validators: int = 2,
    min_kills: int = 4,
) -> CrashReport:
    """Run one crash scenario and check the database; ``report.problems`` lists what failed."""
    rng = random.Random(seed)
    report = CrashReport(seed=seed)
    base = int(time.time())
    tag = f"s{seed}"
    stream = build_stream(rng, subscriptions, base, tag)
    report.events = len(stream)
    expected = expected_states(stream, base)

    server = ServerProcess(make_data_dir(workdir / "data"), {"STRIPE_WEBHOOK_SECRET": se.SECRET})
    server.start()
    started = time.monotonic()
    stripe = Stripe(server, stream, spread, rng.randrange(2**32))
    checkers = Validators(server, rng.randrange(2**32))
    threads = [threading.Thread(target=stripe.sender, daemon=True) for _ in range(senders)]
    threads += [threading.Thread(target=checkers.client, daemon=True) for _ in range(validators)]
    for thread in threads:
        thread.start()
    deadline = started + max_seconds
    try:
        # Kill at random moments while the stream is being sent, then let retries drain.
        # A restart takes a second or more, so the stream is spread over several kills.
        while time.monotonic() < deadline and (report.kills < min_kills or not stripe.first_sends_done()):
            time.sleep(rng.uniform(*uptime))
            if not stripe.all_acked():
                report.kills_mid_stream += 1
            server.kill()
            report.kills += 1
            server.start()
        while time.monotonic() < deadline and not stripe.all_acked():
            time.sleep(0.05)
    finally:
        stripe.halt.set()
        checkers.halt.set()
        for thread in threads:
            thread.join(timeout=15)
        server.kill()  # the last stop is a SIGKILL too: what is on disk must stand alone
    report.seconds = time.monotonic() - started

    deliveries = list(stripe.deliveries.values())
    report.deliveries = sum(d.sends for d in deliveries)
    report.acked = sum(d.acked for d in deliveries)
    report.cut_requests = sum(d.no_answer for d in deliveries)
    report.refused_requests = sum(d.refused for d in deliveries)
    report.retried_500 = sum(d.failed_500 for d in deliveries)
    report.validations = checkers.count
    report.validations_cut = checkers.cut
    report.activations_acked = len(checkers.activated)
    problems = report.problems
    problems += checkers.bad[:5]
    for d in deliveries:
        if d.other:
            problems.append(f"{d.event['id']} answered {d.other}")
    if report.acked != report.events:
        problems.append(f"only {report.acked} of {report.events} events acknowledged in {max_seconds} s")

    rows = {str(r["id"]): r for r in server.rows("SELECT id, status, attempts FROM stripe_events")}
    sent_ids = set(stripe.deliveries)
    report.lost = len(
        [i for i in sent_ids if i not in rows or rows[i]["status"] not in ("applied", "ignored")]
    )
    report.duplicates_in_db = len(server.rows("SELECT id FROM stripe_events")) - len(rows)
    if set(rows) != sent_ids:
        problems.append(f"stripe_events ids differ from the ids sent: {sorted(set(rows) ^ sent_ids)[:5]}")
    for event_id, d in stripe.deliveries.items():
        row = rows.get(event_id)
        if row is None:
            continue
        if row["status"] not in ("applied", "ignored"):
            problems.append(f"{event_id} ended {row['status']}")
        # Each failed processing is recorded (attempts + 1); a kill may hide a 500 from us.
        low, high = 1 + d.failed_500, 1 + d.failed_500 + d.no_answer
        if not low <= row["attempts"] <= high:
            problems.append(f"{event_id}: attempts {row['attempts']}, expected {low}..{high}")

    actual = {
        str(r["stripe_subscription_id"]): state_of(r)
        for r in server.rows("SELECT * FROM licenses WHERE stripe_subscription_id IS NOT NULL")
    }
    if actual != expected:
        for sub_id in sorted(set(actual) | set(expected)):
            if actual.get(sub_id) != expected.get(sub_id):
                problems.append(f"{sub_id}: state {actual.get(sub_id)} != expected {expected.get(sub_id)}")
    seats = {(str(r[0]), str(r[1])) for r in server.rows("SELECT license_id, machine_hash FROM machines")}
    report.activations_lost = len(checkers.activated - seats)
    if report.activations_lost:
        problems.append(f"{report.activations_lost} acknowledged activations are gone")
    # These stories never lower a licence's seats, so the limit holds at the end too.
    over = server.rows(
        "SELECT l.id FROM licenses l"
        " WHERE (SELECT COUNT(*) FROM machines m WHERE m.license_id = l.id) > l.max_machines"
    )
    if over:
        problems.append(f"licences over their seat limit: {[str(r[0]) for r in over]}")
    check = [str(r[0]) for r in server.rows("PRAGMA integrity_check")]
    if check != ["ok"]:
        problems.append(f"integrity_check: {check[:5]}")
    if server.rows("PRAGMA foreign_key_check"):
        problems.append("foreign_key_check found orphans")
    log = server.stderr()
    for bad in ("Traceback", "unhandled error"):
        if bad in log:
            problems.append(f"server log has {bad!r}")
    return report
