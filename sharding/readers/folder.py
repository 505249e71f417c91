"""Reader of a plain folder of 2D images with label-map masks.

Layout::

    ROOT/images/<name>.<png|jpg|jpeg|tif|tiff>   the images (grey or colour; 16-bit and float
                                                 are mapped to uint8 with the percentile rule)
    ROOT/masks/<name>.png                        a label map of the same size: each nonzero value
                                                 is a class; one mask per value present
    ROOT/classes.json                            optional {"1": "liver", ...}

One unit per image; unit id = ``images/<file name>``. Case id = the name up to its last ``_``
when digits follow it (``patient7_012`` -> case ``patient7``, slice 12), else the whole name (its
own case); slice numbers are made unique per case by ``common.assign_slice_indices``. Class id =
the label value; its name from classes.json, else ``class_<value>``. Dataset = ``cfg.dataset`` or
ROOT's folder name; modality = ``cfg.modality`` or "unknown".

Bad input (``RejectedInput`` naming the file): a missing, truncated or corrupt image or mask, a
mask of another size than its image, a colour mask whose channels differ. A value present in the
mask but missing from classes.json (when that file exists) leaves that mask out, listed in
``rejections``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sharding.config import ShardingConfig
from sharding.readers.common import (
    IMAGE_SUFFIXES,
    assign_slice_indices,
    decode_image_file,
    modality_name,
    present_ids,
    read_class_names,
    split_trailing_number,
    to_uint8_2d,
)
from sharding.records import RejectedInput, Slice2D, Unit

__all__ = ["FolderReader"]


class FolderReader:
    """``Reader`` of ``images/`` + ``masks/`` folders (see the module docstring)."""

    def __init__(self, root: Path, *, cfg: ShardingConfig):
        self.root = Path(root)
        self.cfg = cfg
        self.dataset = cfg.dataset or self.root.resolve().name
        self.modality = modality_name(cfg.modality) or "unknown"
        self.class_names = read_class_names(self.root)
        self._slices: dict[str, int] | None = None

    def _images(self) -> list[Path]:
        image_dir = self.root / "images"
        if not image_dir.is_dir():
            raise ValueError(f"{image_dir}: folder not found (folder layout images/ + masks/)")
        return sorted(
            p
            for p in image_dir.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )

    def _slice_indices(self) -> dict[str, int]:
        if self._slices is None:
            entries = []
            for path in self._images():
                case_id, number = split_trailing_number(path.stem)
                entries.append((f"images/{path.name}", self.dataset, case_id, number))
            self._slices = assign_slice_indices(entries)
        return self._slices

    def for_units(self, units: Sequence[Unit]) -> FolderReader:
        """A copy that knows only the slice indices of ``units`` (what a worker gets with each
        shard, instead of listing the whole folder again)."""
        slices = self._slice_indices()
        sub = copy.copy(self)
        sub._slices = {u.id: slices[u.id] for u in units if u.id in slices}
        return sub

    def list_units(self) -> list[Unit]:
        """One unit per image, sorted by id; paths = (image, mask). No pixels are read."""
        units = [
            Unit(
                id=f"images/{path.name}",
                dataset=self.dataset,
                case_id=split_trailing_number(path.stem)[0],
                paths=(str(path), str(self.root / "masks" / f"{path.stem}.png")),
                modality=self.modality,
            )
            for path in self._images()
        ]
        if not units:
            raise ValueError(f"{self.root / 'images'}: no images (.png, .jpg, .tif) found")
        return units

    def load(self, unit: Unit) -> Slice2D:
        """Read one image and split its label map into one bool mask per value present."""
        image_path = self.root / unit.id
        mask_path = self.root / "masks" / f"{image_path.stem}.png"
        try:
            image = to_uint8_2d(
                decode_image_file(image_path), percentiles=tuple(self.cfg.mr_percentiles)
            )
        except ValueError as exc:
            raise RejectedInput(str(image_path), str(exc)) from None
        if not mask_path.is_file():
            raise RejectedInput(str(mask_path), "mask file does not exist")
        labels = decode_image_file(mask_path)
        if labels.ndim == 3:
            if not (labels == labels[:, :, :1]).all():
                raise RejectedInput(
                    str(mask_path), "colour mask; expected a single-channel label map"
                )
            labels = labels[:, :, 0]
        if labels.shape != image.shape[:2]:
            raise RejectedInput(
                str(mask_path),
                f"mask size {labels.shape[1]}x{labels.shape[0]} != image size "
                f"{image.shape[1]}x{image.shape[0]}",
            )
        ids, names, rejections = [], [], []
        for value in present_ids(labels):
            if value == 0:
                continue
            if self.class_names is not None and value not in self.class_names:
                rejections.append(
                    {
                        "unit": unit.id,
                        "path": str(mask_path),
                        "reason": f"label value {value} is not in classes.json",
                    }
                )
                continue
            ids.append(value)
            names.append((self.class_names or {}).get(value, f"class_{value}"))
        id_arr = np.array(ids, dtype=labels.dtype)
        masks = labels[None, :, :] == id_arr[:, None, None]
        return Slice2D(
            image=image,
            masks=masks,
            class_ids=ids,
            class_names=names,
            dataset=self.dataset,
            case_id=unit.case_id,
            modality=self.modality,
            slice_index=self._slice_indices().get(unit.id, -1),
            spacing=(),
            source=str(image_path),
            rejections=rejections,
        )
