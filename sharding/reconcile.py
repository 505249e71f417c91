"""A rerun against what the output folder already holds: shards written from other inputs.

Before a run writes anything, every complete shard of its range is compared with this run's
inputs (``sharding.inputs.stale_reason``: settings, unit list, input folder, metadata files,
each input file's size and time, or content with ``--verify-content``), and shard files that the
plan does not name at all (left by an older plan, e.g. after plan.json was deleted and the corpus
changed) are listed too. Without ``--overwrite`` any of them stops the run with one line naming
the first shard and what changed; nothing is written or removed. With ``--overwrite`` they are
taken back (``discard``: manifest.json first, so the set no longer reads as complete, then each
shard's sidecar, tar and Zarr groups, under the shard's lock) and written again.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sharding.format import SPLITS, VOLUMES_DIR, shard_name
from sharding.inputs import Provenance, stale_reason
from sharding.locks import shard_lock
from sharding.manifest import MANIFEST_FILE
from sharding.plan import Plan, ShardSpec
from sharding.volumes import case_group_name, store_path
from sharding.writer import ShardError, read_sidecar

__all__ = ["InputsChanged", "Stale", "discard", "find_stale", "refusal"]

log = logging.getLogger(__name__)


class InputsChanged(ValueError):
    """Shards in the output folder were written from other inputs than this run's."""


@dataclass(frozen=True)
class Stale:
    """A shard on disk that is not what this run writes, and why."""

    spec: ShardSpec
    reason: str


def _orphans(plan: Plan, output: Path) -> Iterator[Stale]:
    """Shard files (tar or sidecar) whose split and number are not a shard of the plan."""
    planned = {(spec.split, spec.name) for spec in plan.shards}
    found: set[tuple[str, str]] = set()
    for split in SPLITS:
        for path in sorted((output / split).glob("shard-*")):
            if path.suffix not in (".tar", ".json") or (split, path.stem) in planned:
                continue
            number = path.stem.removeprefix("shard-")
            if number.isdigit() and (split, path.stem) not in found:
                found.add((split, path.stem))
                spec = ShardSpec(index=int(number), split=split, units=())
                yield Stale(spec, "not a shard of the plan (left by another corpus or plan)")


def find_stale(
    plan: Plan,
    selected: list[ShardSpec],
    output: Path,
    source: Provenance,
    *,
    content: bool,
    overwrite: bool,
) -> list[Stale]:
    """The complete shards of ``selected`` that this run would not write as they are, then the
    shard files the plan does not name.

    Arguments:
      plan: this run's plan.
      selected: the shards this run is asked for (``--shard-range``).
      output: the output folder.
      source: this run's provenance.
      content: compare input contents (``--verify-content``) instead of times.
      overwrite: a damaged shard (``ShardError`` from its sidecar check) is listed to be
        rewritten; without it the error is raised.

    Returns:
      The ``Stale`` shards, in plan order, orphans last.
    """
    stale = []
    for spec in selected:
        try:
            side = read_sidecar(spec, output)
        except ShardError as err:
            if not overwrite:
                raise
            stale.append(Stale(spec, f"damaged ({err})"))
            continue
        if side is None:
            continue
        reason = stale_reason(side, spec.units, source, content=content)
        if reason:
            stale.append(Stale(spec, reason))
    stale.extend(_orphans(plan, output))
    return stale


def refusal(stale: list[Stale], selected: list[ShardSpec]) -> InputsChanged:
    """The one-line error of a rerun that found ``stale`` shards without ``--overwrite``."""
    first = stale[0]
    return InputsChanged(
        f"{len(stale)} shard(s) in the output were not written from this run's inputs "
        f"({len(selected)} selected); first: {first.spec.relpath()}: {first.reason}. Rerun with "
        "--overwrite to rewrite them, or shard into a new output folder"
    )


def _groups(spec: ShardSpec, output: Path) -> list[str]:
    """The Zarr groups the shard wrote (its sidecar's list; the groups its units would have for
    a sidecar written before the list existed)."""
    try:
        recorded = json.loads(spec.sidecar_path(output).read_text()).get("volumes")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, list):
        return [str(g) for g in recorded]
    return [
        (store_path(output, u.dataset) / case_group_name(u.case_id)).relative_to(output).as_posix()
        for u in spec.units
    ]


def discard(stale: list[Stale], output: Path) -> None:
    """Take ``stale`` shards back: manifest.json first (the set is no longer complete), then per
    shard, under its lock, the sidecar (it marks a complete shard), the tar, its Zarr groups."""
    (output / MANIFEST_FILE).unlink(missing_ok=True)
    for item in stale:
        spec = item.spec
        with shard_lock(output, shard_name(spec.index), wait=True):
            groups = _groups(spec, output)
            spec.sidecar_path(output).unlink(missing_ok=True)
            spec.tar_path(output).unlink(missing_ok=True)
            for group in groups:
                if group.startswith(f"{VOLUMES_DIR}/") and ".." not in group.split("/"):
                    shutil.rmtree(output / group, ignore_errors=True)
        log.warning("--overwrite: removed %s (%s)", spec.relpath(), item.reason)
