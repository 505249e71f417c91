"""Box / point prompts from masks and batch collation, against per-mask numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.collate import collate, label_map
from pipeline.data.prompts import boxes_from_masks, points_from_masks, tight_boxes


def _masks(rng: np.random.Generator, m: int, h: int, w: int) -> np.ndarray:
    """Random blobs of random sizes (some one pixel, some touching the border), uint8."""
    masks = np.zeros((m, h, w), np.uint8)
    for i in range(m):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, w) + 1
        blob = rng.random((y1 - y0, x1 - x0)) < 0.6
        blob[0, 0] = True
        masks[i, y0:y1, x0:x1] = blob
    return masks


def _reference_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max(), ys.max()]


def test_tight_boxes_exact_with_zero_jitter():
    rng = np.random.default_rng(0)
    masks = _masks(rng, 50, 24, 31)
    boxes = boxes_from_masks(masks, jitter=0, rng=rng)
    assert boxes.shape == (50, 4) and boxes.dtype == np.float32
    for mask, box in zip(masks, boxes, strict=True):
        assert box.tolist() == _reference_box(mask)
    one = np.zeros((1, 10, 12), np.uint8)
    one[0, 3, 5] = 1
    assert boxes_from_masks(one, jitter=0, rng=rng).tolist() == [[5, 3, 5, 3]]


def test_jittered_boxes_stay_within_the_limit():
    rng = np.random.default_rng(1)
    h, w, jitter = 40, 48, 5
    masks = _masks(rng, 400, h, w)
    tight, _ = tight_boxes(masks)
    boxes = boxes_from_masks(masks, jitter=jitter, rng=rng).astype(np.int64)
    size = np.minimum(tight[:, 2] - tight[:, 0] + 1, tight[:, 3] - tight[:, 1] + 1)
    limit = np.minimum(jitter, (0.5 * size).astype(int))
    shift = boxes - tight
    assert (np.abs(shift) <= limit[:, None]).all()
    assert (shift <= np.maximum(limit - 1, 0)[:, None]).all()  # [-n, n): never +n
    # one shift per axis: both corners move together unless clipped at the image border
    inside = (boxes[:, 0] > 0) & (boxes[:, 2] < w - 1) & (boxes[:, 1] > 0) & (boxes[:, 3] < h - 1)
    assert (shift[inside, 0] == shift[inside, 2]).all()
    assert (shift[inside, 1] == shift[inside, 3]).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w - 1).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h - 1).all()
    # big masks do get shifted, over the whole range
    big = limit == jitter
    assert shift[big & inside, 0].min() == -jitter and shift[big & inside, 0].max() == jitter - 1
    # tiny masks (min side < 2) never move
    assert (shift[size < 2] == 0).all()


def test_points_fall_on_foreground():
    rng = np.random.default_rng(2)
    masks = _masks(rng, 60, 20, 26)
    coords, labels = points_from_masks(masks, n=7, rng=rng)
    assert coords.shape == (60, 7, 2) and coords.dtype == np.float32
    assert labels.shape == (60, 7) and labels.dtype == np.int64 and (labels == 1).all()
    xs, ys = coords[..., 0].astype(int), coords[..., 1].astype(int)
    assert (masks[np.arange(60)[:, None], ys, xs] == 1).all()
    # uniform over the foreground: a two-pixel mask gets both pixels
    two = np.zeros((1, 5, 5), np.uint8)
    two[0, 1, 1] = two[0, 4, 3] = 1
    c, _ = points_from_masks(two, n=200, rng=rng)
    assert {tuple(p) for p in c[0].astype(int).tolist()} == {(1, 1), (3, 4)}


def test_empty_mask_gets_background_point_and_whole_image_box():
    rng = np.random.default_rng(3)
    masks = np.zeros((2, 9, 11), np.uint8)
    masks[1, 2:4, 5:7] = 1
    coords, labels = points_from_masks(masks, n=3, rng=rng)
    assert labels.tolist() == [[0, 0, 0], [1, 1, 1]]
    assert (coords[0, :, 0] <= 10).all() and (coords[0, :, 1] <= 8).all()
    boxes = boxes_from_masks(masks, jitter=5, rng=rng)
    assert boxes[0].tolist() == [0, 0, 10, 8]
    none = np.zeros((0, 9, 11), np.uint8)
    assert boxes_from_masks(none, jitter=5, rng=rng).shape == (0, 4)
    c, lab = points_from_masks(none, n=2, rng=rng)
    assert c.shape == (0, 2, 2) and lab.shape == (0, 2)


def test_prompts_are_reproducible():
    masks = _masks(np.random.default_rng(4), 10, 16, 16)
    a = boxes_from_masks(masks, jitter=3, rng=np.random.default_rng(9))
    b = boxes_from_masks(masks, jitter=3, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="jitter"):
        boxes_from_masks(masks, jitter=-1, rng=np.random.default_rng(0))


def _sample(key: str, m: int, s: int = 8) -> dict:
    rng = np.random.default_rng(len(key) + m)
    masks = _masks(rng, m, s, s)
    coords, labels = points_from_masks(masks, n=1, rng=rng)
    return {
        "key": key,
        "image": np.broadcast_to(rng.integers(0, 256, (1, s, s), dtype=np.uint8), (3, s, s)),
        "meta": {"k": key},
        "masks": masks,
        "boxes": boxes_from_masks(masks, jitter=0, rng=rng),
        "point_coords": coords,
        "point_labels": labels,
        "class_ids": np.arange(1, m + 1, dtype=np.int64),
    }


def test_collate_pads_variable_mask_counts():
    samples = [_sample("a", 2), _sample("bb", 0), _sample("ccc", 3)]
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, 8, 8) and batch["image"].dtype == torch.uint8
    assert batch["image"].is_contiguous()
    assert batch["masks"].shape == (3, 3, 8, 8) and batch["masks"].dtype == torch.uint8
    assert batch["mask_valid"].tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert batch["point_labels"][0, 2].tolist() == [-1]
    assert batch["class_ids"][1].tolist() == [-1] * 3
    np.testing.assert_array_equal(batch["masks"][2].numpy(), samples[2]["masks"])
    assert batch["keys"] == ["a", "bb", "ccc"]
    same = collate([_sample("a", 2), _sample("b", 2)])
    assert same["mask_valid"].all() and same["boxes"].dtype == torch.float32


def test_label_map_later_masks_win():
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[0, :2] = 1
    masks[1, 1:3] = 1
    masks[2, 3, 3] = 1
    out = label_map(masks, np.array([5, 7, 9]))
    assert out.dtype == np.int64
    assert out[:, 0].tolist() == [5, 7, 7, 0] and out[3, 3] == 9


@pytest.mark.parametrize("kind", ["diagonal", "ell"])
def test_points_are_uniform_over_the_foreground(kind):
    # a diagonal fills 1/64 of its box (mostly the exact fallback); an L fills ~1/4 (rejection)
    mask = np.zeros((64, 64), np.uint8)
    if kind == "diagonal":
        mask[np.arange(64), np.arange(64)] = 1
    else:
        mask[:, :8] = 1
        mask[-8:, :] = 1
    rng = np.random.default_rng(5)
    coords, labels = points_from_masks(mask[None], n=20000, rng=rng)
    xs, ys = coords[0, :, 0].astype(int), coords[0, :, 1].astype(int)
    assert (mask[ys, xs] == 1).all() and (labels == 1).all()
    counts = np.bincount(ys * 64 + xs, minlength=64 * 64)[mask.reshape(-1) == 1]
    expected = 20000 / mask.sum()
    # every foreground pixel drawn, none far from its share (chi-square, generous bound)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert counts.min() > 0 and chi2 < 2 * mask.sum()


def test_prompts_of_indexed_rows_equal_prompts_of_the_rows():
    # the reader prompts drawn rows (repeats included) of the decoded stack without copying them
    rng = np.random.default_rng(6)
    masks = _masks(rng, 4, 20, 24)
    masks[2] = 0  # an empty mask among them
    masks[1] = 0
    masks[1, np.arange(20), np.arange(20)] = 1  # thin: most points come from the exact fallback
    masks[0] = 0
    masks[0, np.arange(20), 23 - np.arange(20)] = 1
    index = np.array([3, 0, 3, 2, 3, 1])
    rows = masks[index]
    for got, ref in zip(tight_boxes(masks, index), tight_boxes(rows), strict=True):
        np.testing.assert_array_equal(got, ref)
    boxes, empty = tight_boxes(masks, index)
    assert empty.tolist() == [False, False, False, True, False, False]
    for j in (0, 1, 2, 4, 5):
        assert boxes[j].tolist() == _reference_box(rows[j])
    assert boxes[3].tolist() == [0, 0, 23, 19]
    a = boxes_from_masks(masks, jitter=4, rng=np.random.default_rng(1), index=index)
    b = boxes_from_masks(rows, jitter=4, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert not (a[0] == a[2]).all() or not (a[2] == a[4]).all()  # repeats: independent shifts
    ca, la = points_from_masks(masks, n=5, rng=np.random.default_rng(2), index=index)
    cb, lb = points_from_masks(rows, n=5, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_array_equal(la, lb)
    assert la[3].tolist() == [0] * 5 and (la[[0, 1, 2, 4, 5]] == 1).all()
    # boolean masks give the same boxes as 0/1 bytes
    np.testing.assert_array_equal(tight_boxes(masks.astype(bool), index)[0], tight_boxes(rows)[0])
    with pytest.raises(ValueError, match="index"):
        tight_boxes(masks, np.array([0, 4]))


def test_collate_gathers_indexed_masks_into_one_buffer():
    full = _sample("d", 3)
    index = np.array([2, 2, 0, 1])
    fields = ("boxes", "point_coords", "point_labels", "class_ids")
    rows = {k: full[k][index] for k in fields}
    indexed = {**full, **rows, "mask_index": index}  # masks stay (3, S, S)
    plain = {**full, **rows, "masks": full["masks"][index]}
    for other in (_sample("e", 4), _sample("f", 1)):  # same M, then padding
        a, b = collate([indexed, other]), collate([plain, other])
        tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
        assert sorted(tensors) == sorted(["image", "masks", *fields, "mask_valid"])
        for k in tensors:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            assert a[k].is_contiguous()
        np.testing.assert_array_equal(a["masks"][0].numpy(), full["masks"][index])
        # every tensor of the batch is a view of one buffer (one segment to hand between
        # processes); in the main process it is ordinary memory
        assert len({a[k].untyped_storage().data_ptr() for k in tensors}) == 1
        assert not a["image"].untyped_storage().is_shared()
    assert collate([indexed, _sample("f", 1)])["mask_valid"].tolist() == [
        [True] * 4,
        [True] + [False] * 3,
    ]
