"""GET /metrics: counters move with traffic, gauges follow the database, the text parses."""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support.clock import T0, FrozenClock
from support.live import Live

from licensed import metrics
from licensed.metrics import LATENCY_BUCKETS, MAX_SERIES, Metrics
from licensed.store import Store

Sample = tuple[str, frozenset[tuple[str, str]]]

_SAMPLE = re.compile(
    r"^[a-zA-Z_:][a-zA-Z0-9_:]*"
    r'(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*\})?'
    r" (?:[+-]?Inf|NaN|[+-]?[0-9.]+(?:e[+-]?[0-9]+)?)$"
)


def parse(text: str) -> dict[Sample, float]:
    """Check the exposition text strictly, then read it with the reference parser."""
    assert text.endswith("\n")
    declared: dict[str, str] = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in declared, f"{name} declared twice"
            declared[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            assert _SAMPLE.match(line), f"bad sample line: {line!r}"
            name = line.split("{")[0].split(" ")[0]
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in declared else name
            assert family in declared, f"sample {name} has no # TYPE"
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        declared_as = family.name + "_total" if family.type == "counter" else family.name
        assert declared.get(declared_as) == family.type, f"{family.name} parsed as {family.type}"
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        if family.type == "histogram":
            _check_histogram(family.name, samples)
    return samples


def _check_histogram(name: str, samples: dict[Sample, float]) -> None:
    """Buckets never decrease with ``le``, and ``+Inf`` holds every observation (= ``_count``)."""
    series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
    for (sample, labels), count in samples.items():
        if sample == name + "_bucket":
            le = dict(labels)["le"]
            series.setdefault(frozenset(i for i in labels if i[0] != "le"), []).append((float(le), count))
    for labels, buckets in series.items():
        counts = [c for _, c in sorted(buckets)]
        assert counts == sorted(counts), f"{name} buckets decrease"
        assert max(b for b, _ in buckets) == math.inf, f"{name} has no +Inf bucket"
        assert counts[-1] == samples.get((name + "_count", labels)), f"{name} +Inf != _count"


@pytest.mark.parametrize(
    "text",
    [
        "# TYPE a counter\na_total 1",  # no final newline
        "a_total 1\n",  # no TYPE
        '# TYPE a_total counter\na_total{x="1} 1\n',  # open quote
        "# TYPE a_total counter\na_total one\n",  # not a number
        "# TYPE a_total counter\n# TYPE a_total counter\na_total 1\n",  # declared twice
        '# TYPE h histogram\nh_bucket{le="1"} 1\n',  # histogram without +Inf
    ],
)
def test_the_checker_rejects_broken_text(text: str) -> None:
    with pytest.raises((AssertionError, ValueError)):
        parse(text)


def scrape(live: Live) -> dict[Sample, float]:
    answer = live.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(answer.text)


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counts_move_with_requests(live: Live) -> None:
    key = live.issue()
    before = scrape(live)
    assert live.post("/api/license/validate", {"key": key, "machine_id": "m-1"}).json()["code"] == "VALID"
    assert live.post("/api/license/validate", {"key": key, "machine_id": "m-1"}).json()["code"] == "VALID"
    assert live.post("/api/license/validate", {"key": "DC-PRO-nonsense"}).json()["code"] == "INVALID_KEY"
    assert live.post("/api/license/activate", {"key": key, "machine_id": "m-2"}).json()["code"] == (
        "TOO_MANY_MACHINES"
    )
    assert live.post("/api/license/deactivate", {"key": key, "machine_id": "m-1"}).json()["code"] == (
        "DEACTIVATED"
    )
    assert live.get("/no/such/path").status_code == 404
    wrong_type = live.http.post(
        live.url + "/api/license/validate", data=b"{}", headers={"Content-Type": "text/plain"}, timeout=10
    )
    assert wrong_type.status_code == 415
    after = scrape(live)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    answers = "licensed_license_answers_total"
    assert delta(answers, action="validate", code="VALID") == 2
    assert delta(answers, action="validate", code="INVALID_KEY") == 1
    assert delta(answers, action="activate", code="TOO_MANY_MACHINES") == 1
    assert delta(answers, action="deactivate", code="DEACTIVATED") == 1
    http = "licensed_http_requests_total"
    assert delta(http, method="POST", route="/api/license/validate", status="200") == 3
    assert delta(http, method="POST", route="/api/license/validate", status="415") == 1
    assert delta(http, method="GET", route="unmatched", status="404") == 1
    # The scrape before this one is counted too.
    assert delta(http, method="GET", route="/metrics", status="200") == 1
    hist = "licensed_http_request_duration_seconds"
    assert delta(hist + "_count", route="/api/license/validate") == 4
    assert delta(hist + "_bucket", route="/api/license/validate", le="+Inf") == 4
    assert delta(hist + "_sum", route="/api/license/validate") > 0


def test_histogram_buckets_are_cumulative(live: Live) -> None:
    for _ in range(3):
        live.get("/health")
    samples = scrape(live)
    counts = [
        value(samples, "licensed_http_request_duration_seconds_bucket", route="/health", le=str(float(b)))
        for b in LATENCY_BUCKETS
    ]
    total = value(samples, "licensed_http_request_duration_seconds_count", route="/health")
    assert counts == sorted(counts)
    hist = "licensed_http_request_duration_seconds"
    assert value(samples, hist + "_bucket", route="/health", le="+Inf") == total
    assert total >= 3


def test_outbox_backlog_by_status(live: Live) -> None:
    store = live.services.store
    lic = live.issue_license()
    with store.atomic():
        ids = [store.enqueue_mail(lic.id, "license_key", "b@example.com", None, T0 - 600) for _ in range(4)]
    store.execute("UPDATE outbox SET status = 'failed' WHERE id = ?", (ids[0],))
    store.execute("UPDATE outbox SET status = 'sent' WHERE id = ?", (ids[1],))
    store.execute("UPDATE outbox SET status = 'sending' WHERE id = ?", (ids[2],))
    samples = scrape(live)
    assert value(samples, "licensed_outbox_backlog", status="pending") == 1 + _issued_mails(store)
    assert value(samples, "licensed_outbox_backlog", status="sending") == 1
    assert value(samples, "licensed_outbox_backlog", status="failed") == 1
    assert ("licensed_outbox_backlog", frozenset({("status", "sent")})) not in samples
    assert value(samples, "licensed_outbox_oldest_unsent_age_seconds") == 600
    assert value(samples, "licensed_database_up") == 1


def _issued_mails(store: Store) -> int:
    """Mails queued by issuing the licence itself (none today, but not this test's business)."""
    row = store.one("SELECT COUNT(*) FROM outbox WHERE status = 'pending' AND created_at != ?", (T0 - 600,))
    return int(row[0]) if row else 0


@pytest.mark.parametrize(
    ("stored", "age", "stamp"),
    [
        (None, math.inf, 0),
        ("0", math.inf, 0),
        ("garbage", math.inf, 0),
        (str(T0 - 300), 300, T0 - 300),
    ],
)
def test_seconds_since_last_reconcile(live: Live, stored: str | None, age: float, stamp: float) -> None:
    if stored is not None:
        live.services.store.put_setting(Store.LAST_RECONCILE, stored, T0)
    samples = scrape(live)
    assert value(samples, "licensed_seconds_since_last_reconcile") == age
    assert value(samples, "licensed_reconcile_last_success_timestamp_seconds") == stamp


def test_reconcile_age_follows_the_clock(live: Live, clock: FrozenClock) -> None:
    live.services.store.put_setting(Store.LAST_RECONCILE, str(T0), T0)
    clock.advance(1234)
    assert value(scrape(live), "licensed_seconds_since_last_reconcile") == 1234


def test_webhooks_by_type_and_outcome(live: Live) -> None:
    before = scrape(live)
    metrics.REGISTRY.record_webhook("invoice.paid", "applied")
    metrics.REGISTRY.record_webhook("invoice.paid", "applied")
    metrics.REGISTRY.record_webhook("charge.refunded", "failed")
    after = scrape(live)
    name = "licensed_webhooks_total"
    for labels, expected in [
        ({"type": "invoice.paid", "outcome": "applied"}, 2),
        ({"type": "charge.refunded", "outcome": "failed"}, 1),
    ]:
        assert value(after, name, **labels) - value(before, name, **labels) == expected


def test_database_down_is_reported_not_a_500(tmp_path: Path) -> None:
    broken = Store(tmp_path)  # a directory: SQLite cannot open it
    samples = parse(Metrics().render(broken, T0))
    assert value(samples, "licensed_database_up") == 0
    assert ("licensed_outbox_backlog", frozenset({("status", "pending")})) not in samples


@settings(max_examples=100, deadline=None)
@given(event_type=st.text(max_size=40), outcome=st.text(min_size=1, max_size=20))
def test_any_label_value_survives_escaping(event_type: str, outcome: str) -> None:
    registry = Metrics()
    registry.record_webhook(event_type, outcome)
    samples = parse(registry.render(None, T0))
    assert value(samples, "licensed_webhooks_total", type=event_type, outcome=outcome) == 1


def test_series_are_capped() -> None:
    registry = Metrics()
    for n in range(MAX_SERIES + 50):
        registry.record_webhook(f"type-{n}", "applied")
    samples = parse(registry.render(None, T0))
    webhook_series = [k for k in samples if k[0] == "licensed_webhooks_total"]
    assert len(webhook_series) == MAX_SERIES + 1
    assert value(samples, "licensed_webhooks_total", type="other", outcome="other") == 50


def test_request_series_are_capped_and_answers_counted_once() -> None:
    registry = Metrics()
    for n in range(MAX_SERIES + 50):
        registry.observe_request("GET", f"/route-{n}", 200, 0.001)
    for code in ("VALID", "VALID", "EXPIRED"):
        registry.observe_request("POST", "/api/license/validate", 200, 0.001, code)
    samples = parse(registry.render(None, T0))
    name = "licensed_http_requests_total"
    request_series = [k for k in samples if k[0] == name]
    assert len(request_series) == MAX_SERIES + 1
    assert value(samples, name, method="other", route="other", status="other") == 53
    assert value(samples, "licensed_license_answers_total", action="validate", code="VALID") == 2
    assert value(samples, "licensed_license_answers_total", action="validate", code="EXPIRED") == 1


def test_counting_is_thread_safe() -> None:
    registry = Metrics()

    def hammer() -> None:
        for _ in range(2000):
            registry.observe_request("POST", "/api/license/validate", 200, 0.001, "VALID")
            registry.record_webhook("invoice.paid", "applied")

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples = parse(registry.render(None, T0))
    assert value(samples, "licensed_license_answers_total", action="validate", code="VALID") == 16000
    assert value(samples, "licensed_webhooks_total", type="invoice.paid", outcome="applied") == 16000
    hist = "licensed_http_request_duration_seconds"
    assert value(samples, hist + "_count", route="/api/license/validate") == 16000


def test_unknown_methods_do_not_make_new_series(live: Live) -> None:
    live.http.request("BREW", live.url + "/health", timeout=10)
    samples = scrape(live)
    methods = {dict(labels)["method"] for name, labels in samples if name == "licensed_http_requests_total"}
    assert "BREW" not in methods
    assert "other" in methods
