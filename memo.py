"""A bounded memo for values that are cheap to forget and dear to recompute."""

from __future__ import annotations

from typing import Any


class BoundedCache:
    """A dict that forgets everything once it holds ``size`` entries.

    O(1), no lock needed beyond the dict's own atomic operations (a lost
    ``put`` only costs a recomputation), and memory stays bounded.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self.entries: dict[Any, Any] = {}
        """The dict itself, for readers on a hot path (the same object for the cache's life)."""

    def get(self, key: Any) -> Any:
        return self.entries.get(key)

    def put(self, key: Any, value: Any) -> None:
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[key] = value

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)
