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
        self._data: dict[Any, Any] = {}

    def get(self, key: Any) -> Any:
        return self._data.get(key)

    def put(self, key: Any, value: Any) -> None:
        if len(self._data) >= self.size:
            self._data.clear()
        self._data[key] = value

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
