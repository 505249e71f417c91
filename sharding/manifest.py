"""The files that describe a finished shard set, and the checks that read them back.

* every file of the output folder is written as ``NAME.tmp-<pid>`` and renamed
  (``sharding/files.py``), so a reader (or a killed run) never sees half a file.
* ``finalize``: merges the per-shard sidecars into ``manifest.json``, ``summary.json`` and
  ``rejected.jsonl`` (all sorted, no timestamps: an interrupted and resumed run, a job array and a
  single run all give byte-identical files).
* ``load_manifest``: the one typed reader of ``manifest.json`` (the training stream, the 3D reader
  and ``samadapt inspect``); ``check_shards`` / ``verify_shards`` compare the files with it (sizes
  before training; ``samadapt inspect --verify`` re-hashes every shard, and the data reader
  hashes each shard as it streams, ``pipeline/data/stream.py``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sharding.files import atomic_write_text, file_sha256
from sharding.format import FORMAT_VERSION, SPLITS, VOLUMES_DIR

if TYPE_CHECKING:
    from sharding.plan import Plan

__all__ = [
    "FORMAT_NAME",
    "MANIFEST_FILE",
    "REJECTED_FILE",
    "SUMMARY_FILE",
    "Manifest",
    "ManifestError",
    "Shard",
    "check_shards",
    "empty_counts",
    "finalize",
    "load_manifest",
    "load_summary",
    "merge_counts",
    "reason_category",
    "verify_shards",
]

FORMAT_NAME = "samadapt-webdataset"
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.json"
REJECTED_FILE = "rejected.jsonl"
_NUMBER = re.compile(r"\d+")


# --------------------------------------------------------------------------------------------
# Counts (per shard in the sidecar, merged into summary.json)
# --------------------------------------------------------------------------------------------


def empty_counts() -> dict[str, Any]:
    """The per-shard summary counters (all zero)."""
    return {
        "samples": 0,
        "masks": 0,
        "units": 0,
        "units_rejected": 0,
        "empty_kept": 0,
        "empty_dropped": 0,
        "by_split": {},
        "by_dataset": {},
        "by_modality": {},
        "by_class": {},
        "classes": {},
        "rejected": 0,
        "rejected_by_reason": {},
    }


def merge_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add the counters of ``part`` into ``total`` (numbers add, mappings merge recursively)."""
    for key, value in part.items():
        if isinstance(value, dict):
            merge_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def reason_category(reason: str) -> str:
    """The kind of a rejection reason, for counts: its text before the first ':' or '(', with
    numbers replaced by N ("image has 3 NaN/Inf voxels" -> "image has N NaN/Inf voxels")."""
    head = reason
    for sep in (":", "("):
        head = head.split(sep, 1)[0]
    return _NUMBER.sub("N", head).strip()[:80] or "unknown"


def _sorted_counts(counts: dict[str, Any]) -> dict[str, Any]:
    return {k: (_sorted_counts(v) if isinstance(v, dict) else v) for k, v in sorted(counts.items())}


# --------------------------------------------------------------------------------------------
# Finalize
# --------------------------------------------------------------------------------------------


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=False) + "\n"


def class_map(classes: dict[str, dict[str, int]]) -> dict[str, str]:
    """Class id -> name over the whole set, ids in numeric order (``manifest["classes"]``).

    Arguments:
      classes: the summary's ``classes`` counters: id (str) -> {name: masks}.

    Returns:
      id (str) -> the name most masks of that id carry (ties: the first name in sorted order);
      id 0 (no class) is left out.
    """
    out = {}
    for cid in sorted(classes, key=int):
        if int(cid) == 0:
            continue
        names = classes[cid]
        out[cid] = min(names, key=lambda n: (-names[n], n))
    return out


def finalize(output: str | os.PathLike, plan: Plan, sidecars: Iterable[dict]) -> dict:
    """Write ``manifest.json``, ``summary.json`` and ``rejected.jsonl`` from the sidecars.

    Arguments:
      output: the output folder.
      plan: the plan (all of whose shards are complete).
      sidecars: the sidecar dicts of every shard of the plan (any order).

    Returns:
      The manifest dict. Files whose content would not change are left untouched.
    """
    output = Path(output)
    by_index = {int(s["index"]): s for s in sidecars}
    shards, rejections = [], []
    totals = {"samples": 0, "shards": 0, "bytes": 0, "by_split": {}}
    counts = empty_counts()
    for spec in plan.shards:
        side = by_index[spec.index]
        shards.append(
            {
                "index": spec.index,
                "split": spec.split,
                "path": spec.relpath(),
                "samples": side["samples"],
                "bytes": side["bytes"],
                "sha256": side["sha256"],
            }
        )
        per_split = totals["by_split"].setdefault(
            spec.split, {"samples": 0, "shards": 0, "bytes": 0}
        )
        for bucket in (totals, per_split):
            bucket["samples"] += side["samples"]
            bucket["shards"] += 1
            bucket["bytes"] += side["bytes"]
        merge_counts(counts, side["counts"])
        rejections.extend(side["rejections"])
    totals["by_split"] = {s: totals["by_split"][s] for s in SPLITS if s in totals["by_split"]}
    totals["rejected"] = counts["rejected"]
    stores = (output / VOLUMES_DIR).glob("*.zarr")
    volumes = sorted(f"{VOLUMES_DIR}/{p.name}" for p in stores if p.is_dir())
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "input_format": plan.format,
        "input": plan.input,
        "image_size": plan.settings["image_size"],
        "resize": plan.settings["resize"],
        "inputs_per_shard": plan.inputs_per_shard,
        "sharding": plan.settings,
        "totals": totals,
        "classes": class_map(counts.get("classes", {})),
        "volumes": volumes,
        "shards": shards,
    }
    summary = _sorted_counts(counts)
    summary["shards"] = len(shards)
    lines = sorted(json.dumps(r, sort_keys=True) for r in rejections)
    _write_if_changed(output / REJECTED_FILE, "".join(line + "\n" for line in lines))
    _write_if_changed(output / SUMMARY_FILE, _dump(summary))
    # the manifest last: its presence means the whole set is complete
    _write_if_changed(output / MANIFEST_FILE, _dump(manifest))
    return manifest


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------


class ManifestError(ValueError):
    """``manifest.json`` cannot be parsed, is of another format or version, or is malformed; the
    message names the file."""


@dataclass(frozen=True)
class Shard:
    """One tar shard as the manifest lists it."""

    url: str
    """Path of the tar: the manifest's ``path`` joined to the output folder (or as is, when
    absolute)."""
    samples: int
    bytes: int
    sha256: str = ""
    """The manifest's digest of the file ("" when the manifest has none)."""
    split: str = ""


@dataclass(frozen=True)
class Manifest:
    """A shard set's ``manifest.json``, read and checked by ``load_manifest``."""

    path: Path
    """The manifest file (``OUTPUT/manifest.json``)."""
    image_size: int
    resize: str
    shards: tuple[Shard, ...]
    """Every shard, in manifest order."""
    classes: dict[int, str] | None
    """Class id -> name over the set (ids >= 1); None for a manifest written before it existed."""
    document: dict[str, Any]
    """The whole JSON document (totals, settings, input...): what reports print."""

    @property
    def totals(self) -> dict[str, Any]:
        """Samples, shards and bytes, in all and per split (``{}`` when not recorded)."""
        return self.document.get("totals", {})

    def split(self, name: str) -> list[Shard]:
        """The shards of split ``name`` in manifest order; ``ManifestError`` when it has none."""
        shards = [s for s in self.shards if s.split == name]
        if not shards:
            present = sorted({s.split for s in self.shards})
            raise ManifestError(
                f"{self.path}: no shards for split {name!r} (splits present: {present})"
            )
        return shards


def _document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except ValueError as err:
        raise ManifestError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path} is not a samadapt shard manifest")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {version!r}, this reader reads only {FORMAT_VERSION} "
            "(version 1 stored PNG image members): reshard the corpus with `samadapt shard`"
        )
    return document


def _shard(entry: Any, root: Path) -> Shard:
    url = Path(entry["path"])
    return Shard(
        url=str(url if url.is_absolute() else root / url),
        samples=int(entry["samples"]),
        bytes=int(entry["bytes"]),
        sha256=str(entry.get("sha256", "")),
        split=str(entry["split"]),
    )


def load_manifest(output: str | os.PathLike) -> Manifest:
    """Read and check ``OUTPUT/manifest.json``: the one manifest reader (the training stream,
    the 3D reader and ``samadapt inspect`` all read it here).

    Returns:
      The ``Manifest``. Raises ``FileNotFoundError`` naming the folder when there is none, and
      ``ManifestError`` naming the file when it cannot be parsed, is of another format version
      or has malformed entries.
    """
    path = Path(output) / MANIFEST_FILE
    if not Path(output).is_dir():
        raise FileNotFoundError(f"{output} is not a folder: give the OUTPUT of samadapt shard")
    if not path.is_file():
        raise FileNotFoundError(
            f"{output} has no {MANIFEST_FILE}: run samadapt shard first (or let it finish: the "
            "manifest is written when every shard of the plan is complete)"
        )
    document = _document(path)
    try:
        image_size = int(document["image_size"])
        entries = list(document["shards"])
        classes = document.get("classes")
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: not a shard manifest ({type(exc).__name__}: {exc})") from exc
    shards = []
    for i, entry in enumerate(entries):
        try:
            shards.append(_shard(entry, path.parent))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{path}: shards[{i}] is malformed ({exc!r})") from exc
    if classes is not None:
        try:
            classes = {int(k): str(v) for k, v in classes.items()}
        except (AttributeError, ValueError) as exc:
            raise ManifestError(f"{path}: 'classes' is not an id -> name map ({exc})") from exc
    return Manifest(
        path=path,
        image_size=image_size,
        resize=str(document.get("resize", "square")),
        shards=tuple(shards),
        classes=classes,
        document=document,
    )


def load_summary(output: str | os.PathLike) -> dict:
    path = Path(output) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{output} has no {SUMMARY_FILE}: run samadapt shard first")
    return json.loads(path.read_text())


def check_shards(shards: Iterable[Shard], *, digest: bool) -> list[str]:
    """Compare shard files with the manifest: present, its size, and (``digest``) its sha256.

    Arguments:
      shards: from ``Manifest.shards`` or ``Manifest.split``.
      digest: re-hash every file (reads it whole); False = sizes only (one stat per shard).

    Returns:
      One message per bad shard, each starting with the shard path (empty list = all good).
    """
    bad = []
    for shard in shards:
        path = Path(shard.url)
        if not path.is_file():
            bad.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != shard.bytes:
            bad.append(
                f"{path}: {size} bytes, manifest says {shard.bytes} (truncated or rewritten "
                "after the manifest)"
            )
            continue
        if digest and (found := file_sha256(path)) != shard.sha256:
            bad.append(f"{path}: sha256 {found} != manifest {shard.sha256}")
    return bad


def verify_shards(output: str | os.PathLike) -> list[str]:
    """Recompute every shard's size and sha256 and compare with the manifest.

    Arguments:
      output: the output folder of ``samadapt shard``.

    Returns:
      One message per bad shard, each naming the shard path (empty list = all good).
    """
    return check_shards(load_manifest(output).shards, digest=True)
