"""Prompts from masks: boxes and points (numpy and OpenCV, one pass per distinct mask).

Conventions (SAM-Med2D's ``get_boxes_from_mask`` / ``init_point_sampling``, utils.py, called by
its ``TrainingDataset`` on each mask after the resize to the model's input size, i.e. in the frame
our shards are stored in):

* a box is ``(x0, y0, x1, y1)`` in pixels with an **exclusive** maximum, as
  ``skimage.measure.regionprops``' ``bbox``: a mask whose only pixel is ``(row=3, col=5)`` has
  the box ``(5, 3, 6, 4)``, and ``x1 - x0`` is the width in pixels. (``segment_anything``'s own
  ``batched_mask_to_box`` is inclusive, one pixel smaller; SAM-Med2D trains with the exclusive
  box.) The box of an empty mask is the whole image ``(0, 0, W, H)`` (SAM-Med2D fails on empty
  masks; interactive training never sees them: the reader skips them).
* ``box_from="largest_component"`` (SAM-Med2D): the box of the mask's largest 8-connected
  component (``skimage.measure.label``'s default full connectivity); a tie goes to the component
  met first in raster order (skimage numbers components in that order and Python's sort is
  stable). ``"whole_mask"``: the box of all foreground pixels.
* a point is ``(x, y)`` = ``(col, row)`` of a pixel, uniform over the **whole** mask's foreground;
  label 1 = foreground, 0 = background.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.config import BOX_FROM, BoxFrom

__all__ = [
    "boxes_from_masks",
    "component_boxes",
    "points_from_masks",
    "tight_boxes",
]

# SAM-Med2D's jitter: the limit is int(min(w, h) * std * 5) pixels, std = 0.1 (get_boxes_from_mask)
_JITTER_STD = 0.1


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
    """The box of all foreground pixels of each mask (or of the masks ``index`` picks).

    Each distinct mask is scanned once (``cv2.boundingRect`` of its nonzero pixels), however many
    times ``index`` repeats it.

    Arguments:
      masks: (N, H, W) array, nonzero = foreground.
      index: (M,) rows of ``masks`` (repeats allowed); None = every row (M = N).

    Returns:
      boxes: (M, 4) int64 ``x0, y0, x1, y1``, maxima exclusive (``(0, 0, W, H)`` when empty).
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
    boxes[:, 2:] = rects[:, :2] + rects[:, 2:]
    boxes[empty] = (0, 0, w, h)
    return boxes, empty


def _labelled_largest(crop: np.ndarray) -> tuple[int, int, int, int]:
    """``(x, y, width, height)`` of the largest 8-connected component of ``crop``, by labelling.

    Ties go to the component whose first pixel comes first in raster order (SAM-Med2D's choice,
    through skimage's label numbering and a stable sort). OpenCV numbers labels in the order of
    its 2-row block scan, not the raster order, so ties are settled from the label image.
    """
    _, labels, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8, ltype=cv2.CV_32S)
    area = stats[1:, cv2.CC_STAT_AREA]
    best = np.flatnonzero(area == area.max()) + 1
    if best.size > 1:
        flat = labels.reshape(-1)
        best = best[np.argmin([np.argmax(flat == label) for label in best.tolist()])]
    else:
        best = best[0]
    x, y, bw, bh = stats[best, :4].tolist()
    return x, y, bw, bh


def _largest_component(crop: np.ndarray) -> tuple[int, int, int, int]:
    """``(x, y, width, height)`` in ``crop`` (a mask's whole-mask box, uint8) of its largest
    8-connected foreground component.

    Border following (``cv2.findContours``, several times cheaper than labelling with
    statistics) finds the components: their outer borders are the top level of ``RETR_CCOMP``
    (holes below; a component inside another's hole is top level too), and a component's outer
    border holds its extreme pixels, so its bounding rectangle is the component's box. One
    component (the common case): the crop itself. Several: a component has at least as many
    pixels as its box's longer side (it has a pixel in every row and column of its box) and at
    most its box's area, so only components whose box area reaches the largest such lower bound
    can be the largest; one such candidate (a structure and a few specks) is the answer, several
    are counted by flood fill from a border pixel, and an exact tie is settled by labelling.
    """
    # a zero frame: findContours must see background beyond every border pixel
    framed = cv2.copyMakeBorder(crop, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, hierarchy = cv2.findContours(framed, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer = [c for c, link in zip(contours, hierarchy[0], strict=True) if link[3] < 0]
    if len(outer) == 1:
        return 0, 0, crop.shape[1], crop.shape[0]
    rects = [cv2.boundingRect(c) for c in outer]
    least = max(max(bw, bh) for _, _, bw, bh in rects)
    candidates = [k for k, (_, _, bw, bh) in enumerate(rects) if bw * bh >= least]
    if len(candidates) > 1:
        filled = np.zeros((framed.shape[0] + 2, framed.shape[1] + 2), np.uint8)
        flags = 8 | cv2.FLOODFILL_MASK_ONLY | (1 << 8)  # 8-connected, mark the mask with 1
        sizes = []
        for k in candidates:
            seed = tuple(int(v) for v in outer[k][0, 0])  # a pixel of the component's border
            sizes.append(cv2.floodFill(framed, filled, seed, 1, 0, 0, flags)[0])
        best = max(sizes)
        if sizes.count(best) > 1:  # the first in raster order wins: label to find it
            return _labelled_largest(crop)
        candidates = [candidates[sizes.index(best)]]
    x, y, bw, bh = rects[candidates[0]]
    return x - 1, y - 1, bw, bh


def component_boxes(
    masks: np.ndarray,
    index: np.ndarray | None = None,
    *,
    tight: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The box of the largest 8-connected component of each mask (SAM-Med2D's box).

    Each distinct mask is looked at once, within its whole-mask box only (a mask's components all
    lie there): see ``_largest_component``.

    Arguments:
      masks: (N, H, W) array, nonzero = foreground.
      index: (M,) rows of ``masks`` (repeats allowed); None = every row.
      tight: ``tight_boxes(masks, index)`` if already computed.

    Returns:
      (M, 4) int64 ``x0, y0, x1, y1``, maxima exclusive (``(0, 0, W, H)`` for an empty mask).
    """
    rows = _rows(masks, index)
    boxes, empty = tight_boxes(masks, rows) if tight is None else tight
    out = boxes.copy()
    done: dict[int, int] = {}  # mask row -> first prompt row that has its box
    for j, i in enumerate(rows.tolist()):
        if i in done:
            out[j] = out[done[i]]
            continue
        done[i] = j
        if empty[j]:
            continue
        x0, y0, x1, y1 = boxes[j].tolist()
        x, y, bw, bh = _largest_component(np.ascontiguousarray(_bytes(masks[i])[y0:y1, x0:x1]))
        out[j] = (x0 + x, y0 + y, x0 + x + bw, y0 + y + bh)
    return out


def boxes_from_masks(
    masks: np.ndarray,
    *,
    jitter: int,
    rng: np.random.Generator,
    box_from: BoxFrom = "largest_component",
    tight: tuple[np.ndarray, np.ndarray] | None = None,
    index: np.ndarray | None = None,
) -> np.ndarray:
    """Box prompts: each mask's box (``box_from``), shifted as SAM-Med2D shifts it.

    The whole box moves by one integer offset per axis (``dx`` for both x corners, ``dy`` for both
    y corners), each drawn uniformly from ``[-n, n)`` (numpy's ``randint(-n, n)``: never ``+n``)
    with ``n = min(jitter, int(min(w, h) * 0.1 * 5))``, ``w`` and ``h`` the box's width and height
    in pixels (small structures get less noise); ``n = 0`` means no shift. As in SAM-Med2D the
    shifted box is not clipped to the image: a corner may lie up to ``n`` pixels outside it (the
    prompt encoder takes any coordinates). A mask that ``index`` repeats gets an independent shift
    per repeat.

    Arguments:
      masks: (N, H, W) uint8 or bool masks.
      jitter: the largest shift in pixels (``data.box_jitter``, SAM-Med2D's ``max_pixel``); 0 =
        exact boxes.
      rng: the numpy generator to draw from.
      box_from: "largest_component" (SAM-Med2D) or "whole_mask" (all foreground pixels).
      tight: ``tight_boxes(masks, index)`` if already computed.
      index: (M,) rows of ``masks`` to prompt (repeats allowed); None = every row.

    Returns:
      (M, 4) float32 boxes ``x0, y0, x1, y1`` (pixels, maxima exclusive).
    """
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if box_from not in BOX_FROM:
        raise ValueError(f"box_from must be one of {', '.join(BOX_FROM)}, got {box_from!r}")
    rows = _rows(masks, index)
    tight = tight_boxes(masks, rows) if tight is None else tight
    if box_from == "largest_component":
        boxes = component_boxes(masks, rows, tight=tight)
    else:
        boxes = tight[0].copy()
    empty = tight[1]
    m = boxes.shape[0]
    if jitter > 0 and m > 0:
        size = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        # the same float arithmetic as SAM-Med2D's int(min(w, h) * std * 5) (floor at integers)
        limit = np.minimum(jitter, (size * _JITTER_STD * 5).astype(np.int64))
        limit[empty] = 0
        # uniform integer in [-limit, limit); the upper bound max(limit, 1) gives 0 when limit is 0
        low = -limit[:, None]
        shift = rng.integers(low, np.maximum(limit, 1)[:, None], size=(m, 2), dtype=np.int64)
        boxes[:, 0::2] += shift[:, :1]
        boxes[:, 1::2] += shift[:, 1:]
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

    Each point first tries 16 uniform pixels of the mask's whole-mask box, all at once for the whole
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
    bw = (boxes[:, 2] - boxes[:, 0])[:, None, None]
    bh = (boxes[:, 3] - boxes[:, 1])[:, None, None]
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
