"""Resizing samples to the stored size, and slicing volumes into 2D samples.

``resize_sample`` rules (tests reproduce them pixel-exactly with the same cv2 calls), which the 3D
reader applies to its slices too (``resize_image``, and ``resize_label_map`` for label maps):

* interpolation of the image: ``cv2.INTER_AREA`` when the image shrinks, i.e. when
  ``size < max(H, W)``, else ``cv2.INTER_LINEAR``. Masks always use ``cv2.INTER_NEAREST``.
* ``"square"``: ``cv2.resize(x, (size, size))``: aspect ratio not kept (SAM-Med2D).
* ``"letterbox"``: ``scale = size / max(H, W)``, ``new_h = min(size, max(1, floor(H * scale +
  0.5)))`` (same for ``new_w``), so the longest side becomes exactly ``size``; then
  ``cv2.resize(x, (new_w, new_h))`` and zero padding at the bottom and right up to
  ``(size, size)`` (SAM's own preprocessing).
* when the target shape equals the input shape, arrays are copied, not interpolated.
* each mask is resized alone (one 2D ``cv2.resize`` of its 0/1 bytes into its slot of the
  output stack: no (N, H, W) -> (H, W, N) transpose, no full-size copy of a bool stack), the
  result is bool ``(N, size, size)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

from sharding.config import ShardingConfig
from sharding.intensity import to_uint8
from sharding.records import Slice2D, Volume

__all__ = [
    "RESIZE_MODES",
    "resize_image",
    "resize_label_map",
    "resize_sample",
    "target_shape",
    "volume_slices",
]

RESIZE_MODES = ("square", "letterbox")


def target_shape(height: int, width: int, *, size: int, mode: str) -> tuple[int, int]:
    """The ``(h, w)`` an image of ``(height, width)`` is resized to before any padding."""
    if mode == "square":
        return size, size
    if mode == "letterbox":
        scale = size / max(height, width)
        new_h = min(size, max(1, int(np.floor(height * scale + 0.5))))
        new_w = min(size, max(1, int(np.floor(width * scale + 0.5))))
        return new_h, new_w
    raise ValueError(f"unknown resize mode {mode!r} (known: {', '.join(RESIZE_MODES)})")


def _resize_image(image: np.ndarray, new_h: int, new_w: int, shrink: bool) -> np.ndarray:
    if image.shape[:2] == (new_h, new_w):
        return image.copy()
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interp)


def _resize_masks(masks: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """(N, H, W) masks -> bool (N, new_h, new_w), nearest neighbour, one cv2 call per mask."""
    n, h, w = masks.shape
    if (h, w) == (new_h, new_w):
        return masks.astype(bool, copy=True)
    # bool is stored as 0/1 bytes: resize the bytes themselves (other dtypes: test nonzero once)
    src = masks if masks.dtype == bool else masks != 0
    src = np.ascontiguousarray(src).view(np.uint8)
    out = np.empty((n, new_h, new_w), dtype=np.uint8)
    for i in range(n):
        cv2.resize(src[i], (new_w, new_h), dst=out[i], interpolation=cv2.INTER_NEAREST)
    return out.view(bool)


def _pad(x: np.ndarray, size: int, axes: tuple[int, int]) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axes[0]] = (0, size - x.shape[axes[0]])
    pad[axes[1]] = (0, size - x.shape[axes[1]])
    if all(p == (0, 0) for p in pad):
        return x
    return np.pad(x, pad, mode="constant", constant_values=0)


def resize_image(image: np.ndarray, *, size: int, mode: str) -> np.ndarray:
    """Resize one uint8 image (H, W) or (H, W, C) to ``(size, size)`` by the module's rules."""
    height, width = image.shape[:2]
    new_h, new_w = target_shape(height, width, size=size, mode=mode)
    out = _resize_image(image, new_h, new_w, size < max(height, width))
    return _pad(out, size, (0, 1)) if mode == "letterbox" else out


def resize_label_map(label: np.ndarray, *, size: int, mode: str) -> np.ndarray:
    """Resize one integer label map (H, W) to ``(size, size)``: nearest neighbour (as masks),
    letterbox padding with 0 (background).

    Returns:
      int32 (cv2 resizes int32, not int64) ``(size, size)``.
    """
    height, width = label.shape
    new_h, new_w = target_shape(height, width, size=size, mode=mode)
    src = label.astype(np.int32, copy=False)
    if (height, width) == (new_h, new_w):
        out = src.copy()
    else:
        out = cv2.resize(src, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    return _pad(out, size, (0, 1)) if mode == "letterbox" else out


def resize_sample(
    image: np.ndarray, masks: np.ndarray, *, size: int, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Resize one image and its masks to ``(size, size)`` by the rules of the module docstring.

    Arguments:
      image: uint8 (H, W) or (H, W, 3).
      masks: bool (N, H, W), N may be 0.
      size: side of the output.
      mode: "square" or "letterbox".

    Returns:
      image uint8 (size, size) or (size, size, 3); masks bool (N, size, size).
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"masks must be (N, H, W) with (H, W) = {image.shape[:2]}, got shape {masks.shape}"
        )
    height, width = image.shape[:2]
    new_h, new_w = target_shape(height, width, size=size, mode=mode)
    out_image = resize_image(image, size=size, mode=mode)
    out_masks = _resize_masks(masks, new_h, new_w)
    if mode == "letterbox":
        out_masks = _pad(out_masks, size, (1, 2))
    return out_image, out_masks


def volume_slices(volume: Volume, *, cfg: ShardingConfig) -> Iterator[Slice2D]:
    """One ``Slice2D`` per Z slice of ``volume``, intensities mapped by ``to_uint8``.

    The whole volume is mapped at once (one percentile pair for non-CT). Each slice gets one bool
    mask per nonzero label id present in it, in increasing id order, named from
    ``volume.class_map`` (``"label_<id>"`` for ids it does not name). Slices without foreground
    are yielded too, with N = 0 masks. ``volume.rejections`` are not repeated per slice.

    Arguments:
      volume: a loaded ``Volume`` (image (Z, H, W) float32, label (Z, H, W) or None).
      cfg: the sharding section (ct_window, mr_percentiles).

    Returns:
      An iterator of ``Slice2D`` with image uint8 (H, W), masks bool (N, H, W), spacing (y, x).
    """
    image8 = to_uint8(volume.image, modality=volume.modality, cfg=cfg)
    depth, height, width = image8.shape
    spacing = tuple(float(s) for s in volume.spacing[1:])
    for z in range(depth):
        if volume.label is not None:
            lab = volume.label[z]
            ids = np.unique(lab)
            ids = ids[ids != 0]
            masks = lab[None, :, :] == ids[:, None, None]
        else:
            ids = np.zeros((0,), dtype=np.int64)
            masks = np.zeros((0, height, width), dtype=bool)
        class_ids = [int(i) for i in ids]
        yield Slice2D(
            image=image8[z],
            masks=masks,
            class_ids=class_ids,
            class_names=[volume.class_map.get(i, f"label_{i}") for i in class_ids],
            dataset=volume.dataset,
            case_id=volume.case_id,
            modality=volume.modality,
            slice_index=z,
            spacing=spacing,
            source=volume.source,
        )
