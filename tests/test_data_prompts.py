"""Box / point prompts from masks and batch collation, against per-mask numpy references."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from pipeline.data.collate import collate, label_map
from pipeline.data.prompts import (
    boxes_from_masks,
    component_boxes,
    points_from_masks,
    tight_boxes,
)


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
    """regionprops' bbox convention: maxima exclusive."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _reference_component_box(mask: np.ndarray) -> list[int]:
    """SAM-Med2D's box, spelled out: ``skimage.measure.label`` (8-connectivity, components
    numbered in the raster order of their first pixel) + ``regionprops``, sorted by area with
    Python's stable sort (a tie goes to the lowest label); bbox maxima exclusive."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: tuple[int, list[int]] | None = None
    for r0 in range(h):
        for c0 in range(w):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            seen[r0, c0] = True
            todo, area, box = deque([(r0, c0)]), 0, [c0, r0, c0 + 1, r0 + 1]
            while todo:
                r, c = todo.popleft()
                area += 1
                box = [min(box[0], c), min(box[1], r), max(box[2], c + 1), max(box[3], r + 1)]
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            todo.append((rr, cc))
            if best is None or area > best[0]:
                best = (area, box)
    assert best is not None
    return best[1]


def test_whole_mask_boxes_exact_with_zero_jitter():
    rng = np.random.default_rng(0)
    masks = _masks(rng, 50, 24, 31)
    boxes = boxes_from_masks(masks, jitter=0, rng=rng, box_from="whole_mask")
    assert boxes.shape == (50, 4) and boxes.dtype == np.float32
    for mask, box in zip(masks, boxes, strict=True):
        assert box.tolist() == _reference_box(mask)
    one = np.zeros((1, 10, 12), np.uint8)
    one[0, 3, 5] = 1
    for box_from in ("whole_mask", "largest_component"):
        got = boxes_from_masks(one, jitter=0, rng=rng, box_from=box_from)
        assert got.tolist() == [[5, 3, 6, 4]]  # regionprops' bbox: one pixel is 1 x 1
    full = np.ones((1, 10, 12), np.uint8)  # a mask touching every border: the image's box
    assert boxes_from_masks(full, jitter=0, rng=rng).tolist() == [[0, 0, 12, 10]]
    with pytest.raises(ValueError, match="box_from"):
        boxes_from_masks(one, jitter=0, rng=rng, box_from="whole")


def test_largest_component_boxes_match_sam_med2d_rule():
    rng = np.random.default_rng(10)
    masks = _masks(rng, 120, 24, 31)  # 60 % density blobs: most have several components
    # hand-made cases: 8-connectivity (a diagonal is one component), ties by raster order
    extra = np.zeros((4, 24, 31), np.uint8)
    extra[0, np.arange(10), np.arange(10)] = 1  # diagonal: one component, not ten
    extra[0, 20:22, 25:29] = 1  # smaller (8 px) than the diagonal (10 px)
    extra[1, 5:7, 20:23] = 1  # 6 px, first in raster order (row 5)
    extra[1, 10:13, 2:4] = 1  # 6 px, same area, later first pixel, further left
    # 2 px each; raster order meets row 0 first, OpenCV's 2-row block scan meets column 0 first
    extra[2, 0, 5:7] = 1
    extra[2, 1:3, 0] = 1
    extra[3, 3:9, 3:9] = 1  # a ring and a larger speck inside does not merge with it
    extra[3, 4:8, 4:8] = 0
    extra[3, 5:7, 5:7] = 1
    masks = np.concatenate([masks, extra])
    boxes = boxes_from_masks(masks, jitter=0, rng=rng)
    for i, (mask, box) in enumerate(zip(masks, boxes, strict=True)):
        assert box.tolist() == _reference_component_box(mask), i
    assert boxes[-4].tolist() == [0, 0, 10, 10]
    assert boxes[-3].tolist() == [20, 5, 23, 7]
    assert boxes[-2].tolist() == [5, 0, 7, 1]
    assert boxes[-1].tolist() == [3, 3, 9, 9]
    # the rule matters on these masks: the whole-mask box differs for many of them
    whole = boxes_from_masks(masks, jitter=0, rng=rng, box_from="whole_mask")
    assert (whole != boxes).any(axis=1).sum() > 20
    # repeats, bool masks and a precomputed whole-mask box give the same boxes
    index = np.array([3, 121, 3, 0])
    tight = tight_boxes(masks, index)
    np.testing.assert_array_equal(component_boxes(masks, index, tight=tight), boxes[index])
    np.testing.assert_array_equal(component_boxes(masks.astype(bool), index), boxes[index])


def test_jittered_boxes_stay_within_the_limit():
    rng = np.random.default_rng(1)
    h, w, jitter = 40, 48, 5
    masks = _masks(rng, 400, h, w)
    tight, _ = tight_boxes(masks)
    boxes = boxes_from_masks(masks, jitter=jitter, rng=rng, box_from="whole_mask")
    boxes = boxes.astype(np.int64)
    size = np.minimum(tight[:, 2] - tight[:, 0], tight[:, 3] - tight[:, 1])
    limit = np.minimum(jitter, (0.5 * size).astype(int))
    shift = boxes - tight
    assert (np.abs(shift) <= limit[:, None]).all()
    assert (shift <= np.maximum(limit - 1, 0)[:, None]).all()  # [-n, n): never +n
    # one shift per axis, both corners together, never clipped (SAM-Med2D does not clip)
    assert (shift[:, 0] == shift[:, 2]).all()
    assert (shift[:, 1] == shift[:, 3]).all()
    outside = (boxes[:, :2] < 0).any(axis=1) | (boxes[:, 2] > w) | (boxes[:, 3] > h)
    assert outside.any()
    assert (boxes[:, 0::2] >= -jitter).all() and (boxes[:, 0::2] <= w + jitter).all()
    assert (boxes[:, 1::2] >= -jitter).all() and (boxes[:, 1::2] <= h + jitter).all()
    # big masks do get shifted, over the whole range
    big = limit == jitter
    assert shift[big, 0].min() == -jitter and shift[big, 0].max() == jitter - 1
    # tiny masks (min side < 2) never move
    assert (shift[size < 2] == 0).all()


def test_jitter_limit_follows_the_component_box():
    # a 3 x 3 square and a 20 x 20 one: the prompt is the big one's box, and its noise limit
    # min(5, int(20 * 0.1 * 5)) = 5; the whole-mask box would give the same limit, so also a
    # mask whose largest component is thin: limit int(2 * 0.5) = 1, shifts in [-1, 1) only
    mask = np.zeros((2, 64, 64), np.uint8)
    mask[0, 2:5, 2:5] = 1
    mask[0, 30:50, 30:50] = 1
    mask[1, 10:12, 5:60] = 1  # 2 x 55 bar: its limit is 1
    mask[1, 40, 40] = 1  # a speck far away makes the whole-mask box 31 x 55 (limit 5)
    rng = np.random.default_rng(3)
    index = np.repeat(np.arange(2), 500)
    boxes = boxes_from_masks(mask, jitter=5, rng=rng, index=index).astype(np.int64)
    shift = boxes - component_boxes(mask, index)
    assert shift[:500].min() == -5 and shift[:500].max() == 4
    assert set(np.unique(shift[500:]).tolist()) == {-1, 0}


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
    assert boxes[0].tolist() == [0, 0, 11, 9]
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
    assert boxes[3].tolist() == [0, 0, 24, 20]
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
