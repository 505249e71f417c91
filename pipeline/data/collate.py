"""Samples -> one batch of fixed-shape tensors (numpy stacking, one ``torch.from_numpy`` per field).

A *sample* is what the reader's map stage makes of one shard sample (see ``stream.py``)::

    key          str                 dataset/case/slice
    image        (3, S, S) uint8     may be a strided view (HWC transposed, or gray broadcast)
    meta         dict                the sample's KEY.json (+ "url", and "padding" for top-up)
    -- interactive mode --
    masks        (M, S, S) uint8     0/1
    boxes        (M, 4) float32      x0, y0, x1, y1 (inclusive)
    point_coords (M, n, 2) float32   x, y
    point_labels (M, n) int64        1 foreground, 0 background
    class_ids    (M,) int64
    -- semantic mode --
    label        (S, S) int64        class id per pixel, 0 = background

A batch (interactive)::

    image        (B, 3, S, S) uint8  normalised on the device by the model
    masks        (B, M, S, S) uint8
    boxes        (B, M, 4) float32
    point_coords (B, M, n, 2) float32
    point_labels (B, M, n) int64
    class_ids    (B, M) int64
    mask_valid   (B, M) bool         False for padding (only when samples have different M)
    keys         list[str]
    meta         list[dict]

Samples with different M (the eval loader keeps every mask of an image) are padded to the
largest M of the batch, at least 1: padded masks are zeros, boxes and points zeros, point labels
-1 (SAM's "not a point"), class ids -1, ``mask_valid`` False.

A batch (semantic): ``image``, ``label`` (B, S, S) int64, ``keys``, ``meta``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["collate", "label_map"]


def label_map(masks: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """All masks of an image -> one label map.

    Masks are painted in order, so where masks overlap the **later** mask's class wins. Class id 0
    (unknown class) paints background.

    Arguments:
      masks: (N, S, S) uint8 0/1 (N may be 0).
      class_ids: (N,) integer class id per mask.

    Returns:
      (S, S) int64 label map, 0 = background.
    """
    n, h, w = masks.shape
    if n == 0:
        return np.zeros((h, w), dtype=np.int64)
    # index of the last mask covering each pixel: argmax over the reversed stack finds the first 1
    rev = masks[::-1]
    last = (n - 1) - rev.argmax(axis=0)
    covered = rev.any(axis=0)
    ids = np.asarray(class_ids, dtype=np.int64)
    return np.where(covered, ids[last], 0)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack into a new C-contiguous array (``np.stack`` keeps the layout of strided views)."""
    out = np.empty((len(arrays), *arrays[0].shape), dtype=arrays[0].dtype)
    for i, arr in enumerate(arrays):
        out[i] = arr
    return out


def _stack_padded(arrays: list[np.ndarray], m: int, fill: float, dtype: np.dtype) -> np.ndarray:
    """Stack (M_i, ...) arrays into (B, m, ...), padding M_i < m with ``fill``."""
    shape = (len(arrays), m, *arrays[0].shape[1:])
    out = np.full(shape, fill, dtype=dtype)
    for i, arr in enumerate(arrays):
        out[i, : arr.shape[0]] = arr
    return out


def _interactive(samples: list[dict]) -> dict:
    counts = [s["masks"].shape[0] for s in samples]
    m = max(max(counts), 1)
    if all(c == m for c in counts):
        # the training case: one contiguous copy per field, no padding
        masks = _stack([s["masks"] for s in samples])
        boxes = _stack([s["boxes"] for s in samples])
        coords = _stack([s["point_coords"] for s in samples])
        labels = _stack([s["point_labels"] for s in samples])
        class_ids = _stack([s["class_ids"] for s in samples])
        valid = np.ones((len(samples), m), dtype=bool)
    else:
        masks = _stack_padded([s["masks"] for s in samples], m, 0, np.uint8)
        boxes = _stack_padded([s["boxes"] for s in samples], m, 0, np.float32)
        coords = _stack_padded([s["point_coords"] for s in samples], m, 0, np.float32)
        labels = _stack_padded([s["point_labels"] for s in samples], m, -1, np.int64)
        class_ids = _stack_padded([s["class_ids"] for s in samples], m, -1, np.int64)
        valid = np.arange(m)[None, :] < np.asarray(counts)[:, None]
    return {
        "masks": torch.from_numpy(masks),
        "boxes": torch.from_numpy(boxes),
        "point_coords": torch.from_numpy(coords),
        "point_labels": torch.from_numpy(labels),
        "class_ids": torch.from_numpy(class_ids),
        "mask_valid": torch.from_numpy(valid),
    }


def collate(samples: list[dict]) -> dict:
    """Stack samples (interactive or semantic, see the module docstring) into one batch.

    Arguments:
      samples: a non-empty list of samples, all of the same mode and image size.

    Returns:
      The batch dict of the module docstring.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch = {
        # one contiguous (B, 3, S, S) copy from the strided per-sample views
        "image": torch.from_numpy(_stack([s["image"] for s in samples])),
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    if "label" in samples[0]:
        batch["label"] = torch.from_numpy(_stack([s["label"] for s in samples]))
    else:
        batch.update(_interactive(samples))
    return batch
