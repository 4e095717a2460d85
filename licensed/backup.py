"""``licensed backup PATH``: a consistent copy of the database while the server runs.

SQLite's online backup copies one snapshot (writers carry on in WAL mode),
the copy must pass ``PRAGMA integrity_check``, and only then does it appear
under its final name: it is written to a hidden temporary file next to the
target and linked into place, so a reader of ``PATH`` never sees half a copy
and an existing file is never replaced unless asked to.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import Config
from .errors import BackupFailed, Conflict, StorageUnavailable, ValidationFailed
from .files import NameTaken, write_whole
from .store import Store, integrity_check, open_store


def _exists(target: Path) -> Conflict:
    return Conflict(f"{target} exists; add --force to overwrite it", code="BACKUP_EXISTS")


def check_copy(path: Path) -> None:
    """Raise unless ``PRAGMA integrity_check`` of the copy says exactly ``ok``."""
    report = integrity_check(path)
    if report != ["ok"]:
        raise BackupFailed(f"the copy failed integrity_check: {'; '.join(report[:3])}")


def backup(store: Store, target: Path, *, force: bool = False) -> Path:
    """Copy ``store`` to ``target``; refuses an existing file unless ``force``."""
    target = target.absolute()
    if target.is_dir():
        raise ValidationFailed(f"{target} is a directory; give a file name")
    if target.exists() and not force:
        raise _exists(target)
    if not target.parent.is_dir():
        raise ValidationFailed(f"no directory {target.parent}")
    if target.exists() and target.samefile(store.path):
        raise ValidationFailed("the backup cannot replace the live database")

    def fill(tmp: Path) -> None:
        store.backup_to(tmp)
        check_copy(tmp)

    try:
        write_whole(target, fill, force=force)
    except NameTaken as err:
        raise _exists(target) from err
    except OSError as err:
        raise BackupFailed(f"cannot write {target}: {err.strerror or err}") from err
    return target


def run(config: Config, target: Path, *, force: bool = False) -> str:
    """The command: back up the configured database; returns the line to print."""
    if not config.db_path.exists():
        raise StorageUnavailable(f"no database at {config.db_path}")
    store = open_store(config.db_path, int(time.time()))
    try:
        started = time.monotonic()
        written = backup(store, target, force=force)
        took = time.monotonic() - started
    finally:
        store.close()
    return f"backed up {config.db_path} to {written} ({written.stat().st_size} bytes, {took:.2f} s)"
