"""Per-sample stages of the reader: decode the tar members, then make a training sample.

Everything here is numpy (cheaper than torch for per-sample work in a loader worker) and
uint8 / float32 / int64: no float64 arrays the size of an image.

``decode`` turns WebDataset's ``{"__key__", "__url__", "img", "mpk", "json"}`` into
``{"key", "image" (3, S, S) uint8, "masks" (N, S, S) uint8, "class_ids" (N,) int64, "meta"}``;
``interactive`` and ``semantic`` turn decoded samples into the samples of ``collate.py``.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import BoxFrom
from pipeline.data.collate import label_map
from pipeline.data.prompts import boxes_from_masks, points_from_masks, tight_boxes
from sharding.format import IMAGE_EXT, MASKS_EXT, META_EXT, decode_image, decode_masks

__all__ = ["SampleError", "SkipCounter", "decode", "interactive", "sample_rng", "semantic"]

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A shard or one of its samples cannot be read. The message names the shard path (and key)."""


@dataclass
class SkipCounter:
    """Samples dropped for having no mask: since the last batch (reset by the batcher), in total,
    and in a row; more than ``limit`` in a row raises (an endless stream of unusable samples)."""

    limit: int | None = None
    what: str = "stream"
    since_batch: int = 0
    total: int = 0
    in_a_row: int = 0

    def add(self) -> None:
        self.since_batch += 1
        self.total += 1
        self.in_a_row += 1
        if self.limit is not None and self.in_a_row > self.limit:
            raise SampleError(
                f"{self.what}: {self.in_a_row} samples in a row without masks (is every image of "
                "the split empty?)"
            )

    def take(self) -> int:
        n, self.since_batch = self.since_batch, 0
        return n


def _three_channels(image: np.ndarray, where: str) -> np.ndarray:
    """(S, S) or (S, S, 3) uint8 -> a (3, S, S) view (no copy: ``collate`` stacks the views)."""
    if image.ndim == 2:
        return np.broadcast_to(image[None], (3, *image.shape))
    if image.ndim == 3 and image.shape[2] == 3:
        return image.transpose(2, 0, 1)
    raise SampleError(f"{where}: image must be (S, S) or (S, S, 3), got shape {image.shape}")


def decode(sample: dict, *, image_size: int) -> dict:
    """Decode one tar sample and check it against the shard contract.

    Arguments:
      sample: WebDataset's dict of raw members (bytes) with ``__key__`` and ``__url__``.
      image_size: the expected side S of images and masks (``model.image_size``).

    Returns:
      ``{"key", "image": (3, S, S) uint8, "masks": (N, S, S) uint8, "class_ids": (N,) int64,
      "meta": dict}``; ``meta`` gets ``"url"`` (the shard) and ``"padding"`` (top-up sample).
      Raises ``SampleError`` naming the shard and key for a missing or broken member.
    """
    key = sample.get("__key__", "?")
    url = sample.get("__url__", "?")
    where = f"shard {url}: sample {key}"
    try:
        image = decode_image(sample[IMAGE_EXT])
        masks = decode_masks(sample[MASKS_EXT])
        meta = json.loads(sample[META_EXT])
    except KeyError as missing:
        if missing.args[0] == IMAGE_EXT and "png" in sample:
            raise SampleError(
                f"{where}: a .png image member (shard format_version 1); this reader reads "
                "format_version 2 (.img): reshard the corpus with `samadapt shard`"
            ) from None
        raise SampleError(f"{where}: no .{missing.args[0]} member") from None
    except Exception as exc:
        raise SampleError(f"{where}: {type(exc).__name__}: {exc}") from exc
    s = image_size
    if image.dtype != np.uint8 or image.shape[:2] != (s, s):
        raise SampleError(
            f"{where}: image is {image.dtype} {image.shape}, expected uint8 ({s}, {s}[, 3]) "
            f"(model.image_size={s})"
        )
    if masks.shape[1:] != (s, s):
        raise SampleError(f"{where}: masks are {masks.shape}, expected (N, {s}, {s})")
    n = masks.shape[0]
    class_ids = meta.get("class_ids")
    class_ids = np.zeros(n, np.int64) if class_ids is None else np.asarray(class_ids, np.int64)
    if class_ids.shape != (n,):
        raise SampleError(f"{where}: {n} masks but class_ids has shape {class_ids.shape}")
    meta["url"] = url
    meta["padding"] = bool(sample.get("__padding__", False))
    return {
        "key": key,
        "image": _three_channels(image, where),
        "masks": masks,
        "class_ids": class_ids,
        "meta": meta,
    }


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key): eval prompts do not depend on the sharding
    of the data over ranks and workers."""
    return np.random.default_rng([seed % 2**32, zlib.crc32(key.encode())])


def _prompted(
    sample: dict, idx: np.ndarray, *, jitter: int, box_from: BoxFrom, points: int, rng
) -> dict:
    masks = sample["masks"]  # (N, S, S): collate copies the rows idx straight into the batch
    # one whole-mask box per distinct drawn mask: the point prompts' sampling window, and the
    # region where the box prompt's components are looked for
    tight = tight_boxes(masks, idx)
    boxes = boxes_from_masks(
        masks, jitter=jitter, rng=rng, box_from=box_from, tight=tight, index=idx
    )
    coords, labels = points_from_masks(masks, n=points, rng=rng, tight=tight, index=idx)
    return {
        "key": sample["key"],
        "image": sample["image"],
        "meta": sample["meta"],
        "masks": masks,
        "mask_index": idx,
        "boxes": boxes,
        "point_coords": coords,
        "point_labels": labels,
        "class_ids": sample["class_ids"][idx],
    }


def interactive(
    src: Iterable[dict],
    *,
    mask_num: int,
    keep_empty: bool,
    jitter: int,
    points: int,
    rng: np.random.Generator | None,
    box_from: BoxFrom = "largest_component",
    seed: int = 0,
    skipped: SkipCounter | None = None,
) -> Iterator[dict]:
    """Decoded samples -> prompted samples with ``mask_num`` masks each (training) or all masks.

    Arguments:
      src: decoded samples.
      mask_num: masks drawn per image uniformly **with replacement** (SAM-Med2D's
        ``random.choices``), so an image with fewer masks repeats some; 0 = keep every mask once,
        in order (evaluation).
      keep_empty: keep images without masks (with M = 0; ``collate`` pads them, ``mask_valid``
        False); otherwise skip and count them.
      jitter: box shift limit (``data.box_jitter``; 0 for evaluation).
      box_from: the box of the largest connected component (SAM-Med2D) or of the whole mask
        (``data.box_from``; see ``prompts.py``).
      points: foreground points per mask (``data.point_num``).
      rng: the worker's generator; None = one generator per sample from (seed, key).
      seed: used when ``rng`` is None.
      skipped: counts the images without masks dropped when ``mask_num`` > 0.

    Yields:
      Samples in the interactive layout of ``collate.py``.
    """
    for sample in src:
        n = sample["masks"].shape[0]
        gen = rng if rng is not None else sample_rng(seed, sample["key"])
        if n == 0 and not keep_empty:
            if skipped is not None:
                skipped.add()
            continue
        if mask_num == 0 or n == 0:
            idx = np.arange(n)
        else:
            idx = gen.integers(0, n, size=mask_num)
        if skipped is not None:
            skipped.in_a_row = 0
        yield _prompted(sample, idx, jitter=jitter, box_from=box_from, points=points, rng=gen)


def semantic(
    src: Iterable[dict], *, keep_empty: bool = True, skipped: SkipCounter | None = None
) -> Iterator[dict]:
    """Decoded samples -> ``{"key", "image", "meta", "label"}`` (see ``collate.label_map``).

    Arguments:
      src: decoded samples.
      keep_empty: keep images without masks (all-background label maps).
      skipped: counts the images dropped when ``keep_empty`` is False.
    """
    for sample in src:
        if not keep_empty and sample["masks"].shape[0] == 0:
            if skipped is not None:
                skipped.add()
            continue
        if skipped is not None:
            skipped.in_a_row = 0
        yield {
            "key": sample["key"],
            "image": sample["image"],
            "meta": sample["meta"],
            "label": label_map(sample["masks"], sample["class_ids"]),
        }
