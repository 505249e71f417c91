"""What the corpus readers hand to the shard writer.

A reader lists its *input units* cheaply (sorted, stable ids) and loads one unit at a time. A 2D
unit loads as one ``Slice2D``; a 3D unit (a CT/MR case) loads as one ``Volume``, which the writer
maps to uint8, slices along Z into ``Slice2D`` records and also stores as a Zarr group.

A unit that cannot be read raises ``RejectedInput``; a unit with some bad parts (one mask file
missing, one empty mask) loads with those parts left out and listed in ``rejections``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class RejectedInput(Exception):
    """An input that cannot be used. ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def record(self, unit_id: str = "") -> dict:
        return {"unit": unit_id, "path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class Unit:
    """One input unit: a 2D image with its masks, or one 3D case."""

    id: str
    """Stable, unique id within the corpus (used for sorting and plan.json)."""
    dataset: str
    case_id: str
    """Patient/case id: the split is decided by hash(dataset, case_id), never per slice."""
    paths: tuple[str, ...] = ()
    """Files the unit reads (image first); informative, and for error messages."""
    modality: str = ""
    split: str = ""
    """The split the corpus itself assigns (nnU-Net's imagesTs/ = "test"); "" = decided by the
    hash of (dataset, case_id)."""


@dataclass
class Slice2D:
    """One 2D sample before resizing: image and all its masks at the same original size."""

    image: np.ndarray
    """uint8, (H, W) or (H, W, 3)."""
    masks: np.ndarray
    """bool, (N, H, W); N may be 0 (a slice without foreground). Overlaps allowed."""
    class_ids: list[int]
    """Per mask: class id (0 = unknown class). Same length as masks."""
    class_names: list[str]
    dataset: str
    case_id: str
    modality: str
    slice_index: int = -1
    """Index along Z for slices of a volume; -1 for a 2D image."""
    spacing: tuple[float, ...] = ()
    """Pixel spacing (row, col) in mm, or () when unknown."""
    source: str = ""
    rejections: list[dict] = field(default_factory=list)


@dataclass
class Volume:
    """One 3D case, as read (orientation canonicalised to (Z, Y, X) with Z the slice axis)."""

    image: np.ndarray
    """float32 raw intensities (HU for CT), (Z, H, W)."""
    label: np.ndarray | None
    """Integer label map (Z, H, W), 0 = background, or None for unlabelled cases."""
    spacing: tuple[float, float, float]
    """(z, y, x) voxel size in mm."""
    affine: np.ndarray
    """4x4 voxel -> world (RAS mm) of the (Z, Y, X) array."""
    class_map: dict[int, str]
    """Label id -> name (without background)."""
    dataset: str
    case_id: str
    modality: str
    source: str = ""
    rejections: list[dict] = field(default_factory=list)


class Reader(Protocol):
    """What ``samadapt shard --format NAME`` uses. Readers take the sharding config section."""

    def list_units(self) -> list[Unit]:
        """All input units, sorted by id. Cheap: no pixel data is read."""

    def load(self, unit: Unit) -> Slice2D | Volume:
        """Read one unit; raises ``RejectedInput`` for unusable input."""


def iter_nonempty(masks: np.ndarray) -> Iterator[int]:
    for i in range(masks.shape[0]):
        if masks[i].any():
            yield i
