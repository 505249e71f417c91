"""Deterministic synthetic corpora in each input layout, for tests, benchmarks and the quickstart.

Organs are irregular, concave shapes (lobed blobs, crescents, rings, branching arms) with their
own texture, in weak contrast to a textured body (``sharding/synthetic_truth.py``), so that the
trivial answer to a box prompt (the filled box) scores well below what a model can reach. The
same arguments always write the same files. ``synthetic_volume`` and ``synthetic_image`` give the
ground truth a reader must return (for volumes: the canonical (Z, Y, X) image and label, which the
writers store in a non-canonical orientation).

``write_corpus`` writes one in a named layout; on the command line (``samadapt/synthetic.py``)::

    python -m samadapt.synthetic --format sa-med2d OUT [--cases N] [--slices K] [--size S]
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np

from sharding.synthetic_dicom import write_dicom
from sharding.synthetic_truth import (
    ORGANS_2D,
    VOLUME_LABELS,
    fill_box_dice,
    synthetic_image,
    synthetic_volume,
    volume_affine,
)

__all__ = [
    "ORGANS_2D",
    "VOLUME_LABELS",
    "fill_box_dice",
    "synthetic_image",
    "synthetic_volume",
    "volume_affine",
    "write_corpus",
    "write_dicom",
    "write_folder",
    "write_nifti",
    "write_sa_med2d",
]

log = logging.getLogger(__name__)

_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1]


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


# ------------------------------------------------------------------------------------ 3D


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
