"""Files written whole: a copy or an export appears under its name complete, or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's, or a directory's (its entries'), changes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, target: Path, *, force: bool) -> None:
    """Give the finished (and synced) file ``tmp`` its name ``target``, then sync the directory.

    Without ``force`` an existing ``target`` is never replaced: a hard link fails
    if the name was taken meanwhile, unlike a rename; where the file system has
    no hard links, the name is checked just before the rename. Raises
    :class:`FileExistsError` when the name is taken.
    """
    if force:
        os.replace(tmp, target)
    else:
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError:
            if target.exists():
                raise FileExistsError(target) from None
            os.replace(tmp, target)
    fsync_path(target.parent)
