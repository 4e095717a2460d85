"""A fixed "now" for tests, and a clock they move by hand."""

from __future__ import annotations

T0 = 1_800_000_000  # 2027-01-15T08:00:00Z: a fixed "now" for tests
DAY = 86400


class FrozenClock:
    """A clock tests move by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, now: float) -> None:
        self.now = float(now)
