import os

import pytest

from core.atomic import atomic_dir, atomic_file, atomic_path, write_atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    write_atomic(target, b"one")
    write_atomic(target, "two", durable=True)
    assert target.read_text() == "two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert _leftovers(target.parent) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_for_writers_that_want_a_name(tmp_path):
    target = tmp_path / "g.bin"
    with atomic_path(target, durable=True) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"x")
        assert not target.exists()
    assert target.read_bytes() == b"x"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_whole_or_nothing(tmp_path):
    dest = tmp_path / "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("killed")
    assert not dest.exists() and _leftovers(tmp_path) == []
    with atomic_dir(dest, durable=True) as tmp:
        (tmp / "a").write_text("1")
    assert (dest / "a").read_text() == "1"
    with pytest.raises(OSError):  # an existing folder is not replaced unless asked
        with atomic_dir(dest) as tmp:
            (tmp / "b").write_text("2")
    with atomic_dir(dest, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert os.listdir(dest) == ["b"] and _leftovers(tmp_path) == []
