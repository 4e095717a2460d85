"""Files written whole: ``files.write_whole`` publishes a complete file or nothing."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import nacl.signing
import pytest

from licensed import keys
from licensed.files import NameTaken, write_private, write_whole


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_the_file_appears_complete_and_nothing_else_is_left(tmp_path: Path) -> None:
    target = tmp_path / "copy.bin"
    write_whole(target, lambda tmp: tmp.write_bytes(b"whole"), force=False)
    assert target.read_bytes() == b"whole"
    assert leftovers(tmp_path) == []


def test_a_name_taken_while_writing_is_never_replaced(tmp_path: Path) -> None:
    target = tmp_path / "copy.bin"

    def fill(tmp: Path) -> None:
        tmp.write_bytes(b"new")
        target.write_bytes(b"someone else's")  # the name is taken meanwhile

    with pytest.raises(NameTaken) as taken:
        write_whole(target, fill, force=False)
    assert taken.value.filename == str(target)
    assert target.read_bytes() == b"someone else's"
    assert leftovers(tmp_path) == []


def test_force_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "copy.bin"
    target.write_bytes(b"old")
    write_whole(target, lambda tmp: tmp.write_bytes(b"new"), force=True)
    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [OSError("disk full"), ValueError("bad copy")])
def test_a_failed_fill_publishes_nothing_and_leaves_nothing(tmp_path: Path, error: Exception) -> None:
    target = tmp_path / "copy.bin"

    def fill(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        write_whole(target, fill, force=False)
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_private_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "secret.bin"
    old = os.umask(0o700)  # takes the owner's own bits away from a new file
    try:
        write_private(target, b"secret", force=False)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_key_file_is_never_replaced_unless_asked(tmp_path: Path) -> None:
    first = keys.create_key(tmp_path)
    other = replace(first, key=nacl.signing.SigningKey.generate())  # another key under its name
    path = keys.key_path(tmp_path, first.kid)
    with pytest.raises(NameTaken) as taken:
        keys.write_key(tmp_path, other, replace=False)
    assert taken.value.filename == str(path)
    assert json.loads(path.read_text()) == keys.key_body(first)
    assert leftovers(tmp_path) == []
