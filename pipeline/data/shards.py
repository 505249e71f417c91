"""The shard list of a split and its dealing over ranks and workers (pure functions).

``read_manifest`` reads ``manifest.json`` (through ``sharding.manifest.load_manifest``, the one
manifest reader) and checks it against the model's input size; ``plan_epoch`` deals the shards of
one epoch to (rank, worker) slots; ``steps_per_epoch`` counts the batches every rank's train
loader yields (see ``stream.py``).
"""

from __future__ import annotations

import math

import numpy as np

from configtree import ConfigError
from pipeline.config import DataConfig
from pipeline.data.samples import SampleError
from sharding.manifest import Manifest, ManifestError, Shard, check_shards, load_manifest

__all__ = [
    "Shard",
    "epoch_order",
    "plan_epoch",
    "read_class_map",
    "read_manifest",
    "seed_of",
    "split_by_node",
    "split_by_worker",
    "steps_per_epoch",
    "worker_batches",
]

# seed tags: one independent random stream per purpose (shard order, a worker's own run of
# shards, its shuffle buffer, its mask/prompt picks, resampled shards, top-up shards, the
# interleaving of its open shards)
ORDER, OWN, SHUFFLE, PICK, RESAMPLE, TOPUP, INTERLEAVE = range(7)


def seed_of(*parts: int) -> int:
    """One 32-bit seed from integers (any sign), stable across processes and Python versions."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# The shard list
# --------------------------------------------------------------------------------------------


def _manifest(root: str) -> Manifest:
    """``load_manifest`` with its errors named after ``data.shards``."""
    if not root:
        raise ConfigError("data.shards is empty: set it to the output folder of `samadapt shard`")
    try:
        return load_manifest(root)
    except FileNotFoundError as exc:
        raise ConfigError(f"data.shards={root!r}: {exc}") from exc
    except ManifestError as exc:
        raise SampleError(str(exc)) from exc


def read_manifest(
    root: str, *, split: str, image_size: int, check_files: bool = True
) -> list[Shard]:
    """The shards of one split, from ``ROOT/manifest.json`` (manifest order).

    Arguments:
      root: output folder of ``samadapt shard`` (``data.shards``).
      split: e.g. ``data.train_split``.
      image_size: ``model.image_size``; must equal the manifest's ``image_size``.
      check_files: stat every shard: missing, or a size other than the manifest's ``bytes``
        (a truncated copy), is an error naming the shard.

    Returns:
      The split's shards. Raises ``ConfigError`` naming ``data.shards`` / ``model.image_size``, or
      ``SampleError`` naming the manifest or shard path.
    """
    manifest = _manifest(root)
    if manifest.image_size != image_size:
        raise ConfigError(
            f"model.image_size={image_size} does not match image_size={manifest.image_size} of "
            f"the shards in {manifest.path.parent} ({manifest.path}): set "
            f"model.image_size={manifest.image_size} or reshard"
        )
    try:
        shards = manifest.split(split)
    except ManifestError as exc:
        raise SampleError(str(exc)) from exc
    bad = check_shards(shards, digest=False) if check_files else []
    if bad:
        raise SampleError(f"shard {bad[0]} (listed in {manifest.path})")
    return shards


def read_class_map(root: str) -> dict[int, str] | None:
    """Class id -> name of a shard set (``manifest["classes"]``); None when the manifest has no
    class map (written before it existed). Ids are >= 1; 0 (no class) is not listed."""
    return _manifest(root).classes


def _deal(shards: list[Shard], parts: int) -> list[list[Shard]]:
    """Deal shards in order to the part with the fewest samples so far (ties: lowest index)."""
    out: list[list[Shard]] = [[] for _ in range(parts)]
    load = [0] * parts
    for shard in shards:
        j = min(range(parts), key=load.__getitem__)
        out[j].append(shard)
        load[j] += shard.samples
    return out


def split_by_node(shards: list[Shard], *, rank: int, world_size: int) -> list[Shard]:
    """This rank's shards (explicit rank and world size: no environment lookups)."""
    return _deal(shards, world_size)[rank]


def split_by_worker(shards: list[Shard], *, worker: int, num_workers: int) -> list[Shard]:
    """This DataLoader worker's part of the rank's shards."""
    return _deal(shards, num_workers)[worker]


def epoch_order(shards: list[Shard], *, seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    """The shards in this epoch's order: a permutation by (seed, epoch), or manifest order."""
    if not shuffle:
        return list(shards)
    perm = np.random.default_rng(seed_of(seed, epoch, ORDER)).permutation(len(shards))
    return [shards[i] for i in perm]


def plan_epoch(
    shards: list[Shard], *, seed: int, epoch: int, shuffle: bool, world_size: int, num_workers: int
) -> list[list[list[Shard]]]:
    """``plan[rank][worker]`` = the shards that slot reads in this epoch (no resampling)."""
    ordered = epoch_order(shards, seed=seed, epoch=epoch, shuffle=shuffle)
    return [
        [
            split_by_worker(
                split_by_node(ordered, rank=r, world_size=world_size),
                worker=w,
                num_workers=num_workers,
            )
            for w in range(num_workers)
        ]
        for r in range(world_size)
    ]


def worker_batches(plan: list[list[list[Shard]]], batch_size: int) -> list[int]:
    """Batches worker w yields on every rank: enough for the fullest slot of that worker index."""
    workers = len(plan[0])
    return [
        max(math.ceil(sum(s.samples for s in plan[r][w]) / batch_size) for r in range(len(plan)))
        for w in range(workers)
    ]


def resampled_batches(total: int, batch_size: int, world_size: int, workers: int) -> list[int]:
    """Batches worker w yields when resampling: ceil(total / (batch_size * world_size)) per rank,
    shared out over the workers (the first workers take the remainder)."""
    per_rank = max(1, math.ceil(total / (batch_size * world_size)))
    return [per_rank // workers + (1 if w < per_rank % workers else 0) for w in range(workers)]


def steps_per_epoch(
    *,
    cfg: DataConfig,
    image_size: int,
    world_size: int,
    epoch: int = 0,
    resampled: bool | None = None,
    shards: list[Shard] | None = None,
) -> int:
    """Batches each rank's train loader yields in ``epoch`` (``equalize=True`` or resampled).

    Arguments:
      cfg: the data section (shards, train_split, batch_size, num_workers, seed, resampled).
      image_size: ``model.image_size``, checked against the manifest when it is read here.
      world_size: number of ranks.
      epoch: the epoch (the dealing of shards, hence the count, depends on it).
      resampled: override ``cfg.resampled``.
      shards: the split's shards if already read (else read from the manifest).

    Returns:
      The number of optimizer-step batches per rank, the same on every rank.
    """
    resampled = cfg.resampled if resampled is None else resampled
    if shards is None:
        shards = read_manifest(
            cfg.shards, split=cfg.train_split, image_size=image_size, check_files=False
        )
    workers = max(cfg.num_workers, 1)
    if resampled:
        total = sum(s.samples for s in shards)
        return sum(resampled_batches(total, cfg.batch_size, world_size, workers))
    plan = plan_epoch(
        shards, seed=cfg.seed, epoch=epoch, shuffle=True, world_size=world_size, num_workers=workers
    )
    return sum(worker_batches(plan, cfg.batch_size))
