"""Helpers the readers share: image files, slice numbering, canonical orientation, names."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from nibabel import orientations

from sharding.intensity import percentile_to_uint8
from sharding.records import RejectedInput

__all__ = [
    "IMAGE_SUFFIXES",
    "assign_slice_indices",
    "canonical_zyx",
    "decode_image_file",
    "integer_label",
    "modality_name",
    "present_ids",
    "split_trailing_number",
    "to_uint8_2d",
    "to_zyx",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MR_NAMES = {"mr", "mri", "t1", "t2", "t1w", "t2w", "t1gd", "t1ce", "flair", "adc", "dwi", "pd"}


def modality_name(raw: str) -> str:
    """Normalise a modality string: "CT" -> "ct", MR sequence names ("MRI", "T2", "FLAIR",
    "ADC"...) -> "mr", anything else lower-cased and stripped ("" stays "")."""
    name = raw.strip().lower()
    if name in _MR_NAMES:
        return "mr"
    return name


def _check_complete(path: str | Path, data: bytes) -> None:
    """Reject files whose end is cut off: PNG must end with IEND, JPEG with EOI."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".png":
        if not data.startswith(_PNG_SIGNATURE):
            raise RejectedInput(str(path), "not a PNG file (bad signature)")
        if b"IEND" not in data[-32:]:
            raise RejectedInput(str(path), "truncated PNG (no IEND chunk at the end)")
    elif suffix in (".jpg", ".jpeg"):
        if not data.startswith(b"\xff\xd8"):
            raise RejectedInput(str(path), "not a JPEG file (bad signature)")
        if b"\xff\xd9" not in data[-32:]:
            raise RejectedInput(str(path), "truncated JPEG (no end-of-image marker)")


def decode_image_file(path: str | Path, *, what: str = "") -> np.ndarray:
    """Read an image file as stored (any depth, channels as cv2 returns them, BGR order).

    Raises ``RejectedInput`` naming the file when it is missing ("``what`` file does not exist"),
    truncated or not decodable.
    """
    try:
        with open(path, "rb") as file:  # plain open: pathlib costs ~25 us a file, per mask
            data = file.read()
    except FileNotFoundError:
        raise RejectedInput(str(path), f"{what} file does not exist".lstrip()) from None
    except OSError as exc:
        raise RejectedInput(str(path), f"cannot read file: {exc}") from None
    if not data:
        raise RejectedInput(str(path), "empty file")
    _check_complete(path, data)
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise RejectedInput(str(path), "not a decodable image (corrupt or unsupported)")
    return arr


def to_uint8_2d(arr: np.ndarray, *, percentiles: tuple[float, float]) -> np.ndarray:
    """A decoded 2D image -> uint8 (H, W) or RGB (H, W, 3).

    BGR(A) becomes RGB (alpha dropped); a single-channel (H, W, 1) becomes (H, W); any depth other
    than uint8 (16-bit PNG, float TIFF) is mapped with the percentile rule of
    ``sharding.intensity`` over all channels. A float image with NaN or Inf pixels is a
    ``ValueError`` (as NaN volumes are rejected: an all-NaN image came out all black).
    """
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"image has {bad} NaN/Inf pixels (of {arr.size})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        if arr.shape[2] != 3:
            raise ValueError(f"unsupported channel count {arr.shape[2]}")
        arr = arr[:, :, ::-1]
    if arr.dtype != np.uint8:
        arr = percentile_to_uint8(arr, percentiles=percentiles)
    return np.ascontiguousarray(arr)


def assign_slice_indices(entries: Iterable[tuple[str, str, str, int]]) -> dict[str, int]:
    """Slice indices for 2D images that are unique within each (dataset, case).

    Arguments:
      entries: ``(unit_id, dataset, case_id, parsed_index)`` per image; ``parsed_index`` is the
        slice number read from the file name, or -1 when the name has none.

    Returns:
      ``unit_id -> slice_index``. Within one (dataset, case) group: when every image has a parsed
      number and no number repeats, the parsed numbers are kept; a group of a single image without
      a number gets -1; otherwise every image of the group gets its rank (0, 1, ...) in the order
      of unit ids. Sample keys ``dataset/case/slice`` are thus never shared.
    """
    groups: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    for unit_id, dataset, case_id, parsed in entries:
        groups[(dataset, case_id)].append((unit_id, parsed))
    out: dict[str, int] = {}
    for members in groups.values():
        members.sort()
        numbers = [p for _, p in members]
        if len(members) == 1 and numbers[0] < 0:
            out[members[0][0]] = -1
        elif min(numbers) >= 0 and len(set(numbers)) == len(numbers):
            out.update(members)
        else:
            out.update((uid, rank) for rank, (uid, _) in enumerate(members))
    return out


# (z, y, x) index -> (x, y, z) index: the column permutation applied to an (x, y, z) affine
_ZYX_TO_XYZ = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def canonical_zyx(
    data_xyz: np.ndarray, affine_xyz: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Reorient an (X, Y, Z) array to the closest canonical (RAS+) grid and return it as (Z, Y, X).

    The same axis flips and swaps as ``nibabel.as_closest_canonical`` (no resampling), done on
    the array directly so any dtype works.

    Arguments:
      data_xyz: 3D array indexed (i, j, k) as the affine says.
      affine_xyz: 4x4 voxel (i, j, k) -> world RAS mm.

    Returns:
      ``(data_zyx, affine_zyx, spacing_zyx)``: the array indexed (z, y, x) with x towards Right,
      y towards Anterior and z towards Superior (closest axes); the 4x4 affine that maps
      (z, y, x, 1) -> RAS mm; the voxel size (z, y, x) in mm.
    """
    affine = np.asarray(affine_xyz, dtype=np.float64)
    ornt = orientations.io_orientation(affine)
    data = orientations.apply_orientation(data_xyz, ornt)
    affine = affine @ orientations.inv_ornt_aff(ornt, data_xyz.shape)
    return to_zyx(data, affine)


def to_zyx(
    data_xyz: np.ndarray, affine_xyz: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """An (X, Y, Z) array and its affine -> ``(data_zyx, affine_zyx, spacing_zyx)`` (no flips)."""
    affine = np.asarray(affine_xyz, dtype=np.float64)
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = (float(sizes[2]), float(sizes[1]), float(sizes[0]))
    data = np.ascontiguousarray(np.asarray(data_xyz).transpose(2, 1, 0))
    return data, affine @ _ZYX_TO_XYZ, spacing


_TRAILING_NUMBER = re.compile(r"^(.*)_(\d+)$")


def split_trailing_number(name: str) -> tuple[str, int]:
    """``"patient7_012"`` -> ``("patient7", 12)``; ``"scan"`` -> ``("scan", -1)``."""
    match = _TRAILING_NUMBER.match(name)
    if match and match.group(1):
        return match.group(1), int(match.group(2))
    return name, -1


def integer_label(raw: np.ndarray, path: str, known: set[int] | None) -> np.ndarray:
    """Check and convert a label array read from a file.

    Arguments:
      raw: the label voxels as stored (any numeric dtype, any shape).
      path: the file, for error messages.
      known: label ids allowed besides 0, or None to allow any.

    Returns:
      the same voxels as uint8 (int32 when an id is outside 0..255). Raises ``RejectedInput`` for
      NaN/Inf, non-integer values (off by more than 1e-3) and ids not in ``known``.
    """
    if np.issubdtype(raw.dtype, np.floating):
        if not np.isfinite(raw).all():
            raise RejectedInput(path, "label has NaN/Inf values")
        rounded = np.rint(raw)
        if raw.size and np.abs(raw - rounded).max() > 1e-3:
            raise RejectedInput(path, "label has non-integer values")
        raw = rounded
    elif not np.issubdtype(raw.dtype, np.integer) and raw.dtype != np.bool_:
        raise RejectedInput(path, f"label has unsupported data type {raw.dtype}")
    present = present_ids(raw)
    if known is not None:
        unknown = sorted(set(present) - set(known) - {0})
        if unknown:
            raise RejectedInput(
                path, f"label ids {unknown} are not among the known labels {sorted(known)}"
            )
    small = not present or (min(present) >= 0 and max(present) <= 255)
    return raw.astype(np.uint8 if small else np.int32, copy=False)


def present_ids(label: np.ndarray) -> list[int]:
    """Sorted distinct values of an integer (or integral float) label array."""
    if label.dtype in (np.uint8, np.bool_):
        counts = np.bincount(label.reshape(-1).astype(np.uint8, copy=False), minlength=2)
        return [int(i) for i in np.flatnonzero(counts)]
    return [int(i) for i in np.unique(label)]


def read_class_names(root: Path) -> dict[int, str] | None:
    """``ROOT/classes.json`` ({"1": "liver", ...}) as label id -> name without 0; None if absent.

    Raises ``ValueError`` naming the file when it is not such a mapping.
    """
    path = Path(root) / "classes.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return {int(k): str(v) for k, v in raw.items() if int(k) != 0}
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: must map label ids to names ({exc})") from None
