"""Synthetic DICOM corpora: one CT series per case folder, with a NIfTI or DICOM-SEG label.

The truth is ``synthetic_volume`` (canonical (Z, Y, X)); the files store it as a DICOM converter
and a scanner would: axial LPS slices, rescaled uint16 pixels, files and instance numbers in
shuffled order (only ImagePositionPatient gives the slice order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)

from sharding.synthetic_truth import SPACING, VOLUME_LABELS, synthetic_volume, volume_affine

__all__ = ["write_dicom"]


def write_dicom(
    root: str | Path,
    *,
    n_cases: int,
    shape: tuple[int, int, int] = (6, 40, 48),
    seed: int = 0,
    label: str = "nifti",
) -> Path:
    """Write one CT series per case folder ``ROOT/case_NNN/`` with pydicom.

    Truth: ``synthetic_volume(case, shape, "CT", seed, quantum=2)`` (canonical (Z, Y, X)), stored
    as axial LPS slices (rows and columns flipped relative to the truth) of uint16 values with
    RescaleSlope 1 / RescaleIntercept -1024 (even cases) or 2 / -2048 (odd cases). Files are named
    in shuffled order (``.dcm`` for even cases, no extension for odd), with InstanceNumber shuffled
    too, so only ImagePositionPatient gives the order.

    Arguments:
      label: "nifti" (``label.nii.gz`` in the series' (column, row, slice) grid, names in
        ``ROOT/classes.json``), "seg" (a binary
        DICOM-SEG ``seg.dcm``, one frame per segment and slice where it is present) or "none".

    Returns:
      ``root`` as a Path.
    """
    if label not in ("nifti", "seg", "none"):
        raise ValueError(f"unknown label kind {label!r} (known: nifti, seg, none)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for case in range(n_cases):
        image, lab = synthetic_volume(case, shape, "CT", seed, quantum=2)
        _write_dicom_case(
            root / f"case_{case:03d}",
            image=image,
            label=lab,
            affine=volume_affine(case, shape),
            case=case,
            seed=seed,
            label_kind=label,
        )
    if label == "nifti":
        table = {str(i): n for i, n in VOLUME_LABELS.items()}
        (root / "classes.json").write_text(json.dumps(table, indent=1))
    return root


def _ds(value: float) -> str:
    """A DICOM DS string (<= 16 characters) of ``value``."""
    text = f"{round(float(value), 6):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _dicom_base(uid_base: list, sop_class: str, instance: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*uid_base, "study"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[*uid_base, "frame"])
    ds.PatientID = str(uid_base[-1])
    ds.PatientName = "Synthetic^Case"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    return ds


@dataclass
class _Series:
    """One case's series as stored: LPS pixel order, its affine, and the UIDs' entropy."""

    folder: Path
    hu: np.ndarray
    """(K, R, C) HU in DICOM pixel order."""
    label: np.ndarray
    """(K, R, C) label ids in DICOM pixel order."""
    affine_krc: np.ndarray
    """(slice, row, column, 1) -> RAS mm."""
    uid_base: list[str]

    def ipp(self, k: int) -> list[str]:
        """ImagePositionPatient (LPS mm) of slice ``k``'s first pixel."""
        ras = self.affine_krc @ np.array([k, 0.0, 0.0, 1.0])
        return [_ds(-ras[0]), _ds(-ras[1]), _ds(ras[2])]


def _write_dicom_case(
    folder: Path,
    *,
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    case: int,
    seed: int,
    label_kind: str,
) -> None:
    """Write one axial LPS CT series (and its label) whose canonical view is ``image``."""
    folder.mkdir(parents=True, exist_ok=True)
    _, height, width = image.shape
    affine_krc = affine.copy()
    affine_krc[:, 1], affine_krc[:, 2] = -affine[:, 1], -affine[:, 2]
    affine_krc[:, 3] = affine @ np.array([0.0, height - 1, width - 1, 1.0])
    # DICOM pixel (k, r, c) is truth (k, H-1-r, W-1-c): rows run posterior, columns left (LPS)
    series = _Series(
        folder=folder,
        hu=image[:, ::-1, ::-1],
        label=label[:, ::-1, ::-1],
        affine_krc=affine_krc,
        uid_base=[str(seed), f"case_{case:03d}"],
    )
    _write_ct_slices(series, case=case, seed=seed)
    if label_kind == "nifti":
        # the series' own (column, row, slice) grid, RAS affine: what a DICOM converter writes
        affine_crk = affine_krc[:, [2, 1, 0, 3]]
        data = np.ascontiguousarray(series.label.transpose(2, 1, 0))
        nib.save(nib.Nifti1Image(data, affine_crk), str(folder / "label.nii.gz"))
    elif label_kind == "seg":
        _write_seg(series)


def _write_ct_slices(series: _Series, *, case: int, seed: int) -> None:
    """One CT file per slice, named and numbered in a shuffled order."""
    depth, height, width = series.hu.shape
    sz, sy, sx = SPACING
    slope, intercept = (1.0, -1024.0) if case % 2 == 0 else (2.0, -2048.0)
    uid_base = series.uid_base
    series_uid = generate_uid(entropy_srcs=[*uid_base, "series"])
    order = np.random.default_rng([seed, case, 7]).permutation(depth)
    suffix = ".dcm" if case % 2 == 0 else ""
    for k in range(depth):
        instance = generate_uid(entropy_srcs=[*uid_base, "slice", str(k)])
        ds = _dicom_base(uid_base, CTImageStorage, instance)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = series.ipp(k)
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [_ds(sy), _ds(sx)]
        ds.SliceThickness = _ds(sz)
        ds.Rows, ds.Columns = height, width
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        values = np.rint((series.hu[k] - intercept) / slope).astype("<u2")
        ds.PixelData = values.tobytes()
        path = series.folder / f"IM{int(order[k]):04d}{suffix}"
        ds.save_as(str(path), enforce_file_format=True)


def _seg_frames(series: _Series) -> tuple[list[np.ndarray], list[Dataset]]:
    """The frames of a binary DICOM-SEG (one per segment and slice where it is present) and
    their per-frame functional groups."""
    frames, groups = [], []
    for number in sorted(VOLUME_LABELS):
        for k in range(series.label.shape[0]):
            frame = series.label[k] == number
            if not frame.any():
                continue
            frames.append(frame)
            group = Dataset()
            ident = Dataset()
            ident.ReferencedSegmentNumber = number
            group.SegmentIdentificationSequence = Sequence([ident])
            pos = Dataset()
            pos.ImagePositionPatient = series.ipp(k)
            group.PlanePositionSequence = Sequence([pos])
            groups.append(group)
    return frames, groups


def _write_seg(series: _Series) -> None:
    """``seg.dcm``: the label as a binary DICOM-SEG on the series' frame of reference."""
    _, height, width = series.label.shape
    sz, sy, sx = SPACING
    frames, groups = _seg_frames(series)
    uid_base = series.uid_base
    instance = generate_uid(entropy_srcs=[*uid_base, "seg"])
    seg = _dicom_base(uid_base, SegmentationStorage, instance)
    seg.Modality = "SEG"
    seg.SeriesInstanceUID = generate_uid(entropy_srcs=[*uid_base, "seg-series"])
    seg.SegmentationType = "BINARY"
    seg.Rows, seg.Columns = height, width
    seg.BitsAllocated, seg.BitsStored, seg.HighBit = 1, 1, 0
    seg.NumberOfFrames = len(frames)
    segments = []
    for number, name in sorted(VOLUME_LABELS.items()):
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = name
        item.SegmentAlgorithmType = "MANUAL"
        segments.append(item)
    seg.SegmentSequence = Sequence(segments)
    shared, orient, measures = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    measures.PixelSpacing = [_ds(sy), _ds(sx)]
    measures.SliceThickness = _ds(sz)
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    seg.SharedFunctionalGroupsSequence = Sequence([shared])
    seg.PerFrameFunctionalGroupsSequence = Sequence(groups)
    packed = np.packbits(np.stack(frames).reshape(-1), bitorder="little").tobytes()
    seg.PixelData = packed + (b"\0" if len(packed) % 2 else b"")
    seg.save_as(str(series.folder / "seg.dcm"), enforce_file_format=True)
