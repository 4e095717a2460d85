"""Every log record of the process, as the server's own JSON formatter writes it."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from licensed import logs


@contextmanager
def captured_logs(secrets: Sequence[str] = ()) -> Iterator[io.StringIO]:
    """The JSON lines of every record logged inside, at DEBUG and up, with ``secrets`` masked."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter(secrets))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
