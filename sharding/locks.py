"""Locks between ``samadapt shard`` runs that share an output folder (job-array tasks with
overlapping ``--shard-range``, a rerun started while another is still going).

* ``output_lock``: one per output folder (``OUT/.finalize.lock``), held while a run plans and
  checks what is on disk, and while it finalizes: plan.json, the manifest and the cleanup of
  temp files are never written by two runs at once.
* ``shard_lock``: one per shard (``OUT/.locks/shard-NNNNNN.lock``), held while a shard is
  written or removed. A run that finds a shard's lock held skips that shard at first and waits
  for it once its own shards are written; then the shard is complete (the other run wrote it) or
  it writes it itself (the other run died). So no run deletes another's temp files as stale, and
  two runs never write one shard.

Both are ``flock`` locks: the kernel drops them when their process dies, however it dies (no stale
lock file to clean up), and Linux NFS clients map them to NFS locks. On a file system without
lock support, a warning is logged once and runs go unlocked (as before locks existed).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_DIR", "OUTPUT_LOCK", "output_lock", "shard_lock"]

log = logging.getLogger(__name__)

OUTPUT_LOCK = ".finalize.lock"
LOCK_DIR = ".locks"
_warned = False


def _unsupported(path: Path, err: OSError) -> None:
    global _warned
    if not _warned:
        log.warning("%s: no file locks here (%s); runs sharing the output are unlocked", path, err)
        _warned = True


@contextmanager
def _flock(path: Path, *, wait: bool) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError as err:  # ENOLCK and friends: no locks on this file system
            _unsupported(path, err)
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[None]:
    """Hold the output folder's lock (waiting for it)."""
    with _flock(Path(output) / OUTPUT_LOCK, wait=True):
        yield


@contextmanager
def shard_lock(output: str | os.PathLike, name: str, *, wait: bool) -> Iterator[bool]:
    """Hold the lock of shard ``name`` (``shard-NNNNNN``).

    Arguments:
      output: the output folder.
      name: the shard's name.
      wait: block until the lock is free; False = give up at once when another holds it.

    Yields:
      True when held, False when another process holds it (only with ``wait=False``).
    """
    with _flock(Path(output) / LOCK_DIR / f"{name}.lock", wait=wait) as held:
        yield held
