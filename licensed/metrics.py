"""The server's counters, rendered in Prometheus text format (0.0.4).

No client library: a few counters and one histogram under one lock, plus
gauges read from the database at scrape time (outbox backlog, age of the last
successful reconcile). Counters live in the process-wide :data:`REGISTRY`.

Label values come from bounded sets (route templates, not raw paths; known
methods; stable codes), and each family is capped at :data:`MAX_SERIES` label
sets so a flood of odd values cannot grow memory without end.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import LicensedError
from .replication import replica_status
from .store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_SERIES = 500
UNMATCHED = "unmatched"
OTHER = "other"
LICENSE_PREFIX = "/api/license/"
OUTBOX_BACKLOG_STATUSES = ("pending", "sending", "failed")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Labels = tuple[str, ...]


class _Histogram:
    def __init__(self) -> None:
        self.buckets = [0] * len(LATENCY_BUCKETS)  # non-cumulative; summed when rendered
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(LATENCY_BUCKETS, max(0.0, value))  # the first bound >= value
        if index < len(self.buckets):
            self.buckets[index] += 1
        self.count += 1
        self.sum += value


class _Family:
    """Counts by label values, at most :data:`MAX_SERIES` sets (the rest count as ``other``)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.values: dict[Labels, int] = {}

    def inc(self, labels: Labels, by: int = 1) -> None:
        if labels not in self.values and len(self.values) >= MAX_SERIES:
            labels = tuple(OTHER for _ in labels)
        self.values[labels] = self.values.get(labels, 0) + by


class Metrics:
    """The process' counters. Every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_at = time.time()
        self.requests = _Family(("method", "route", "status"))
        self.answers = _Family(("action", "code"))
        self.webhooks = _Family(("type", "outcome"))
        self.ignored = _Family(("reason",))
        self.latency: dict[str, _Histogram] = {}

    def observe_request(
        self, method: str, route: str | None, status: int, seconds: float, code: str | None = None
    ) -> None:
        """Count one answered request; a license route's answer also counts its ``code``."""
        label = route or UNMATCHED
        with self._lock:
            self.requests.inc((method if method in _METHODS else OTHER, label, str(status)))
            if code is not None and label.startswith(LICENSE_PREFIX):
                self.answers.inc((label.removeprefix(LICENSE_PREFIX), code))
            histogram = self.latency.get(label)
            if histogram is None and len(self.latency) < MAX_SERIES:
                histogram = self.latency[label] = _Histogram()
            if histogram is not None:
                histogram.observe(seconds)

    def record_webhook(self, event_type: str, outcome: str, reason: str | None = None) -> None:
        """Count one webhook delivery, and why an ignored one changed nothing."""
        with self._lock:
            self.webhooks.inc((event_type[:100], outcome[:50]))
            if reason is not None:
                self.ignored.inc((reason[:50],))

    def render(self, store: Store | None, now: float, litestream_socket: Path | None = None) -> str:
        """The exposition text: in-memory counters, then gauges read from ``store``, then
        Litestream's word on the replica when ``litestream_socket`` is set."""
        out: list[str] = []
        with self._lock:
            _counter(out, "licensed_http_requests_total", "HTTP requests answered.", self.requests)
            _family(
                out,
                "licensed_http_request_duration_seconds",
                "histogram",
                "Time from request start to the answer being ready.",
            )
            for route, histogram in sorted(self.latency.items()):
                cumulative = 0
                for bound, count in zip(LATENCY_BUCKETS, histogram.buckets, strict=True):
                    cumulative += count
                    name = "licensed_http_request_duration_seconds_bucket"
                    out.append(_line(name, ("route", "le"), (route, _number(bound)), cumulative))
                name = "licensed_http_request_duration_seconds"
                out.append(_line(f"{name}_bucket", ("route", "le"), (route, "+Inf"), histogram.count))
                out.append(_line(f"{name}_sum", ("route",), (route,), histogram.sum))
                out.append(_line(f"{name}_count", ("route",), (route,), histogram.count))
            _counter(
                out,
                "licensed_license_answers_total",
                "Answers of validate/activate/deactivate by outcome code.",
                self.answers,
            )
            _counter(
                out,
                "licensed_webhooks_total",
                "Stripe webhook deliveries by event type and outcome.",
                self.webhooks,
            )
            _counter(
                out,
                "licensed_stripe_events_ignored_total",
                "Stripe events recorded without effect, by reason (no_plan: a paid purchase got no licence).",
                self.ignored,
            )
        _family(out, "licensed_process_start_time_seconds", "gauge", "When this process started (epoch).")
        out.append(_line("licensed_process_start_time_seconds", (), (), self.started_at))
        out.extend(_store_gauges(store, now))
        if litestream_socket is not None and store is not None:
            out.extend(_replica_gauges(litestream_socket, store.path, now))
        return "\n".join(out) + "\n"


def _store_gauges(store: Store | None, now: float) -> list[str]:
    """Gauges read from the database; a database that cannot be read says so in ``licensed_database_up``."""
    out: list[str] = []
    _family(out, "licensed_database_up", "gauge", "1 when the database answered this scrape.")
    try:
        if store is None:
            raise LicensedError("no store")
        backlog = store.outbox_backlog()
        oldest = store.outbox_oldest_unsent()
        last = store.last_reconcile_at()
    except LicensedError:
        out.append(_line("licensed_database_up", (), (), 0))
        return out
    out.append(_line("licensed_database_up", (), (), 1))
    _family(out, "licensed_outbox_backlog", "gauge", "Mails not yet sent, by outbox status.")
    for status in OUTBOX_BACKLOG_STATUSES:
        out.append(_line("licensed_outbox_backlog", ("status",), (status,), backlog.get(status, 0)))
    _family(
        out,
        "licensed_outbox_oldest_unsent_age_seconds",
        "gauge",
        "Age of the oldest pending or sending mail; 0 when none waits.",
    )
    age = max(0.0, now - oldest) if oldest else 0
    out.append(_line("licensed_outbox_oldest_unsent_age_seconds", (), (), age))
    _family(
        out,
        "licensed_reconcile_last_success_timestamp_seconds",
        "gauge",
        "When the last reconcile with Stripe succeeded (epoch); 0 when never.",
    )
    out.append(_line("licensed_reconcile_last_success_timestamp_seconds", (), (), last or 0))
    _family(
        out,
        "licensed_seconds_since_last_reconcile",
        "gauge",
        "Seconds since the last successful reconcile; +Inf when it never succeeded.",
    )
    since = max(0.0, now - last) if last else math.inf
    out.append(_line("licensed_seconds_since_last_reconcile", (), (), since))
    return out


def _replica_gauges(socket_path: Path, db_path: Path, now: float) -> list[str]:
    """Two gauges from Litestream's control socket (one request per scrape)."""
    status = replica_status(socket_path, db_path)
    out: list[str] = []
    _family(
        out,
        "licensed_replication_up",
        "gauge",
        "1 when Litestream's control socket answered and it replicates the database.",
    )
    out.append(_line("licensed_replication_up", (), (), 1 if status.up else 0))
    _family(
        out,
        "licensed_replication_seconds_since_sync",
        "gauge",
        "Seconds since Litestream last finished an upload to the replica (it uploads every "
        "sync-interval, also when idle); +Inf when unknown.",
    )
    since = max(0.0, now - status.last_sync_at) if status.up and status.last_sync_at else math.inf
    out.append(_line("licensed_replication_seconds_since_sync", (), (), since))
    return out


def _counter(out: list[str], name: str, help_text: str, family: _Family) -> None:
    _family(out, name, "counter", help_text)
    for labels, value in sorted(family.values.items()):
        out.append(_line(name, family.names, labels, value))


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _line(name: str, names: Iterable[str], values: Iterable[str], value: float) -> str:
    pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return f"{name}{{{pairs}}} {_number(value)}" if pairs else f"{name} {_number(value)}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


REGISTRY = Metrics()
"""The process' metrics: one server per process, so one registry."""
