"""The ``sharding`` section of the config: how ``samadapt shard`` turns a corpus into shards.

Read by every module of ``sharding/``; loaded from YAML by ``configtree`` (the entry layer composes
it into the root config, ``samadapt/config.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from configtree import fraction, require

__all__ = ["ShardingConfig"]


@dataclass
class ShardingConfig:
    """How ``samadapt shard`` turns a corpus into WebDataset shards and Zarr volumes."""

    image_size: int = 256
    """Side of the stored square image and masks (256 as SAM-Med2D trains, 1024 for full SAM)."""
    resize: Literal["square", "letterbox"] = "square"
    """square: stretch to size x size (SAM-Med2D); letterbox: longest side to size, pad
    bottom/right with zeros (SAM's own preprocessing)."""
    inputs_per_shard: int = 0
    """Input units per shard (a 2D image, or a 3D case with all its slices); 0 = estimate from
    shard_size_mb on the first inputs. Fixed once planned (plan.json), so reruns and job arrays
    agree on which input goes to which shard."""
    shard_size_mb: float = 1000.0
    """Target shard size used when inputs_per_shard is 0."""
    shuffle_seed: int = 0
    """Seed of the order in which each split's inputs are cut into shards (sharding/plan.py): a
    random order, so that every shard is a sample of the whole split, not a few cases."""
    keep_empty_ratio: float = 0.1
    """Fraction of slices without any foreground that are kept (chosen by hash, deterministic)."""
    val_fraction: float = 0.1
    """Fraction of cases (patients) assigned to the val split, by hash of the case id."""
    test_fraction: float = 0.1
    """Fraction of cases assigned to the test split."""
    ct_window: list[float] = field(default_factory=lambda: [40.0, 400.0])
    """CT window [level, width] in HU mapped to 0..255 (default abdomen)."""
    mr_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    """MR (and other non-CT) intensity clipping percentiles, mapped to 0..255."""
    min_mask_pixels: int = 1
    """Masks with fewer pixels after resizing are dropped (and reported in rejected.jsonl)."""
    workers: int = 0
    """Worker processes; 0 = all local cores."""
    volumes: bool = True
    """Also write 3D inputs as Zarr v3 stores (one group per case) under volumes/."""
    zstd_level: int = 5
    """Blosc-zstd level for Zarr volumes and the image and mask members of the shards."""
    dataset: str = ""
    """Dataset name; empty = from dataset.json or the input folder's name."""
    modality: str = ""
    """Modality override (ct, mr, us, xray, ...); empty = from the input's metadata."""

    def __post_init__(self) -> None:
        require(self.image_size >= 16, "image_size", f"must be >= 16, got {self.image_size}")
        require(self.inputs_per_shard >= 0, "inputs_per_shard", "must be >= 0")
        require(self.shard_size_mb > 0, "shard_size_mb", "must be > 0")
        fraction(self.keep_empty_ratio, "keep_empty_ratio")
        fraction(self.val_fraction, "val_fraction")
        fraction(self.test_fraction, "test_fraction")
        require(
            self.val_fraction + self.test_fraction < 1.0,
            "val_fraction",
            f"+ test_fraction ({self.val_fraction} + {self.test_fraction}) must be < 1 "
            "to leave cases for training",
        )
        require(
            len(self.ct_window) == 2 and self.ct_window[1] > 0,
            "ct_window",
            f"must be [level, width] with width > 0, got {self.ct_window}",
        )
        lo_hi = self.mr_percentiles
        require(
            len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 100,
            "mr_percentiles",
            f"must be [low, high] with 0 <= low < high <= 100, got {lo_hi}",
        )
        require(self.min_mask_pixels >= 1, "min_mask_pixels", "must be >= 1")
        require(self.workers >= 0, "workers", "must be >= 0")
        require(1 <= self.zstd_level <= 9, "zstd_level", "must be in 1..9")
