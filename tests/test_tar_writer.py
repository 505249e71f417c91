"""The shard writer's tar stream is the one ``tarfile`` writes, byte for byte."""

from __future__ import annotations

import io
import tarfile

import pytest

from sharding.tar_writer import HashingFile, TarWriter

NAMES = [
    "ds/case-001/slice-0007.json",
    "x" * 100,  # the longest plain ustar name
    "y" * 101,  # too long: PAX extended header
    "données/cas-é/slice-0001.img",  # non-ASCII: PAX
]


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("count", [0, 1, 7, 40])
def test_tar_stream_matches_tarfile(count):
    sizes = [0, 1, 511, 512, 513, 100_003]
    members = [
        (f"{NAMES[i % len(NAMES)]}.{i}", bytes([i % 251]) * sizes[i % len(sizes)])
        for i in range(count)
    ]
    out = io.BytesIO()
    sink = HashingFile(out)
    tar = TarWriter(sink)
    for name, data in members:
        tar.add(name, data)
    tar.close()
    expected = _tarfile_bytes(members)
    assert out.getvalue() == expected and sink.size == len(expected)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as back:
        assert [(m.name, back.extractfile(m).read()) for m in back.getmembers()] == members
