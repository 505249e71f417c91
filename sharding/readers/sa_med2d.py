"""Reader of the SA-Med2D-16M / SAM-Med2D 2D layout.

Layout::

    ROOT/images/*.png               the images (8-bit grey or RGB; 16-bit is mapped to uint8 with
                                    the percentile rule of ``sharding.intensity``)
    ROOT/masks/*.png                one binary mask per file (0/255 or 0/1; any nonzero = inside)
    ROOT/image2label_*.json         {image path: [mask path, ...]}; all such files are merged

Paths in the JSON may be relative to ROOT (``images/x.png``) or to ROOT's parent
(``data_demo/images/x.png``, as in SAM-Med2D's data_demo); the base is chosen per JSON file and
per kind (images / masks) as the one under which the first 16 listed files exist (ROOT when
neither resolves them and the first path component is not ROOT's name). Without any
``image2label_*.json`` every ``images/*.png`` is a unit and a mask belongs to the image whose stem
is the longest prefix of the mask's stem followed by ``--`` or ``_``.

One unit per image (unit id = image path relative to ROOT, POSIX). Names are parsed as follows.

* SA-Med2D-16M style, a stem with ``--``: ``ct_00--AbdomenCT1K--Case_00001--x_0089`` =
  ``MODALITY_NN--DATASET--CASE--AXIS_SLICE``: modality = the first field without its trailing
  ``_digits`` (``ct``), dataset = the second field, case = the third, slice = the digits after the
  last ``_`` of the last field (89). With other than four fields: case = all fields but the last
  joined with ``--``, dataset = ROOT's folder name, modality from a ``ct_`` / ``mr_`` prefix.
  Masks: ``<image stem>--<class name>_<instance>.png`` (``..--x_0089--liver_000.png`` -> liver).
* demo style, no ``--``: ``amos_0004_75`` = ``CASE_SLICE`` (case ``amos_0004``, slice 75; a stem
  without trailing ``_digits`` is its own case). Dataset = ROOT's folder name. A stem starting with
  ``ct_`` or ``mr_`` gives the modality. Masks: ``<image stem>_<class name>_<instance>.png``
  (``amos_0004_75_aorta_000.png`` -> aorta).

For both: the class name is the mask stem with the image-stem prefix and separator removed, then
the trailing ``_digits`` (instance) removed; when only digits or nothing is left the class is
unknown (id 0, name "unknown").
Class ids: all class names found in the corpus, sorted alphabetically, numbered from 1. Slice
numbers are made unique per case by ``common.assign_slice_indices``. ``cfg.dataset`` and
``cfg.modality`` override the parsed values; modality defaults to "unknown".

Bad input: a missing, unreadable, wrongly sized or empty mask is left out and listed in
``Slice2D.rejections``; a missing, truncated or corrupt image raises ``RejectedInput``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharding.config import ShardingConfig
from sharding.readers.common import (
    assign_slice_indices,
    decode_image_file,
    modality_name,
    split_trailing_number,
    to_uint8_2d,
)
from sharding.records import RejectedInput, Slice2D, Unit

__all__ = ["SAMed2DReader", "mask_class_name", "parse_image_stem"]

log = logging.getLogger(__name__)

_INSTANCE = re.compile(r"_\d+$")
_PROBE = 16


@dataclass
class _Entry:
    image: Path
    masks: list[str]
    """Absolute mask paths as strings (a corpus lists millions: no Path objects kept)."""
    json_name: str
    dataset: str
    case_id: str
    modality: str
    parsed_slice: int


def parse_image_stem(stem: str, default_dataset: str) -> tuple[str, str, str, int]:
    """An image stem -> ``(dataset, case_id, modality, slice)`` by the module docstring's rules.

    ``modality`` is "" when the name does not tell; ``slice`` is -1 when it has no number.
    """
    lowered = stem.lower()
    modality = "ct" if lowered.startswith("ct_") else "mr" if lowered.startswith("mr_") else ""
    if "--" in stem:
        fields = stem.split("--")
        _, number = split_trailing_number(fields[-1])
        if len(fields) == 4:
            return fields[1], fields[2], _INSTANCE.sub("", fields[0]).lower(), number
        return default_dataset, "--".join(fields[:-1]), modality, number
    case_id, number = split_trailing_number(stem)
    return default_dataset, case_id, modality, number


def mask_class_name(mask_stem: str, image_stem: str) -> str:
    """The class name of a mask file stem (module docstring); "" when unknown."""
    rest = mask_stem
    for sep in ("--", "_"):
        if mask_stem.startswith(image_stem + sep):
            rest = mask_stem[len(image_stem) + len(sep) :]
            break
    return "" if rest.isdigit() else _INSTANCE.sub("", rest)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _choose_base(root: Path, paths: list[str]) -> Path:
    """ROOT or ROOT's parent: whichever resolves more of the first few ``paths``."""
    if not paths:
        return root
    probe = paths[:_PROBE]
    hits_root = sum((root / p).exists() for p in probe)
    hits_parent = sum((root.parent / p).exists() for p in probe)
    if hits_root == hits_parent == 0:
        first = Path(os.path.normpath(probe[0])).parts
        return root.parent if first and first[0] == root.name else root
    return root if hits_root >= hits_parent else root.parent


class SAMed2DReader:
    """``Reader`` of the SA-Med2D layout (see the module docstring)."""

    def __init__(self, root: Path, *, cfg: ShardingConfig):
        self.root = Path(root)
        self.cfg = cfg
        self._entries: dict[str, _Entry] | None = None
        self._slices: dict[str, int] = {}
        self.class_ids: dict[str, int] = {}
        """Class name -> id (1-based, alphabetical over the corpus); filled by list_units."""

    # ---------------------------------------------------------------- listing

    def _json_pairs(self) -> list[tuple[str, str, list[str]]]:
        pairs: list[tuple[str, str, list[str]]] = []
        files = sorted(self.root.glob("image2label_*.json"))
        for jf in files:
            try:
                mapping = json.loads(jf.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{jf}: not a readable JSON file: {exc}") from None
            if not isinstance(mapping, dict):
                raise ValueError(f"{jf}: must map image paths to lists of mask paths")
            images = [str(k) for k in mapping]
            masks = [str(m) for v in mapping.values() if isinstance(v, list) for m in v]
            image_base = str(_choose_base(self.root, images))
            mask_base = str(_choose_base(self.root, masks))
            for key, value in mapping.items():
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list):
                    raise ValueError(f"{jf}: value of {key!r} must be a list of mask paths")
                image = os.path.normpath(os.path.join(image_base, str(key)))
                pairs.append(
                    (jf.name, image, [os.path.normpath(os.path.join(mask_base, m)) for m in value])
                )
        return pairs

    def _scan_pairs(self) -> list[tuple[str, str, list[str]]]:
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        if not image_dir.is_dir():
            raise ValueError(
                f"{self.root}: no image2label_*.json and no images/ folder (SA-Med2D layout)"
            )
        images = sorted(p for p in image_dir.glob("*.png") if not p.name.startswith("."))
        by_stem = {p.stem: (p, []) for p in images}
        masks = sorted(mask_dir.glob("*.png")) if mask_dir.is_dir() else []
        orphans = []
        for mask in masks:
            stem, owner = mask.stem, None
            for i in range(len(stem), 0, -1):
                if (stem[i:].startswith("--") or stem[i:].startswith("_")) and stem[:i] in by_stem:
                    owner = stem[:i]
                    break
            if owner is None:
                orphans.append(mask)
                continue
            by_stem[owner][1].append(str(mask))
        if masks and len(orphans) == len(masks):
            # not a corpus with a few stray files: another layout (a folder of label maps named
            # like their images wrote 1 sample and a warning per mask before)
            same = sum(p.stem in by_stem for p in masks)
            hint = (
                f"{same} are named exactly like an image (label maps: --format folder)"
                if same
                else "is this another layout?"
            )
            raise ValueError(
                f"{mask_dir}: none of its {len(masks)} masks is named after an image as the "
                f"SA-Med2D layout names them (IMAGE--CLASS.png or IMAGE_CLASS_N.png); {hint}"
            )
        for mask in orphans:
            log.warning("%s: no image matches this mask's name; ignored", mask)
        return [("images/", str(p), m) for p, m in by_stem.values()]

    def _unit_id(self, image: str) -> str:
        """The image path relative to ROOT, with "/" (string work: millions of images)."""
        root = self._root_str
        if image.startswith(root) and image[len(root) : len(root) + 1] == os.sep:
            rel = image[len(root) + 1 :]
        else:
            rel = os.path.relpath(image, root)
        return rel if os.sep == "/" else Path(rel).as_posix()

    def _index(self) -> dict[str, _Entry]:
        if self._entries is not None:
            return self._entries
        pairs = self._json_pairs() or self._scan_pairs()
        default_dataset = self.root.resolve().name
        override_mod = modality_name(self.cfg.modality)
        entries: dict[str, _Entry] = {}
        self._root_str = os.path.normpath(os.path.abspath(self.root))
        for json_name, image, masks in pairs:
            image = os.path.abspath(image) if not os.path.isabs(image) else image
            uid = self._unit_id(image)
            if uid in entries:
                merged = entries[uid].masks + [m for m in masks if m not in entries[uid].masks]
                entries[uid].masks = merged
                continue
            dataset, case_id, modality, number = parse_image_stem(_stem(image), default_dataset)
            entries[uid] = _Entry(
                image=Path(image),
                masks=list(masks),
                json_name=json_name,
                dataset=self.cfg.dataset or dataset,
                case_id=case_id,
                modality=override_mod or modality_name(modality) or "unknown",
                parsed_slice=number,
            )
        for entry in entries.values():
            entry.masks.sort()
        names = set()
        for e in entries.values():
            image_stem = e.image.stem
            names.update(mask_class_name(_stem(m), image_stem) for m in e.masks)
        names.discard("")
        self.class_ids = {name: i + 1 for i, name in enumerate(sorted(names))}
        self._slices = assign_slice_indices(
            (uid, e.dataset, e.case_id, e.parsed_slice) for uid, e in entries.items()
        )
        self._entries = dict(sorted(entries.items()))
        return self._entries

    def list_units(self) -> list[Unit]:
        """One unit per image, sorted by id (image path relative to ROOT). No pixels are read."""
        entries = self._index()
        if not entries:
            raise ValueError(f"{self.root}: no images found (SA-Med2D layout)")
        return [
            Unit(
                id=uid,
                dataset=e.dataset,
                case_id=e.case_id,
                paths=(str(e.image), *e.masks),
                modality=e.modality,
            )
            for uid, e in entries.items()
        ]

    def for_units(self, units: Sequence[Unit]) -> SAMed2DReader:
        """A copy that can load only ``units``: what a worker process gets with each shard,
        instead of parsing the whole index again (gigabytes of JSON for SA-Med2D-16M)."""
        entries = self._index()
        sub = copy.copy(self)
        sub._entries = {u.id: entries[u.id] for u in units if u.id in entries}
        sub._slices = {uid: self._slices[uid] for uid in sub._entries}
        return sub

    # ---------------------------------------------------------------- loading

    def _load_mask(self, path: str, shape: tuple[int, int], out: np.ndarray) -> None:
        """Read one mask file into ``out`` (bool (H, W)): > 0 in any channel = inside."""
        arr = decode_image_file(path, what="mask")  # no separate stat: one syscall less
        if arr.shape[:2] != shape:
            raise RejectedInput(
                str(path),
                f"mask size {arr.shape[1]}x{arr.shape[0]} != image size {shape[1]}x{shape[0]}",
            )
        if arr.ndim == 2:
            np.greater(arr, 0, out=out)
        else:
            np.any(arr > 0, axis=2, out=out)
        if not out.any():
            raise RejectedInput(str(path), "mask is empty (no nonzero pixel)")

    def load(self, unit: Unit) -> Slice2D:
        """Read one image and its masks.

        Returns:
          ``Slice2D`` with image uint8 (H, W) or RGB (H, W, 3) and masks bool (N, H, W), one per
          usable mask file, in mask path order.
        """
        entries = self._index()
        entry = entries.get(unit.id)
        if entry is None:
            raise RejectedInput(unit.paths[0] if unit.paths else unit.id, "unit not in corpus")
        try:
            raw = decode_image_file(entry.image)
        except RejectedInput:
            if not entry.image.exists():  # stat only on failure: name the JSON that lists it
                raise RejectedInput(
                    str(entry.image), f"image file named in {entry.json_name} does not exist"
                ) from None
            raise
        try:
            image = to_uint8_2d(raw, percentiles=tuple(self.cfg.mr_percentiles))
        except ValueError as exc:
            raise RejectedInput(str(entry.image), str(exc)) from None
        shape = image.shape[:2]
        # every mask is thresholded straight into its slot of the stack (no per-mask arrays to
        # stack afterwards); a rejected mask's slot is reused by the next one
        stack = np.empty((len(entry.masks), *shape), dtype=bool)
        ids, names, rejections = [], [], []
        image_stem = entry.image.stem
        for path in entry.masks:
            try:
                self._load_mask(path, shape, stack[len(ids)])
            except RejectedInput as rej:
                rejections.append(rej.record(unit.id))
                continue
            name = mask_class_name(_stem(path), image_stem)
            names.append(name or "unknown")
            ids.append(self.class_ids.get(name, 0))
        return Slice2D(
            image=image,
            masks=stack[: len(ids)],
            class_ids=ids,
            class_names=names,
            dataset=entry.dataset,
            case_id=entry.case_id,
            modality=entry.modality,
            slice_index=self._slices[unit.id],
            spacing=(),
            source=str(entry.image),
            rejections=rejections,
        )
