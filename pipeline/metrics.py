"""Segmentation metrics: Dice, IoU, HD95 and normalised surface Dice (NSD), 2D and 3D.

Masks are boolean numpy arrays, ``(H, W)`` or ``(D, H, W)``; ``spacing`` gives the size of a
voxel along each axis in mm (same order as the array's axes), so distances are in mm and an
anisotropic grid (e.g. 5 mm slices of 0.8 mm pixels) is measured as it is in the scanner.

Definitions (those of MONAI's ``compute_hausdorff_distance(percentile=95)`` and
``compute_surface_dice(use_subvoxels=False)``, which follow DeepMind's ``surface-distance``
package; ``tests/test_metrics.py`` compares against MONAI on random masks):

- the surface of a mask is its voxels that have a face neighbour outside it (mask XOR its erosion
  by the 6- / 4-neighbourhood; outside the array counts as background);
- HD95 = max(P95 of the distances from each predicted surface voxel to the nearest true surface
  voxel, P95 of the distances the other way), percentiles interpolated linearly;
- NSD at tolerance t mm = (predicted surface voxels within t of the true surface + true surface
  voxels within t of the predicted surface) / (all surface voxels of both).

Empty masks (a structure absent from the truth, the prediction, or both):

=====================  ======  ======  ======  =====
truth / prediction      Dice    IoU     HD95    NSD
=====================  ======  ======  ======  =====
both empty              NaN     NaN     NaN     NaN
one empty, other not    0       0       inf     0
=====================  ======  ======  ======  =====

Both empty is undefined, not perfect: nnU-Net v2 (``nnunetv2/evaluation/evaluate_predictions.py``,
``compute_metrics``: Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN), NaN when
TP + FP + FN = 0) leaves such a case out by aggregating with ``np.nanmean``, and MONAI returns NaN
HD and NSD when neither mask has a surface (DeepMind's package: NaN NSD, inf HD95). One empty mask
gets the worst score: Dice, IoU and NSD 0 (nnU-Net, MONAI, DeepMind) and an infinite HD95
(DeepMind's ``compute_robust_hausdorff``; MONAI 1.6 returns NaN there, which would drop a missed
structure from a NaN-ignoring mean). ``summarize`` ignores NaN and reports how many values it
averaged and left out; an infinite HD95 makes the mean infinite, the honest figure (a caller may
cap it, e.g. at the image diagonal, and must say so).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

METRICS = ("dice", "iou", "hd95", "nsd")


@dataclass(frozen=True)
class MaskScores:
    """The four metrics of one binary mask against its truth (NaN / inf as the module says)."""

    dice: float
    iou: float
    hd95: float
    nsd: float


@dataclass(frozen=True)
class Summary:
    """Mean and (population) std over the values that are not NaN; ``n`` of them were used and
    ``nan`` were left out."""

    mean: float
    std: float
    n: int
    nan: int


def _check(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None) -> tuple:
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {pred.ndim} dimensions")
    spacing = (1.0,) * pred.ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} must give {pred.ndim} positive voxel sizes")
    return pred, truth, spacing


def overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks.

    Arguments:
      pred, truth: boolean arrays of one shape.

    Returns:
      (dice, iou): NaN for both when both masks are empty (nnU-Net).
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(pred & truth))
    wrong = int(np.count_nonzero(pred ^ truth))  # FP + FN
    if tp + wrong == 0:
        return math.nan, math.nan
    return 2 * tp / (2 * tp + wrong), tp / (tp + wrong)


def surface(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` with a face neighbour outside it (outside the array is outside).

    Arguments:
      mask: boolean array, 2D or 3D.

    Returns:
      np.ndarray: boolean array of the same shape.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the nearest of the other.

    Arguments:
      pred, truth: boolean arrays of one shape, 2D or 3D.
      spacing: voxel size per axis in mm (None = 1 per axis).

    Returns:
      (pred_to_truth, truth_to_pred): 1D float arrays, one value per surface voxel of ``pred``
      (resp. ``truth``); all inf when the other mask is empty, empty when this one is.
    """
    pred, truth, spacing = _check(pred, truth, spacing)
    edges = surface(pred), surface(truth)
    out = []
    for source, target in (edges, edges[::-1]):
        if not target.any():
            out.append(np.full(int(np.count_nonzero(source)), np.inf))
            continue
        # distance of every voxel to the nearest target surface voxel, in mm
        field = ndimage.distance_transform_edt(~target, sampling=spacing)
        out.append(field[source])
    return out[0], out[1]


def _hd95_of(forward: np.ndarray, backward: np.ndarray) -> float:
    """HD95 from the two directed distance lists (NaN: both masks empty; inf: one is)."""
    if forward.size == 0 and backward.size == 0:
        return math.nan
    if forward.size == 0 or backward.size == 0:
        return math.inf
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def _nsd_of(forward: np.ndarray, backward: np.ndarray, tolerance: float) -> float:
    """NSD from the two directed distance lists (NaN: both masks empty; 0: one is, as its
    distances are inf)."""
    total = forward.size + backward.size
    if total == 0:
        return math.nan
    right = np.count_nonzero(forward <= tolerance) + np.count_nonzero(backward <= tolerance)
    return float(right / total)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """The 95th-percentile symmetric Hausdorff distance in mm.

    Arguments:
      pred, truth: boolean arrays of one shape, 2D or 3D.
      spacing: voxel size per axis in mm (None = 1 per axis).

    Returns:
      float: max of the two directed 95th percentiles; NaN if both are empty, inf if one is.
    """
    return _hd95_of(*surface_distances(pred, truth, spacing))


def nsd(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    tolerance: float = 1.0,
) -> float:
    """Normalised surface Dice: the share of both surfaces within ``tolerance`` mm of the other.

    Arguments:
      pred, truth: boolean arrays of one shape, 2D or 3D.
      spacing: voxel size per axis in mm (None = 1 per axis).
      tolerance: the distance in mm up to which a surface voxel counts as right.

    Returns:
      float: in [0, 1]; NaN if both are empty, 0 if one is.
    """
    return _nsd_of(*surface_distances(pred, truth, spacing), tolerance)


def score_mask(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    tolerance: float = 1.0,
) -> MaskScores:
    """Dice, IoU, HD95 and NSD of one binary mask.

    Arguments:
      pred, truth: boolean arrays of one shape, 2D or 3D.
      spacing: voxel size per axis in mm (None = 1 per axis).
      tolerance: NSD tolerance in mm.

    Returns:
      MaskScores: the four metrics.
    """
    pred, truth, spacing = _check(pred, truth, spacing)
    dice, iou = overlap(pred, truth)
    distances = surface_distances(pred, truth, spacing)
    return MaskScores(dice, iou, _hd95_of(*distances), _nsd_of(*distances, tolerance))


def score_classes(
    pred: np.ndarray,
    truth: np.ndarray,
    classes: Iterable[int],
    *,
    spacing: Sequence[float] | None = None,
    tolerance: float = 1.0,
) -> dict[int, MaskScores]:
    """Per-class scores of one case's label maps (each class as its own binary mask).

    Arguments:
      pred, truth: integer label maps of one shape, 2D or 3D.
      classes: the class ids to score (usually the foreground classes 1..C).
      spacing: voxel size per axis in mm (None = 1 per axis).
      tolerance: NSD tolerance in mm.

    Returns:
      dict[int, MaskScores]: by class id.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    return {
        int(c): score_mask(pred == c, truth == c, spacing=spacing, tolerance=tolerance)
        for c in classes
    }


def summarize(values: Iterable[float]) -> Summary:
    """Mean and std of the values that are not NaN (nnU-Net's nanmean).

    Arguments:
      values: floats, possibly NaN or inf.

    Returns:
      Summary: NaN mean and std when no value is left.
    """
    array = np.asarray(list(values), dtype=np.float64)
    kept = array[~np.isnan(array)]
    if kept.size == 0:
        return Summary(math.nan, math.nan, 0, int(array.size))
    with np.errstate(invalid="ignore"):  # std of values with inf is NaN: say so, quietly
        return Summary(
            float(kept.mean()), float(kept.std()), int(kept.size), int(array.size - kept.size)
        )


def summarize_cases(cases: dict[str, dict[int, MaskScores]]) -> dict[str, dict[str, Summary]]:
    """Per-class summaries over cases, and the mean over classes of each case's mean.

    Arguments:
      cases: case id -> ``score_classes`` output.

    Returns:
      dict: ``{"class 1": {"dice": Summary, ...}, ..., "mean": {...}}``; ``"mean"`` summarises,
      per case, the NaN-ignoring mean over its classes (nnU-Net's foreground mean works per
      class instead; both are reported by callers as they need).
    """
    classes = sorted({c for scores in cases.values() for c in scores})
    out: dict[str, dict[str, Summary]] = {}
    for c in classes:
        rows = [asdict(scores[c]) for scores in cases.values() if c in scores]
        out[f"class {c}"] = {m: summarize(r[m] for r in rows) for m in METRICS}
    per_case = {m: [] for m in METRICS}
    for scores in cases.values():
        for m in METRICS:
            case_mean = summarize(getattr(s, m) for s in scores.values()).mean
            per_case[m].append(case_mean)
    out["mean"] = {m: summarize(v) for m, v in per_case.items()}
    return out
