"""Logging: one JSON object per line on stderr, every line masked before it is written.

Logs are read by more people, and kept longer, than the database, so every
line goes through :class:`redact.Redactor`: keys, leases, tokens, secrets and
the request's own sensitive values never reach a file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import redact


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", …}``: the fields passed with ``extra=`` follow."""

    _STANDARD = frozenset(vars(logging.makeLogRecord({})))

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.redactor = redact.Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in self._STANDARD and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["trace"] = self.formatException(record.exc_info)
        # default=str: a field that JSON cannot carry (a date, a path) is written as text.
        return json.dumps(self.redactor.clean(entry), default=str, ensure_ascii=False)


class OncePerInterval(logging.Filter):
    """Lets one record through per ``interval`` seconds (waitress' queue warnings)."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last = -interval
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            if self.suppressed:
                record.suppressed = self.suppressed
            self.suppressed = 0
            return True
        self.suppressed += 1
        return False


def setup_logging(level: str, secrets: Sequence[str] = ()) -> None:
    """JSON lines on stderr at ``level``, with the configured ``secrets`` masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The formatter writes no caller, thread or process: skip collecting them for every
    # record (the logging HOWTO's own advice for speed).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.getLogger("waitress.queue").addFilter(OncePerInterval(60.0))
