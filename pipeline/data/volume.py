"""3D reader: stacks of adjacent slices from a Zarr v3 volume store (MA-SAM style inputs).

The store this reader expects (written by ``sharding``; ``OUT/volumes/{dataset}.zarr``)::

    {dataset}.zarr/                  root group (Zarr v3)
      attrs["cases"]                 the index, one of:
                                       [{"group": G, "case_id": C, "split": S, ...}, ...]
                                       (an entry may name only "group" or only "case_id": the
                                       other defaults to it)
                                       [G, ...]            group names
                                       {G: {"split": S, ...}, ...}
                                     absent = every child group, sorted by name
      attrs["intensity"]             optional default for every case (see below)
      {G}/                           one group per case
        image   (Z, H, W)            uint8, int16 (raw HU), float32 ... chunks (1, H, W)
        label   (Z, H, W)            integer label map, 0 = background, chunks (1, H, W);
                                     optional (an unlabelled case reads as all zeros)
        attrs: case_id, split, spacing [z, y, x], affine 4x4, class_map {id: name}, modality,
               intensity, optionally foreground_slices [z, ...] (slices whose label is non-zero)

A case's split is its index entry's ``split``, else its group's ``attrs["split"]``.

Image -> uint8 rule, from ``attrs["intensity"]`` (the case's, else the root's). The rule's name is
read from ``"mapping"`` (what ``sharding/volumes.py`` writes) or ``"kind"``:

* ``ct_window`` with ``level``, ``width``: ``lo, hi = level - width/2, level + width/2``;
* ``range`` with ``lo``, ``hi``;
* ``percentiles`` (or ``percentile``): ``lo, hi`` as stored by the writer (the values its
  percentiles gave for this volume); without them, ``np.percentile`` (linear) of the case's
  non-NaN voxels at ``percentiles: [p, q]`` (or ``low: p, high: q``), computed once per case and
  worker (reads the whole image);
* ``none``, or no ``intensity`` with a uint8 image: the values as stored.

then ``floor((clip(v, lo, hi) - lo) * 255 / (hi - lo) + 0.5)``, NaN -> 0, all 0 when
``hi <= lo``: the formula of ``sharding/intensity.py`` for 2D samples, computed in float64 in the
same order (subtract, times 255, divide), so a slice here equals the PNG of the same slice.
A non-uint8 image without ``intensity`` is an error.

Slices of another size than ``model.image_size`` are resized after the uint8 mapping, as the shard
writer resizes 2D samples: ``square`` = ``cv2.resize`` to S x S; ``letterbox`` = longest side to S
(``new = min(S, max(1, floor(side * S / max(H, W) + 0.5)))``), zero padding bottom/right. Images
use ``INTER_AREA`` when shrinking (S < max(H, W)), else ``INTER_LINEAR``; labels ``INTER_NEAREST``.
The mode is the ``resize`` argument, by default the ``resize`` of ``manifest.json`` two folders up
(``OUT/manifest.json`` for ``OUT/volumes/NAME.zarr``), else ``square``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.config import DataConfig
from pipeline.data.samples import SampleError
from sharding.intensity import linear_uint8

__all__ = ["VolumeSliceDataset", "build_volume_loader", "to_uint8"]

log = logging.getLogger(__name__)


def to_uint8(block: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    """Map raw values to uint8 by the module docstring's formula; ``lo is None`` = as stored.

    The formula is the shard writer's own (``sharding.intensity.linear_uint8``), so a slice read
    here equals the 2D sample of the same slice, rounding included."""
    if lo is None or hi is None:
        if block.dtype != np.uint8:
            raise ValueError(f"no intensity rule for a {block.dtype} image")
        return block
    return linear_uint8(block, lo, hi)


def _resize_mode(store: Path) -> str:
    """The ``resize`` of ``OUT/manifest.json`` for a store at ``OUT/volumes/NAME.zarr``."""
    manifest = store.parent.parent / "manifest.json"
    try:
        return str(json.loads(manifest.read_text()).get("resize", "square"))
    except (OSError, ValueError, AttributeError):
        return "square"


@dataclass(frozen=True)
class _Case:
    group: str
    case_id: str
    depth: int
    intensity: dict | None


def _index(root: zarr.Group) -> list[dict]:
    raw = root.attrs.get("cases")
    if raw is None:
        return [{"group": name} for name in sorted(root.group_keys())]
    if isinstance(raw, dict):
        return [{"group": g, **(v if isinstance(v, dict) else {})} for g, v in raw.items()]
    out = []
    for item in raw:
        if isinstance(item, str):
            out.append({"group": item})
        else:
            item = dict(item)
            item.setdefault("group", item.get("case_id"))
            out.append(item)
    return out


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
        ``cfg.foreground_only``); uses ``foreground_slices`` from the case attrs when present,
        else reads each case's label once at construction.
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
        if self.resize not in ("square", "letterbox"):
            raise ValueError(f"resize must be 'square' or 'letterbox', got {self.resize!r}")
        root = self._root()
        default_intensity = root.attrs.get("intensity")
        self.cases: list[_Case] = []
        self.items: list[tuple[int, int]] = []  # (case index, z)
        for entry in _index(root):
            group = str(entry["group"])
            try:
                node = root[group]
                image = node["image"]
            except KeyError:
                raise SampleError(
                    f"{self.store_path}: case group {group!r} (listed in the index) has no image "
                    "array"
                ) from None
            attrs = dict(node.attrs)
            if entry.get("split", attrs.get("split")) != split:
                continue
            if image.ndim != 3:
                raise SampleError(
                    f"{self.store_path}/{group}/image: expected (Z, H, W), got shape {image.shape}"
                )
            intensity = attrs.get("intensity", default_intensity)
            if image.dtype != np.uint8 and not intensity:
                raise SampleError(
                    f"{self.store_path}/{group}: image is {image.dtype} but attrs['intensity'] is "
                    "missing (expected {'mapping': 'ct_window' | 'percentiles' | 'range', ...})"
                )
            case = _Case(
                group,
                str(entry.get("case_id", attrs.get("case_id", group))),
                int(image.shape[0]),
                intensity,
            )
            zs = range(case.depth)
            if fg_only:
                zs = self._foreground(node, attrs, case)
            self.items.extend((len(self.cases), int(z)) for z in zs)
            self.cases.append(case)
        if not self.cases:
            raise SampleError(f"{self.store_path}: no case of split {split!r}")
        self._bounds: dict[str, tuple[float | None, float | None]] = {}
        self._handle: zarr.Group | None = None

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

    def _foreground(self, node: zarr.Group, attrs: dict, case: _Case) -> list[int]:
        if "foreground_slices" in attrs:
            return sorted(int(z) for z in attrs["foreground_slices"])
        if "label" not in node:
            return []
        label = node["label"][...]
        return np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1)).tolist()

    def _intensity_bounds(self, case: _Case) -> tuple[float | None, float | None]:
        if case.group in self._bounds:
            return self._bounds[case.group]
        rule = case.intensity or {"kind": "none"}
        kind = rule.get("mapping", rule.get("kind"))
        try:
            if kind == "none":
                bounds = (None, None)
            elif kind == "ct_window":
                level, width = float(rule["level"]), float(rule["width"])
                if width <= 0:
                    raise ValueError(f"width must be > 0, got {width}")
                bounds = (level - width / 2.0, level + width / 2.0)
            elif kind == "range":
                bounds = (float(rule["lo"]), float(rule["hi"]))
            elif kind in ("percentile", "percentiles"):
                if "lo" in rule and "hi" in rule:
                    bounds = (float(rule["lo"]), float(rule["hi"]))
                else:
                    low, high = rule.get("percentiles") or (rule["low"], rule["high"])
                    bounds = self._percentiles(case, float(low), float(high))
            else:
                raise ValueError(f"unknown mapping {kind!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise SampleError(
                f"{self.store_path}/{case.group}: bad attrs['intensity'] {rule!r} ({exc!r})"
            ) from exc
        self._bounds[case.group] = bounds
        return bounds

    def _percentiles(self, case: _Case, low: float, high: float) -> tuple[float, float]:
        image = np.asarray(self._group(case.group)["image"][...])
        if np.issubdtype(image.dtype, np.floating):
            image = image[~np.isnan(image)]
        if image.size == 0:
            return 0.0, 0.0
        lo, hi = np.percentile(image, [low, high])
        return float(lo), float(hi)

    # ---------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.items)

    def _resize(self, block: np.ndarray, label: bool) -> np.ndarray:
        """(D, H, W) -> (D, S, S) by the module docstring's rule."""
        s = self.image_size
        d, h, w = block.shape
        if (h, w) == (s, s):
            return block
        if self.resize == "letterbox":
            scale = s / max(h, w)
            new_h = min(s, max(1, int(np.floor(h * scale + 0.5))))
            new_w = min(s, max(1, int(np.floor(w * scale + 0.5))))
        else:
            new_h = new_w = s
        if label:
            interp = cv2.INTER_NEAREST
        else:
            interp = cv2.INTER_AREA if s < max(h, w) else cv2.INTER_LINEAR
        out = np.zeros((d, s, s), dtype=block.dtype)
        for i in range(d):
            out[i, :new_h, :new_w] = cv2.resize(block[i], (new_w, new_h), interpolation=interp)
        return out

    def __getitem__(self, index: int) -> dict:
        case_index, z = self.items[index]
        case = self.cases[case_index]
        group = self._group(case.group)
        # the stack's slice indices, replicate-padded at the ends; read the covering range once
        zs = np.clip(np.arange(z - self.half, z + self.half + 1), 0, case.depth - 1)
        lo, hi = int(zs[0]), int(zs[-1]) + 1
        where = f"{self.store_path}/{case.group}"
        try:
            raw = np.asarray(group["image"][lo:hi])[zs - lo]
        except Exception as exc:
            raise SampleError(f"{where}/image: cannot read slices {lo}..{hi - 1}: {exc}") from exc
        try:
            image = to_uint8(raw, *self._intensity_bounds(case))
        except ValueError as exc:
            raise SampleError(f"{where}: {exc}") from exc
        image = self._resize(image, label=False)
        lz = zs[self.half : self.half + 1] if self.centre_label else zs
        if "label" in group:
            label = np.asarray(group["label"][int(lz[0]) : int(lz[-1]) + 1])[lz - lz[0]]
            if not np.issubdtype(label.dtype, np.integer):
                raise SampleError(f"{where}/label: must be integer, got {label.dtype}")
            label = self._resize(label.astype(np.int32), label=True).astype(np.int64)
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
