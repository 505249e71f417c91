"""The on-disk format of samadapt shards and volumes: the one contract between ``sharding/`` and
``pipeline/data``.

Output folder of ``samadapt shard``::

    OUT/plan.json                 inputs -> (split, shard) assignment, fixed at the first run
    OUT/{split}/shard-NNNNNN.tar  WebDataset shards (split in train, val, test)
    OUT/{split}/shard-NNNNNN.json sidecar written after the tar is complete: samples, bytes,
                                  sha256, per-shard summary counts and rejections, and what
                                  it was written from (sharding/inputs.py)
    OUT/manifest.json             all shards: {"shards": [{"split", "path", "samples", "bytes",
                                  "sha256"}...], "image_size", "resize", "format_version", ...}
    OUT/summary.json              counts per split / dataset / modality / class, rejected count
    OUT/rejected.jsonl            one line per rejected input or mask: {"unit", "path", "reason"}
    OUT/volumes/{dataset}.zarr    Zarr v3 store, one group per case (3D inputs only)
    OUT/.finalize.lock, OUT/.locks/shard-NNNNNN.lock
                                  empty lock files of runs sharing OUT (sharding/locks.py)

One sample (one 2D image or one slice of a volume), keyed ``dataset/case/slice`` (dataset and
case by ``safe_name``: kept when plain ASCII, else a slug plus a short hash, so distinct names
never share a key; the original names are in ``KEY.json``):

    KEY.img   the image: a 16-byte header (magic ``SIMG``, H, W, C as little-endian uint32)
              followed by Blosc-zstd of the raw uint8 pixels, (H, W) when C = 1, (H, W, 3) RGB
              when C = 3, C order. Lossless. Decoding is a memcpy-speed Blosc call (~0.1 ms for
              256 px, ~8x faster than PNG), which is what the training loader pays per sample.
    KEY.mpk   all masks of the image in one member: a 16-byte header (magic ``SMK1``, N, H, W)
              followed by Blosc-zstd of np.packbits of the (N, H, W) bool array. Lossless,
              overlaps preserved, ~H*W*N/8 bytes before compression.
    KEY.json  metadata: class_ids, class_names, dataset, modality, case_id, slice_index, spacing,
              original_size, source, split

Both binary members end with one Blosc frame (its own header says codec and shuffle, so a reader
needs only ``numcodecs.Blosc().decode``); the frame's compressed size must equal the rest of the
member and its decoded size must match the header, so a cut member is an error, never garbage.
The writer uses zstd without shuffle at ``sharding.zstd_level``: on uint8 pixels byte shuffle is
the identity, and bit shuffle decoded 10-40 % slower for no consistent size gain (measured on
synthetic and real CT/MR slices). Image members are larger than PNG on smooth real slices
(+16 to +42 %, PNG's row prediction), about the same on noisy ones: bytes traded for decode time
(bench/README.md).

One 3D case (``OUT/volumes/{dataset}.zarr``, Zarr v3, written by ``sharding/volumes.py``, read
by ``pipeline/data/volume.py``; the names below are this module's constants)::

    {dataset}.zarr/               root group, consolidated metadata
      attrs["cases"]              the index: {GROUP: {"case_id", "shape" [Z, H, W], "split",
                                  "spacing"}} (written last, when every shard is done)
      {GROUP}/                    one group per case (``safe_name`` of the case id)
        image  (Z, H, W)          raw intensities: int16 when exact (HU), else float32; chunks
                                  (1, H, W), Blosc-zstd + bit shuffle
        label  (Z, H, W)          integer label map (the smallest of uint8 / uint16 / uint32
                                  that holds the ids), same chunks; absent for unlabelled cases
        attrs: case_id, dataset, modality, source, split, spacing [z, y, x] mm, affine 4x4,
               class_map {id: name}, labelled, foreground_slices [z, ...] (labelled cases:
               slices with a nonzero label), intensity (the uint8 rule of the 2D shards):
               {"mapping": "ct_window", "level", "width"} or
               {"mapping": "percentiles", "percentiles": [p, q], "lo", "hi"} (the values those
               percentiles gave for this volume), read back by ``sharding.intensity``

Format versions (``format_version`` of manifest.json, plan.json and the sidecars):

* 1: the image was ``KEY.png`` (PNG). Not read any more: the reader and ``samadapt inspect``
  refuse a version-1 manifest with a message that names it; reshard the corpus.
* 2: ``KEY.img`` as above (current).
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
import unicodedata

import numpy as np
from numcodecs import Blosc

__all__ = [
    "CASES_ATTR",
    "CT_WINDOW",
    "FOREGROUND_ATTR",
    "FORMAT_VERSION",
    "IMAGE_ARRAY",
    "IMAGE_EXT",
    "INTENSITY_ATTR",
    "LABEL_ARRAY",
    "MASKS_EXT",
    "META_EXT",
    "PERCENTILES",
    "SPLITS",
    "VOLUMES_DIR",
    "decode_image",
    "decode_masks",
    "encode_image",
    "encode_masks",
    "safe_name",
    "sample_key",
    "shard_name",
]

FORMAT_VERSION = 2
IMAGE_EXT = "img"
MASKS_EXT = "mpk"
META_EXT = "json"
SPLITS = ("train", "val", "test")

# The Zarr volume stores (module docstring)
VOLUMES_DIR = "volumes"
CASES_ATTR = "cases"
IMAGE_ARRAY = "image"
LABEL_ARRAY = "label"
INTENSITY_ATTR = "intensity"
FOREGROUND_ATTR = "foreground_slices"
CT_WINDOW = "ct_window"
PERCENTILES = "percentiles"

_MAGIC = b"SMK1"
_HEADER = struct.Struct("<4sIII")  # magic, n, h, w
_IMAGE_MAGIC = b"SIMG"
_IMAGE_HEADER = struct.Struct("<4sIII")  # magic, h, w, c
# the start of a Blosc frame: version, versionlz, flags, typesize, nbytes, blocksize, cbytes
_BLOSC_HEADER = struct.Struct("<BBBBIII")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-]+")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
NAME_HASH_LENGTH = 8
"""Hex digits of the sha1 that ``safe_name`` appends to a name it had to change."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


@functools.lru_cache(maxsize=1 << 16)  # called per sample with the names of a few cases
def safe_name(name: str) -> str:
    """The form of a dataset or case name in sample keys and Zarr paths: ASCII letters, digits,
    ``_`` and ``-`` only, so it is a valid WebDataset key part (no dots), file name and Zarr
    group name.

    A name that already is such a form (and starts with a letter or digit) is kept as it is. Any
    other name becomes a readable slug plus ``-`` and the first ``NAME_HASH_LENGTH`` hex digits of
    the sha1 of the name (UTF-8): accents are dropped, every other run of characters outside the
    set becomes ``_``, and ``_`` / ``-`` are trimmed at both ends (``case 1`` ->
    ``case_1-<hash>``, ``Müller`` -> ``Muller-<hash>``, ``王五_001`` -> ``001-<hash>``, ``王五`` ->
    ``<hash>``). So distinct names keep distinct forms (``case 1`` and ``case_1``, or two names
    in Chinese, no longer meet in one key), the same name always gets the same form, and plain
    names keep the keys and groups they always had. The original name is stored beside it (the
    sample's JSON, the Zarr group's attrs); ``sharding.plan.make_plan`` refuses the rare corpus
    in which two names still meet.

    Arguments:
      name: the name as the reader gives it.

    Returns:
      ``name``, or its slug and hash as above.
    """
    if _PLAIN_NAME.fullmatch(name):
        return name
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = _KEY_SAFE.sub("_", ascii_name).strip("_-")
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:NAME_HASH_LENGTH]
    return f"{slug}-{digest}" if slug else digest


def sample_key(dataset: str, case_id: str, slice_index: int) -> str:
    """A WebDataset key ``dataset/case/slice``, names by ``safe_name`` (no dots: WebDataset
    splits the extension at the first dot)."""
    parts = [safe_name(dataset), safe_name(case_id)]
    parts.append("2d" if slice_index < 0 else f"z{slice_index:05d}")
    return "/".join(parts)


def _codec(level: int = 5) -> Blosc:
    # packed bits and uint8 pixels are bytes: byte shuffle is the identity on them, and bit
    # shuffle costs decode time for no consistent gain (see the module docstring)
    return Blosc(cname="zstd", clevel=level, shuffle=Blosc.NOSHUFFLE)


_DECODER = _codec()  # Blosc frames describe themselves: one decoder reads any level / shuffle


def _check_frame(payload: bytes | memoryview, nbytes: int, what: str) -> None:
    """Raise ``ValueError`` unless ``payload`` is one whole Blosc frame of ``nbytes`` bytes.

    Blosc decodes a cut frame without complaint (the missing blocks come out as garbage), so
    the sizes in its header are checked against the member first.
    """
    if len(payload) < _BLOSC_HEADER.size:
        raise ValueError(f"{what} member is truncated (no complete compressed frame)")
    _, _, _, _, decoded, _, compressed = _BLOSC_HEADER.unpack_from(payload)
    if compressed != len(payload):
        raise ValueError(
            f"{what} member is truncated or has trailing bytes (compressed frame of "
            f"{compressed} bytes, {len(payload)} present)"
        )
    if decoded != nbytes:
        raise ValueError(f"{what} member decodes to {decoded} bytes, its header says {nbytes}")


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
    payload = memoryview(data)[_HEADER.size :]
    packed = np.empty((n * h * w + 7) // 8, dtype=np.uint8)
    _check_frame(payload, packed.size, "mask")
    _DECODER.decode(payload, out=packed)
    bits = np.unpackbits(packed, count=n * h * w)
    return bits.reshape(n, h, w)


def encode_image(image: np.ndarray, level: int = 5) -> bytes:
    """uint8 (H, W) or (H, W, 3) RGB -> bytes of the ``.img`` member.

    Arguments:
      image: the pixels; channels in RGB order.
      level: zstd level (``sharding.zstd_level``).

    Returns:
      The header and the Blosc-zstd frame of the pixels.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        channels = 1
    elif image.ndim == 3 and image.shape[2] == 3:
        channels = 3
    else:
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {image.shape}")
    h, w = image.shape[:2]
    frame = _codec(level).encode(np.ascontiguousarray(image))
    return _IMAGE_HEADER.pack(_IMAGE_MAGIC, h, w, channels) + bytes(frame)


def decode_image(data: bytes) -> np.ndarray:
    """Bytes of a ``.img`` member -> a new, writable uint8 (H, W) or (H, W, 3) RGB array.

    Raises ``ValueError`` for a truncated or malformed member (a PNG, i.e. a member of a
    version-1 shard, included).
    """
    if len(data) < _IMAGE_HEADER.size:
        raise ValueError("image member is truncated (shorter than its header)")
    magic, h, w, channels = _IMAGE_HEADER.unpack_from(data)
    if magic != _IMAGE_MAGIC:
        hint = " (a PNG: a format-version-1 shard; reshard)" if data[:4] == b"\x89PNG" else ""
        raise ValueError(f"image member has bad magic {magic!r}{hint}")
    if channels not in (1, 3):
        raise ValueError(f"image member has {channels} channels (expected 1 or 3)")
    image = np.empty((h, w) if channels == 1 else (h, w, 3), dtype=np.uint8)
    payload = memoryview(data)[_IMAGE_HEADER.size :]
    _check_frame(payload, image.size, "image")
    if image.size:  # Blosc refuses to decode into an empty buffer
        _DECODER.decode(payload, out=image)
    return image
