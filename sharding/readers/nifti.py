"""Reader of nnU-Net v2 and Medical Segmentation Decathlon (MSD) NIfTI corpora.

Layout::

    ROOT/dataset.json     nnU-Net v2: {"channel_names": {"0": "CT"}, "labels": {"background": 0,
                          "liver": 1}, "file_ending": ".nii.gz"}
                          MSD: {"name": ..., "modality": {"0": "CT"}, "labels": {"0": "background",
                          "1": "liver"}, "training": [{"image": "./imagesTr/x.nii.gz",
                          "label": "./labelsTr/x.nii.gz"}, ...]}
    ROOT/imagesTr/        nnU-Net v2: CASE_0000.nii.gz (channel 0); MSD: CASE.nii.gz
    ROOT/labelsTr/        CASE.nii.gz
    ROOT/imagesTs/        optional held-out cases, named as in imagesTr/; with ROOT/labelsTs/
                          their labels. They go to the test split whatever the fractions say.

Cases: the ``training`` list when dataset.json has one (MSD), else every
``imagesTr/*_0000<file_ending>`` (nnU-Net v2), else every ``imagesTr/*<file_ending>``; then the
same rule in ``imagesTs/`` (a case id in both folders is refused). Names
starting with ``.`` (macOS ``._`` files shipped in MSD archives) are skipped. Case id = the file
name without ``file_ending`` and without the ``_0000`` channel suffix; unit id = case id. Only
channel 0 is read (the first file of a multi-channel nnU-Net case, ``[..., 0]`` of a 4D MSD image).

Loading: image and label go through ``nibabel.as_closest_canonical`` (RAS+, flips and swaps only),
then become (Z, Y, X) arrays: image float32 (scl_slope/inter applied), label uint8 (int32 when an
id is > 255). ``Volume.affine`` maps (z, y, x, 1) to RAS mm; ``spacing`` is (z, y, x) mm. Modality
from channel 0's name ("CT" -> "ct", MR sequence names -> "mr", else lower-cased);
``cfg.modality`` overrides. Dataset = ``cfg.dataset``, else dataset.json "name", else ROOT's name.

Rejected (``RejectedInput`` naming the file): unreadable / truncated files, NaN or Inf in the
image, a label whose shape differs from the image or whose affine differs by more than 1e-3 mm,
label ids not listed in dataset.json "labels", non-integer label values, a case listed but its
label file missing while ``labelsTr/`` exists. Without ``labelsTr/`` cases load with label None.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from sharding.config import ShardingConfig
from sharding.readers.common import integer_label, modality_name, to_zyx
from sharding.records import RejectedInput, Unit, Volume

__all__ = ["NiftiReader", "read_dataset_json", "read_stored"]

log = logging.getLogger(__name__)

_AFFINE_ATOL = 1e-3


def read_dataset_json(path: Path) -> dict:
    """Parse dataset.json into ``{"name", "modality", "labels": {id: name}, "file_ending",
    "training": [(image, label) relative paths] or None}`` for either dialect."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: dataset.json not found (nnU-Net / MSD layout)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file: {exc}") from None
    if not isinstance(raw, dict) or "labels" not in raw:
        raise ValueError(f"{path}: must be a mapping with a 'labels' entry")
    channels = raw.get("channel_names") or raw.get("modality") or {}
    if not isinstance(channels, dict):
        raise ValueError(f"{path}: 'channel_names' / 'modality' must be a mapping")
    first = channels.get("0", channels.get(0, "")) if channels else ""
    labels: dict[int, str] = {}
    for key, value in raw["labels"].items():
        if isinstance(value, bool):
            raise ValueError(f"{path}: label {key!r} has a non-integer id {value!r}")
        if isinstance(value, int):  # nnU-Net v2: name -> id
            labels[value] = str(key)
        elif isinstance(value, str) and str(key).lstrip("-").isdigit():  # MSD: "1" -> name
            labels[int(key)] = value
        elif isinstance(value, list):  # nnU-Net v2 region: name -> [ids]; not a voxel value
            continue
        else:
            raise ValueError(f"{path}: cannot read label entry {key!r}: {value!r}")
    training = None
    if isinstance(raw.get("training"), list) and raw["training"]:
        training = []
        for item in raw["training"]:
            if not isinstance(item, dict) or "image" not in item:
                raise ValueError(f"{path}: 'training' entries must have an 'image' path")
            training.append((str(item["image"]), str(item["label"]) if "label" in item else ""))
    return {
        "name": str(raw.get("name", "")),
        "modality": str(first),
        "labels": labels,
        "file_ending": str(raw.get("file_ending", ".nii.gz")),
        "training": training,
    }


def _load_nifti(path: Path, what: str, *, canonical: bool = True) -> nib.Nifti1Image:
    """Open a NIfTI file (channel 0) and, with ``canonical``, reorient it to the closest
    canonical; RejectedInput naming the file on failure."""
    if not path.is_file():
        raise RejectedInput(str(path), f"{what} file does not exist")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel / gzip / zlib raise many kinds for corrupt files
        reason = f"unreadable {what} NIfTI ({type(exc).__name__}: {exc})"
        raise RejectedInput(str(path), reason) from None
    if len(img.shape) not in (3, 4):
        raise RejectedInput(
            str(path), f"expected a 3D (or 4D multi-channel) image, got shape {img.shape}"
        )
    try:
        img = _first_channel(img)
        return nib.as_closest_canonical(img) if canonical else img
    except Exception as exc:
        reason = f"unreadable {what} NIfTI ({type(exc).__name__}: {exc})"
        raise RejectedInput(str(path), reason) from None


def read_stored(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """One image file as stored, without the reorientation ``NiftiReader.load`` applies.

    Arguments:
      path: a ``.nii`` / ``.nii.gz`` file, 3D or 4D (channel 0 is read, as the reader does).

    Returns:
      ``(data, image)``: the (X, Y, Z) float32 voxels in stored order (scl_slope/inter applied)
      and the channel-0 image (affine, header). Raises ``RejectedInput`` naming the file when it
      is missing, unreadable, truncated, of another dimensionality, or has NaN/Inf voxels.
    """
    path = Path(path)
    img = _load_nifti(path, "image", canonical=False)
    return _finite(_read_data(img, path, np.float32), path), img


def _finite(data: np.ndarray, path: Path) -> np.ndarray:
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise RejectedInput(str(path), f"image has {bad} NaN/Inf voxels")
    return data


def _first_channel(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    if len(img.shape) == 3:
        return img
    if len(img.shape) == 4:
        data = np.asanyarray(img.dataobj)[..., 0]
        return nib.Nifti1Image(np.asarray(data), img.affine, img.header)
    raise ValueError(f"expected a 3D (or 4D multi-channel) image, got shape {img.shape}")


def _read_data(img: nib.Nifti1Image, path: Path, dtype: type) -> np.ndarray:
    try:
        return np.asarray(img.get_fdata(dtype=dtype)) if dtype else np.asanyarray(img.dataobj)
    except Exception as exc:
        raise RejectedInput(str(path), f"truncated or corrupt NIfTI data ({exc})") from None


class NiftiReader:
    """``Reader`` of nnU-Net v2 / MSD corpora (see the module docstring)."""

    def __init__(self, root: Path, *, cfg: ShardingConfig):
        self.root = Path(root)
        self.cfg = cfg
        self.meta = read_dataset_json(self.root / "dataset.json")
        self.class_map = {i: n for i, n in sorted(self.meta["labels"].items()) if i != 0}
        self.dataset = cfg.dataset or self.meta["name"] or self.root.resolve().name
        self.modality = modality_name(cfg.modality) or modality_name(self.meta["modality"])
        self.modality = self.modality or "unknown"
        self._cases: dict[str, tuple[Path, Path | None]] | None = None
        self._held_out: set[str] = set()

    def _folder_cases(
        self, images_dir: Path, labels_dir: Path
    ) -> dict[str, tuple[Path, Path | None]]:
        """Cases of one imagesXx/ folder (channel-0 files, or every file), with their label file
        in ``labels_dir`` when that folder exists."""
        ending = self.meta["file_ending"]
        has_labels = labels_dir.is_dir()
        files = sorted(
            p
            for p in images_dir.iterdir()
            if p.name.endswith(ending) and not p.name.startswith(".")
        )
        channel0 = [p for p in files if p.name[: -len(ending)].endswith("_0000")]
        cases: dict[str, tuple[Path, Path | None]] = {}
        for image in channel0 or files:
            case = _case_id(image.name, ending)
            cases[case] = (image, labels_dir / f"{case}{ending}" if has_labels else None)
        return cases

    def _list_cases(self) -> dict[str, tuple[Path, Path | None]]:
        if self._cases is not None:
            return self._cases
        ending = self.meta["file_ending"]
        labels_dir = self.root / "labelsTr"
        has_labels = labels_dir.is_dir()
        cases: dict[str, tuple[Path, Path | None]] = {}
        if self.meta["training"]:
            for image_rel, label_rel in self.meta["training"]:
                image = self.root / image_rel
                case = _case_id(image.name, ending)
                label = self.root / label_rel if label_rel else None
                cases[case] = (image, label)
        else:
            images_dir = self.root / "imagesTr"
            if not images_dir.is_dir():
                raise ValueError(f"{images_dir}: folder not found (nnU-Net / MSD layout)")
            cases = self._folder_cases(images_dir, labels_dir)
        if (self.root / "imagesTs").is_dir():
            held_out = self._folder_cases(self.root / "imagesTs", self.root / "labelsTs")
            both = sorted(set(held_out) & set(cases))
            if both:
                raise ValueError(
                    f"{self.root}: case {both[0]!r} is in imagesTr/ and imagesTs/ "
                    f"({len(both)} such cases): a case is either trained on or held out"
                )
            cases.update(held_out)
            self._held_out = set(held_out)
        if not cases:
            raise ValueError(f"{self.root}: no cases found in dataset.json or imagesTr/")
        if not has_labels and not self.meta["training"]:
            log.warning("%s: no labelsTr/ folder; cases load without labels", self.root)
        self._cases = dict(sorted(cases.items()))
        return self._cases

    def list_units(self) -> list[Unit]:
        """One unit per case, sorted by case id. No voxel data is read."""
        return [
            Unit(
                id=case,
                dataset=self.dataset,
                case_id=case,
                paths=(str(image),) + ((str(label),) if label else ()),
                modality=self.modality,
                split="test" if case in self._held_out else "",
            )
            for case, (image, label) in self._list_cases().items()
        ]

    def load(self, unit: Unit) -> Volume:
        """Read one case: canonical (Z, Y, X) image, label, spacing and affine."""
        cases = self._list_cases()
        if unit.id not in cases:
            raise RejectedInput(unit.paths[0] if unit.paths else unit.id, "case not in corpus")
        image_path, label_path = cases[unit.id]
        img = _load_nifti(image_path, "image")
        data_xyz = _finite(_read_data(img, image_path, np.float32), image_path)
        image, affine, spacing = to_zyx(data_xyz, img.affine)
        label = None
        if label_path is not None:
            label = self._load_label(label_path, img)
        return Volume(
            image=image,
            label=label,
            spacing=spacing,
            affine=affine,
            class_map=dict(self.class_map),
            dataset=self.dataset,
            case_id=unit.case_id,
            modality=self.modality,
            source=str(image_path),
        )

    def _load_label(self, path: Path, img: nib.Nifti1Image) -> np.ndarray:
        lab = _load_nifti(path, "label")
        if lab.shape != img.shape:
            raise RejectedInput(
                str(path), f"label shape {lab.shape} != image shape {img.shape} (canonical)"
            )
        if not np.allclose(lab.affine, img.affine, atol=_AFFINE_ATOL):
            raise RejectedInput(str(path), "label affine differs from the image affine")
        raw = np.asarray(_read_data(lab, path, None))
        known = set(self.meta["labels"])
        try:
            clean = integer_label(raw, str(path), known)
        except RejectedInput as rej:
            if "known labels" in rej.reason:
                reason = rej.reason.replace("among the known labels", "in dataset.json labels")
                raise RejectedInput(str(path), reason) from None
            raise
        label, _, _ = to_zyx(clean, lab.affine)
        return label


def _case_id(file_name: str, ending: str) -> str:
    stem = file_name[: -len(ending)] if file_name.endswith(ending) else file_name.split(".")[0]
    return stem[: -len("_0000")] if stem.endswith("_0000") else stem
