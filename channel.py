"""waitress' HTTP channel without a busy loop that the GIL makes costly.

A worker thread appends its response to the channel's buffer and sends it
itself while it holds the buffer's lock. The send is a system call, so the
GIL is released meanwhile. waitress' main loop then sees a channel with
bytes buffered, asks ``select()`` whether the socket can take them (yes, at
once), finds the lock taken, and goes round again: and each time round it
takes the GIL back before the worker, just woken, can run. The worker waits
out the interpreter's 5 ms switch interval while the main loop spins. With
fewer threads than connections that was a hundred turns of the loop per
request, and most of the server's CPU.

:class:`QuietChannel` does not ask to write while a worker holds the lock.
That worker sends what it can and pulls waitress' trigger when bytes remain,
and waitress pulls it again when the task ends, so the main loop looks again
once the lock is free.
"""

from __future__ import annotations

from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer


class QuietChannel(HTTPChannel):
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
