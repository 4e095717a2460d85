"""waitress' HTTP channel without a busy loop that the GIL makes costly.

A worker thread appends its answer to the channel's buffer and sends it itself
while it holds the buffer's lock; the send is a system call, so the GIL is
released meanwhile. waitress' main loop then sees a channel with bytes
buffered, asks ``poll()`` whether the socket can take them (yes, at once),
finds the lock taken, and goes round again, taking the GIL back each time
before the worker that was just woken can run. With fewer worker threads than
connections, that loop burns a good share of the server's one interpreter.

:class:`QuietChannel` does not ask to write while a worker holds the lock: that
worker sends what it can and pulls waitress' trigger when bytes remain, and
waitress pulls it again when the task ends, so the main loop looks again once
the lock is free. BENCHMARKS.md measures the difference. The channel also
answers the requests waitress itself refuses in the JSON error body
(:mod:`waitress_errors`).

This relies on waitress' internals (``HTTPChannel.writable``, ``outbuf_lock``,
``will_close``, ``close_when_flushed``): the versions it was tested with are
pinned in pyproject.toml, and tests/test_quiet_channel.py fails when the
installed waitress differs from them.
"""

from __future__ import annotations

from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer

from .waitress_errors import JsonErrorTask

TESTED_WAITRESS = ("3.0.2",)


class QuietChannel(HTTPChannel):
    error_task_class = JsonErrorTask  # waitress' own 400s and 431s in the JSON error body

    def writable(self) -> bool:
        if not super().writable():
            return False
        if self.will_close or self.close_when_flushed:
            return True
        if self.outbuf_lock.acquire(False):
            self.outbuf_lock.release()
            return True
        return False  # a worker is sending these bytes right now


def install(server_map: dict[Any, Any]) -> None:
    """Make every listening server in waitress' socket map open :class:`QuietChannel` s."""
    for dispatcher in list(server_map.values()):
        if isinstance(dispatcher, BaseWSGIServer):
            dispatcher.channel_class = QuietChannel
