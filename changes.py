"""A count of committed writes to the database, shared by every process that opens it.

The server remembers recent reads (see :class:`store.RecentReads`)
and must forget them the moment anything commits a write: the server's own
threads, and also ``licensed admin`` or cron's ``licensed reconcile`` in
their own processes. Each of them adds one to this counter after every commit
that changed a row; a remembered read is used only while the counter still
shows the value it had before that read.

The counter is eight bytes in a file beside the database, mapped into memory,
so reading it is a memory load. A system call would do, but CPython releases
the GIL around every system call (and every SQLite step), and under load each
release hands the interpreter to another thread: a validation with no system
call in it is what lets eight waitress threads share it without queueing.

Two processes adding at once may both write the same value. That is safe: both
commits happened before both reads of the old value, so anyone who sees the
new value reads the database after both commits.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

SIZE = 8
_WRAP = 1 << 64


class ChangeCounter:
    """The memory-mapped counter in ``path`` (created, filled with zeros, if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            _create(path)
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < SIZE:
                raise OSError(f"{path} is shorter than {SIZE} bytes")
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        # One aligned 8-byte load or store, never a torn value.
        self._value = memoryview(self._map).cast("Q")

    def read(self) -> int:
        return int(self._value[0])

    def bump(self) -> None:
        self._value[0] = (self._value[0] + 1) % _WRAP

    def close(self) -> None:
        self._value.release()
        self._map.close()


def _create(path: Path) -> None:
    """Write the file whole under a temporary name, then link it into place.

    Never truncated or rewritten once there, so a process that starts late
    cannot zero a count others have already read. Real bytes, not a sparse
    file: storing into a mapped hole on a full disk would kill the process.
    """
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, bytes(SIZE))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass  # another process made it first: theirs is the one
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
