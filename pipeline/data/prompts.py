"""Prompts from masks: boxes and points (numpy, one ``cv2.boundingRect`` per distinct mask).

Conventions (the same as ``segment_anything``'s own ``batched_mask_to_box`` and predictor):

* a box is ``(x0, y0, x1, y1)`` in pixels with **inclusive** maxima: a mask whose only pixel is
  ``(row=3, col=5)`` has the box ``(5, 3, 5, 3)``. Box of an empty mask: the whole image
  ``(0, 0, W - 1, H - 1)`` (interactive training never sees empty masks: the reader skips them).
* the box is the tight box of the **whole** mask (all connected components), not of the largest
  component as SAM-Med2D does with ``skimage.measure.regionprops``: masks in our shards are one
  structure each, and the whole-mask box never hides a part of the target from the prompt.
* a point is ``(x, y)`` = ``(col, row)`` of a pixel; label 1 = foreground, 0 = background.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["boxes_from_masks", "points_from_masks", "tight_boxes"]


def _rows(masks: np.ndarray, index: np.ndarray | None) -> np.ndarray:
    """The mask rows prompted: ``index`` (checked), or every row of ``masks``."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if index is None:
        return np.arange(masks.shape[0])
    index = np.asarray(index, dtype=np.int64)
    if index.ndim != 1 or (index.size and not 0 <= index.min() <= index.max() < masks.shape[0]):
        raise ValueError(f"index must be (M,) rows of the {masks.shape[0]} masks, got {index!r}")
    return index


def _bytes(mask: np.ndarray) -> np.ndarray:
    """One (H, W) mask as contiguous uint8 with nonzero = foreground (a view for bool / uint8)."""
    if mask.dtype == np.uint8:
        return np.ascontiguousarray(mask)
    if mask.dtype == bool:
        return np.ascontiguousarray(mask).view(np.uint8)
    return (mask != 0).view(np.uint8)


def tight_boxes(
    masks: np.ndarray, index: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tight inclusive boxes of each mask (or of the masks ``index`` picks).

    Each distinct mask is scanned once (``cv2.boundingRect`` of its nonzero pixels), however many
    times ``index`` repeats it.

    Arguments:
      masks: (N, H, W) array, nonzero = foreground.
      index: (M,) rows of ``masks`` (repeats allowed); None = every row (M = N).

    Returns:
      boxes: (M, 4) int64 ``x0, y0, x1, y1`` (whole image for empty masks).
      empty: (M,) bool, True where a mask has no foreground pixel.
    """
    rows = _rows(masks, index)
    _, h, w = masks.shape
    distinct, inverse = np.unique(rows, return_inverse=True)
    rects = np.empty((distinct.size, 4), dtype=np.int64)
    for k, i in enumerate(distinct.tolist()):
        rects[k] = cv2.boundingRect(_bytes(masks[i]))  # x, y, width, height; zeros when empty
    rects = rects[inverse.reshape(-1)]
    empty = rects[:, 2] == 0
    boxes = np.empty((rows.size, 4), dtype=np.int64)
    boxes[:, :2] = rects[:, :2]
    boxes[:, 2:] = rects[:, :2] + rects[:, 2:] - 1
    boxes[empty] = (0, 0, w - 1, h - 1)
    return boxes, empty


def boxes_from_masks(
    masks: np.ndarray,
    *,
    jitter: int,
    rng: np.random.Generator,
    tight: tuple[np.ndarray, np.ndarray] | None = None,
    index: np.ndarray | None = None,
) -> np.ndarray:
    """Box prompts: the tight box of each mask, shifted by a random offset.

    The whole box moves by one integer offset per axis (``dx`` for both x corners, ``dy`` for both
    y corners), each drawn uniformly from ``[-n, n)`` with
    ``n = min(jitter, int(0.1 * min(box_w, box_h) * 5))`` (SAM-Med2D's rule: small structures get
    less noise); ``n = 0`` means no shift. Corners are then clipped to the image, so every
    coordinate stays within ``n`` of the tight box. A mask that ``index`` repeats gets an
    independent shift per repeat.

    Arguments:
      masks: (N, H, W) uint8 or bool masks.
      jitter: the largest shift in pixels (``data.box_jitter``); 0 = exact tight boxes.
      rng: the numpy generator to draw from.
      tight: ``tight_boxes(masks, index)`` if already computed.
      index: (M,) rows of ``masks`` to prompt (repeats allowed); None = every row.

    Returns:
      (M, 4) float32 boxes ``x0, y0, x1, y1`` (inclusive pixel coordinates).
    """
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    boxes, empty = tight_boxes(masks, index) if tight is None else tight
    boxes = boxes.copy()
    m = boxes.shape[0]
    _, h, w = masks.shape
    if jitter > 0 and m > 0:
        size = np.minimum(boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1)
        limit = np.minimum(jitter, (0.1 * size * 5).astype(np.int64))
        limit[empty] = 0
        # uniform integer in [-limit, limit); the upper bound max(limit, 1) gives 0 when limit is 0
        low = -limit[:, None]
        shift = rng.integers(low, np.maximum(limit, 1)[:, None], size=(m, 2), dtype=np.int64)
        boxes[:, 0::2] += shift[:, :1]
        boxes[:, 1::2] += shift[:, 1:]
        np.clip(boxes[:, 0::2], 0, w - 1, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, h - 1, out=boxes[:, 1::2])
    return boxes.astype(np.float32)


# candidates drawn per point inside the tight box before falling back to the exact method
_TRIES = 16


def points_from_masks(
    masks: np.ndarray,
    *,
    n: int,
    rng: np.random.Generator,
    tight: tuple[np.ndarray, np.ndarray] | None = None,
    index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Point prompts: ``n`` foreground pixels per mask, uniform and independent (with replacement).

    Each point first tries 16 uniform pixels of the mask's tight box, all at once for the whole
    (M, n) array, and keeps the first that is foreground (rejection sampling: uniform over the
    foreground). Points whose 16 tries all miss (thin or sparse masks) are drawn exactly: the k-th
    pixel of ``np.flatnonzero(mask)`` with k uniform. Either way each point is uniform over the
    mask's foreground, and no pass over all pixels is made for typical masks. An empty mask gets
    ``n`` uniform pixels of the image labelled 0 (background), as a negative click would be.
    A mask that ``index`` repeats gets independent points per repeat.

    Arguments:
      masks: (N, H, W) uint8 or bool masks.
      n: points per mask (``data.point_num``), >= 1.
      rng: the numpy generator to draw from.
      tight: ``tight_boxes(masks, index)`` if already computed.
      index: (M,) rows of ``masks`` to prompt (repeats allowed); None = every row.

    Returns:
      coords: (M, n, 2) float32 ``x, y`` pixel coordinates.
      labels: (M, n) int64, 1 = foreground, 0 = background.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows = _rows(masks, index)
    boxes, empty = tight_boxes(masks, rows) if tight is None else tight
    m = rows.size
    _, h, w = masks.shape
    # empty masks: their "box" is the whole image, and every try is a (background) pixel of it
    x0, y0 = boxes[:, 0, None, None], boxes[:, 1, None, None]
    bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None, None]
    bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None, None]
    xs = x0 + rng.integers(0, bw, size=(m, n, _TRIES), dtype=np.int64)
    ys = y0 + rng.integers(0, bh, size=(m, n, _TRIES), dtype=np.int64)
    hit = masks[rows[:, None, None], ys, xs] != 0
    hit[empty] = True  # take the first try
    first = hit.argmax(axis=2)  # (M, n): the first hit, or 0 when every try missed
    mi, ni = np.arange(m)[:, None], np.arange(n)[None, :]
    x, y = xs[mi, ni, first], ys[mi, ni, first]
    missed = ~hit[mi, ni, first]  # (M, n)
    for i in np.flatnonzero(missed.any(axis=1)):
        fg = np.flatnonzero(masks[rows[i]])
        slots = np.flatnonzero(missed[i])
        pick = fg[rng.integers(0, fg.size, size=slots.size)]
        y[i, slots], x[i, slots] = np.divmod(pick, w)
    coords = np.empty((m, n, 2), dtype=np.float32)
    coords[..., 0] = x
    coords[..., 1] = y
    labels = np.broadcast_to(~empty[:, None], (m, n)).astype(np.int64)
    return coords, labels
