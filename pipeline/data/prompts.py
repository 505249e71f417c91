"""Prompts from masks: boxes and points, vectorised over the mask stack (numpy, no torch).

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

import numpy as np

__all__ = ["boxes_from_masks", "points_from_masks", "tight_boxes"]


def tight_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight inclusive boxes of each mask.

    Arguments:
      masks: (M, H, W) array, nonzero = foreground.

    Returns:
      boxes: (M, 4) int64 ``x0, y0, x1, y1`` (whole image for empty masks).
      empty: (M,) bool, True where a mask has no foreground pixel.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {masks.shape}")
    m, h, w = masks.shape
    rows = masks.any(axis=2)  # (M, H)
    cols = masks.any(axis=1)  # (M, W)
    empty = ~rows.any(axis=1)
    boxes = np.empty((m, 4), dtype=np.int64)
    # argmax finds the first True; on the reversed axis it finds the last one
    boxes[:, 0] = cols.argmax(axis=1)
    boxes[:, 1] = rows.argmax(axis=1)
    boxes[:, 2] = w - 1 - cols[:, ::-1].argmax(axis=1)
    boxes[:, 3] = h - 1 - rows[:, ::-1].argmax(axis=1)
    boxes[empty] = (0, 0, w - 1, h - 1)
    return boxes, empty


def boxes_from_masks(
    masks: np.ndarray,
    *,
    jitter: int,
    rng: np.random.Generator,
    tight: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Box prompts: the tight box of each mask, shifted by a random offset.

    The whole box moves by one integer offset per axis (``dx`` for both x corners, ``dy`` for both
    y corners), each drawn uniformly from ``[-n, n)`` with
    ``n = min(jitter, int(0.1 * min(box_w, box_h) * 5))`` (SAM-Med2D's rule: small structures get
    less noise); ``n = 0`` means no shift. Corners are then clipped to the image, so every
    coordinate stays within ``n`` of the tight box.

    Arguments:
      masks: (M, H, W) uint8 or bool masks.
      jitter: the largest shift in pixels (``data.box_jitter``); 0 = exact tight boxes.
      rng: the numpy generator to draw from.
      tight: ``tight_boxes(masks)`` if already computed.

    Returns:
      (M, 4) float32 boxes ``x0, y0, x1, y1`` (inclusive pixel coordinates).
    """
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    boxes, empty = tight_boxes(masks) if tight is None else tight
    boxes = boxes.copy()
    m, h, w = masks.shape
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
) -> tuple[np.ndarray, np.ndarray]:
    """Point prompts: ``n`` foreground pixels per mask, uniform and independent (with replacement).

    Each point first tries 16 uniform pixels of the mask's tight box, all at once for the whole
    (M, n) array, and keeps the first that is foreground (rejection sampling: uniform over the
    foreground). Points whose 16 tries all miss (thin or sparse masks) are drawn exactly: the k-th
    pixel of ``np.flatnonzero(mask)`` with k uniform. Either way each point is uniform over the
    mask's foreground, and no pass over all pixels is made for typical masks. An empty mask gets
    ``n`` uniform pixels of the image labelled 0 (background), as a negative click would be.

    Arguments:
      masks: (M, H, W) uint8 or bool masks.
      n: points per mask (``data.point_num``), >= 1.
      rng: the numpy generator to draw from.
      tight: ``tight_boxes(masks)`` if already computed.

    Returns:
      coords: (M, n, 2) float32 ``x, y`` pixel coordinates.
      labels: (M, n) int64, 1 = foreground, 0 = background.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    boxes, empty = tight_boxes(masks) if tight is None else tight
    m, h, w = masks.shape
    # empty masks: their "box" is the whole image, and every try is a (background) pixel of it
    x0, y0 = boxes[:, 0, None, None], boxes[:, 1, None, None]
    bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None, None]
    bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None, None]
    xs = x0 + rng.integers(0, bw, size=(m, n, _TRIES), dtype=np.int64)
    ys = y0 + rng.integers(0, bh, size=(m, n, _TRIES), dtype=np.int64)
    hit = masks[np.arange(m)[:, None, None], ys, xs] != 0
    hit[empty] = True  # take the first try
    first = hit.argmax(axis=2)[..., None]  # (M, n, 1)
    x = np.take_along_axis(xs, first, axis=2)[..., 0]
    y = np.take_along_axis(ys, first, axis=2)[..., 0]
    missed = ~hit.any(axis=2)  # (M, n)
    for i in np.flatnonzero(missed.any(axis=1)):
        fg = np.flatnonzero(masks[i])
        rows = np.flatnonzero(missed[i])
        pick = fg[rng.integers(0, fg.size, size=rows.size)]
        y[i, rows], x[i, rows] = np.divmod(pick, w)
    coords = np.empty((m, n, 2), dtype=np.float32)
    coords[..., 0] = x
    coords[..., 1] = y
    labels = np.broadcast_to(~empty[:, None], (m, n)).astype(np.int64)
    return coords, labels
