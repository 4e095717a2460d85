"""Per-client rate limiting of the public license and checkout routes.

A token bucket per client address: a client may burst up to
``RATE_LIMIT_PER_MINUTE`` requests, then gets one more every
``60 / RATE_LIMIT_PER_MINUTE`` seconds. The table lives in memory (one process
serves everything) and is bounded: an address idle for a full minute has a
full bucket, which is the same as not being tracked, so it is dropped; past
``max_clients`` the least recently seen address is dropped too.

Time comes from the services clock, so tests step it by hand.

The client address is the peer's, or the last untrusted hop of
``X-Forwarded-For`` when the peer is a trusted proxy (Caddy in front).
"""

from __future__ import annotations

import ipaddress
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import IPNetwork
from .errors import RateLimited

LIMITED_PREFIXES = (
    "/api/license/",
    "/api/checkout/",
    "/api/public/",
    "/api/billing/",
    "/account/",
    "/checkout/",
)
"""Paths counted against a client's budget; webhooks, health, metrics and admin are not
(failed admin tokens have a budget of their own). Of the customer pages: the sign-in form
(each request may mail a link) and link, the account's forms (billing calls Stripe), and
the checkout pages (each looks a purchase up); not the account page itself or its assets."""

WINDOW = 60.0
DEFAULT_MAX_CLIENTS = 50_000


def is_limited(path: str) -> bool:
    return path.startswith(LIMITED_PREFIXES)


def client_address(remote: str, forwarded: str | None, trusted: Sequence[IPNetwork]) -> str:
    """The client address, believing ``X-Forwarded-For`` only from trusted proxies.

    Walks the forwarded chain from the nearest hop outwards and returns the
    first address that is not itself a trusted proxy: hops further out were
    written by the client and could be anything.
    """
    if not forwarded:
        return remote
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if not any(address in net for net in trusted):
        return remote
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            hop_address = ipaddress.ip_address(hop)
        except ValueError:
            return remote
        if not any(hop_address in net for net in trusted):
            return hop
    return hops[0] if hops else remote


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets keyed by client address; thread-safe, bounded in memory."""

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float],
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.max_clients = max(1, max_clients)
        self._rate = per_minute / WINDOW  # tokens per second
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, client: str) -> None:
        """Spend one token of ``client``'s budget, or raise :class:`RateLimited`."""
        wait = self.acquire(client)
        if wait > 0:
            raise RateLimited(math.ceil(wait))

    def acquire(self, client: str) -> float:
        """Spend one token; returns 0 when allowed, else the seconds until one is free."""
        if not self.enabled:
            return 0.0
        now = float(self.clock())
        capacity = float(self.per_minute)
        with self._lock:
            self._evict_idle(now)
            bucket = self._buckets.pop(client, None)
            if bucket is None:
                bucket = _Bucket(capacity, now)
            else:
                # A clock stepped backwards refills nothing rather than draining.
                elapsed = max(0.0, now - bucket.at)
                bucket.tokens = min(capacity, bucket.tokens + elapsed * self._rate)
                bucket.at = max(bucket.at, now)
            self._buckets[client] = bucket  # most recently seen goes last
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self._rate

    def _evict_idle(self, now: float) -> None:
        """Drop addresses unseen for a whole window: their buckets are full anyway.

        Buckets are kept in order of last use, so the idle ones sit at the front
        and each is removed once: the cost is spread over the requests.
        """
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.at < WINDOW:
                break
            self._buckets.popitem(last=False)
