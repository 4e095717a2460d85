"""Files written whole: ``files.write_whole`` publishes a complete file or nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from licensed.files import NameTaken, write_whole


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

    with pytest.raises(NameTaken):
        write_whole(target, fill, force=False)
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
