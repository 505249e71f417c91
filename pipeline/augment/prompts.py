"""Box and point prompts of resampled masks, recomputed on the device by the reader's rules.

A rotation or scaling resamples the masks, so their prompts cannot be moved with them: nearest
sampling can split a thin component, join two close ones or change which one is the largest. The
prompts are made again from the transformed masks with the rules of ``pipeline/data/prompts.py``:

* box: the largest 8-connected component (``data.box_from=largest_component``; a size tie goes to
  the component met first in raster order) or all foreground pixels (``whole_mask``), maximum
  exclusive; then SAM-Med2D's jitter: one integer shift per axis, uniform in ``[-n, n)`` with
  ``n = min(data.box_jitter, int(min(w, h) * 0.1 * 5))``, not clipped;
* points: uniform over the whole mask's foreground.

Components are found on the device, batched over all masks, by parent-pointer hooking with
pointer jumping (``_roots``): a few rounds (logarithmic in the mask's size, whatever its shape),
each ending with one comparison on the host. A component's root is its first pixel in raster
order, which settles size ties exactly as the reader does.
"""

from __future__ import annotations

import torch

from pipeline.interact import positions_from_uniform

__all__ = ["component_masks", "jitter_boxes", "mask_boxes", "mask_points"]

_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))  # each 8-neighbour pair once
_JITTER_STD = 0.1  # SAM-Med2D's get_boxes_from_mask: int(min(w, h) * std * 5)


def _pairs(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """The (rows, cols) slices of the pixels and of their neighbours at (+dy, +dx)."""
    xs, xt = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    return (slice(0, h - dy), xs), (slice(dy, h), xt)


def _roots(fg: torch.Tensor) -> torch.Tensor:
    """Each pixel's component root: the flat index (over all masks) of the component's first
    pixel in raster order. Background pixels are their own roots.

    FastSV-style hooking with pointer jumping (Zhang, Azad and Hu, 2020): every round, each pair of
    8-neighbouring foreground pixels lowers the parent of either side, and that parent's parent,
    to the other side's grandparent; then every parent jumps to its grandparent. Parents only
    ever point to smaller indices of the same component, so at the fixed point every pixel points
    at its component's smallest index. O(log) rounds, whatever the shape (a spiral or a noise
    pattern needs about as many as a disc).
    """
    p, h, w = fg.shape
    parent = torch.arange(p * h * w, device=fg.device)
    grid = parent.view(p, h, w)
    edges = []
    for dy, dx in _NEIGHBOURS:
        a, b = _pairs(h, w, dy, dx)
        edges.append((a, b, fg[:, a[0], a[1]] & fg[:, b[0], b[1]]))
    while True:
        before = parent.clone()
        grand = parent[parent].view(p, h, w)
        for a, b, both in edges:
            for s, t in ((a, b), (b, a)):
                mine = grid[:, s[0], s[1]].clone()  # not a view of what the scatter writes
                offer = torch.where(both, grand[:, t[0], t[1]], mine)
                parent.scatter_reduce_(0, mine.reshape(-1), offer.reshape(-1), "amin")
                grid[:, s[0], s[1]] = torch.minimum(grid[:, s[0], s[1]], offer)
        parent.copy_(parent[parent])
        if torch.equal(parent, before):
            return grid


def component_masks(masks: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of each mask (ties: the first in raster order), on the
    masks' device.

    Arguments:
      masks: (P, H, W) bool.

    Returns:
      (P, H, W) bool; an empty mask gives an empty component.
    """
    p, h, w = masks.shape
    n = h * w
    fg = masks.bool().reshape(p, n)
    root = _roots(masks.bool()).reshape(p, n)
    inside = fg.long()
    sizes = torch.zeros(p * n, dtype=torch.long, device=masks.device)
    sizes.scatter_add_(0, root.reshape(-1), inside.reshape(-1))
    local = root - torch.arange(p, device=masks.device)[:, None] * n
    # the largest; among equals, the smallest root (the first in raster order)
    score = (sizes[root] * (n + 1) + (n - local)) * inside
    best = score.amax(1, keepdim=True)
    return ((score == best) & fg).view(p, h, w)


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of all True pixels of each mask.

    Arguments:
      masks: (P, H, W) bool.

    Returns:
      boxes: (P, 4) int64 ``x0, y0, x1, y1``, maxima exclusive; ``(0, 0, W, H)`` when empty.
      empty: (P,) bool.
    """
    h, w = masks.shape[-2:]
    rows, cols = masks.any(2), masks.any(1)
    empty = ~rows.any(1)
    y0 = rows.int().argmax(1)
    y1 = h - rows.flip(1).int().argmax(1)
    x0 = cols.int().argmax(1)
    x1 = w - cols.flip(1).int().argmax(1)
    boxes = torch.stack((x0, y0, x1, y1), 1).long()
    whole = torch.tensor([0, 0, w, h], device=masks.device)
    return torch.where(empty[:, None], whole, boxes), empty


def jitter_boxes(
    boxes: torch.Tensor, empty: torch.Tensor, u: torch.Tensor, *, jitter: int
) -> torch.Tensor:
    """SAM-Med2D's box noise (``pipeline.data.prompts.boxes_from_masks``), from given uniforms.

    Arguments:
      boxes: (P, 4) int64 exact boxes; empty: (P,) bool.
      u: (P, 2) float64 uniforms in [0, 1): the x and y shifts.
      jitter: the largest shift (``data.box_jitter``).

    Returns:
      (P, 4) float32 boxes.
    """
    size = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    # the reader's float64 arithmetic, truncated: int(min(w, h) * 0.1 * 5)
    limit = torch.clamp((size.double() * _JITTER_STD * 5).long(), max=jitter)
    limit = torch.where(empty, torch.zeros_like(limit), limit)[:, None]
    shift = (u * (2 * limit)).floor().long() - limit  # uniform in [-limit, limit), 0 if limit 0
    out = boxes.clone()
    out[:, 0::2] += shift[:, :1]
    out[:, 1::2] += shift[:, 1:]
    return out.float()


def mask_points(masks: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Point prompts uniform over each mask's foreground, from given uniforms.

    Arguments:
      masks: (P, H, W) bool.
      u: (P, n) float64 uniforms in [0, 1).

    Returns:
      coords: (P, n, 2) float32 ``x, y`` pixel indices; labels: (P, n) int64, 1 (0 for an empty
      mask, whose points are uniform over the image, as the reader's).
    """
    w = masks.shape[-1]
    flat = masks.flatten(1)
    index = positions_from_uniform(flat, u)
    coords = torch.stack((index % w, torch.div(index, w, rounding_mode="floor")), -1).float()
    return coords, flat.any(1, keepdim=True).long().expand_as(index).contiguous()
