"""The trivial answers every interactive validation scores beside the model."""

import torch

from pipeline.evaluate import baseline_dice, fill_box


def test_fill_box_is_the_box_with_an_exclusive_max():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 6.0, 6.0]])
    filled = fill_box(boxes, 6)
    assert filled.shape == (2, 6, 6) and filled.dtype == torch.bool
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[2:4, 1:3] = True  # rows y0..y1-1, columns x0..x1-1
    assert torch.equal(filled[0], expected)
    assert filled[1].all()


def test_baseline_dice_by_hand():
    # An L-shaped mask of 3 pixels in a 4x4 image; its box (x 0..2, y 0..2) holds 4 pixels.
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0, 0] = target[0, 0, 1, 0] = target[0, 0, 1, 1] = 1
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    out = baseline_dice(boxes, target)
    assert torch.allclose(out["fill_box"], torch.tensor([2 * 3 / (4 + 3)]))
    assert torch.allclose(out["fill_image"], torch.tensor([2 * 3 / (16 + 3)]))
