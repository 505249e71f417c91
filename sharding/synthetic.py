"""Deterministic synthetic corpora in each input layout, for tests, benchmarks and the quickstart.

Organs are discs, ellipses and rectangles of fixed intensity with noise on a noisy body. The same
arguments always write the same files. ``synthetic_volume`` and ``synthetic_image`` give the
ground truth a reader must return (for volumes: the canonical (Z, Y, X) image and label, which the
writers store in a non-canonical orientation).

``write_corpus`` writes one in a named layout; on the command line (``samadapt/synthetic.py``)::

    python -m samadapt.synthetic --format sa-med2d OUT [--cases N] [--slices K] [--size S]
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
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

__all__ = [
    "ORGANS_2D",
    "VOLUME_LABELS",
    "synthetic_image",
    "synthetic_volume",
    "volume_affine",
    "write_dicom",
    "write_folder",
    "write_nifti",
    "write_sa_med2d",
]

log = logging.getLogger(__name__)

ORGANS_2D = ("aorta", "gallbladder", "kidney_left", "liver", "spleen", "stomach")
"""Class names of the 2D corpora (underscores on purpose: names are parsed from file names)."""
VOLUME_LABELS = {1: "liver", 2: "kidney", 3: "spleen"}
"""Label ids of the 3D corpora."""
_VOLUME_HU = {1: 60, 2: 150, 3: 45}
_VOLUME_MR = {1: 900, 2: 1400, 3: 600}
_SPACING = (2.5, 0.8, 0.75)  # (z, y, x) mm
_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1]


# ------------------------------------------------------------------------------------ 2D truth


def _draw(canvas: np.ndarray, kind: int, cy: int, cx: int, ry: int, rx: int) -> None:
    if kind == 0:
        cv2.circle(canvas, (cx, cy), min(ry, rx), 1, thickness=-1)
    elif kind == 1:
        cv2.ellipse(canvas, (cx, cy), (rx, ry), 0, 0, 360, 1, thickness=-1)
    else:
        cv2.rectangle(canvas, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, thickness=-1)


def synthetic_image(
    rng: np.random.Generator, height: int, width: int, n_masks: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One noisy grey image with ``n_masks`` non-empty organ masks.

    Returns:
      image uint8 (H, W); masks bool (N, H, W) (may overlap); class names (N,), drawn from
      ``ORGANS_2D`` with repetition.
    """
    image = rng.normal(40, 8, size=(height, width))
    masks = np.zeros((n_masks, height, width), dtype=np.uint8)
    names = []
    lo = max(2, min(height, width) // 16)
    hi = max(lo + 1, min(height, width) // 5)
    for i in range(n_masks):
        ry, rx = (int(v) for v in rng.integers(lo, hi, size=2))
        cy = int(rng.integers(ry, max(ry + 1, height - ry)))
        cx = int(rng.integers(rx, max(rx + 1, width - rx)))
        _draw(masks[i], int(rng.integers(0, 3)), cy, cx, ry, rx)
        names.append(ORGANS_2D[int(rng.integers(0, len(ORGANS_2D)))])
        image[masks[i] > 0] = rng.normal(80 + 25 * (i % 6), 6)
    image += rng.normal(0, 4, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), masks.astype(bool), names


def _n_masks(rng: np.random.Generator, masks_per_image: tuple[int, int]) -> int:
    lo, hi = masks_per_image
    return int(rng.integers(lo, hi + 1))


def write_sa_med2d(
    root: str | Path,
    *,
    n_cases: int,
    slices_per_case: int,
    size: int = 512,
    masks_per_image: tuple[int, int] = (2, 5),
    seed: int = 0,
    style: str = "16m",
) -> Path:
    """Write an SA-Med2D corpus: ``images/``, ``masks/``, ``image2label_train.json``.

    Arguments:
      root: output folder (created).
      n_cases, slices_per_case: cases and images per case.
      size: image side.
      masks_per_image: inclusive range of masks per image.
      seed: random seed.
      style: "16m": SA-Med2D-16M names (``ct_00--SynthAbdomen--case_0000--z_0010.png``, masks
        ``<stem>--<class>_<inst>.png``; even cases CT, odd MR; JSON paths relative to ROOT), or
        "demo": SAM-Med2D data_demo names (``synth_0000_10.png``, masks
        ``<stem>_<class>_<inst>.png``; JSON paths relative to ROOT's parent).

    Returns:
      ``root`` as a Path.
    """
    if style not in ("16m", "demo"):
        raise ValueError(f"unknown style {style!r} (known: 16m, demo)")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prefix = f"{root.name}/" if style == "demo" else ""
    mapping: dict[str, list[str]] = {}
    for case in range(n_cases):
        modality = "ct" if case % 2 == 0 else "mr"
        for s in range(slices_per_case):
            number = 10 + 3 * s
            if style == "16m":
                stem = f"{modality}_00--SynthAbdomen--case_{case:04d}--z_{number:04d}"
                sep = "--"
            else:
                stem, sep = f"synth_{case:04d}_{number}", "_"
            image, masks, names = synthetic_image(rng, size, size, _n_masks(rng, masks_per_image))
            cv2.imwrite(str(root / "images" / f"{stem}.png"), image, _PNG)
            counts: dict[str, int] = {}
            mask_keys = []
            for mask, name in zip(masks, names, strict=True):
                inst = counts.get(name, 0)
                counts[name] = inst + 1
                mask_name = f"{stem}{sep}{name}_{inst:03d}.png"
                cv2.imwrite(str(root / "masks" / mask_name), mask.astype(np.uint8) * 255, _PNG)
                mask_keys.append(f"{prefix}masks/{mask_name}")
            mapping[f"{prefix}images/{stem}.png"] = mask_keys
    (root / "image2label_train.json").write_text(json.dumps(mapping, indent=1))
    return root


def write_folder(
    root: str | Path,
    *,
    n_cases: int,
    slices_per_case: int,
    size: tuple[int, int] = (96, 128),
    masks_per_image: tuple[int, int] = (1, 3),
    seed: int = 0,
    ext: str = "png",
    classes: bool = True,
) -> Path:
    """Write a folder corpus: ``images/patient<c>_<sss>.<ext>``, label maps ``masks/*.png`` and
    ``classes.json`` (when ``classes``).

    Label value ``v`` (1..len(ORGANS_2D)) is organ ``ORGANS_2D[v - 1]``; masks are painted in
    order so later organs cover earlier ones. ``ext`` "png" or "tif" (lossless).

    Returns:
      ``root`` as a Path.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    for case in range(n_cases):
        for s in range(slices_per_case):
            name = f"patient{case}_{s:03d}"
            image, masks, names = synthetic_image(
                rng, height, width, _n_masks(rng, masks_per_image)
            )
            labels = np.zeros((height, width), dtype=np.uint8)
            for mask, organ in zip(masks, names, strict=True):
                labels[mask] = ORGANS_2D.index(organ) + 1
            cv2.imwrite(str(root / "images" / f"{name}.{ext}"), image)
            cv2.imwrite(str(root / "masks" / f"{name}.png"), labels, _PNG)
    if classes:
        table = {str(i + 1): n for i, n in enumerate(ORGANS_2D)}
        (root / "classes.json").write_text(json.dumps(table, indent=1))
    return root


# ------------------------------------------------------------------------------------ 3D truth


def synthetic_volume(
    index: int, shape: tuple[int, int, int], modality: str = "CT", seed: int = 0, quantum: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The canonical (Z, Y, X) ground truth of case ``index``.

    A body ellipse (CT ~0-40 HU in -1000 HU air; MR ~300 on 0) holding three ellipsoid organs
    (labels ``VOLUME_LABELS``), with integer-valued noise.

    Returns:
      image float32 (Z, Y, X) of integers that are multiples of ``quantum`` (HU for CT); label
      uint8 (Z, Y, X) with values 0..3 (every label present).
    """
    depth, height, width = shape
    rng = np.random.default_rng([seed, index])
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, depth),
        np.linspace(-1, 1, height),
        np.linspace(-1, 1, width),
        indexing="ij",
    )
    ct = modality.strip().lower() == "ct"
    body = (y / 0.9) ** 2 + (x / 0.95) ** 2 <= 1.0
    image = np.where(body, 20.0 if ct else 300.0, -1000.0 if ct else 0.0)
    label = np.zeros(shape, dtype=np.uint8)
    centres = {1: (-0.2, 0.35), 2: (0.3, -0.4), 3: (-0.35, -0.3)}
    values = _VOLUME_HU if ct else _VOLUME_MR
    for lab, (cy, cx) in centres.items():
        jitter = rng.uniform(-0.08, 0.08, size=2)
        radius = rng.uniform(0.22, 0.3)
        inside = ((y - cy - jitter[0]) ** 2 + (x - cx - jitter[1]) ** 2) / radius**2 + (
            z / 1.2
        ) ** 2 <= 1.0
        label[inside] = lab
        image[inside] = values[lab]
    noise = rng.integers(-20, 21, size=shape) if ct else rng.integers(-60, 61, size=shape)
    image = image + np.where(body, noise, 0)
    if quantum > 1:
        image = quantum * np.floor(image / quantum)
    return image.astype(np.float32), label


def volume_affine(index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The canonical 4x4 affine of case ``index``: (z, y, x, 1) -> RAS mm (axis-aligned)."""
    sz, sy, sx = _SPACING
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0] = sx, sy, sz
    affine[:3, 3] = (-0.5 * shape[2] * sx + index, -0.5 * shape[1] * sy, -40.0 - 5.0 * index)
    affine[3, 3] = 1.0
    return affine


def _stored_lps_like(index: int, data_zyx: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) data flipped in X and Y, with the matching affine (as a DICOM conversion would
    store it): canonicalising gives back ``data_zyx`` and ``volume_affine``."""
    canon = volume_affine(index, shape)
    xyz_affine = canon @ np.array(
        [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
    )
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[2] - 1, shape[1] - 1
    stored = np.ascontiguousarray(data_zyx.transpose(2, 1, 0)[::-1, ::-1, :])
    return stored, xyz_affine @ flip


def write_nifti(
    root: str | Path,
    *,
    n_cases: int,
    shape: tuple[int, int, int] = (8, 48, 48),
    modality: str = "CT",
    seed: int = 0,
    layout: str = "nnunet",
) -> Path:
    """Write a NIfTI corpus of ``n_cases`` cases ``synth_NNN`` (truth: ``synthetic_volume``).

    Arguments:
      root: output folder (created).
      shape: (Z, Y, X) of every case.
      modality: channel 0 name written to dataset.json ("CT", "MRI"...).
      layout: "nnunet" (v2: ``imagesTr/synth_000_0000.nii.gz``, dataset.json with channel_names,
        labels name -> id, file_ending) or "msd" (``imagesTr/synth_000.nii.gz``, dataset.json with
        name, modality, labels id -> name, training list).

    Images are int16 and labels uint8, stored flipped in X and Y with a non-identity affine.

    Returns:
      ``root`` as a Path.
    """
    if layout not in ("nnunet", "msd"):
        raise ValueError(f"unknown layout {layout!r} (known: nnunet, msd)")
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for case in range(n_cases):
        image, label = synthetic_volume(case, shape, modality, seed)
        stem = f"synth_{case:03d}"
        image_name = f"{stem}_0000.nii.gz" if layout == "nnunet" else f"{stem}.nii.gz"
        data, affine = _stored_lps_like(case, image.astype(np.int16), shape)
        nib.save(nib.Nifti1Image(data, affine), str(root / "imagesTr" / image_name))
        data, affine = _stored_lps_like(case, label, shape)
        nib.save(nib.Nifti1Image(data, affine), str(root / "labelsTr" / f"{stem}.nii.gz"))
        training.append(
            {"image": f"./imagesTr/{stem}.nii.gz", "label": f"./labelsTr/{stem}.nii.gz"}
        )
    if layout == "nnunet":
        meta = {
            "channel_names": {"0": modality},
            "labels": {"background": 0, **{n: i for i, n in VOLUME_LABELS.items()}},
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
        }
    else:
        meta = {
            "name": "SynthMSD",
            "modality": {"0": modality},
            "labels": {"0": "background", **{str(i): n for i, n in VOLUME_LABELS.items()}},
            "numTraining": n_cases,
            "training": training,
        }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


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
    depth, height, width = image.shape
    sz, sy, sx = _SPACING
    slope, intercept = (1.0, -1024.0) if case % 2 == 0 else (2.0, -2048.0)
    # DICOM pixel (k, r, c) is truth (k, H-1-r, W-1-c): rows run posterior, columns left (LPS)
    stored_hu = image[:, ::-1, ::-1]
    stored_lab = label[:, ::-1, ::-1]
    affine_krc = affine.copy()
    affine_krc[:, 1], affine_krc[:, 2] = -affine[:, 1], -affine[:, 2]
    affine_krc[:, 3] = affine @ np.array([0.0, height - 1, width - 1, 1.0])

    def ipp(k: int) -> list[str]:
        ras = affine_krc @ np.array([k, 0.0, 0.0, 1.0])
        return [_ds(-ras[0]), _ds(-ras[1]), _ds(ras[2])]

    uid_base = [str(seed), f"case_{case:03d}"]
    series_uid = generate_uid(entropy_srcs=[*uid_base, "series"])
    order = np.random.default_rng([seed, case, 7]).permutation(depth)
    suffix = ".dcm" if case % 2 == 0 else ""
    for k in range(depth):
        instance = generate_uid(entropy_srcs=[*uid_base, "slice", str(k)])
        ds = _dicom_base(uid_base, CTImageStorage, instance)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = ipp(k)
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [_ds(sy), _ds(sx)]
        ds.SliceThickness = _ds(sz)
        ds.Rows, ds.Columns = height, width
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        values = np.rint((stored_hu[k] - intercept) / slope).astype("<u2")
        ds.PixelData = values.tobytes()
        ds.save_as(str(folder / f"IM{int(order[k]):04d}{suffix}"), enforce_file_format=True)
    if label_kind == "nifti":
        # the series' own (column, row, slice) grid, RAS affine: what a DICOM converter writes
        affine_crk = affine_krc[:, [2, 1, 0, 3]]
        data = np.ascontiguousarray(stored_lab.transpose(2, 1, 0))
        nib.save(nib.Nifti1Image(data, affine_crk), str(folder / "label.nii.gz"))
    elif label_kind == "seg":
        _write_dicom_seg(folder / "seg.dcm", label=stored_lab, ipp=ipp, uid_base=uid_base)

def _write_dicom_seg(
    path: Path,
    *,
    label: np.ndarray,
    ipp: Callable[[int], list[str]],
    uid_base: list[str],
) -> None:
    """A binary DICOM SEG of ``label`` (stored (k, row, col) order): one frame per segment and
    slice with foreground, positioned by ``ipp(k)``."""
    depth, height, width = label.shape
    sz, sy, sx = _SPACING
    frames, groups = [], []
    for number in sorted(VOLUME_LABELS):
        for k in range(depth):
            frame = label[k] == number
            if not frame.any():
                continue
            frames.append(frame)
            group = Dataset()
            ident = Dataset()
            ident.ReferencedSegmentNumber = number
            group.SegmentIdentificationSequence = Sequence([ident])
            pos = Dataset()
            pos.ImagePositionPatient = ipp(k)
            group.PlanePositionSequence = Sequence([pos])
            groups.append(group)
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
    seg.save_as(str(path), enforce_file_format=True)


# ------------------------------------------------------------------------------------ by name

WRITERS = ("sa-med2d", "nifti", "dicom", "folder")


def write_corpus(
    out: Path,
    *,
    fmt: str = "sa-med2d",
    cases: int = 8,
    slices: int = 4,
    size: int = 256,
    seed: int = 0,
    force: bool = False,
) -> bool:
    """Write a synthetic corpus in layout ``fmt`` (one of ``WRITERS``) to ``out``.

    Arguments:
      out: the corpus folder.
      cases: cases; slices: 2D images per case and size: their side (sa-med2d and folder; the
        3D layouts have a fixed shape).
      force: replace a non-empty ``out``; without it a non-empty ``out`` is left as it is.

    Returns:
      True when the corpus was written, False when a non-empty ``out`` was kept.
    """
    if out.exists() and any(out.iterdir()):
        if not force:
            log.info("%s exists and is not empty; leaving it as is (use --force)", out)
            return False
        shutil.rmtree(out)
    if fmt == "sa-med2d":
        write_sa_med2d(out, n_cases=cases, slices_per_case=slices, size=size, seed=seed)
    elif fmt == "folder":
        write_folder(out, n_cases=cases, slices_per_case=slices, size=(size, size), seed=seed)
    elif fmt == "nifti":
        write_nifti(out, n_cases=cases, seed=seed)
    elif fmt == "dicom":
        write_dicom(out, n_cases=cases, seed=seed)
    else:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(WRITERS)})")
    log.info("wrote a synthetic %s corpus to %s", fmt, out)
    return True
