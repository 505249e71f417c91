"""The on-disk format of samadapt shards: the one contract between ``sharding/`` and
``pipeline/data``.

Output folder of ``samadapt shard``::

    OUT/plan.json                 inputs -> (split, shard) assignment, fixed at the first run
    OUT/{split}/shard-NNNNNN.tar  WebDataset shards (split in train, val, test)
    OUT/{split}/shard-NNNNNN.json sidecar written after the tar is complete: samples, bytes,
                                  sha256, per-shard summary counts and rejections
    OUT/manifest.json             all shards: {"shards": [{"split", "path", "samples", "bytes",
                                  "sha256"}...], "image_size", "resize", "format_version", ...}
    OUT/summary.json              counts per split / dataset / modality / class, rejected count
    OUT/rejected.jsonl            one line per rejected input or mask: {"unit", "path", "reason"}
    OUT/volumes/{dataset}.zarr    Zarr v3 store, one group per case (3D inputs only)

One sample (one 2D image or one slice of a volume), keyed ``dataset/case/slice``:

    KEY.png   the image, uint8, (S, S) or (S, S, 3), PNG (lossless)
    KEY.mpk   all masks of the image in one member: a 16-byte header (magic, version, N, S, S)
              followed by Blosc-zstd of np.packbits of the (N, S, S) bool array. Lossless,
              overlaps preserved, ~S*S*N/8 bytes before compression.
    KEY.json  metadata: class_ids, class_names, dataset, modality, case_id, slice_index, spacing,
              original_size, source, split
"""

from __future__ import annotations

import re
import struct

import cv2
import numpy as np
from numcodecs import Blosc

FORMAT_VERSION = 1
IMAGE_EXT = "png"
MASKS_EXT = "mpk"
META_EXT = "json"
SPLITS = ("train", "val", "test")

_MAGIC = b"SMK1"
_HEADER = struct.Struct("<4sIII")  # magic, n, h, w
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def sample_key(dataset: str, case_id: str, slice_index: int) -> str:
    """A WebDataset key: no dots (WebDataset splits the extension at the first dot)."""
    parts = [_KEY_SAFE.sub("_", dataset), _KEY_SAFE.sub("_", case_id)]
    parts.append("2d" if slice_index < 0 else f"z{slice_index:05d}")
    return "/".join(parts)


def _codec(level: int = 5) -> Blosc:
    # packed bits are bytes: byte shuffle does nothing useful, bit shuffle costs time for ~no gain
    return Blosc(cname="zstd", clevel=level, shuffle=Blosc.NOSHUFFLE)


def encode_masks(masks: np.ndarray, level: int = 5) -> bytes:
    """(N, H, W) bool -> bytes of the ``.mpk`` member."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    n, h, w = masks.shape
    packed = np.packbits(masks.astype(bool, copy=False).reshape(-1))
    return _HEADER.pack(_MAGIC, n, h, w) + bytes(_codec(level).encode(packed))


def decode_masks(data: bytes) -> np.ndarray:
    """Bytes of a ``.mpk`` member -> (N, H, W) uint8 array of 0/1."""
    if len(data) < _HEADER.size:
        raise ValueError("mask member is truncated (shorter than its header)")
    magic, n, h, w = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError(f"mask member has bad magic {magic!r}")
    if n == 0:
        return np.zeros((0, h, w), dtype=np.uint8)
    packed = np.frombuffer(_codec().decode(data[_HEADER.size :]), dtype=np.uint8)
    bits = np.unpackbits(packed, count=n * h * w)
    return bits.reshape(n, h, w)


def encode_image(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) RGB -> PNG bytes (fast compression level)."""
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    arr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W) or (H, W, 3) RGB."""
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("image member is not a decodable PNG")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    return arr
