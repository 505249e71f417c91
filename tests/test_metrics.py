"""Dice, IoU, HD95 and NSD: hand-computed cases, empty-mask rules, and MONAI as the reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from pipeline.metrics import (
    MaskScores,
    hd95,
    nsd,
    overlap,
    score_classes,
    score_mask,
    summarize,
    summarize_cases,
    surface,
    surface_distances,
)


def square(top: int, left: int, size: int = 10, shape=(20, 20)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def voxel(shape, index) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[index] = True
    return mask


def test_empty_masks_follow_nnunet_and_monai():
    empty, full = np.zeros((8, 8), bool), square(2, 2, 4, (8, 8))
    both = score_mask(empty, empty)
    assert all(math.isnan(v) for v in (both.dice, both.iou, both.hd95, both.nsd))
    for pred, truth in ((empty, full), (full, empty)):
        assert score_mask(pred, truth) == MaskScores(0.0, 0.0, math.inf, 0.0)
    forward, backward = surface_distances(empty, full)
    assert forward.size == 0 and backward.size == 12 and np.all(np.isinf(backward))


def test_one_voxel_objects():
    shape = (12, 12)
    same = score_mask(voxel(shape, (5, 5)), voxel(shape, (5, 5)))
    assert same == MaskScores(1.0, 1.0, 0.0, 1.0)
    apart = score_mask(voxel(shape, (5, 5)), voxel(shape, (5, 8)), tolerance=2.0)
    assert apart == MaskScores(0.0, 0.0, 3.0, 0.0)
    assert nsd(voxel(shape, (5, 5)), voxel(shape, (5, 8)), tolerance=3.0) == 1.0
    # a voxel on the array's edge is its own surface (outside counts as background)
    assert surface(voxel(shape, (0, 0)))[0, 0]


def test_anisotropic_spacing_measures_mm_not_voxels():
    shape = (6, 10, 10)  # (slices, rows, columns)
    truth = voxel(shape, (2, 5, 5))
    spacing = (5.0, 0.8, 0.8)
    assert hd95(voxel(shape, (3, 5, 5)), truth, spacing) == pytest.approx(5.0)
    assert hd95(voxel(shape, (2, 5, 6)), truth, spacing) == pytest.approx(0.8)
    assert hd95(voxel(shape, (3, 6, 5)), truth, spacing) == pytest.approx(math.hypot(5.0, 0.8))
    assert hd95(voxel(shape, (3, 5, 5)), truth) == 1.0  # in voxels
    # NSD at 2 mm: one slice off is wrong, one pixel off is right
    assert nsd(voxel(shape, (3, 5, 5)), truth, spacing, tolerance=2.0) == 0.0
    assert nsd(voxel(shape, (2, 5, 6)), truth, spacing, tolerance=2.0) == 1.0


def test_shifted_square_known_dice_hd_nsd():
    """10x10 squares, one shifted 2 columns. Each border has 36 pixels; per side 16 lie on the
    other border, 4 at distance 1 and 16 at distance 2 (worked out in the commit)."""
    truth, pred = square(5, 5), square(5, 7)
    dice, iou = overlap(pred, truth)
    assert (dice, iou) == (pytest.approx(0.8), pytest.approx(2 / 3))
    forward, backward = surface_distances(pred, truth)
    for d in (forward, backward):
        assert sorted(d.tolist()) == [0.0] * 16 + [1.0] * 4 + [2.0] * 16
    assert hd95(pred, truth) == 2.0
    assert nsd(pred, truth, tolerance=1.0) == pytest.approx(40 / 72)
    assert nsd(pred, truth, tolerance=0.5) == pytest.approx(32 / 72)
    assert nsd(pred, truth, tolerance=2.0) == 1.0
    # columns of 0.5 mm: the 2-column shift is 1 mm, so HD95 1 mm and NSD at 1 mm is perfect
    assert hd95(pred, truth, (1.0, 0.5)) == pytest.approx(1.0)
    assert nsd(pred, truth, (1.0, 0.5), tolerance=1.0) == 1.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="differs from truth shape"):
        score_mask(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2D or 3D"):
        score_mask(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="positive voxel sizes"):
        hd95(np.zeros((4, 4)), np.zeros((4, 4)), (1.0,))


def test_per_class_per_case_and_summaries():
    truth = np.zeros((20, 20), np.int64)
    truth[square(5, 5)] = 1
    pred = np.zeros_like(truth)
    pred[square(5, 7)] = 1
    pred[0, 0] = 2  # class 2 predicted but absent: a false positive
    case_a = score_classes(pred, truth, [1, 2, 3], tolerance=1.0)
    assert case_a[1].dice == pytest.approx(0.8) and case_a[1].hd95 == 2.0
    assert case_a[2] == MaskScores(0.0, 0.0, math.inf, 0.0)
    assert math.isnan(case_a[3].dice)  # absent from both: left out
    case_b = score_classes(truth, truth, [1, 2, 3])
    table = summarize_cases({"a": case_a, "b": case_b})
    one = table["class 1"]["dice"]
    assert (one.mean, one.std, one.n, one.nan) == (pytest.approx(0.9), pytest.approx(0.1), 2, 0)
    assert table["class 2"]["dice"].n == 1 and table["class 2"]["dice"].nan == 1
    assert table["class 3"]["dice"].n == 0 and math.isnan(table["class 3"]["dice"].mean)
    # per case: a = mean(0.8, 0) over its scored classes, b = 1.0 (class 1 only)
    assert table["mean"]["dice"].mean == pytest.approx((0.4 + 1.0) / 2)
    assert table["mean"]["hd95"].mean == math.inf
    assert summarize([1.0, math.nan, 3.0]).mean == 2.0


def _blobs(rng: np.random.Generator, shape, threshold: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    return noise > threshold * noise.std()


def _monai(pred: np.ndarray, truth: np.ndarray, spacing, tolerance: float) -> tuple[float, float]:
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p = torch.from_numpy(pred)[None, None]
    t = torch.from_numpy(truth)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks; we test them
        hd = compute_hausdorff_distance(
            p, t, include_background=True, percentile=95, spacing=list(spacing)
        )
        sd = compute_surface_dice(
            p, t, [tolerance], include_background=True, spacing=list(spacing), use_subvoxels=False
        )
    return float(hd[0, 0]), float(sd[0, 0])


@pytest.mark.parametrize(
    "shape, spacing",
    [((40, 48), (1.0, 1.0)), ((40, 48), (0.7, 1.9)), ((12, 24, 20), (3.0, 0.8, 1.1))],
)
def test_against_monai_on_random_masks(shape, spacing):
    pytest.importorskip("monai")
    rng = np.random.default_rng(len(shape) * 100 + int(spacing[0] * 10))
    pairs = [(_blobs(rng, shape, 0.5), _blobs(rng, shape, 0.6)) for _ in range(6)]
    pairs.append((np.zeros(shape, bool), _blobs(rng, shape, 0.5)))  # empty prediction
    pairs.append((np.zeros(shape, bool), np.zeros(shape, bool)))  # both empty
    for pred, truth in pairs:
        ours = score_mask(pred, truth, spacing=spacing, tolerance=1.5)
        hd, sd = _monai(pred, truth, spacing, 1.5)
        if pred.any() != truth.any():  # one empty: inf here (DeepMind's rule), NaN in MONAI
            assert ours.hd95 == math.inf
        else:
            np.testing.assert_allclose(ours.hd95, hd, rtol=1e-5, equal_nan=True)
        np.testing.assert_allclose(ours.nsd, sd, rtol=1e-5, equal_nan=True)
    assert any(0 < score_mask(p, t, spacing=spacing).nsd < 1 for p, t in pairs)
