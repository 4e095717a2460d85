"""Files written whole: a copy or an export appears under its name complete, or not at all."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path


class NameTaken(FileExistsError):
    """The target's name was taken, and the file was not to replace it (``filename``: the target)."""

    def __init__(self, target: Path) -> None:
        super().__init__(errno.EEXIST, "the name is taken", str(target))


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
    :class:`NameTaken` when the name is taken.
    """
    if force:
        os.replace(tmp, target)
    else:
        try:
            os.link(tmp, target)
        except FileExistsError as err:
            raise NameTaken(target) from err
        except OSError:
            if target.exists():
                raise NameTaken(target) from None
            os.replace(tmp, target)
    fsync_path(target.parent)


def write_whole(target: Path, fill: Callable[[Path], None], *, force: bool) -> None:
    """Have ``fill`` write the file at a hidden temporary name beside ``target``, sync it,
    then :func:`publish` it under ``target``. The temporary file never outlives the call.

    Raises :class:`NameTaken` as ``publish`` does, and whatever ``fill`` or the
    file system raise (``OSError``) for the caller to translate.
    """
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fill(tmp)
        fsync_path(tmp)
        publish(tmp, target, force=force)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def write_private(target: Path, data: bytes, *, force: bool) -> None:
    """:func:`write_whole` of ``data`` into a file of mode 0600, whatever the umask."""

    def fill(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away from the owner too
            handle.write(data)

    write_whole(target, fill, force=force)
