"""The evaluation protocols' click rules on hand-made masks, and the CVPR protocol end to end on
a model that is perfect by construction (it corrects exactly the error region it is clicked in).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.eval.protocols import click_disc, cvpr_click, cvpr_clicks, run_cvpr
from pipeline.eval.scoring import Row, auc_rows, shard_spacing
from pipeline.evaluate import fill_box

S = 20


def _mask(*blocks: tuple[int, int, int, int]) -> np.ndarray:
    """(S, S) bool with the given (row0, row1, col0, col1) blocks set (max exclusive)."""
    m = np.zeros((S, S), dtype=bool)
    for r0, r1, c0, c1 in blocks:
        m[r0:r1, c0:c1] = True
    return m


def test_missed_foreground_gets_a_positive_click_at_its_centre():
    truth = _mask((2, 11, 2, 11))  # 9 x 9: one pixel farthest from its border, (6, 6)
    assert cvpr_click(np.zeros_like(truth), truth) == (6, 6, True)


def test_false_foreground_gets_a_negative_click_in_the_largest_error_region():
    truth = _mask((0, 3, 0, 3))
    pred = truth | _mask((8, 15, 10, 17))  # a 7 x 7 false blob, centre (11, 13)
    pred[0, 0] = False  # a 1-pixel missed region: smaller, not clicked
    assert cvpr_click(pred, truth) == (11, 13, False)


def test_the_largest_of_several_error_regions_is_clicked():
    truth = _mask((1, 4, 1, 4), (10, 15, 12, 17))  # 3 x 3 and 5 x 5, both missed
    assert cvpr_click(np.zeros_like(truth), truth) == (12, 14, True)


def test_diagonal_pixels_are_one_region_and_the_image_border_counts_as_outside():
    # two 4 x 4 blocks touching at a corner are one 8-connected region of 32 pixels, larger
    # than the 5 x 5 block (25) elsewhere
    truth = _mask((10, 14, 0, 4), (14, 18, 4, 8), (0, 5, 12, 17))
    row, col, positive = cvpr_click(np.zeros_like(truth), truth)
    assert positive and (row, col) in {
        (11, 1),
        (11, 2),
        (12, 1),
        (12, 2),
        (15, 5),
        (15, 6),
        (16, 5),
        (16, 6),
    }
    # a strip along the top edge: the border is outside, so the centre is row 2, not row 4
    strip = _mask((0, 5, 0, S))
    row, _, _ = cvpr_click(np.zeros_like(strip), strip)
    assert row == 2


def test_ties_are_broken_as_the_challenge_does():
    truth = _mask((2, 12, 2, 12))  # 10 x 10: four centre pixels at distance 5
    maxima = [(6, 6), (6, 7), (7, 6), (7, 7)]
    expected = maxima[np.random.RandomState(42).choice(4)]
    assert cvpr_click(np.zeros_like(truth), truth)[:2] == expected


def test_no_error_no_click_and_batched_coordinates_are_x_y():
    truth = _mask((2, 11, 4, 13))
    assert cvpr_click(truth, truth) is None
    pred = torch.from_numpy(np.stack([truth, np.zeros_like(truth)]))
    coords, labels = cvpr_clicks(pred, torch.from_numpy(np.stack([truth, truth])))
    assert labels.tolist() == [[-1], [1]]
    assert coords[1, 0].tolist() == [8.0, 6.0]  # x = column 8, y = row 6


class Oracle:
    """Perfect by construction: a box prompt gives the filled box; each click replaces the error
    region (8-connected) it falls in by the truth, on top of the previous mask prompt."""

    def __init__(self, truth: torch.Tensor) -> None:
        self.truth = truth.numpy()
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []

    def decode(self, embeddings, *, image_index, boxes=None, points=None, mask_inputs=None):
        if mask_inputs is None:
            pred = fill_box(boxes, S).numpy()
        else:
            pred = mask_inputs[:, 0].numpy() > 0
        pred = pred.copy()
        if points is not None:
            self.seen.append((points[0][:, -1].numpy().copy(), points[1][:, -1].numpy().copy()))
            for i in range(pred.shape[0]):
                for (x, y), label in zip(points[0][i].tolist(), points[1][i].tolist(), strict=True):
                    if label < 0:
                        continue
                    regions, _ = ndimage.label(pred[i] != self.truth[i], np.ones((3, 3)))
                    region = regions == regions[int(y), int(x)]
                    if regions[int(y), int(x)]:
                        pred[i][region] = self.truth[i][region]
        logits = torch.from_numpy(np.where(pred, 10.0, -10.0)).float()[:, None]
        return logits, torch.ones(pred.shape[0], 1)


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())


def test_cvpr_protocol_on_a_perfect_model_never_loses_dice_and_clicks_where_it_should():
    l_shape = _mask((2, 12, 2, 6), (8, 12, 6, 14))  # filling its box adds a 6 x 8 false region
    two_blobs = _mask((2, 10, 2, 10), (13, 17, 13, 17))  # the box covers the larger blob only
    ring = _mask((3, 17, 3, 17)) & ~_mask((7, 13, 7, 13))  # a hole: one false region inside
    truth = torch.from_numpy(np.stack([l_shape, two_blobs, ring]))
    boxes = torch.tensor([[2, 2, 14, 12], [2, 2, 10, 10], [3, 3, 17, 17]], dtype=torch.float32)
    oracle = Oracle(truth)
    trace = run_cvpr(oracle, torch.zeros(3, 1), torch.arange(3), boxes, truth, clicks=5)
    assert trace.steps == ["box", "click 1", "click 2", "click 3", "click 4", "click 5"]
    dice = np.array(
        [[_dice(p[i].numpy(), truth[i].numpy()) for i in range(3)] for p in trace.preds]
    )
    assert (np.diff(dice, axis=0) >= 0).all(), dice
    assert dice[0].max() < 1 and (dice[-1] == 1).all()
    # each click is the rule's click on the previous prediction (none once it is perfect)
    for k, (coords, labels) in enumerate(oracle.seen):
        for i in range(3):
            expected = cvpr_click(trace.preds[k][i].numpy(), truth[i].numpy())
            if expected is None:
                assert labels[i] == -1
            else:
                row, col, positive = expected
                assert (coords[i].tolist(), int(labels[i])) == ([col, row], int(positive))
    first = oracle.seen[0]
    assert first[1].tolist() == [0, 1, 0]  # false region, missed blob, the ring's hole
    # the 4 x 4 blob's four centre pixels tie; seed 42 picks the third in raster order, (15, 14)
    assert first[0][1].tolist() == [14.0, 15.0]
    assert first[0][2].tolist() in ([9.0, 9.0], [9.0, 10.0], [10.0, 9.0], [10.0, 10.0])


def test_auc_is_the_trapezoid_over_the_clicks_and_final_is_the_last_step():
    def row(index: int, dice: float) -> Row:
        return Row(
            "trained",
            "cvpr",
            f"step {index}",
            index,
            "k",
            0,
            1,
            "c",
            False,
            dice,
            dice,
            1.0,
            dice / 2,
        )

    dice = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # box, then clicks 1..5
    auc, final = auc_rows([row(i, d) for i, d in enumerate(dice)])
    assert auc.step == "auc" and auc.dice == pytest.approx(3.2)  # box left out, x = 0..4
    assert auc.nsd == pytest.approx(1.6) and math.isnan(auc.hd95)
    assert final.step == "final" and final.dice == 1.0


def test_disc_baseline_and_spacing_at_the_shard_resolution():
    disc = click_disc(torch.tensor([[[10.0, 5.0]]]), S, radius=2)
    assert disc.shape == (1, S, S) and disc[0, 5, 10] and disc[0, 5, 12] and not disc[0, 5, 13]
    assert int(disc.sum()) == 13  # pixels within distance 2 of the centre
    assert int(click_disc(torch.tensor([[[10.0, 10.0]]]), 64).sum()) == 29  # radius 3 at 64 px
    meta = {"spacing": [0.5, 0.8], "original_size": [128, 256]}
    assert shard_spacing(meta, size=64, resize="square") == ((1.0, 3.2), True)
    assert shard_spacing(meta, size=64, resize="letterbox") == ((2.0, 3.2), True)
    assert shard_spacing({"spacing": []}, size=64, resize="square") == ((1.0, 1.0), False)
