"""Samples -> one batch of fixed-shape tensors, all views of one buffer (see "Memory" below).

A *sample* is what the reader's map stage makes of one shard sample (see ``stream.py``)::

    key          str                 dataset/case/slice
    image        (3, S, S) uint8     may be a strided view (HWC transposed, or gray broadcast)
    meta         dict                the sample's KEY.json (+ "url", and "padding" for top-up)
    -- interactive mode --
    masks        (M, S, S) uint8     0/1; or (N, S, S) with mask_index:
    mask_index   (M,) int64          optional: the sample's masks are masks[mask_index] (the
                                     reader passes the decoded stack and the drawn rows, so each
                                     drawn mask is copied once, straight into the batch)
    boxes        (M, 4) float32      x0, y0, x1, y1 (maxima exclusive)
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

Memory: the tensors of a batch are views of one uint8 buffer (each field 64-byte aligned), and
inside a DataLoader worker that buffer is allocated in shared memory (as torch's default_collate
does). Handing a batch to the main process then costs one shared-memory segment and one file
descriptor instead of one per field, and no copy into shared memory: with 7 fields per batch
this transfer had cost more CPU than making the batch (bench/README.md). Keeping any one tensor
of a batch keeps the whole buffer. torch's default ``file_descriptor`` sharing strategy is kept on
purpose: ``file_system`` measured within noise of it (bench/loader.py, one worker) and leaves the
segments of batches prefetched but never taken (each loader shutdown, e.g. every epoch) in
/dev/shm until the process exits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import get_worker_info

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


class _Buffer:
    """Fields of one batch laid out in one buffer: ``add`` them, then ``allocate`` once."""

    _ALIGN = 64

    def __init__(self) -> None:
        self.fields: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}
        self.size = 0

    def add(self, name: str, shape: tuple[int, ...], dtype) -> None:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        self.fields[name] = (self.size, nbytes, tuple(shape), dtype)
        self.size += -(-nbytes // self._ALIGN) * self._ALIGN

    def allocate(self) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """Numpy views to fill and the torch views to return, of the same memory."""
        buf = _new_buffer(max(self.size, 1))
        raw = buf.numpy()
        arrays, tensors = {}, {}
        for name, (offset, nbytes, shape, dtype) in self.fields.items():
            arrays[name] = raw[offset : offset + nbytes].view(dtype).reshape(shape)
            tensors[name] = buf[offset : offset + nbytes].view(_TORCH[dtype]).view(shape)
        return arrays, tensors


_TORCH = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.int64): torch.int64,
    np.dtype(bool): torch.bool,
}


def _new_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes``: in shared memory inside a DataLoader worker, where the batch
    will be sent to the main process (no copy into shared memory at send time), else plain."""
    if get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    try:
        # what torch's default_collate does in a worker: a new shared segment, nothing copied
        storage = torch.UntypedStorage._new_shared(nbytes)
    except AttributeError:  # a torch without this private helper: one copy into shared memory
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _fill_masks(out: np.ndarray, sample: dict) -> int:
    """Copy a sample's masks into ``out`` (M_max, S, S); returns its M."""
    masks, index = sample["masks"], sample.get("mask_index")
    if index is None:
        out[: masks.shape[0]] = masks
        return masks.shape[0]
    # mode="clip": take writes straight into ``out`` (the default mode="raise" buffers a copy);
    # the reader's indices are in range by construction
    np.take(masks, index, axis=0, out=out[: index.shape[0]], mode="clip")
    return index.shape[0]


def _count(sample: dict) -> int:
    index = sample.get("mask_index")
    return sample["masks"].shape[0] if index is None else index.shape[0]


def _interactive(samples: list[dict], buf: _Buffer) -> int:
    """Lay out the interactive fields in ``buf``; returns M, the masks per sample (>= 1)."""
    b, m = len(samples), max(max(_count(s) for s in samples), 1)
    s, n = samples[0]["image"].shape[-1], samples[0]["point_coords"].shape[1]
    buf.add("masks", (b, m, s, s), np.uint8)
    buf.add("boxes", (b, m, 4), np.float32)
    buf.add("point_coords", (b, m, n, 2), np.float32)
    buf.add("point_labels", (b, m, n), np.int64)
    buf.add("class_ids", (b, m), np.int64)
    buf.add("mask_valid", (b, m), bool)
    return m


def _fill_interactive(arrays: dict[str, np.ndarray], samples: list[dict], m: int) -> None:
    # padding: masks, boxes and points 0, point labels and class ids -1, mask_valid False
    padded = any(_count(s) != m for s in samples)
    if padded:
        arrays["masks"].fill(0)
        arrays["boxes"].fill(0)
        arrays["point_coords"].fill(0)
        arrays["point_labels"].fill(-1)
        arrays["class_ids"].fill(-1)
    for i, sample in enumerate(samples):
        k = _fill_masks(arrays["masks"][i], sample)
        arrays["boxes"][i, :k] = sample["boxes"]
        arrays["point_coords"][i, :k] = sample["point_coords"]
        arrays["point_labels"][i, :k] = sample["point_labels"]
        arrays["class_ids"][i, :k] = sample["class_ids"]
        arrays["mask_valid"][i, :k] = True
        arrays["mask_valid"][i, k:] = False


def collate(samples: list[dict]) -> dict:
    """Stack samples (interactive or semantic, see the module docstring) into one batch.

    Arguments:
      samples: a non-empty list of samples, all of the same mode and image size.

    Returns:
      The batch dict of the module docstring (its tensors share one buffer).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    semantic = "label" in samples[0]
    buf = _Buffer()
    buf.add("image", (len(samples), *samples[0]["image"].shape), np.uint8)
    if semantic:
        buf.add("label", (len(samples), *samples[0]["label"].shape), np.int64)
    else:
        m = _interactive(samples, buf)
    arrays, tensors = buf.allocate()
    for i, sample in enumerate(samples):
        # one contiguous copy from the strided per-sample views (HWC transposed, gray broadcast)
        arrays["image"][i] = sample["image"]
        if semantic:
            arrays["label"][i] = sample["label"]
    if not semantic:
        _fill_interactive(arrays, samples, m)
    return {**tensors, "keys": [s["key"] for s in samples], "meta": [s["meta"] for s in samples]}
