"""The byte stream of one shard: a tar exactly as ``tarfile`` writes it, hashed as it is written,
and a spool for the slices of 3D cases that are written after the shard's last unit (the shard
writer, ``sharding/writer.py``, decides what goes in and in which order)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from sharding.format import IMAGE_EXT, MASKS_EXT, META_EXT
from sharding.plan import order_key

__all__ = ["MEMBER_ORDER", "TAR_BLOCK", "HashingFile", "Spool", "TarWriter", "add_sample"]

MEMBER_ORDER = (META_EXT, MASKS_EXT, IMAGE_EXT)
"""The members of a sample, in the order they are written."""
TAR_BLOCK = 512


class HashingFile:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, fh: io.BufferedWriter):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.fh.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class TarWriter:
    """The tar stream of a shard, byte for byte what ``tarfile`` writes in its default (PAX)
    format for these members (mode 0644, mtime 0, uid/gid 0, no user names), at ~1/10 of its
    cost per member: a name that fits a plain ustar header (ASCII, <= 100 bytes) gets one built
    here; any other name goes through ``tarfile.TarInfo.tobuf`` (PAX extended header)."""

    _RECORD = TAR_BLOCK * 20  # tarfile.RECORDSIZE: the archive is padded to a multiple of it
    # the constant fields of the header, after name/mode/uid/gid/size/mtime/chksum
    _TAIL = (
        b"0"  # typeflag: regular file
        + bytes(100)  # linkname
        + b"ustar\x0000"  # magic + version (POSIX)
        + bytes(32 + 32)  # uname, gname
        + bytes(8 + 8)  # devmajor, devminor: empty for a regular file, as tarfile writes them
        + bytes(155 + 12)  # prefix, padding to 512
    )
    _FIXED = b"0000644\x00" + b"0000000\x00" * 2  # mode, uid, gid

    def __init__(self, sink: HashingFile) -> None:
        self.sink = sink
        self.offset = 0

    def _header(self, name: str, size: int) -> bytes:
        raw = name.encode("ascii", "surrogateescape") if name.isascii() else b""
        if not raw or len(raw) > 100 or size >= 8**11:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
        head = raw.ljust(100, b"\x00") + self._FIXED + b"%011o\x00" % size + b"00000000000\x00"
        # checksum: byte sum with the checksum field itself taken as 8 spaces
        checksum = sum(head) + sum(self._TAIL) + 8 * 32
        return head + b"%06o\x00 " % checksum + self._TAIL

    def add(self, name: str, data: bytes) -> None:
        header = self._header(name, len(data))
        pad = -len(data) % TAR_BLOCK
        self.sink.write(header)
        self.sink.write(data)
        if pad:
            self.sink.write(bytes(pad))
        self.offset += len(header) + len(data) + pad

    def close(self) -> None:
        """End-of-archive blocks, then zero padding to a whole record (as ``tarfile``)."""
        end = 2 * TAR_BLOCK
        self.sink.write(bytes(end + -(self.offset + end) % self._RECORD))


def add_sample(tar: TarWriter, key: str, members: dict[str, bytes]) -> None:
    for ext in MEMBER_ORDER:
        tar.add(f"{key}.{ext}", members[ext])


class Spool:
    """Encoded samples parked in a temp file (not in memory: a shard is up to shard_size_mb), to
    be written to the tar later in another order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: io.BufferedRandom | None = None  # opened by the first sample
        self.offset = 0
        self.index: list[tuple[str, list[tuple[str, int, int]]]] = []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.file is None:
            self.file = open(self.path, "w+b")
        spans = []
        for ext in MEMBER_ORDER:
            data = members[ext]
            self.file.write(data)
            spans.append((ext, self.offset, len(data)))
            self.offset += len(data)
        self.index.append((key, spans))

    def drain(self, tar: TarWriter, *, seed: int) -> None:
        """Write every parked sample to ``tar``, in the order of ``order_key(seed, key)``."""
        if self.file is None:
            return
        self.file.flush()
        fd = self.file.fileno()
        for key, spans in sorted(self.index, key=lambda entry: order_key(seed, entry[0])):
            for ext, offset, size in spans:
                tar.add(f"{key}.{ext}", os.pread(fd, size, offset))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.path.unlink(missing_ok=True)
