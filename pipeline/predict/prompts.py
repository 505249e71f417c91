"""The prompts file of ``samadapt predict``: boxes and points per slice, in voxel or world mm.

Schema (the README has an example)::

    {"space": "voxel",                 optional default of every prompt: voxel, ras or lps
     "prompts": [                      one entry per object and slice
       {"id": 1,                       label value written for it (1..65535; default: its
                                       position in the list + 1). Repeat an id on several
                                       slices to label one structure through a volume.
        "input": "case_01.nii.gz",     optional: the input it belongs to (file or folder name,
                                       or the INPUT argument as given); none = every input
        "space": "voxel",              optional: overrides the file's default
        "slice": 12,                   voxel space, volumes only: the plane k
        "box": [x0, y0, x1, y1],       voxel: first and last column (x) and row (y) inside
                                       the object, inclusive; world: [[x, y, z], [x, y, z]],
                                       two opposite corners in mm
        "points": [[x, y, 1], ...]}    voxel: column, row, label (1 object, 0 background);
                                       world: [x, y, z, label]
     ]}

Voxel coordinates are the input's own (``inputs.py``): x = column = NIfTI i, y = row = NIfTI
j, slice = k (a DICOM series: the slice's rank along the slice normal); for a 2D image x, y are
its pixel column and row and ``slice`` is left out. World coordinates are mm in the scanner
frame: ``ras`` as NIfTI affines state them, ``lps`` as DICOM's ImagePositionPatient does; they are
mapped to voxels by the inverse of the input's affine, and every corner and point of one prompt
must fall on one slice (within half a slice). A prompt needs a box, points, or both.

Inside the model the prompts follow the shard reader's convention (``pipeline/data/prompts.py``):
a box is ``x0, y0, x1 + 1, y1 + 1`` (max exclusive) and points are pixel indices, both scaled to
the model's input by the resize of ``sharding.transform`` (``predict/geometry.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.predict.inputs import Input, Scan

__all__ = ["SPACES", "Prompt", "PromptError", "PromptSpec", "load_prompts", "resolve"]

SPACES = ("voxel", "ras", "lps")
_MAX_ID = 65535
_KEYS = {"id", "input", "space", "slice", "box", "points"}
_LPS = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS: x and y change sign


class PromptError(ValueError):
    """A prompt that cannot be used; the message names the file and the prompt."""


@dataclass(frozen=True)
class PromptSpec:
    """One prompt as the file states it."""

    where: str
    """``FILE: prompts[i]``, for messages."""
    id: int
    input: str | None
    space: str
    slice: int | None
    box: tuple[tuple[float, ...], ...] | None
    """voxel: ((x0, y0), (x1, y1)); world: ((x, y, z), (x, y, z))."""
    points: tuple[tuple[float, ...], ...] = ()
    """voxel: (x, y, label) each; world: (x, y, z, label)."""

    def matches(self, item: Input) -> bool:
        """Whether this prompt belongs to ``item``."""
        return self.input is None or self.input in (item.path.name, str(item.path), item.given)


@dataclass(frozen=True)
class Prompt:
    """A prompt on one plane of a scan, in the plane's pixel coordinates."""

    id: int
    slice: int
    box: tuple[float, float, float, float] | None
    """x0, y0, x1, y1 with the max exclusive (pixel edges), or None."""
    points: np.ndarray
    """(n, 2) float x, y pixel indices (n may be 0)."""
    labels: np.ndarray
    """(n,) int64: 1 object, 0 background."""


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PromptError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _coords(value: Any, n: int, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != n:
        raise PromptError(f"{where}: expected a list of {n} numbers, got {value!r}")
    return tuple(_number(v, where) for v in value)


def _box(value: Any, space: str, where: str) -> tuple[tuple[float, ...], ...]:
    if space == "voxel":
        x0, y0, x1, y1 = _coords(value, 4, where)
        if x1 < x0 or y1 < y0:
            raise PromptError(f"{where}: [x0, y0, x1, y1] needs x0 <= x1 and y0 <= y1, got {value}")
        return (x0, y0), (x1, y1)
    if not isinstance(value, list) or len(value) != 2:
        raise PromptError(f"{where}: a {space} box is two corners [[x, y, z], [x, y, z]] in mm")
    return tuple(_coords(c, 3, where) for c in value)


def _points(value: Any, space: str, where: str) -> tuple[tuple[float, ...], ...]:
    n = 3 if space == "voxel" else 4
    if not isinstance(value, list) or not value:
        raise PromptError(f"{where}: expected a non-empty list of points")
    out = []
    for i, point in enumerate(value):
        coords = _coords(point, n, f"{where}[{i}]")
        if coords[-1] not in (0.0, 1.0):
            raise PromptError(f"{where}[{i}]: the label (last value) must be 1 or 0")
        out.append(coords)
    return tuple(out)


def _spec(entry: Any, index: int, default_space: str, where: str) -> PromptSpec:
    here = f"{where}: prompts[{index}]"
    if not isinstance(entry, dict):
        raise PromptError(f"{here}: expected an object with a box and/or points")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise PromptError(f"{here}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    space = entry.get("space", default_space)
    if space not in SPACES:
        raise PromptError(f"{here}.space: must be one of {', '.join(SPACES)}, got {space!r}")
    pid = entry.get("id", index + 1)
    if isinstance(pid, bool) or not isinstance(pid, int) or not 1 <= pid <= _MAX_ID:
        raise PromptError(f"{here}.id: must be an integer in 1..{_MAX_ID}, got {pid!r}")
    slice_ = entry.get("slice")
    if slice_ is not None and (isinstance(slice_, bool) or not isinstance(slice_, int)):
        raise PromptError(f"{here}.slice: must be an integer, got {slice_!r}")
    if slice_ is not None and space != "voxel":
        raise PromptError(f"{here}.slice: only voxel prompts name a slice ({space} has z)")
    target = entry.get("input")
    if target is not None and not isinstance(target, str):
        raise PromptError(f"{here}.input: must be a file or folder name, got {target!r}")
    if "box" not in entry and "points" not in entry:
        raise PromptError(f"{here}: needs a box, points, or both")
    box = _box(entry["box"], space, f"{here}.box") if "box" in entry else None
    points = _points(entry["points"], space, f"{here}.points") if "points" in entry else ()
    return PromptSpec(here, pid, target, space, slice_, box, points)


def load_prompts(path: str | Path, inputs: list[Input]) -> list[PromptSpec]:
    """Read and check a prompts file (module docstring).

    Arguments:
      path: the JSON file.
      inputs: the command's inputs; every ``input`` a prompt names must be one of them.

    Returns:
      The prompts in file order. Raises ``PromptError`` with one line naming the file and the
      key for an unreadable file or an entry that breaks the schema.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PromptError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("prompts"), list):
        raise PromptError(f'{path}: expected {{"prompts": [...]}}')
    space = document.get("space", "voxel")
    if space not in SPACES:
        raise PromptError(f"{path}: space must be one of {', '.join(SPACES)}, got {space!r}")
    unknown = sorted(set(document) - {"space", "prompts"})
    if unknown:
        raise PromptError(f"{path}: unknown key {unknown[0]!r} (known: prompts, space)")
    specs = [_spec(e, i, space, str(path)) for i, e in enumerate(document["prompts"])]
    for spec in specs:
        if spec.input is not None and not any(spec.matches(item) for item in inputs):
            raise PromptError(f"{spec.where}.input: {spec.input!r} is none of the inputs")
    return specs


def _to_voxels(spec: PromptSpec, coords: np.ndarray, scan: Scan) -> np.ndarray:
    """(n, 3) world mm -> (n, 3) continuous (x, y, k) voxel indices of the scan."""
    ras = coords @ _LPS.T if spec.space == "lps" else coords
    homogeneous = np.concatenate([ras, np.ones((len(ras), 1))], axis=1)
    return (homogeneous @ np.linalg.inv(scan.affine).T)[:, :3]


def _outside(spec: PromptSpec, scan: Scan, what: str) -> PromptError:
    k, h, w = scan.planes.shape[:3]
    extent = f"x 0..{w - 1}, y 0..{h - 1}" + (f", slice 0..{k - 1}" if scan.is_volume else "")
    return PromptError(f"{spec.where}: {what} is outside {scan.source.path} ({extent})")


def resolve(spec: PromptSpec, scan: Scan) -> Prompt:
    """The prompt on its plane of ``scan``.

    Raises ``PromptError`` naming the prompt and the input when a corner, point or slice is
    outside the image, world coordinates are given for a 2D image, a volume prompt has no slice,
    or a world prompt's corners and points are not on one slice.
    """
    depth, height, width = scan.planes.shape[:3]
    dim = 2 if spec.space == "voxel" else 3
    corners = np.array(spec.box or (), dtype=np.float64).reshape(-1, dim)
    points = np.array([p[:-1] for p in spec.points], dtype=np.float64).reshape(-1, dim)
    labels = np.array([int(p[-1]) for p in spec.points], dtype=np.int64)
    if spec.space == "voxel":
        if scan.is_volume and spec.slice is None:
            raise PromptError(f"{spec.where}.slice: a voxel prompt on a volume needs its slice")
        if not scan.is_volume and spec.slice not in (None, 0):
            raise PromptError(f"{spec.where}.slice: {scan.source.path} is a 2D image")
        k = 0 if spec.slice is None else spec.slice
        tolerance = 0.0
    else:
        if scan.affine is None:
            raise PromptError(
                f"{spec.where}.space: {spec.space} needs a volume with an affine; "
                f"{scan.source.path} is a 2D image"
            )
        voxels = _to_voxels(spec, np.concatenate([corners, points]), scan)
        ks = voxels[:, 2]
        k = int(np.rint(ks.mean()))
        if np.abs(ks - k).max() > 0.5 + 1e-6:
            found = ", ".join(f"{v:.2f}" for v in ks)
            raise PromptError(
                f"{spec.where}: its corners and points are not on one slice (k {found})"
            )
        corners, points = voxels[: len(corners), :2], voxels[len(corners) :, :2]
        tolerance = 0.5  # world positions anywhere inside the border voxels
    if not 0 <= k < depth:
        raise _outside(spec, scan, f"slice {k}")
    for what, xy in (("box corner", corners), ("point", points)):
        for x, y in xy:
            if not (
                -tolerance <= x <= width - 1 + tolerance
                and -tolerance <= y <= height - 1 + tolerance
            ):
                raise _outside(spec, scan, f"{what} ({x:.1f}, {y:.1f})")
    # world positions in the outer half of a border voxel belong to that voxel
    corners = np.clip(corners, 0.0, [width - 1, height - 1])
    points = np.clip(points, 0.0, [width - 1, height - 1])
    box = None
    if spec.box is not None:
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        box = (float(lo[0]), float(lo[1]), float(hi[0]) + 1.0, float(hi[1]) + 1.0)
    return Prompt(spec.id, k, box, points.astype(np.float64), labels)
