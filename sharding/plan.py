"""The shard plan: which input unit goes to which split and which shard, fixed at the first run.

The plan is a pure function of the unit list and the sharding settings:

* the split is decided per **case** (patient), never per slice or image: the first 8 bytes of
  ``sha1(f"{dataset}/{case_id}")`` as a fraction ``u`` in [0, 1) give ``val`` when
  ``u < val_fraction``, ``test`` when ``u < val_fraction + test_fraction``, else ``train``;
* the units are put in a seeded random order, ``sha256(f"{shuffle_seed}/{unit id}")`` (stable
  across runs, machines and library versions), and each split keeps that order. Readers list
  units sorted by dataset/case/slice; cut in that order, a shard would hold a few cases and the
  reader's shuffle buffer (a few hundred samples of a shard of thousands) could not mix them, so
  batches would hold slices of one patient far more often than a global shuffle gives;
* within a split the units are cut into shards of ``inputs_per_shard`` units; when that setting
  is 0 it is estimated once, from the encoded size of the first (up to 8) units sorted by id, so
  that shards come out near ``shard_size_mb``;
* shards are numbered **globally**, one numbering across splits in the order train, val, test, so
  shard ``i`` is ``OUT/{split}/shard-{i:06d}.tar`` and ``--shard-range i:j`` (half-open) is one
  slice of the whole job, as a Slurm job array wants.

``plan.json`` is written once (temp file + rename). It stays small at any corpus size (one line
per shard: split, position in the split's ordered unit list, first and last unit id; one sha256
per split over its ordered unit ids), because every task of a job array reads it. A rerun reads it
back and checks that the input folder, the units of every split and every setting that changes
shard content are unchanged; if not it stops with a message naming the difference (folder,
setting, split, first shard that differs) instead of silently resharding into a mixed set, or,
with ``--overwrite``, plans again (the shards are then checked one by one, ``sharding/run.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sharding.config import ShardingConfig
from sharding.files import atomic_write_text
from sharding.format import FORMAT_VERSION, SPLITS, safe_name, shard_name
from sharding.records import Unit

__all__ = [
    "ESTIMATE_UNITS",
    "PLAN_FILE",
    "Plan",
    "PlanMismatch",
    "ShardSpec",
    "check_names",
    "load_or_create_plan",
    "make_plan",
    "order_key",
    "plan_order",
    "plan_settings",
    "save_plan",
    "split_of",
    "unit_split",
]

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
ESTIMATE_UNITS = 8
"""Units encoded to estimate bytes per unit when ``inputs_per_shard`` is 0."""
_IGNORED_SETTINGS = ("workers",)
"""ShardingConfig fields that do not change what is written (everything else is checked)."""


class PlanMismatch(ValueError):
    """plan.json in the output folder was made from other inputs or other settings."""


@dataclass(frozen=True)
class ShardSpec:
    """One shard of the plan: its global index, split and input units (in plan order)."""

    index: int
    split: str
    units: tuple[Unit, ...]

    @property
    def name(self) -> str:
        return shard_name(self.index)

    def tar_path(self, output: Path) -> Path:
        return Path(output) / self.split / f"{self.name}.tar"

    def sidecar_path(self, output: Path) -> Path:
        return Path(output) / self.split / f"{self.name}.json"

    def relpath(self) -> str:
        """Path of the tar relative to the output folder (as written in manifest.json)."""
        return f"{self.split}/{self.name}.tar"


@dataclass
class Plan:
    """The whole job: settings it was made with and the shards in global order."""

    format: str
    input: str
    settings: dict
    inputs_per_shard: int
    """Resolved units per shard (the estimate when the setting was 0)."""
    shards: list[ShardSpec]

    def select(self, shard_range: tuple[int, int] | None) -> list[ShardSpec]:
        """Shards with global index in the half-open ``shard_range`` (all when None)."""
        if shard_range is None:
            return list(self.shards)
        lo, hi = shard_range
        return [s for s in self.shards if lo <= s.index < hi]

    def to_json(self) -> dict:
        shards, splits = _compact((s.index, s.split, [u.id for u in s.units]) for s in self.shards)
        return {
            "format_version": FORMAT_VERSION,
            "format": self.format,
            "input": self.input,
            "settings": self.settings,
            "inputs_per_shard": self.inputs_per_shard,
            "units": sum(entry["units"] for entry in splits.values()),
            "splits": splits,
            "shards": shards,
        }


def _compact(listing: Iterable[tuple[int, str, list[str]]]) -> tuple[list[dict], dict[str, dict]]:
    """(index, split, unit ids) per shard in plan order -> plan.json's "shards" (position in the
    split's unit list, count, first and last id) and "splits" (count and sha256 of the ids)."""
    by_split: dict[str, list[str]] = {}
    shards = []
    for index, split, unit_ids in listing:
        ids = by_split.setdefault(split, [])
        shards.append(
            {
                "index": index,
                "split": split,
                "start": len(ids),
                "count": len(unit_ids),
                "first": unit_ids[0],
                "last": unit_ids[-1],
            }
        )
        ids.extend(unit_ids)
    splits = {k: {"units": len(v), "sha256": _ids_digest(v)} for k, v in by_split.items()}
    return shards, splits


def _ids_digest(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for uid in ids:
        h.update(uid.encode())
        h.update(b"\n")
    return h.hexdigest()


def order_key(seed: int, name: str) -> bytes:
    """The sort key of the seeded random orders (units in the plan, 3D slices in a shard)."""
    return hashlib.sha256(f"{seed}/{name}".encode()).digest()


def plan_order(units: Iterable[Unit], *, seed: int) -> list[Unit]:
    """The units in the plan's seeded random order (``sharding.shuffle_seed``).

    Arguments:
      units: the units (any order; ids unique).
      seed: the shuffle seed.

    Returns:
      The units sorted by ``sha256(f"{seed}/{id}")``: a permutation that depends only on the ids
      and the seed.
    """
    return sorted(units, key=lambda u: order_key(seed, u.id))


def _split_units(ordered: Sequence[Unit], cfg: ShardingConfig) -> dict[str, list[Unit]]:
    """Units by split, each split in the order of ``ordered``."""
    by_split: dict[str, list[Unit]] = {s: [] for s in SPLITS}
    for unit in ordered:
        by_split[unit_split(unit, cfg)].append(unit)
    return by_split


def unit_split(unit: Unit, cfg: ShardingConfig) -> str:
    """The split of ``unit``: the one its corpus assigns (``Unit.split``, e.g. nnU-Net's
    imagesTs/), else ``split_of`` its case."""
    if unit.split:
        return unit.split
    return split_of(
        unit.dataset, unit.case_id, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction
    )


def split_of(dataset: str, case_id: str, *, val_fraction: float, test_fraction: float) -> str:
    """The split of one case, by hash of ``dataset/case_id`` (stable across runs and machines).

    Arguments:
      dataset, case_id: the case (all images/slices of a patient share it).
      val_fraction, test_fraction: expected fractions of cases in val and test.

    Returns:
      "train", "val" or "test".
    """
    digest = hashlib.sha1(f"{dataset}/{case_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def check_names(units: Iterable[Unit]) -> None:
    """Raise ``ValueError`` when two distinct dataset names, or two distinct case ids of one
    dataset, have the same ``format.safe_name`` (sample keys and Zarr groups would be shared:
    one would be lost). Only a hash collision, or a plain name that equals another name's
    slug-and-hash, can do it; the message names both so one can be renamed."""
    seen: dict[tuple[str, ...], str] = {}
    for unit in units:
        for where, name in (((), unit.dataset), ((safe_name(unit.dataset),), unit.case_id)):
            slot = (*where, safe_name(name))
            other = seen.setdefault(slot, name)
            if other != name:
                kind = "dataset names" if not where else f"case ids of dataset {unit.dataset!r}"
                raise ValueError(
                    f"{kind} {other!r} and {name!r} both map to the key part {slot[-1]!r} "
                    f"(unit {unit.id}): rename one of them"
                )


def plan_settings(fmt: str, cfg: ShardingConfig) -> dict:
    """Every setting that changes the shards' content or layout (checked again on reruns)."""
    values = dataclasses.asdict(cfg)
    out = {"format": fmt, "format_version": FORMAT_VERSION}
    out.update({k: v for k, v in sorted(values.items()) if k not in _IGNORED_SETTINGS})
    return out


def make_plan(
    units: Sequence[Unit],
    *,
    fmt: str,
    input_path: str,
    cfg: ShardingConfig,
    bytes_per_unit: Callable[[list[Unit]], float] | None = None,
) -> Plan:
    """Assign units to splits and shards.

    Arguments:
      units: all input units (any order; ids must be unique).
      fmt: reader format name (recorded and checked on reruns).
      input_path: the corpus root (recorded; a rerun reading another folder is refused).
      cfg: the sharding section.
      bytes_per_unit: called with the first ``ESTIMATE_UNITS`` units (by id) when
        ``cfg.inputs_per_shard`` is 0; returns their mean encoded size in bytes.

    Returns:
      The ``Plan``; shards numbered globally in split order train, val, test, each split's
      units in ``plan_order``.
    """
    by_id = sorted(units, key=lambda u: u.id)
    ids = [u.id for u in by_id]
    dupes = sorted({i for i, j in zip(ids, ids[1:], strict=False) if i == j})
    if dupes:
        raise PlanMismatch(f"the reader listed unit ids more than once: {dupes[:5]}")
    check_names(by_id)
    per_shard = cfg.inputs_per_shard
    if per_shard == 0:
        per_shard = _estimate_per_shard(by_id, cfg=cfg, bytes_per_unit=bytes_per_unit)
    by_split = _split_units(plan_order(by_id, seed=cfg.shuffle_seed), cfg)
    shards: list[ShardSpec] = []
    for split in SPLITS:
        members = by_split[split]
        for start in range(0, len(members), per_shard):
            chunk = tuple(members[start : start + per_shard])
            shards.append(ShardSpec(index=len(shards), split=split, units=chunk))
    return Plan(
        format=fmt,
        input=str(input_path),
        settings=plan_settings(fmt, cfg),
        inputs_per_shard=per_shard,
        shards=shards,
    )


def _estimate_per_shard(
    units: list[Unit],
    *,
    cfg: ShardingConfig,
    bytes_per_unit: Callable[[list[Unit]], float] | None,
) -> int:
    if bytes_per_unit is None:
        raise ValueError("inputs_per_shard is 0: an estimator (bytes_per_unit) is needed")
    sample = units[:ESTIMATE_UNITS]
    mean = float(bytes_per_unit(sample)) if sample else 0.0
    if mean <= 0:
        # nothing usable among the first units: one shard per split is as good a guess as any
        return max(1, len(units))
    per_shard = max(1, math.floor(cfg.shard_size_mb * 1e6 / mean))
    log.info(
        "estimated %.0f bytes per input from %d inputs: %d inputs per shard (~%.0f MB)",
        mean,
        len(sample),
        per_shard,
        cfg.shard_size_mb,
    )
    return per_shard


def load_or_create_plan(
    output: Path,
    units: Sequence[Unit],
    *,
    fmt: str,
    input_path: str,
    cfg: ShardingConfig,
    bytes_per_unit: Callable[[list[Unit]], float] | None = None,
    replace: bool = False,
) -> tuple[Plan, bool]:
    """Read ``OUTPUT/plan.json`` and check it against this run, or make a new plan.

    Arguments:
      output: the output folder.
      units: the reader's current unit list.
      fmt, input_path, cfg, bytes_per_unit: as for ``make_plan``.
      replace: when plan.json differs from this run, make a new plan instead of raising.

    Returns:
      ``(plan, new)``: the plan, whose shards hold the reader's current ``Unit`` objects, and
      whether it is new (not on disk yet: ``save_plan`` it once the output checks out).
      Raises ``PlanMismatch`` naming the input folder, setting or units that differ from
      plan.json (unless ``replace``).
    """
    path = Path(output) / PLAN_FILE
    if path.exists():
        try:
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise PlanMismatch(
                    f"{path}: cannot be read ({err}); move it away to plan again"
                ) from err
            return _check_saved(saved, path, units, fmt=fmt, input_path=input_path, cfg=cfg), False
        except PlanMismatch as err:
            if not replace:
                raise
            log.warning("%s; --overwrite: planning again", err)
    plan = make_plan(units, fmt=fmt, input_path=input_path, cfg=cfg, bytes_per_unit=bytes_per_unit)
    return plan, True


def save_plan(output: Path, plan: Plan) -> None:
    """Write ``OUTPUT/plan.json`` (temp file + rename)."""
    path = Path(output) / PLAN_FILE
    atomic_write_text(path, json.dumps(plan.to_json(), indent=1) + "\n")
    units = sum(len(s.units) for s in plan.shards)
    log.info("planned %d shards of %d inputs -> %s", len(plan.shards), units, path)


def _check_saved(
    saved: dict,
    path: Path,
    units: Sequence[Unit],
    *,
    fmt: str,
    input_path: str,
    cfg: ShardingConfig,
) -> Plan:
    expected = plan_settings(fmt, cfg)
    recorded = saved.get("settings", {})
    for key in sorted(set(expected) | set(recorded)):
        if key not in recorded:
            raise PlanMismatch(
                f"{path} was made by an earlier samadapt without the setting {key} (this run "
                f"has {key}={expected[key]!r}), which orders or fills shards differently: finish "
                "it with that version, or write to a new output folder"
            )
        if expected.get(key) != recorded.get(key):
            raise PlanMismatch(
                f"{path} was made with {key}={recorded.get(key)!r}, this run has "
                f"{key}={expected.get(key)!r}; rerun with the same settings, with --overwrite "
                "to rewrite every shard, or write to a new output folder (shards of both "
                "settings would be mixed)"
            )
    by_split = _split_units(plan_order(units, seed=cfg.shuffle_seed), cfg)
    if saved["shards"] and "units" in saved["shards"][0]:
        saved = _upgrade_listing(saved)
    for split in SPLITS:
        ids = [u.id for u in by_split[split]]
        entry = saved.get("splits", {}).get(split, {"units": 0, "sha256": _ids_digest([])})
        if len(ids) == entry["units"] and _ids_digest(ids) == entry["sha256"]:
            continue
        raise PlanMismatch(
            f"{path}: the input units differ from the plan in split {split!r} ({len(ids)} now, "
            f"{entry['units']} planned{_first_difference(saved, split, ids)}); the corpus "
            "changed, or a case id or dataset name did (they decide the split): rerun with "
            "--overwrite to rewrite the affected shards, or shard it into a new output folder"
        )
    if saved.get("input", input_path) != input_path:
        raise PlanMismatch(
            f"{path} was made from {saved['input']}, this run reads {input_path}: rerun with "
            "--overwrite to rewrite the shards from it, or write to a new output folder"
        )
    shards = []
    for s in saved["shards"]:
        start, count = int(s["start"]), int(s["count"])
        shards.append(
            ShardSpec(
                index=int(s["index"]),
                split=str(s["split"]),
                units=tuple(by_split[s["split"]][start : start + count]),
            )
        )
    return Plan(
        format=str(saved["format"]),
        input=str(saved["input"]),
        settings=recorded,
        inputs_per_shard=int(saved["inputs_per_shard"]),
        shards=shards,
    )


def _first_difference(saved: dict, split: str, ids: list[str]) -> str:
    for s in saved["shards"]:
        if s["split"] != split:
            continue
        start, count = int(s["start"]), int(s["count"])
        now = ids[start : start + count]
        now_first = now[0] if now else None
        now_last = now[-1] if now else None
        if (now_first, now_last, len(now)) != (s["first"], s["last"], count):
            return (
                f"; first differing shard {shard_name(int(s['index']))}: planned "
                f"{s['first']} .. {s['last']} ({count}), now {now_first} .. {now_last} "
                f"({len(now)})"
            )
    return ""


def _upgrade_listing(saved: dict) -> dict:
    # plan.json of the first releases listed every unit id per shard; same content, bigger.
    shards, splits = _compact((s["index"], s["split"], s["units"]) for s in saved["shards"])
    return {**saved, "shards": shards, "splits": splits}
