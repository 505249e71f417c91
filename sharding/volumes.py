"""3D inputs as Zarr v3 stores, ``OUT/volumes/{dataset}.zarr``: one group per case, in the layout
``sharding/format.py`` states (the contract with the 3D reader; names are its constants).

Why the layout is as it is:

* ``image`` holds the **raw** intensities, not the uint8 of the shards. The uint8 mapping is a
  choice (CT window, MR percentiles) that 3D training may want to redo, and the raw values are
  exact: ``int16`` when every voxel is an integer in int16 range (CT in HU, most MR scanners),
  else ``float32`` (what the reader returns, so always lossless). int16 halves the bytes.
  ``attrs["intensity"]`` records the mapping the 2D shards used
  (``sharding.intensity.intensity_record``), so the 3D reader reproduces the shards' uint8 slices
  exactly.
* Chunks are one slice (1, H, W), so a 2.5D reader fetches exactly the slices it needs, and
  ``foreground_slices`` lets it skip empty ones without reading the labels.

A case is written under ``OUT/volumes/.tmp/`` and moved into the store by one directory rename
when complete, so a killed run leaves either the whole group or nothing in the store. ``finalize``
writes an index of cases into the root group's attrs and consolidates the metadata.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from sharding.config import ShardingConfig
from sharding.format import (
    CASES_ATTR,
    FOREGROUND_ATTR,
    IMAGE_ARRAY,
    INTENSITY_ATTR,
    LABEL_ARRAY,
    VOLUMES_DIR,
    safe_name,
)
from sharding.intensity import intensity_record
from sharding.records import Volume

__all__ = ["case_group_name", "finalize_volumes", "store_path", "write_case"]

log = logging.getLogger(__name__)

_TMP_DIR = ".tmp"
_INT16 = np.iinfo(np.int16)


def store_path(output: str | os.PathLike, dataset: str) -> Path:
    """``OUT/volumes/{dataset}.zarr``, the dataset name by ``format.safe_name``."""
    return Path(output) / VOLUMES_DIR / f"{safe_name(dataset)}.zarr"


def case_group_name(case_id: str) -> str:
    """The group name of a case: ``format.safe_name`` of its id (the sample keys' case part;
    never starts with ``_``, which Zarr reserves as ``__``)."""
    return safe_name(case_id)


def _compressors(cfg: ShardingConfig) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=cfg.zstd_level, shuffle=BloscShuffle.bitshuffle)


def _raw_dtype(image: np.ndarray) -> np.dtype:
    """int16 when it holds ``image`` exactly, else float32 (checked slice by slice: no copy of
    the whole volume)."""
    if not image.size:
        return np.dtype(np.float32)
    for plane in image.reshape(-1, *image.shape[-2:]):
        if not np.isfinite(plane).all() or plane.min() < _INT16.min or plane.max() > _INT16.max:
            return np.dtype(np.float32)
        if not np.array_equal(plane, np.round(plane)):
            return np.dtype(np.float32)
    return np.dtype(np.int16)


def _label_dtype(label: np.ndarray) -> np.dtype:
    top = int(label.max()) if label.size else 0
    if int(label.min() if label.size else 0) < 0:
        return np.dtype(np.int32)
    if top <= 255:
        return np.dtype(np.uint8)
    if top <= 65535:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _ensure_store(store: Path) -> None:
    """Create the (empty) root group of ``store`` once, race-free between processes."""
    if (store / "zarr.json").exists():
        return
    tmp = store.parent / _TMP_DIR / f"{store.name}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    zarr.open_group(str(tmp), mode="w", zarr_format=3)
    try:
        os.rename(tmp, store)
    except OSError:
        # another process created it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (store / "zarr.json").exists():
            raise


def write_case(
    output: str | os.PathLike, volume: Volume, *, split: str, cfg: ShardingConfig
) -> Path:
    """Write one case as a group of its dataset's store, unless it is there already.

    Arguments:
      output: the output folder.
      volume: the case; image (Z, H, W) float32 raw, label (Z, H, W) int or None.
      split: the case's split (recorded in attrs).
      cfg: the sharding section (zstd_level, intensity mapping).

    Returns:
      The path of the case group.
    """
    store = store_path(output, volume.dataset)
    group = store / case_group_name(volume.case_id)
    if (group / "zarr.json").exists():  # complete: groups only appear by rename
        held = _read_json(group / "zarr.json").get("attributes", {}).get("case_id")
        if held != volume.case_id:
            # never let one case stand for another (names that met in one group lost a volume)
            raise ValueError(
                f"{group} holds case {held!r}, not {volume.case_id!r} ({volume.source}): two "
                "case names map to one group name"
            )
        return group
    store.parent.mkdir(parents=True, exist_ok=True)
    _ensure_store(store)
    host = socket.gethostname()
    tmp = store.parent / _TMP_DIR / f"{store.stem}-{group.name}-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    z, h, w = volume.image.shape
    attrs = {
        "case_id": volume.case_id,
        "dataset": volume.dataset,
        "modality": volume.modality,
        "source": volume.source,
        "split": split,
        "spacing": [float(s) for s in volume.spacing],
        "affine": np.asarray(volume.affine, dtype=np.float64).tolist(),
        "class_map": {str(k): str(v) for k, v in sorted(volume.class_map.items())},
        INTENSITY_ATTR: intensity_record(volume.image, modality=volume.modality, cfg=cfg),
        "labelled": volume.label is not None,
    }
    if volume.label is not None:
        foreground = np.flatnonzero(volume.label.any(axis=(1, 2)))
        attrs[FOREGROUND_ATTR] = [int(i) for i in foreground]
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes=attrs)
    image_dtype = _raw_dtype(volume.image)
    image = root.create_array(
        IMAGE_ARRAY,
        shape=(z, h, w),
        chunks=(1, h, w),
        dtype=image_dtype,
        compressors=_compressors(cfg),
        fill_value=0,
    )
    image[:] = volume.image.astype(image_dtype)
    if volume.label is not None:
        label_dtype = _label_dtype(volume.label)
        label = root.create_array(
            LABEL_ARRAY,
            shape=(z, h, w),
            chunks=(1, h, w),
            dtype=label_dtype,
            compressors=_compressors(cfg),
            fill_value=0,
        )
        label[:] = volume.label.astype(label_dtype)
    try:
        os.rename(tmp, group)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (group / "zarr.json").exists():
            raise
    return group


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def finalize_volumes(output: str | os.PathLike) -> list[Path]:
    """Index and consolidate every store under ``OUT/volumes`` (call when all shards are done).

    The root group of each store gets ``attrs["cases"] = {group: {"case_id", "shape", "split",
    "spacing"}}``; stale temp groups of killed runs are removed.

    Returns:
      The store paths.
    """
    base = Path(output) / VOLUMES_DIR
    if not base.is_dir():
        return []
    shutil.rmtree(base / _TMP_DIR, ignore_errors=True)
    stores = sorted(p for p in base.glob("*.zarr") if (p / "zarr.json").exists())
    for store in stores:
        cases = {}
        for group in sorted(p for p in store.iterdir() if (p / "zarr.json").exists()):
            attrs = _read_json(group / "zarr.json").get("attributes", {})
            shape = _read_json(group / IMAGE_ARRAY / "zarr.json")["shape"]
            cases[group.name] = {
                "case_id": attrs.get("case_id", group.name),
                "shape": list(shape),
                "split": attrs.get("split", ""),
                "spacing": attrs.get("spacing", []),
            }
        root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
        if root.attrs.asdict().get(CASES_ATTR) != cases:
            root.attrs.put({CASES_ATTR: cases})
        with warnings.catch_warnings():
            # zarr warns that consolidated metadata is not (yet) in the v3 spec; we want it
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(store))
        log.info("indexed %d cases in %s", len(cases), store)
    return stores
