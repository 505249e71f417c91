"""A small shard writer for tests: real tars in the ``sharding/format.py`` contract.

Writes ``OUT/{split}/shard-NNNNNN.tar`` with ``webdataset.TarWriter`` (members KEY.img, KEY.mpk,
KEY.json) and ``OUT/manifest.json``. Independent of the real writer in ``sharding/`` so the reader
is tested against the contract, not against one implementation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from sharding.format import (
    FORMAT_VERSION,
    IMAGE_EXT,
    MASKS_EXT,
    META_EXT,
    encode_image,
    encode_masks,
    sample_key,
    shard_name,
)
from sharding.manifest import FORMAT_NAME


@dataclass
class Written:
    """One sample as written (for pixel-exact comparison)."""

    key: str
    split: str
    image: np.ndarray
    """uint8 (S, S) or (S, S, 3)."""
    masks: np.ndarray
    """uint8 (N, S, S) 0/1."""
    class_ids: list[int]
    shard: str


def random_sample(rng: np.random.Generator, size: int, n_masks: int, rgb: bool):
    """A random image and ``n_masks`` random rectangle masks (each non-empty)."""
    shape = (size, size, 3) if rgb else (size, size)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    masks = np.zeros((n_masks, size, size), dtype=np.uint8)
    for i in range(n_masks):
        y0, x0 = rng.integers(0, size - 1, size=2)
        y1 = rng.integers(y0 + 1, size + 1)
        x1 = rng.integers(x0 + 1, size + 1)
        masks[i, y0:y1, x0:x1] = 1
        # a few holes, so masks are not always rectangles
        masks[i][rng.random((size, size)) < 0.1] = 0
        masks[i, y0, x0] = 1
    return image, masks


def write_shards(
    out: Path,
    *,
    splits: dict[str, list[int]],
    image_size: int = 32,
    seed: int = 0,
    empty_every: int = 0,
    max_masks: int = 4,
    dataset: str = "toy",
    slices_per_case: int = 1,
) -> list[Written]:
    """Write shards and a manifest.

    Arguments:
      out: output folder.
      splits: split -> samples per shard, e.g. ``{"train": [5, 5, 3], "val": [4]}``.
      image_size: S.
      seed: content seed.
      empty_every: every k-th sample (k > 0) has no mask.
      max_masks: masks per sample are drawn in 1..max_masks.
      dataset: dataset name in the keys.
      slices_per_case: consecutive samples that share a case id (at most 7: slice indices are
        the sample counter mod 7), as a sharder writing cases in sorted order would.

    Returns:
      Every sample written, in write order.
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Written] = []
    entries = []
    index = 0
    counter = 0
    for split, sizes in splits.items():
        (out / split).mkdir(exist_ok=True)
        for n_samples in sizes:
            rel = f"{split}/{shard_name(index)}.tar"
            path = out / rel
            with wds.TarWriter(str(path)) as sink:
                for _ in range(n_samples):
                    counter += 1
                    empty = empty_every > 0 and counter % empty_every == 0
                    n = 0 if empty else int(rng.integers(1, max_masks + 1))
                    image, masks = random_sample(rng, image_size, n, rgb=bool(counter % 2))
                    case = f"case{(counter - 1) // slices_per_case + 1:04d}"
                    key = sample_key(dataset, case, counter % 7)
                    class_ids = [int(c) for c in rng.integers(1, 5, size=n)]
                    meta = {
                        "class_ids": class_ids,
                        "class_names": [f"c{c}" for c in class_ids],
                        "dataset": dataset,
                        "modality": "ct",
                        "case_id": case,
                        "slice_index": counter % 7,
                        "spacing": [1.0, 1.0],
                        "original_size": [image_size, image_size],
                        "source": "shardkit",
                        "split": split,
                    }
                    sink.write(
                        {
                            "__key__": key,
                            IMAGE_EXT: encode_image(image),
                            MASKS_EXT: encode_masks(masks.astype(bool)),
                            META_EXT: json.dumps(meta).encode(),
                        }
                    )
                    written.append(Written(key, split, image, masks, class_ids, str(path)))
            data = path.read_bytes()
            entries.append(
                {
                    "split": split,
                    "path": rel,
                    "samples": n_samples,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            index += 1
    manifest = {
        "format": FORMAT_NAME,
        "shards": entries,
        "image_size": image_size,
        "resize": "square",
        "format_version": FORMAT_VERSION,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return written
