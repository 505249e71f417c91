"""Reader of DICOM series, one case per folder.

Layout::

    ROOT/<case>/...            the slices of one series: ``*.dcm`` files or files without an
                               extension, in any sub-folder, any file names and order
    ROOT/<case>/label.nii.gz   optional label map (``label.nii`` too) on the series' voxel grid
                               (compared through the affines, so any NIfTI axis order works)
    ROOT/<case>/*.dcm          or a DICOM-SEG file (Modality SEG) among the slices
    ROOT/classes.json          optional {"1": "liver", ...}: names of label ids

Unit id = case id = the case folder's name. ``list_units`` only lists file names.

Loading a case:

* every candidate file is read with pydicom; an unreadable or truncated file rejects the case
  (``RejectedInput`` naming the file). Files of Modality SEG are label sources; files without
  pixel data are skipped (listed in ``rejections``). When several series are present the one
  with the most slices is used and the others are listed in ``rejections``, each naming every
  series (UID, description, number, files); series of equal size reject the case, naming them.
* slices are sorted by ImagePositionPatient projected on the slice normal (row x column
  direction of ImageOrientationPatient). Differing orientation or size, two slices at the same
  position, or a gap wider than 1.5x the median slice distance (a missing slice) reject the case.
* intensities: stored values * RescaleSlope + RescaleIntercept, per slice, as float32 (HU for
  CT). Modality from the Modality tag ("CT" -> "ct", "MR" -> "mr"); ``cfg.modality`` overrides.
* spacing: PixelSpacing (row, column) and the median slice distance (SliceThickness for a
  single slice). The volume is built in the patient frame (LPS -> RAS) and reoriented to the
  closest canonical (Z, Y, X) like the NIfTI reader: the same scan read from DICOM or from its
  NIfTI conversion gives the same array.
* label.nii.gz: reoriented the same way; its shape must equal the image's and its affine agree
  within 0.05 mm, else ``RejectedInput``.
* DICOM-SEG (used when there is no label.nii.gz): BINARY or FRACTIONAL (> half of
  MaximumFractionalValue) segmentations, one segment per frame, located by each frame's
  ReferencedSegmentNumber and ImagePositionPatient (matched to the nearest slice within half a
  slice distance); the SEG's orientation and size must match the series. Segments are painted in
  increasing segment number, so on overlap the higher number wins. Class names from
  SegmentLabel. Multi-frame image series (enhanced CT/MR) are not supported.
* class names: ``classes.json`` when present (ids it does not list reject the case), else the
  SEG segment labels, else ``label_<id>``.

``read_series(folder)`` reads one series folder the same way without reorienting it (the
(column, row, slice) grid and its affine, as stored): what ``samadapt predict`` reads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from sharding.config import ShardingConfig
from sharding.readers.common import (
    canonical_zyx,
    integer_label,
    modality_name,
    read_class_names,
)
from sharding.records import RejectedInput, Unit, Volume

__all__ = ["DicomReader", "DicomSeries", "read_series", "series_files"]

log = logging.getLogger(__name__)

_LABEL_NAMES = ("label.nii.gz", "label.nii")
_SEG = "SEG"
_LABEL_ATOL = 0.05


def _is_candidate(name: str) -> bool:
    if name.startswith(".") or name.upper() == "DICOMDIR" or name in _LABEL_NAMES:
        return False
    suffix = os.path.splitext(name)[1].lower()
    return suffix in ("", ".dcm")


class _Series:
    """The sorted slices of one series and their geometry."""

    def __init__(self, datasets: list[tuple[Path, pydicom.Dataset]], case_dir: Path):
        first_path, first = datasets[0]
        self.iop = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
        self.row_dir, self.col_dir = self.iop[:3], self.iop[3:]
        self.normal = np.cross(self.row_dir, self.col_dir)
        self.rows, self.cols = int(first.Rows), int(first.Columns)
        self.pixel_spacing = tuple(float(v) for v in first.PixelSpacing)  # (row, column)
        for path, ds in datasets[1:]:
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            if not np.allclose(iop, self.iop, atol=1e-4):
                raise RejectedInput(str(path), f"orientation differs from {first_path.name}")
            if (int(ds.Rows), int(ds.Columns)) != (self.rows, self.cols):
                raise RejectedInput(str(path), f"slice size differs from {first_path.name}")
        keyed = [
            (float(np.dot(_ipp(ds, path), self.normal)), str(path), path, ds)
            for path, ds in datasets
        ]
        keyed.sort(key=lambda t: (t[0], t[1]))
        self.positions = np.array([k[0] for k in keyed])
        self.slices = [(k[2], k[3]) for k in keyed]
        if len(keyed) > 1:
            gaps = np.diff(self.positions)
            median = float(np.median(gaps))
            dup = np.flatnonzero(gaps < 1e-3 * max(median, 1e-3))
            if dup.size:
                a, b = keyed[dup[0]][2], keyed[dup[0] + 1][2]
                raise RejectedInput(str(b), f"same slice position as {a.name}")
            wide = np.flatnonzero(gaps > 1.5 * median)
            if wide.size:
                i = int(wide[0])
                raise RejectedInput(
                    str(case_dir),
                    f"slice missing between positions {self.positions[i]:.3f} and "
                    f"{self.positions[i + 1]:.3f} mm (gap {gaps[i]:.3f} mm, median {median:.3f})",
                )
            self.slice_distance = median
            step = (_ipp(keyed[-1][3], keyed[-1][2]) - _ipp(keyed[0][3], keyed[0][2])) / (
                len(keyed) - 1
            )
        else:
            thickness = float(first.get("SliceThickness", 0) or 0) or 1.0
            self.slice_distance = thickness
            step = self.normal * thickness
        origin = _ipp(keyed[0][3], keyed[0][2])
        lps = np.eye(4)
        lps[:3, 0] = self.row_dir * self.pixel_spacing[1]  # column index moves along the row
        lps[:3, 1] = self.col_dir * self.pixel_spacing[0]  # row index moves down the column
        lps[:3, 2] = step
        lps[:3, 3] = origin
        self.affine_crk = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
        """4x4 (column, row, slice) index -> RAS mm."""

    def slice_of(self, ipp: np.ndarray) -> int | None:
        """Index of the slice at patient position ``ipp``, or None when no slice is there."""
        pos = float(np.dot(ipp, self.normal))
        k = int(np.argmin(np.abs(self.positions - pos)))
        if abs(self.positions[k] - pos) > 0.5 * self.slice_distance:
            return None
        _, ds = self.slices[k]
        offset = ipp - np.array([float(v) for v in ds.ImagePositionPatient])
        in_plane = offset - np.dot(offset, self.normal) * self.normal
        if np.linalg.norm(in_plane) > 0.5 * min(self.pixel_spacing):
            return None
        return k

    def pixels(self) -> np.ndarray:
        """(K, rows, cols) float32: stored values * RescaleSlope + RescaleIntercept."""
        out = np.empty((len(self.slices), self.rows, self.cols), dtype=np.float32)
        for k, (path, ds) in enumerate(self.slices):
            try:
                arr = ds.pixel_array
            except Exception as exc:
                raise RejectedInput(str(path), f"pixel data unreadable ({exc})") from None
            if arr.shape != (self.rows, self.cols):
                raise RejectedInput(str(path), f"pixel array shape {arr.shape} is not one frame")
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
            out[k] = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        return out


def _ipp(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    try:
        return np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        raise RejectedInput(str(path), "no valid ImagePositionPatient") from None


def series_files(case_dir: Path) -> list[str]:
    """The candidate DICOM files of a case folder (any depth, hidden folders skipped), sorted;
    label files are not among them."""
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(case_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in filenames if _is_candidate(f))
    return sorted(files)


@dataclass
class DicomSeries:
    """One series as stored, before any reorientation (what ``samadapt predict`` reads)."""

    pixels: np.ndarray
    """(K, rows, cols) float32, rescaled (HU for CT), slices sorted along the slice normal."""
    affine: np.ndarray
    """4x4 (column, row, slice) index -> RAS mm, from ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing (the reader's ``affine_crk``)."""
    modality: str
    """The Modality tag, normalised ("ct", "mr", ...; "" when absent)."""
    rejections: list[dict] = field(default_factory=list)


def read_series(case_dir: str | Path) -> DicomSeries:
    """Read the series of one folder as ``DicomReader.load`` reads a case, without the
    canonical reorientation and without labels.

    Arguments:
      case_dir: a folder holding one series (other series and DICOM-SEG files are left out).

    Returns:
      DicomSeries. Raises ``RejectedInput`` naming the folder or file for no files, unreadable
      files, or a series whose geometry does not hold together.
    """
    case_dir = Path(case_dir)
    files = [Path(p) for p in series_files(case_dir)]
    if not files:
        raise RejectedInput(str(case_dir), "no DICOM files in the folder")
    geo, _, rejections = _scan(files, case_dir, case_dir.name)
    modality = modality_name(str(geo.slices[0][1].get("Modality", "")))
    return DicomSeries(geo.pixels(), geo.affine_crk, modality, rejections)


class DicomReader:
    """``Reader`` of one-series-per-folder DICOM corpora (see the module docstring)."""

    def __init__(self, root: Path, *, cfg: ShardingConfig):
        self.root = Path(root)
        self.cfg = cfg
        self.dataset = cfg.dataset or self.root.resolve().name
        self.class_names: dict[int, str] | None = read_class_names(self.root)

    def list_units(self) -> list[Unit]:
        """One unit per case folder (sorted by name); paths = candidate files, then the label."""
        units = []
        for case_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if case_dir.name.startswith("."):
                continue
            files = series_files(case_dir)
            labels = [str(case_dir / n) for n in _LABEL_NAMES if (case_dir / n).is_file()]
            units.append(
                Unit(
                    id=case_dir.name,
                    dataset=self.dataset,
                    case_id=case_dir.name,
                    paths=(*files, *labels[:1]),
                    modality=modality_name(self.cfg.modality),
                )
            )
        if not units:
            raise ValueError(f"{self.root}: no case folders found (DICOM layout ROOT/<case>/)")
        return units

    def load(self, unit: Unit) -> Volume:
        """Read one case folder: sorted, rescaled, canonical (Z, Y, X) volume and its label."""
        case_dir = self.root / unit.id
        label_files = [Path(p) for p in unit.paths if Path(p).name in _LABEL_NAMES]
        files = [Path(p) for p in unit.paths if Path(p).name not in _LABEL_NAMES]
        if not files:
            raise RejectedInput(str(case_dir), "no DICOM files in the case folder")
        geo, segs, rejections = _scan(files, case_dir, unit.id)
        first = geo.slices[0][1]
        modality = modality_name(self.cfg.modality) or modality_name(str(first.get("Modality", "")))
        krc = geo.pixels()
        image, affine, spacing = canonical_zyx(krc.transpose(2, 1, 0), geo.affine_crk)
        label, class_map = None, {}
        if label_files:
            label = self._nifti_label(label_files[0], image.shape, affine)
            if segs:
                log.info("%s: label.nii.gz used, DICOM-SEG ignored", case_dir)
        elif segs:
            if len(segs) > 1:
                rejections.extend(
                    {"unit": unit.id, "path": str(p), "reason": "extra SEG file ignored"}
                    for p, _ in segs[1:]
                )
            lab_krc, class_map = _seg_label(segs[0][0], segs[0][1], geo)
            lab_krc = integer_label(lab_krc, str(segs[0][0]), self._known())
            label, _, _ = canonical_zyx(lab_krc.transpose(2, 1, 0), geo.affine_crk)
        if label is not None:
            ids = [int(i) for i in np.unique(label) if i != 0]
            names = self.class_names or {}
            class_map = {i: names.get(i) or class_map.get(i) or f"label_{i}" for i in ids}
        return Volume(
            image=image,
            label=label,
            spacing=spacing,
            affine=affine,
            class_map=class_map,
            dataset=self.dataset,
            case_id=unit.case_id,
            modality=modality or "unknown",
            source=str(case_dir),
            rejections=rejections,
        )

    def _known(self) -> set[int] | None:
        return None if self.class_names is None else set(self.class_names)

    def _nifti_label(self, path: Path, shape: tuple, affine: np.ndarray) -> np.ndarray:
        try:
            img = nib.load(str(path))
            raw = np.asanyarray(img.dataobj)
        except Exception as exc:
            reason = f"unreadable label NIfTI ({type(exc).__name__}: {exc})"
            raise RejectedInput(str(path), reason) from None
        if raw.ndim != 3:
            raise RejectedInput(str(path), f"label must be 3D, got shape {raw.shape}")
        clean = integer_label(raw, str(path), self._known())
        label, lab_affine, _ = canonical_zyx(clean, img.affine)
        if label.shape != tuple(shape):
            raise RejectedInput(
                str(path), f"label shape {label.shape} != image shape {tuple(shape)} (Z, Y, X)"
            )
        if not np.allclose(lab_affine, affine, atol=_LABEL_ATOL):
            raise RejectedInput(str(path), "label grid (affine) differs from the DICOM series")
        return label


def _scan(
    files: list[Path], case_dir: Path, unit_id: str
) -> tuple[_Series, list[tuple[Path, pydicom.Dataset]], list[dict]]:
    """Read every file of a case folder: the series with the most slices (sorted, checked), the
    DICOM-SEG files, and what was left out (other series, files without pixel data)."""
    rejections: list[dict] = []
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    segs: list[tuple[Path, pydicom.Dataset]] = []
    for path in files:
        ds = _read(path)
        if str(ds.get("Modality", "")).upper() == _SEG:
            segs.append((path, ds))
        elif "PixelData" not in ds:
            rejections.append({"unit": unit_id, "path": str(path), "reason": "no pixel data"})
        elif int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise RejectedInput(str(path), "multi-frame image files are not supported")
        else:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        raise RejectedInput(str(case_dir), "no image slices among the DICOM files")
    ranked = sorted(series.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    if len(ranked) > 1:
        listed = "; ".join(_describe(uid, items) for uid, items in ranked)
        mixed = f"the folder mixes {len(ranked)} series ({listed})"
        if len(ranked[0][1]) == len(ranked[1][1]):
            raise RejectedInput(
                str(case_dir), f"{mixed}, none larger: put one series per case folder"
            )
        for uid, items in ranked[1:]:
            reason = f"{mixed}: the largest is used, other series {uid} ignored"
            rejections.append({"unit": unit_id, "path": str(items[0][0]), "reason": reason})
    try:
        geo = _Series(ranked[0][1], case_dir)
    except RejectedInput as rej:
        # one SeriesInstanceUID over files of several scans: say so, not just the geometry
        raise RejectedInput(rej.path, rej.reason + _mixed_within(ranked[0][1])) from None
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        reason = f"missing or invalid geometry tags ({type(exc).__name__}: {exc})"
        raise RejectedInput(str(case_dir), reason + _mixed_within(ranked[0][1])) from None
    return geo, segs, rejections


def _describe(uid: str, items: list[tuple[Path, pydicom.Dataset]]) -> str:
    """``UID 'description' #number (N files)`` of one series."""
    first = items[0][1]
    text = str(first.get("SeriesDescription", "") or "").strip() or "no description"
    number = first.get("SeriesNumber", "")
    return f"{uid or 'no SeriesInstanceUID'} '{text}'{f' #{number}' if number else ''} " + (
        f"({len(items)} files)"
    )


_SCAN_TAGS = ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "SeriesDescription")


def _mixed_within(items: list[tuple[Path, pydicom.Dataset]]) -> str:
    """``"; the files mix N scans under one SeriesInstanceUID (...)"`` when the files of one
    series disagree on the tags that tell scans apart, else ``""``."""
    groups: dict[tuple[str, ...], int] = {}
    for _, ds in items:
        key = tuple(str(ds.get(tag, "")) for tag in _SCAN_TAGS)
        groups[key] = groups.get(key, 0) + 1
    if len(groups) < 2:
        return ""
    parts = [
        ", ".join(f"{tag} {value or '-'}" for tag, value in zip(_SCAN_TAGS, key, strict=True))
        + f": {n} files"
        for key, n in sorted(groups.items())
    ]
    return f"; the files mix {len(groups)} scans under one SeriesInstanceUID ({'; '.join(parts)})"


def _read(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(str(path))
        if "PixelData" in ds:
            _ = ds.PixelData  # force the (possibly deferred) element to be read
    except FileNotFoundError:
        raise RejectedInput(str(path), "file does not exist") from None
    except Exception as exc:
        reason = f"unreadable DICOM file ({type(exc).__name__}: {exc})"
        raise RejectedInput(str(path), reason) from None
    return ds


def _seg_label(path: Path, seg: pydicom.Dataset, geo: _Series) -> tuple[np.ndarray, dict[int, str]]:
    """Paint a DICOM-SEG's frames into a (K, rows, cols) label map on the series' grid."""
    try:
        frames = seg.pixel_array
    except Exception as exc:
        raise RejectedInput(str(path), f"SEG pixel data unreadable ({exc})") from None
    if frames.ndim == 2:
        frames = frames[None]
    if frames.shape[1:] != (geo.rows, geo.cols):
        raise RejectedInput(
            str(path), f"SEG frame size {frames.shape[1:]} != image size {(geo.rows, geo.cols)}"
        )
    names = {
        int(s.SegmentNumber): str(s.get("SegmentLabel", "")) or f"label_{int(s.SegmentNumber)}"
        for s in seg.get("SegmentSequence", [])
    }
    if str(seg.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        threshold = float(seg.get("MaximumFractionalValue", 255)) / 2.0
    else:
        threshold = 0.0
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != frames.shape[0]:
        raise RejectedInput(
            str(path), f"{len(per_frame)} per-frame groups for {frames.shape[0]} frames"
        )
    iop = _group_value(shared, None, "PlaneOrientationSequence", "ImageOrientationPatient")
    if iop is not None and not np.allclose([float(v) for v in iop], geo.iop, atol=1e-4):
        raise RejectedInput(str(path), "SEG orientation differs from the image series")
    painted: list[tuple[int, int, int]] = []  # (segment, frame, slice)
    for i, group in enumerate(per_frame):
        number = _group_value(
            group, shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber"
        )
        ipp = _group_value(group, shared, "PlanePositionSequence", "ImagePositionPatient")
        if number is None or ipp is None:
            raise RejectedInput(
                str(path), f"frame {i}: no ReferencedSegmentNumber / ImagePositionPatient"
            )
        k = geo.slice_of(np.array([float(v) for v in ipp]))
        if k is None:
            raise RejectedInput(str(path), f"frame {i}: position {list(ipp)} is on no slice")
        painted.append((int(number), i, k))
    label = np.zeros((len(geo.slices), geo.rows, geo.cols), dtype=np.int32)
    for number, i, k in sorted(painted):
        label[k][frames[i] > threshold] = number
    return label, names


def _group_value(group, shared, sequence: str, keyword: str):
    """``group.<sequence>[0].<keyword>``, falling back to the shared functional groups."""
    for source in (group, shared):
        if source is None or sequence not in source:
            continue
        items = source[sequence].value
        if items and keyword in items[0]:
            return items[0][keyword].value
    return None
