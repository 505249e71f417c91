"""The ``COMPLETE`` marker of a checkpoint: written last, it lists every file of the checkpoint
with its size and sha256, so that a damaged checkpoint is found before anything loads it.

Format (JSON)::

    {"step": 200, "files": {"meta.json": {"bytes": 312, "sha256": "..."}, ...}}

A marker of older runs holds only the step (``"200\\n"``): such a checkpoint is complete but
cannot be verified (``Marker.files`` is None).

Hashing is collective: the files are dealt out over the ranks, each rank hashes its share, and
every rank gets all the results, so every rank takes the same decision from them (a rank that
decided alone would leave the others waiting in a collective).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.distributed import all_gather_object, broadcast_object, get_rank, get_world_size
from sharding.files import atomic_write_text, file_sha256

__all__ = [
    "COMPLETE",
    "DAMAGED",
    "Marker",
    "demote",
    "find_damage",
    "hash_files",
    "read_marker",
    "write_marker",
]

COMPLETE = "COMPLETE"
DAMAGED = "DAMAGED"
"""What ``demote`` renames the marker of a damaged checkpoint to (with the reason appended)."""


@dataclass(frozen=True)
class Marker:
    """A parsed ``COMPLETE`` marker."""

    step: int
    files: dict[str, dict[str, Any]] | None
    """File name -> ``{"bytes": int, "sha256": str}``; None for a marker without the list."""


def hash_files(folder: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of files of ``folder`` (collective: every rank calls it).

    Arguments:
      folder: the checkpoint folder.
      names: the files to hash; None = every file in it but the marker, as rank 0 lists them
        (one listing for all ranks, whatever a shared file system shows each of them).

    Returns:
      Name -> ``{"bytes", "sha256"}`` for every name, the same dict on every rank; a file that
      is missing has ``{"bytes": -1, "sha256": ""}``.
    """
    if names is None:
        listing = None
        if get_rank() == 0:
            listing = sorted(
                p.name for p in folder.iterdir() if p.is_file() and p.name not in (COMPLETE,)
            )
        names = broadcast_object(listing)
    rank, world = get_rank(), get_world_size()
    mine = {}
    for name in names[rank::world]:
        path = folder / name
        try:
            mine[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        except FileNotFoundError:
            mine[name] = {"bytes": -1, "sha256": ""}
    out: dict[str, dict[str, Any]] = {}
    for part in all_gather_object(mine):
        out.update(part)
    return {name: out[name] for name in names}


def write_marker(folder: Path, step: int, files: dict[str, dict[str, Any]]) -> None:
    """Write ``folder/COMPLETE`` (temp file + rename, flushed): the checkpoint is complete."""
    atomic_write_text(folder / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))


def read_marker(folder: Path) -> Marker | None:
    """The marker of ``folder``; None when it is missing or unreadable (a damaged marker makes
    the checkpoint as good as incomplete)."""
    try:
        text = (folder / COMPLETE).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if text.strip().isdigit():  # the step alone: written before markers listed their files
        return Marker(step=int(text), files=None)
    try:
        doc = json.loads(text)
        return Marker(step=int(doc["step"]), files=dict(doc["files"]))
    except (ValueError, KeyError, TypeError):
        return None


def find_damage(folder: Path, marker: Marker) -> str | None:
    """Check every file the marker lists against its size and sha256 (collective).

    Returns:
      None when all match; else one line naming the first bad file (sorted by name), the same
      on every rank.
    """
    if marker.files is None:
        return None
    names = sorted(marker.files)
    rank, world = get_rank(), get_world_size()
    problems = {}
    for name in names[rank::world]:
        problem = _check_file(folder / name, marker.files[name])
        if problem:
            problems[name] = problem
    found: dict[str, str] = {}
    for part in all_gather_object(problems):
        found.update(part)
    if not found:
        return None
    first = min(found)
    more = f" (and {len(found) - 1} more damaged files)" if len(found) > 1 else ""
    return f"{folder / first}: {found[first]}{more}"


def _check_file(path: Path, expected: dict[str, Any]) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    want = int(expected.get("bytes", -1))
    if size != want:
        return f"{size} bytes, the {COMPLETE} marker says {want} (truncated or rewritten)"
    if file_sha256(path) != expected.get("sha256"):
        return f"sha256 differs from the {COMPLETE} marker's (corrupted)"
    return None


def demote(folder: Path, reason: str) -> None:
    """Rename the marker of a damaged checkpoint to ``DAMAGED`` (with ``reason``), so that it is
    never picked again and a later save of the same step replaces it (rank 0 only)."""
    marker = folder / COMPLETE
    try:
        text = marker.read_text(errors="replace")
    except OSError:
        text = ""
    atomic_write_text(folder / DAMAGED, f"{reason}\n{text}")
    marker.unlink(missing_ok=True)
