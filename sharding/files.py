"""Files written whole or not at all, and their digests (the one temp-file-and-rename helper).

Every file written for others to read (shard sidecars, ``plan.json``, the manifest and summary,
the resolved config, checkpoint markers, model exports) is written as ``NAME.tmp-<pid>`` in the
same folder and renamed onto ``NAME``: a reader, or a run killed mid-write, never sees half a
file, and two processes never write the same temp file. A tar shard is streamed under the same
temp name (``tmp_name``) and renamed by the shard writer when complete.

Imports nothing of the project: ``sharding`` and ``pipeline`` both use it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "file_sha256", "tmp_name"]

_HASH_BLOCK = 1 << 20


def tmp_name(path: Path) -> Path:
    """``path`` + ``.tmp-<pid>``: the name a file is written under before its rename."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = False
) -> Path:
    """Have ``write`` fill a temp file next to ``path``, then rename it onto ``path``.

    Arguments:
      path: the file to (re)place; its folder is created if missing.
      write: called with the temp path, writes the whole file (e.g. ``torch.save(obj, tmp)``).
      fsync: flush the file to the disk before the rename (a crash then leaves the old file or
        the whole new one, never an empty one).

    Returns:
      ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    write(tmp)
    if fsync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()
