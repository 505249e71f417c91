"""What a shard was written from, and whether its inputs are still the same.

Every sidecar records its provenance: the corpus folder (``input``), the settings that change
shard content (``settings``), a record of the corpus' own metadata files (``corpus``: every
``ROOT/*.json``, e.g. dataset.json, classes.json, image2label_*.json) and, per unit in the
order of ``units``, a record of each file the unit reads (``sources``). A file record is the
string ``"SIZE:MTIME_NS:SHA"`` (SHA: the first 16 hex digits of the content's sha256; one short
line per file in the sidecar), or None for a listed file that did not exist.

A rerun compares the complete shards it is asked to write with this run's inputs
(``stale_reason``): another corpus folder, other settings, other units than the plan gives the
shard, or a file whose size or modification time changed; with ``content=True``
(``--verify-content``) the content hash decides instead of the time, so a file that was only
touched is not a change, and one rewritten with the same size and time is. Stats are cheap
(one per file); hashes read every input of the checked shards.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sharding.records import Unit

__all__ = ["Provenance", "corpus_record", "file_record", "source_records", "stale_reason"]

_HASH_HEX = 16
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Provenance:
    """What this run writes from (the same for every shard)."""

    input: str
    """The corpus folder (resolved)."""
    settings: dict
    """``plan.plan_settings``: every setting that changes what is written."""
    corpus: dict[str, str | None]
    """``corpus_record`` of the corpus folder."""


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            sha.update(block)
    return sha.hexdigest()[:_HASH_HEX]


def file_record(path: str, *, content: bool = True) -> str | None:
    """``"SIZE:MTIME_NS:SHA"`` of a file (SHA empty when not ``content``), None when it does not
    exist."""
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}:{_digest(path) if content else ''}"
    except FileNotFoundError:
        return None


def corpus_record(root: str | os.PathLike, *, content: bool = True) -> dict[str, str | None]:
    """File name -> ``file_record`` of every ``*.json`` file at the top of the corpus folder."""
    return {
        p.name: file_record(str(p), content=content)
        for p in sorted(Path(root).glob("*.json"))
        if p.is_file()
    }


def source_records(units: Iterable[Unit]) -> list[list[str | None]]:
    """Per unit, the ``file_record`` (with content hash) of each of its ``paths``."""
    return [[file_record(p) for p in unit.paths] for unit in units]


def _file_change(path: str, then: str | None, *, content: bool) -> str | None:
    """How ``path`` differs from its record ``then``, or None when it does not."""
    now = file_record(path, content=False)
    if then is None or now is None:
        if then is None and now is None:
            return None
        return f"{path} was added" if then is None else f"{path} was removed"
    size, mtime, digest = then.split(":")
    now_size, now_mtime, _ = now.split(":")
    if now_size != size:
        return f"{path} changed (size {size} -> {now_size} bytes)"
    if content:
        found = _digest(path)
        if found != digest:
            return f"{path} changed (same size, content sha256 {digest}.. -> {found}..)"
        return None
    if now_mtime != mtime:
        return (
            f"{path} was modified (same size, mtime {_when(mtime)} -> {_when(now_mtime)}; "
            "--verify-content compares the contents instead)"
        )
    return None


def _when(mtime_ns: str) -> str:
    stamp = datetime.fromtimestamp(int(mtime_ns) / 1e9, tz=timezone.utc)
    return stamp.isoformat(sep=" ", timespec="microseconds").replace("+00:00", " UTC")


def _first_setting_change(then: dict, now: dict) -> str | None:
    for key in sorted(set(then) | set(now)):
        if then.get(key) != now.get(key):
            return f"written with {key}={then.get(key)!r}, this run has {key}={now.get(key)!r}"
    return None


def stale_reason(
    sidecar: dict,
    units: Sequence[Unit],
    source: Provenance,
    *,
    content: bool = False,
    files: bool = True,
) -> str | None:
    """Why a complete shard is not what this run would write, or None when it is.

    Arguments:
      sidecar: the shard's sidecar.
      units: the units the plan gives this shard now.
      source: this run's provenance.
      content: compare content hashes instead of modification times.
      files: check the files (else only folder, settings and unit list: no file is touched).

    Returns:
      One phrase naming the first difference (a setting, the unit list, another input folder,
      a metadata file, an input file), or None. Sidecars written before a field existed are not
      checked on it.
    """
    if "settings" in sidecar:
        change = _first_setting_change(sidecar["settings"], source.settings)
        if change:
            return change
    then = list(sidecar.get("units", []))
    ids = [u.id for u in units]
    if then != ids:
        gone = sorted(set(then) - set(ids))
        new = sorted(set(ids) - set(then))
        detail = f"{len(then)} inputs then, {len(ids)} now"
        if gone or new:
            detail += f"; first {'left out' if gone else 'added'}: {(gone or new)[0]}"
        return f"holds other inputs than the plan gives it ({detail})"
    if "input" in sidecar and sidecar["input"] != source.input:
        return f"written from {sidecar['input']}, this run reads {source.input}"
    if not files:
        return None
    if "corpus" in sidecar:
        root = Path(source.input)
        for name in sorted(set(sidecar["corpus"]) | set(source.corpus)):
            change = _file_change(str(root / name), sidecar["corpus"].get(name), content=content)
            if change:
                return change
    for unit, records in zip(units, sidecar.get("sources", ()), strict=False):
        if len(records) != len(unit.paths):
            return f"input {unit.id} reads {len(unit.paths)} files now, {len(records)} then"
        for path, record in zip(unit.paths, records, strict=True):
            change = _file_change(path, record, content=content)
            if change:
                return change
    return None
