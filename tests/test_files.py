"""The one temp-file-and-rename helper: the old file or the whole new one, never half of one."""

from __future__ import annotations

import hashlib
import os

import pytest

from sharding.files import atomic_write, atomic_write_text, file_sha256, tmp_name


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "new" / "folder" / "meta.json"
    atomic_write_text(path, "first\n")
    assert path.read_text() == "first\n"
    atomic_write_text(path, "second\n", fsync=False)
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["meta.json"]
    assert tmp_name(path).name == f"meta.json.tmp-{os.getpid()}"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "export.pt"
    path.write_bytes(b"old")

    def half(tmp):
        tmp.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_bytes() == b"old"
    assert atomic_write(path, lambda tmp: tmp.write_bytes(b"new"), fsync=True) == path
    assert path.read_bytes() == b"new"


def test_file_sha256_matches_hashlib_across_blocks(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom((1 << 20) + 123)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
