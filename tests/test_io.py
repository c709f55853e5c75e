"""Atomic writes: the target appears whole or not at all, and no temp file is left behind."""

from __future__ import annotations

import pytest

from convscope.core.io import atomic_path, atomic_write_bytes, atomic_write_text


def test_write_bytes_creates_parents_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    assert atomic_write_bytes(target, b"\x00\x01hello") == target
    assert target.read_bytes() == b"\x00\x01hello"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_write_text_replaces_existing(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    atomic_write_text(target, "new ünïcode")
    assert target.read_text(encoding="utf-8") == "new ünïcode"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_atomic_path_keeps_old_file_when_block_raises(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old content")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("half written")
        raise RuntimeError("boom")
    assert target.read_text() == "old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_atomic_path_no_target_when_block_raises(tmp_path):
    target = tmp_path / "new.txt"
    with pytest.raises(ValueError), atomic_path(target):
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_moves_temp_onto_target(tmp_path):
    target = tmp_path / "sub" / "x.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("done")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "done"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.txt"]


def test_file_mode_follows_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.txt").stat().st_mode & 0o777 == 0o644
