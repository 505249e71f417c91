"""3D reader: stacks of adjacent slices from a Zarr volume store (MA-SAM style inputs).

It reads the stores ``samadapt shard`` writes (``OUT/volumes/{dataset}.zarr``) in the layout
``sharding/format.py`` states, and nothing else: the case index in the root's attrs, one group per
case with ``image``, optional ``label``, and the attrs the writer sets. A case's split is its
index entry's.

Slices become uint8 and ``model.image_size`` by the shard writer's own functions, so a slice
read here equals the 2D sample of the same slice, rounding included: the case's
``attrs["intensity"]`` gives ``lo, hi`` (``sharding.intensity.record_bounds``: the CT window, or
the bounds the writer's percentiles gave for this volume) and ``sharding.intensity.linear_uint8``
maps the values; slices of another size are resized by ``sharding.transform.resize_image`` /
``resize_label_map`` with the ``resize`` argument, by default the ``resize`` of the shard set's
``manifest.json`` (``OUT/manifest.json`` for ``OUT/volumes/NAME.zarr``), else ``square``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.config import DataConfig
from pipeline.data.samples import SampleError
from sharding.format import (
    CASES_ATTR,
    FOREGROUND_ATTR,
    IMAGE_ARRAY,
    INTENSITY_ATTR,
    LABEL_ARRAY,
)
from sharding.intensity import linear_uint8, record_bounds
from sharding.manifest import load_manifest
from sharding.transform import RESIZE_MODES, resize_image, resize_label_map

__all__ = ["VolumeSliceDataset", "build_volume_loader"]

log = logging.getLogger(__name__)


def _resize_mode(store: Path) -> str:
    """The ``resize`` of ``OUT/manifest.json`` for a store at ``OUT/volumes/NAME.zarr``."""
    try:
        return load_manifest(store.parent.parent).resize
    except (OSError, ValueError):
        return "square"


@dataclass(frozen=True)
class _Case:
    group: str
    case_id: str
    depth: int
    bounds: tuple[float, float]
    """``lo, hi`` of the case's intensity record."""


class VolumeSliceDataset(Dataset):
    """Stacks of ``slices`` adjacent slices centred on each slice of each case of a split.

    Edge slices are replicate-padded (the stack of slice 0 with D = 3 is slices 0, 0, 1). Only the
    chunks of the stack's slices are read (one slice per chunk).

    Arguments:
      store_path: the ``.zarr`` store (``data.volumes``).
      cfg: the data section (foreground_only).
      image_size: S, the side of the returned slices (``model.image_size``).
      slices: D, the stack depth, odd (``model.slices``).
      split: the split to read (e.g. ``cfg.train_split``).
      centre_label: return only the centre slice's label (S, S) instead of (D, S, S).
      foreground_only: only stacks whose centre label has foreground (default
        ``cfg.foreground_only``), from the case's ``foreground_slices``.
      resize: "square" or "letterbox" for slices of another size than S (default: the
        manifest's, see the module docstring).

    Items: ``{"image": (D, 3, S, S) uint8, "label": (D, S, S) or (S, S) int64, "case_id": str,
    "group": str, "z": int, "depth": int}``.
    """

    def __init__(
        self,
        store_path: str | Path,
        *,
        cfg: DataConfig,
        image_size: int,
        slices: int,
        split: str,
        centre_label: bool = False,
        foreground_only: bool | None = None,
        resize: str | None = None,
    ):
        self.store_path = str(store_path)
        if slices < 1 or slices % 2 == 0:
            raise ValueError(f"slices must be odd and >= 1 (model.slices), got {slices}")
        self.cfg = cfg
        self.image_size = image_size
        self.split = split
        self.centre_label = centre_label
        self.half = slices // 2
        fg_only = cfg.foreground_only if foreground_only is None else foreground_only
        self.resize = _resize_mode(Path(self.store_path)) if resize is None else resize
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be 'square' or 'letterbox', got {self.resize!r}")
        root = self._root()
        index = root.attrs.get(CASES_ATTR)
        if not isinstance(index, dict):
            raise SampleError(
                f"{self.store_path}: no case index (attrs[{CASES_ATTR!r}]); is it a store of "
                "`samadapt shard` that ran to the end?"
            )
        self.cases: list[_Case] = []
        self.items: list[tuple[int, int]] = []  # (case index, z)
        for group, entry in index.items():
            if entry.get("split") != split:
                continue
            case, attrs = self._case(root, str(group), entry)
            zs = attrs.get(FOREGROUND_ATTR, []) if fg_only else range(case.depth)
            self.items.extend((len(self.cases), int(z)) for z in zs)
            self.cases.append(case)
        if not self.cases:
            raise SampleError(f"{self.store_path}: no case of split {split!r}")
        self._handle: zarr.Group | None = None

    def _case(self, root: zarr.Group, group: str, entry: dict) -> tuple[_Case, dict]:
        """One case of the index, checked: its image array and intensity record."""
        where = f"{self.store_path}/{group}"
        try:
            node = root[group]
            image = node[IMAGE_ARRAY]
        except KeyError:
            raise SampleError(
                f"{where}: case group (listed in the index) has no {IMAGE_ARRAY} array"
            ) from None
        if image.ndim != 3:
            raise SampleError(f"{where}/{IMAGE_ARRAY}: expected (Z, H, W), got {image.shape}")
        attrs = dict(node.attrs)
        record = attrs.get(INTENSITY_ATTR)
        try:
            bounds = record_bounds(record)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise SampleError(
                f"{where}: bad attrs[{INTENSITY_ATTR!r}] {record!r} ({exc!r})"
            ) from exc
        case_id = str(entry.get("case_id", group))
        return _Case(group, case_id, int(image.shape[0]), bounds), attrs

    # ---------------------------------------------------------------- store access
    def _root(self) -> zarr.Group:
        try:
            return zarr.open_group(self.store_path, mode="r")
        except Exception as exc:  # zarr raises several types for a missing / broken store
            raise SampleError(f"{self.store_path}: cannot open as a Zarr group ({exc})") from exc

    def __getstate__(self) -> dict:
        # a worker opens its own handle (zarr resets its IO loop after fork; no shared handle)
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def _group(self, name: str) -> zarr.Group:
        if self._handle is None:
            self._handle = self._root()
        return self._handle[name]

    # ---------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.items)

    def _resize(self, block: np.ndarray, label: bool) -> np.ndarray:
        """(D, H, W) -> (D, S, S) by the shard writer's rules (module docstring)."""
        s = self.image_size
        if block.shape[1:] == (s, s):
            return block
        resize = resize_label_map if label else resize_image
        return np.stack([resize(plane, size=s, mode=self.resize) for plane in block])

    def __getitem__(self, index: int) -> dict:
        case_index, z = self.items[index]
        case = self.cases[case_index]
        group = self._group(case.group)
        # the stack's slice indices, replicate-padded at the ends; read the covering range once
        zs = np.clip(np.arange(z - self.half, z + self.half + 1), 0, case.depth - 1)
        lo, hi = int(zs[0]), int(zs[-1]) + 1
        where = f"{self.store_path}/{case.group}"
        try:
            raw = np.asarray(group[IMAGE_ARRAY][lo:hi])[zs - lo]
        except Exception as exc:
            raise SampleError(f"{where}/image: cannot read slices {lo}..{hi - 1}: {exc}") from exc
        image = self._resize(linear_uint8(raw, *case.bounds), label=False)
        lz = zs[self.half : self.half + 1] if self.centre_label else zs
        if LABEL_ARRAY in group:
            label = np.asarray(group[LABEL_ARRAY][int(lz[0]) : int(lz[-1]) + 1])[lz - lz[0]]
            if not np.issubdtype(label.dtype, np.integer):
                raise SampleError(f"{where}/label: must be integer, got {label.dtype}")
            label = self._resize(label, label=True).astype(np.int64)
        else:
            s = self.image_size
            label = np.zeros((len(lz), s, s), dtype=np.int64)
        if self.centre_label:
            label = label[0]
        d, s = image.shape[0], image.shape[1]
        return {
            # gray -> 3 channels: one copy, straight into the output layout
            "image": torch.from_numpy(
                np.ascontiguousarray(np.broadcast_to(image[:, None], (d, 3, s, s)))
            ),
            "label": torch.from_numpy(label),
            "case_id": case.case_id,
            "group": case.group,
            "z": z,
            "depth": case.depth,
        }


def build_volume_loader(
    dataset: VolumeSliceDataset,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    shuffle: bool,
    epoch: int = 0,
    num_workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of slice stacks for one rank (``DistributedSampler``: every rank gets the same
    number of batches; the sampler repeats a few items to make the split divisible).

    Returns:
      A DataLoader of ``{"image": (B, D, 3, S, S) uint8, "label": (B, D, S, S) int64, ...}``.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
