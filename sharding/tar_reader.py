"""Reading a tar shard back: its raw samples, in file order, hashed as they stream.

The one tar reader of the project: the training stream (``pipeline/data/stream.py``) and
``samadapt inspect`` both read shards through ``read_shard``. A sample is WebDataset's dict:
``{"__key__": KEY, "__url__": URL, "img": bytes, "mpk": bytes, "json": bytes}`` (the members of
``sharding/format.py``, not decoded). A read error is raised as it comes (the caller names the
shard); Python's streaming tar reader ends quietly at a cut, so callers check the sample count
and the sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

__all__ = ["read_shard"]


class _Hashing:
    """A read-only file that hashes (sha256) every byte read through it."""

    def __init__(self, file) -> None:
        self.file, self.digest = file, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.digest.update(data)
        return data

    def hexdigest_to_end(self) -> str:
        """Read what the tar reader left (end-of-archive blocks) and return the file's digest."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def read_shard(url: str, *, hashed: list[str] | None = None) -> Iterator[dict]:
    """One shard's raw samples; with ``hashed`` (a list), the file is hashed as it streams and
    its sha256 is appended to ``hashed`` once the shard has been read to its end."""
    if hashed is None:
        yield from wds.tarfile_samples([{"url": url}], handler=wds.reraise_exception)
        return
    with open(url, "rb") as file:
        stream = _Hashing(file)
        members = tar_file_expander([{"url": url, "stream": stream}], handler=wds.reraise_exception)
        yield from group_by_keys(members, handler=wds.reraise_exception)
        hashed.append(stream.hexdigest_to_end())
