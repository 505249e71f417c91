"""Write one shard of the plan: units -> samples -> one tar, its sidecar, and Zarr volumes.

A unit loads as a ``Slice2D`` (a 2D image) or a ``Volume`` (a 3D case, sliced along Z with
``sharding.transform.volume_slices``). Every 2D slice is resized with ``resize_sample``
(``cfg.image_size``, ``cfg.resize``); masks with fewer than ``cfg.min_mask_pixels`` pixels after
resizing are dropped and reported; a slice left without any mask is kept with probability
``cfg.keep_empty_ratio``, decided by a hash of its key (so reruns keep the same ones).

Order: 2D samples in plan order (already a seeded random order, ``sharding/plan.py``). The slices
of 3D cases are parked in a temp file beside the tar and written after the shard's last unit, all
cases' slices together in the seeded random order of their keys (``plan.order_key``): written case
after case, a shard of hundreds of slices per case could not be mixed by the reader's shuffle
buffer, and batches would hold slices of one patient most of the time.

Determinism: units in plan order, the orders above, members of a sample in the order
json, mpk, img, and fixed tar headers (mtime 0, uid/gid 0, no user names, mode 0644;
``sharding/tar_writer.py``). A rerun
writes byte-identical tars, so sha256 in the sidecar and the manifest is reproducible.

Crash safety: the tar is written as ``shard-NNNNNN.tar.tmp-<pid>`` and renamed when complete,
then the sidecar ``shard-NNNNNN.json`` is written (temp + rename). The sidecar marks a complete
shard: a rerun skips it after checking that the tar's size matches. Nothing complete is replaced.
A shard is written under its lock (``sharding/locks.py``): runs sharing the output folder never
write one shard together or take each other's temp files for stale ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from sharding.config import ShardingConfig
from sharding.files import atomic_write_text, file_sha256, tmp_name
from sharding.format import (
    FORMAT_VERSION,
    IMAGE_EXT,
    MASKS_EXT,
    META_EXT,
    encode_image,
    encode_masks,
    sample_key,
)
from sharding.inputs import Provenance, source_records
from sharding.locks import shard_lock
from sharding.manifest import empty_counts, merge_counts, reason_category
from sharding.plan import ShardSpec
from sharding.records import Reader, RejectedInput, Slice2D, Unit, Volume
from sharding.tar_writer import TAR_BLOCK, HashingFile, Spool, TarWriter, add_sample
from sharding.transform import resize_sample, volume_slices
from sharding.volumes import write_case

__all__ = [
    "ShardError",
    "UnitResult",
    "encode_unit",
    "estimate_unit_bytes",
    "read_sidecar",
    "stale_tmps",
    "write_shard",
]

log = logging.getLogger(__name__)



class ShardError(RuntimeError):
    """A shard on disk does not match its sidecar, or a unit failed in an unexpected way."""


@dataclass
class Sample:
    """One encoded sample: its key, tar members by extension, and its metadata."""

    key: str
    members: dict[str, bytes]
    meta: dict


@dataclass
class UnitResult:
    """What one unit contributes to a shard."""

    samples: list[Sample] = field(default_factory=list)
    """Encoded samples in write order."""
    rejections: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=empty_counts)
    volume: Volume | None = None
    """The loaded volume of a 3D unit (to be written to Zarr), else None."""


# --------------------------------------------------------------------------------------------
# Unit -> samples
# --------------------------------------------------------------------------------------------


def _keep_empty(key: str, ratio: float) -> bool:
    """Deterministic Bernoulli(ratio) draw from the sample key."""
    digest = hashlib.sha1(f"keep-empty/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < ratio


def _reject(result: UnitResult, record: dict) -> None:
    result.rejections.append(record)
    result.counts["rejected"] += 1
    reasons = result.counts["rejected_by_reason"]
    kind = reason_category(str(record.get("reason", "")))
    reasons[kind] = reasons.get(kind, 0) + 1


def _bump(counts: dict, section: str, name: str, by: int = 1) -> None:
    counts[section][name] = counts[section].get(name, 0) + by


def _slice_sample(
    item: Slice2D, unit: Unit, result: UnitResult, *, split: str, cfg: ShardingConfig
) -> None:
    """Resize, filter and encode one 2D slice into ``result`` (or count it as dropped)."""
    for record in item.rejections:
        _reject(result, {"unit": unit.id, **record})
    key = sample_key(item.dataset, item.case_id, item.slice_index)
    source = item.source or (unit.paths[0] if unit.paths else unit.id)
    original = [int(item.image.shape[0]), int(item.image.shape[1])]
    image, masks = resize_sample(item.image, item.masks, size=cfg.image_size, mode=cfg.resize)
    masks = np.asarray(masks, dtype=bool)
    # one SIMD pixel count per mask (a bool mask is stored as 0/1 bytes)
    areas = [cv2.countNonZero(mask) for mask in masks.view(np.uint8)]
    keep = []
    for i, area in enumerate(areas):
        if area >= cfg.min_mask_pixels:
            keep.append(i)
            continue
        name = item.class_names[i] if i < len(item.class_names) else ""
        _reject(
            result,
            {
                "unit": unit.id,
                "path": source,
                "sample": key,
                "reason": f"mask below min_mask_pixels after resize (mask {i} '{name}' has "
                f"{area} of {cfg.min_mask_pixels} pixels at {cfg.image_size} px)",
            },
        )
    if not keep and not _keep_empty(key, cfg.keep_empty_ratio):
        result.counts["empty_dropped"] += 1
        return
    if len(keep) < masks.shape[0]:
        masks = masks[keep]
    meta = {
        "class_ids": [int(item.class_ids[i]) for i in keep],
        "class_names": [str(item.class_names[i]) for i in keep],
        "dataset": item.dataset,
        "modality": item.modality,
        "case_id": item.case_id,
        "slice_index": int(item.slice_index),
        "spacing": [float(s) for s in item.spacing],
        "original_size": original,
        "source": source,
        "split": split,
    }
    members = {
        META_EXT: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
        MASKS_EXT: encode_masks(masks, level=cfg.zstd_level),
        IMAGE_EXT: encode_image(np.asarray(image, dtype=np.uint8), level=cfg.zstd_level),
    }
    result.samples.append(Sample(key=key, members=members, meta=meta))


def _count_sample(counts: dict, meta: dict) -> None:
    """Add one written sample to the shard's counters."""
    counts["samples"] += 1
    counts["masks"] += len(meta["class_ids"])
    if not meta["class_ids"]:
        counts["empty_kept"] += 1
    _bump(counts, "by_split", meta["split"])
    _bump(counts, "by_dataset", meta["dataset"])
    _bump(counts, "by_modality", meta["modality"] or "unknown")
    for name in meta["class_names"]:
        _bump(counts, "by_class", name or "unknown")
    for cid, name in zip(meta["class_ids"], meta["class_names"], strict=True):
        names = counts.setdefault("classes", {}).setdefault(str(cid), {})
        names[name or "unknown"] = names.get(name or "unknown", 0) + 1


def encode_unit(reader: Reader, unit: Unit, *, split: str, cfg: ShardingConfig) -> UnitResult:
    """Load one unit and turn it into encoded samples (nothing is written).

    Arguments:
      reader: the corpus reader.
      unit: the unit to load.
      split: its split (recorded in each sample's JSON).
      cfg: the sharding section.

    Returns:
      A ``UnitResult``. An unusable unit (``RejectedInput``, or an ``OSError``/``ValueError`` from
      the reader) gives no samples and one rejection; other errors are raised as ``ShardError``
      naming the unit.
    """
    result = UnitResult()
    result.counts["units"] = 1
    where = unit.paths[0] if unit.paths else unit.id
    try:
        loaded = reader.load(unit)
        if isinstance(loaded, Volume):
            for record in loaded.rejections:
                _reject(result, {"unit": unit.id, **record})
            items: Iterable[Slice2D] = volume_slices(loaded, cfg=cfg)
            result.volume = loaded
        else:
            items = [loaded]
        for item in items:
            _slice_sample(item, unit, result, split=split, cfg=cfg)
    except RejectedInput as err:
        return _rejected_unit(unit, err.record(unit.id))
    except (OSError, ValueError) as err:
        reason = f"unreadable input ({type(err).__name__}: {err})"
        return _rejected_unit(unit, {"unit": unit.id, "path": where, "reason": reason})
    except Exception as err:
        raise ShardError(f"unit {unit.id} ({where}): {type(err).__name__}: {err}") from err
    return result


def _rejected_unit(unit: Unit, record: dict) -> UnitResult:
    result = UnitResult()
    result.counts["units"] = 1
    result.counts["units_rejected"] = 1
    _reject(result, record)
    return result


def _tar_bytes(members: dict[str, bytes]) -> int:
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in members.values())


def estimate_unit_bytes(
    reader: Reader, units: list[Unit], *, splits: dict[str, str], cfg: ShardingConfig
) -> float:
    """Mean tar bytes per usable unit over ``units``, by encoding them fully (0 if none load)."""
    sizes = []
    for unit in units:
        result = encode_unit(reader, unit, split=splits[unit.id], cfg=cfg)
        if not result.counts["units_rejected"]:
            sizes.append(sum(_tar_bytes(s.members) for s in result.samples))
    return float(np.mean(sizes)) if sizes else 0.0


# --------------------------------------------------------------------------------------------
# Samples -> tar (the tar stream itself: sharding/tar_writer.py)
# --------------------------------------------------------------------------------------------



def stale_tmps(spec: ShardSpec, output: Path) -> Iterator[Path]:
    """Temp files of ``spec``'s tar, spool and sidecar (call under the shard's lock: then they
    are left by a run that died)."""
    for path in (spec.tar_path(output), spec.sidecar_path(output)):
        yield from path.parent.glob(f"{path.name}.tmp-*")


def read_sidecar(spec: ShardSpec, output: Path) -> dict | None:
    """The sidecar of a complete shard (checked against its tar), or None when not complete.

    Raises ``ShardError`` when the sidecar exists but the tar is missing or of another size.
    """
    side = spec.sidecar_path(output)
    if not side.exists():
        return None
    try:
        data = json.loads(side.read_text())
    except ValueError as err:
        raise ShardError(
            f"{side}: unreadable sidecar ({err}); rerun with --overwrite to rewrite the shard"
        ) from err
    tar = spec.tar_path(output)
    if not tar.exists():
        raise ShardError(
            f"{side} exists but {tar.name} is missing: rerun with --overwrite to rewrite it"
        )
    size = tar.stat().st_size
    if size != data.get("bytes"):
        raise ShardError(
            f"{tar}: {size} bytes on disk, its sidecar says {data.get('bytes')}: the shard was "
            "modified or truncated; rerun with --overwrite to rewrite it"
        )
    return data


def write_shard(
    reader: Reader,
    spec: ShardSpec,
    *,
    output: Path,
    cfg: ShardingConfig,
    source: Provenance,
    wait: bool = True,
    overwrite: bool = False,
) -> dict | None:
    """Write one shard (tar, then sidecar), or return the sidecar of an already complete one.

    The shard's lock (``sharding.locks.shard_lock``) is held throughout, so temp files of this
    shard found here are left by a run that died, never by one still writing.

    Arguments:
      reader: the corpus reader (built in this process).
      spec: the shard: global index, split, units.
      output: the output folder.
      cfg: the sharding section.
      source: what this run writes from (recorded in the sidecar, ``sharding/inputs.py``).
      wait: wait for the shard's lock when another run holds it; False = return None then.
      overwrite: replace a tar left without its sidecar that differs from what this run writes
        (else that is a ``ShardError``).

    Returns:
      The sidecar dict (index, split, path, samples, bytes, sha256, units, counts, rejections,
      and the provenance: input, settings, corpus, sources, volumes), or None when ``wait`` is
      False and another run holds the shard.
    """
    output = Path(output)
    with shard_lock(output, spec.name, wait=wait) as held:
        if not held:
            return None
        done = read_sidecar(spec, output)
        if done is not None:
            return done
        return _write_locked(
            reader, spec, output=output, cfg=cfg, source=source, overwrite=overwrite
        )


def _write_locked(
    reader: Reader,
    spec: ShardSpec,
    *,
    output: Path,
    cfg: ShardingConfig,
    source: Provenance,
    overwrite: bool,
) -> dict:
    tar_path = spec.tar_path(output)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_tmps(spec, output):
        log.info("removing %s (left by an interrupted run)", stale)
        stale.unlink(missing_ok=True)
    counts = empty_counts()
    rejections: list[dict] = []
    seen: dict[str, str] = {}
    volumes: list[str] = []
    tmp = tmp_name(tar_path)
    spool = Spool(tmp.with_name(tmp.name + "-slices"))
    try:
        with open(tmp, "wb") as raw:
            sink = HashingFile(raw)
            tar = TarWriter(sink)
            for unit in spec.units:
                result = encode_unit(reader, unit, split=spec.split, cfg=cfg)
                for sample in result.samples:
                    if sample.key in seen:
                        # the same dataset/case/slice from two units: keep the first
                        _reject(result, _duplicate(unit, sample, seen[sample.key]))
                        continue
                    seen[sample.key] = unit.id
                    if result.volume is not None:
                        spool.add(sample.key, sample.members)
                    else:
                        add_sample(tar, sample.key, sample.members)
                    _count_sample(result.counts, sample.meta)
                if result.volume is not None and cfg.volumes:
                    group = write_case(output, result.volume, split=spec.split, cfg=cfg)
                    volumes.append(group.relative_to(output).as_posix())
                merge_counts(counts, result.counts)
                rejections.extend(result.rejections)
            spool.drain(tar, seed=cfg.shuffle_seed)
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
    finally:
        spool.close()
    digest, size = sink.sha.hexdigest(), sink.size
    _publish(tmp, tar_path, digest, overwrite=overwrite)
    sidecar = {
        "format_version": FORMAT_VERSION,
        "index": spec.index,
        "split": spec.split,
        "path": spec.relpath(),
        "samples": counts["samples"],
        "bytes": size,
        "sha256": digest,
        "units": [u.id for u in spec.units],
        "counts": counts,
        "rejections": sorted(rejections, key=lambda r: json.dumps(r, sort_keys=True)),
        "input": source.input,
        "settings": source.settings,
        "corpus": source.corpus,
        "sources": source_records(spec.units),
        "volumes": volumes,
    }
    atomic_write_text(spec.sidecar_path(output), json.dumps(sidecar, indent=1) + "\n")
    return sidecar


def _duplicate(unit: Unit, sample: Sample, first: str) -> dict:
    return {
        "unit": unit.id,
        "path": sample.meta["source"],
        "sample": sample.key,
        "reason": f"duplicate sample key (also made by unit {first})",
    }


def _publish(tmp: Path, final: Path, digest: str, *, overwrite: bool) -> None:
    """Rename the finished temp tar, unless a complete tar (a run killed before its sidecar) is
    there already: then it must be identical, or be replaced when ``overwrite``."""
    if final.exists() and not overwrite:
        existing = file_sha256(final)
        tmp.unlink()
        if existing != digest:
            raise ShardError(
                f"{final} exists without a sidecar and differs from what this run writes "
                f"(sha256 {existing[:12]} vs {digest[:12]}): inputs or code changed since; "
                "rerun with --overwrite to rewrite it"
            )
        return
    os.replace(tmp, final)
