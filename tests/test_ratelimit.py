"""Rate limiting of the public routes: the limiter alone, then through a live server."""

from __future__ import annotations

import ipaddress
import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.clock import FrozenClock
from support.ops_helpers import live_with

from licensed.errors import RateLimited
from licensed.ratelimit import WINDOW, RateLimiter, client_address, is_limited
from licensed.services import Services

LOCAL = (ipaddress.ip_network("127.0.0.1/32"),)
PROXIES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))

# --- the limiter -------------------------------------------------------------------------


def test_burst_then_429_with_retry_after_then_refill() -> None:
    clock = FrozenClock(1000)
    limiter = RateLimiter(6, clock)  # one token every 10 s
    for _ in range(6):
        limiter.check("a")
    with pytest.raises(RateLimited) as caught:
        limiter.check("a")
    assert caught.value.status == 429
    assert ("Retry-After", "10") in caught.value.headers()
    clock.advance(9)
    with pytest.raises(RateLimited) as caught:
        limiter.check("a")
    assert ("Retry-After", "1") in caught.value.headers()
    clock.advance(1)
    limiter.check("a")


def test_clients_have_separate_budgets() -> None:
    limiter = RateLimiter(1, FrozenClock())
    limiter.check("a")
    limiter.check("b")
    with pytest.raises(RateLimited):
        limiter.check("a")


def test_zero_turns_it_off() -> None:
    limiter = RateLimiter(0, FrozenClock())
    for _ in range(1000):
        limiter.check("a")
    assert len(limiter) == 0


def test_clock_stepping_back_refills_nothing() -> None:
    clock = FrozenClock(1000)
    limiter = RateLimiter(1, clock)
    limiter.check("a")
    clock.advance(-3600)
    with pytest.raises(RateLimited):
        limiter.check("a")


def test_idle_clients_are_forgotten() -> None:
    clock = FrozenClock(1000)
    limiter = RateLimiter(5, clock)
    for n in range(100):
        limiter.check(f"10.0.0.{n}")
    assert len(limiter) == 100
    clock.advance(WINDOW)
    limiter.check("10.1.0.1")
    assert len(limiter) == 1


def test_table_is_bounded() -> None:
    clock = FrozenClock(1000)
    limiter = RateLimiter(5, clock, max_clients=50)
    for n in range(1000):
        limiter.check(f"client-{n}")
        assert len(limiter) <= 50
    # The newest are the ones kept: their spent tokens still count.
    for _ in range(4):
        limiter.check("client-999")
    with pytest.raises(RateLimited):
        limiter.check("client-999")


@settings(max_examples=200, deadline=None)
@given(
    per_minute=st.integers(1, 30),
    gaps=st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=120),
)
def test_never_more_than_burst_plus_refill(per_minute: int, gaps: list[float]) -> None:
    """In any span of T seconds at most per_minute + T * per_minute / 60 requests pass."""
    clock = FrozenClock(0)
    limiter = RateLimiter(per_minute, clock)
    allowed: list[float] = []
    for gap in gaps:
        clock.advance(gap)
        wait = limiter.acquire("x")
        if wait == 0:
            allowed.append(clock())
        else:
            assert 0 < wait <= WINDOW / per_minute + 1e-9
    for i, start in enumerate(allowed):
        for j in range(i, len(allowed)):
            span = allowed[j] - start
            assert j - i + 1 <= per_minute + span * per_minute / WINDOW + 1e-6


@settings(max_examples=100, deadline=None)
@given(per_minute=st.integers(1, 600), count=st.integers(1, 200))
def test_waiting_the_announced_time_always_works(per_minute: int, count: int) -> None:
    clock = FrozenClock(0)
    limiter = RateLimiter(per_minute, clock)
    for _ in range(count):
        wait = limiter.acquire("x")
        if wait:
            clock.advance(math.ceil(wait))
            assert limiter.acquire("x") == 0


def test_thread_safe_counting() -> None:
    limiter = RateLimiter(500, FrozenClock())
    passed: list[int] = []
    lock = threading.Lock()

    def hammer() -> None:
        mine = sum(1 for _ in range(200) if limiter.acquire("shared") == 0)
        with lock:
            passed.append(mine)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(passed) == 500


# --- who the client is ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "forwarded", "expected"),
    [
        ("127.0.0.1", "203.0.113.9", "203.0.113.9"),  # trusted proxy: believed
        ("198.51.100.7", "203.0.113.9", "198.51.100.7"),  # untrusted peer: ignored
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "1.2.3.4, 203.0.113.9", "203.0.113.9"),  # client-written hops ignored
        ("127.0.0.1", "203.0.113.9, 10.1.2.3", "203.0.113.9"),  # inner proxy skipped
        ("127.0.0.1", "not-an-ip", "127.0.0.1"),
        ("127.0.0.1", "10.0.0.1, 10.0.0.2", "10.0.0.1"),  # all trusted: the first
        ("unix-socket", "203.0.113.9", "unix-socket"),
    ],
)
def test_client_address(remote: str, forwarded: str | None, expected: str) -> None:
    assert client_address(remote, forwarded, PROXIES) == expected


@pytest.mark.parametrize(
    ("path", "limited"),
    [
        ("/api/license/validate", True),
        ("/api/license/activate", True),
        ("/api/checkout/session", True),
        ("/api/checkout/session/cs_test_1", True),
        ("/api/public/plans", True),
        ("/api/stripe/webhook", False),
        ("/health", False),
        ("/metrics", False),
        ("/api/admin/licenses", False),
        ("/api/licensefoo", False),
    ],
)
def test_which_paths_are_limited(path: str, limited: bool) -> None:
    assert is_limited(path) is limited


# --- through the server ----------------------------------------------------------------


def test_live_limit_hit_answers_429_with_retry_after(services: Services, clock: FrozenClock) -> None:
    with live_with(services, clock, rate_limit_per_minute=3) as live:
        key = live.issue()
        for _ in range(3):
            assert live.post("/api/license/validate", {"key": key}).json()["code"] == "VALID"
        answer = live.post("/api/license/validate", {"key": key})
        assert answer.status_code == 429
        assert answer.headers["Retry-After"] == "20"
        assert answer.json()["error"]["code"] == "RATE_LIMITED"
        # The budget is per client, across all limited routes.
        assert live.get("/api/public/plans").status_code == 429
        clock.advance(20)
        assert live.post("/api/license/validate", {"key": key}).status_code == 200
        assert live.post("/api/license/validate", {"key": key}).status_code == 429


def test_live_trusted_proxy_forwarded_for_is_believed(services: Services, clock: FrozenClock) -> None:
    with live_with(services, clock, rate_limit_per_minute=2, trusted_proxies=LOCAL) as live:
        first = {"X-Forwarded-For": "203.0.113.1"}
        for _ in range(2):
            assert live.get("/api/public/plans", headers=first).status_code == 200
        assert live.get("/api/public/plans", headers=first).status_code == 429
        # A hop written by the client in front of the real one changes nothing.
        spoofed = {"X-Forwarded-For": "192.0.2.50, 203.0.113.1"}
        assert live.get("/api/public/plans", headers=spoofed).status_code == 429
        other = {"X-Forwarded-For": "203.0.113.2"}
        assert live.get("/api/public/plans", headers=other).status_code == 200


def test_live_untrusted_peer_forwarded_for_is_ignored(services: Services, clock: FrozenClock) -> None:
    elsewhere = (ipaddress.ip_network("10.0.0.0/8"),)
    with live_with(services, clock, rate_limit_per_minute=2, trusted_proxies=elsewhere) as live:
        codes = [
            live.get("/api/public/plans", headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
            for n in range(4)
        ]
        assert codes == [200, 200, 429, 429]


def test_live_zero_disables(services: Services, clock: FrozenClock) -> None:
    with live_with(services, clock, rate_limit_per_minute=0) as live:
        codes = {live.get("/api/public/plans").status_code for _ in range(40)}
        assert codes == {200}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("GET", "/.well-known/jwks.json"),
        ("GET", "/openapi.json"),
        ("POST", "/api/stripe/webhook"),
        ("GET", "/api/admin/stats"),
    ],
)
def test_live_unlimited_routes(services: Services, clock: FrozenClock, method: str, path: str) -> None:
    with live_with(services, clock, rate_limit_per_minute=1) as live:
        assert live.get("/api/public/plans").status_code == 200
        assert live.get("/api/public/plans").status_code == 429
        for _ in range(5):
            answer = live.http.request(method, live.url + path, timeout=10)
            assert answer.status_code != 429
