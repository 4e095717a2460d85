"""``GET /metrics``: the server's counters in Prometheus text format (0.0.4).

No client library: a handful of counters and one histogram, plus gauges read
from the database at scrape time (outbox backlog, age of the last successful
reconcile). Each thread counts into its own shard, with no lock, and a scrape
adds the shards up: one lock taken by every request was a convoy under load
(a thread preempted while holding it made the other seven queue behind it,
each hand-over a trip through the kernel). Counters live in the process-wide
:data:`REGISTRY`, so other modules record into it with plain functions such as
:func:`record_webhook`.

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
from typing import Any

from errors import LicensedError
from services import Services
from store import Store
from web import Request, Response, Route

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_SERIES = 500
UNMATCHED = "unmatched"
OTHER = "other"
LICENSE_PREFIX = "/api/license/"
RECONCILE_SETTING = "reconcile.last_success_at"
OUTBOX_BACKLOG_STATUSES = ("pending", "sending", "failed")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Labels = tuple[str, ...]
Answered = tuple[str, str, int, str | None]


class _Histogram:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        # Non-cumulative, summed when rendered; the last slot counts what is above
        # every bound (+Inf, which the count already says).
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if value < 0.0:
            value = 0.0
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1  # the first bound >= value
        self.count += 1
        self.sum += value

    def add(self, other: _Histogram) -> None:
        for i, n in enumerate(list(other.buckets)):
            self.buckets[i] += n
        self.count += other.count
        self.sum += other.sum


class _Shard:
    """One thread's counters: only that thread writes them, so they need no lock."""

    __slots__ = ("answered", "ignored", "latency", "webhooks")

    def __init__(self) -> None:
        self.answered: dict[Answered, int] = {}
        """Requests by method, route label, status and answer ``code`` (None when the
        answer has none): both request and licence-answer counters are sums of it,
        so a request costs one count."""
        self.latency: dict[str, _Histogram] = {}
        """By route label."""
        self.webhooks: dict[Labels, int] = {}
        self.ignored: dict[Labels, int] = {}
        """Stripe events that changed nothing, by reason."""


class Metrics:
    """The process' counters. Every method is thread-safe."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._shards: list[_Shard] = []
        self._shards_lock = threading.Lock()  # taken once per thread, when it first counts
        self.started_at = time.time()

    def _shard(self) -> _Shard:
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._local.shard = _Shard()
            with self._shards_lock:
                self._shards.append(shard)
        return shard

    # --- recording ---------------------------------------------------------------------

    def observe_request(
        self, method: str, route: str | None, status: int, seconds: float, body: Any = None
    ) -> None:
        """Count one answered request; a license route's answer also counts its ``code``."""
        shard = self._shard()
        label = route or UNMATCHED
        code = body.get("code") if type(body) is dict else None
        key = (method, label, status, code if type(code) is str else None)
        answered = shard.answered
        count = answered.get(key)
        if count is None:
            _first_answer(answered, key)
        else:
            answered[key] = count + 1
        histogram = shard.latency.get(label)
        if histogram is None:
            histogram = _Histogram()
            if len(shard.latency) < MAX_SERIES:
                shard.latency[label] = histogram
        histogram.observe(seconds)

    def record_webhook(self, event_type: str, outcome: str, reason: str | None = None) -> None:
        shard = self._shard()
        _inc(shard.webhooks, (str(event_type)[:100], str(outcome)[:50]))
        if reason is not None:
            _inc(shard.ignored, (str(reason)[:50],))

    def _totals(self) -> _Shard:
        """Every shard added up, as one shard. Copying a dict is one step for the
        interpreter, so each copy is consistent; a histogram read while its thread
        observes may be one observation apart between its count and its sum, which
        a scrape tolerates."""
        with self._shards_lock:
            shards = list(self._shards)
        total = _Shard()
        for shard in shards:
            for key, count in dict(shard.answered).items():
                total.answered[key] = total.answered.get(key, 0) + count
            for labels, count in dict(shard.webhooks).items():
                _inc(total.webhooks, labels, count)
            for labels, count in dict(shard.ignored).items():
                _inc(total.ignored, labels, count)
            for route, histogram in dict(shard.latency).items():
                merged = total.latency.get(route)
                if merged is None:
                    if len(total.latency) >= MAX_SERIES:
                        continue
                    merged = total.latency[route] = _Histogram()
                merged.add(histogram)
        return total

    # --- rendering ---------------------------------------------------------------------

    def render(self, store: Store | None, now: float) -> str:
        """The exposition text: in-memory counters, then gauges read from ``store``."""
        counted = self._totals()
        requests: dict[Labels, int] = {}
        answers: dict[Labels, int] = {}
        for (method, route, status, code), count in counted.answered.items():
            # Status 0 is the capped series' (no answer has it): it renders as "other".
            _inc(requests, (method, route, str(status) if status else OTHER), count)
            if code is not None and route.startswith(LICENSE_PREFIX):
                _inc(answers, (route.removeprefix(LICENSE_PREFIX), code), count)
        webhooks = counted.webhooks
        latency = {k: (h.buckets, h.count, h.sum) for k, h in counted.latency.items()}
        out: list[str] = []
        _family(out, "licensed_http_requests_total", "counter", "HTTP requests answered.")
        _samples(out, "licensed_http_requests_total", ("method", "route", "status"), requests)
        _family(
            out,
            "licensed_http_request_duration_seconds",
            "histogram",
            "Time from request start to the answer being ready.",
        )
        for route, (buckets, count, total) in sorted(latency.items()):
            cumulative = 0
            for bound, n in zip(LATENCY_BUCKETS, buckets[: len(LATENCY_BUCKETS)], strict=True):
                cumulative += n
                out.append(
                    _line(
                        "licensed_http_request_duration_seconds_bucket",
                        ("route", "le"),
                        (route, _number(bound)),
                        cumulative,
                    )
                )
            out.append(
                _line(
                    "licensed_http_request_duration_seconds_bucket", ("route", "le"), (route, "+Inf"), count
                )
            )
            out.append(_line("licensed_http_request_duration_seconds_sum", ("route",), (route,), total))
            out.append(_line("licensed_http_request_duration_seconds_count", ("route",), (route,), count))
        _family(
            out,
            "licensed_license_answers_total",
            "counter",
            "Answers of validate/activate/deactivate by outcome code.",
        )
        _samples(out, "licensed_license_answers_total", ("action", "code"), answers)
        _family(
            out, "licensed_webhooks_total", "counter", "Stripe webhook deliveries by event type and outcome."
        )
        _samples(out, "licensed_webhooks_total", ("type", "outcome"), webhooks)
        _family(
            out,
            "licensed_stripe_events_ignored_total",
            "counter",
            "Stripe events recorded without effect, by reason (no_plan: a paid purchase got no licence).",
        )
        _samples(out, "licensed_stripe_events_ignored_total", ("reason",), counted.ignored)
        _family(out, "licensed_process_start_time_seconds", "gauge", "When this process started (epoch).")
        out.append(_line("licensed_process_start_time_seconds", (), (), self.started_at))
        out.extend(_store_gauges(store, now))
        return "\n".join(out) + "\n"


def _store_gauges(store: Store | None, now: float) -> list[str]:
    """Gauges read from the database; a database that cannot be read says so in ``licensed_database_up``."""
    out: list[str] = []
    try:
        if store is None:
            raise LicensedError("no store")
        backlog = store.outbox_backlog()
        oldest = store.outbox_oldest_unsent()
        last = _epoch(store.get_setting(RECONCILE_SETTING))
    except LicensedError:
        _family(out, "licensed_database_up", "gauge", "1 when the database answered this scrape.")
        out.append(_line("licensed_database_up", (), (), 0))
        return out
    _family(out, "licensed_database_up", "gauge", "1 when the database answered this scrape.")
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
    out.append(
        _line("licensed_outbox_oldest_unsent_age_seconds", (), (), max(0.0, now - oldest) if oldest else 0)
    )
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
    out.append(
        _line("licensed_seconds_since_last_reconcile", (), (), max(0.0, now - last) if last else math.inf)
    )
    return out


def _epoch(value: str | None) -> float | None:
    """An epoch time stored as text; absent, 0, or unreadable all mean "never"."""
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number > 0 and math.isfinite(number) else None


def _first_answer(answered: dict[Answered, int], key: Answered) -> None:
    """Count a request whose labels were not counted yet in this shard: an odd
    method counts as ``other``, and past :data:`MAX_SERIES` label sets whatever
    is new counts under ``other`` (status 0)."""
    method, route, status, code = key
    if method not in _METHODS:
        key = (OTHER, route, status, code)
    if key not in answered and len(answered) >= MAX_SERIES:
        # A licence route's answers still count by code: three routes, a dozen codes.
        key = (OTHER, route if route.startswith(LICENSE_PREFIX) else OTHER, 0, code)
    answered[key] = answered.get(key, 0) + 1


def _inc(family: dict[Labels, int], labels: Labels, by: int = 1) -> None:
    if labels not in family and len(family) >= MAX_SERIES:
        labels = tuple(OTHER for _ in labels)
    family[labels] = family.get(labels, 0) + by


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _samples(out: list[str], name: str, names: Sequence[str], values: dict[Labels, int]) -> None:
    for labels, value in sorted(values.items()):
        out.append(_line(name, names, labels, value))


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


def record_webhook(event_type: str, outcome: str, reason: str | None = None) -> None:
    """Count one webhook delivery (``outcome`` e.g. applied, ignored, duplicate, failed, bad_signature),
    and why an ignored one changed nothing."""
    REGISTRY.record_webhook(event_type, outcome, reason)


def routes(services: Services, registry: Metrics = REGISTRY) -> list[Route]:
    def handler(request: Request) -> Response:
        text = registry.render(services.store, services.clock())
        return Response(raw=text.encode("utf-8"), content_type=CONTENT_TYPE)

    return [Route("GET", "/metrics", handler, "Prometheus metrics", tag="ops", media_type="text/plain")]
