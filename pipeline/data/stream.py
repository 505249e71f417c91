"""The streaming reader: WebDataset shards -> batches, one DataLoader per rank.

The pipeline of one loader worker, stage by stage (``ShardStream.__iter__``)::

    shards of the split (manifest.json)       sizes checked against the manifest
    -> epoch order                             permuted by (seed, epoch) for training
    -> split by node                           explicit rank / world_size, balanced by samples
    -> split by worker                         DataLoader worker id, balanced by samples
    -> tar samples                             a read error names the shard path; sample count
                                               and sha256 checked against the manifest
    -> interleave                              data.open_shards shards read at once (training)
    -> shuffle buffer                          data.shuffle_buffer raw samples (bytes), per worker
    -> decode                                  our decoder: .img / .mpk / .json (sharding.format)
    -> map                                     pick masks + prompts (interactive) or label map
    -> batch + collate                         fixed-shape tensors (collate.py)
    -> take                                    the same number of batches on every rank

Epochs. Every shard goes to exactly one (rank, worker) slot per epoch: shards are dealt, in the
epoch's order, to the least-loaded rank (by manifest sample count, ties to the lower rank), then
within the rank to the least-loaded worker. So with ``resampled=False`` each sample of the split
is read exactly once per epoch across all ranks and workers. Shards never divide perfectly, and
DeepSpeed needs every rank to take the same number of steps (each step is a collective), so:

* ``equalize=True`` (training default): worker ``w`` of every rank yields exactly
  ``max over ranks of ceil(samples of slot (rank, w) / batch_size)`` full batches. After its own
  shards, a worker tops up from an endless stream of shards drawn with replacement (seeded by
  seed/epoch/rank/worker); top-up samples carry ``meta["padding"] = True``. The non-padding
  samples of an epoch are still every sample exactly once (minus images skipped for having no
  mask). ``steps_per_epoch`` gives the batches per rank. Keep shards >> ranks x workers or the
  top-up (and the repeated samples) grows.
* ``equalize=False``: the pure exactly-once pass; a worker's last batch may be partial and ranks
  may yield different numbers of batches. For evaluation and analysis, not for DeepSpeed steps.
* ``resampled=True`` (``data.resampled``): every worker draws shards with replacement (weighted by
  samples) and the epoch is cut at ``ceil(total samples / (batch_size * world_size))`` full batches
  per rank, shared out over the workers (open_clip's ``--dataset-resampled``).

Mixing. The sharder writes each split's inputs in a seeded random order (``sharding/plan.py``),
so a shard is a sample of the whole split; a training worker still reads ``data.open_shards``
shards at once, one sample of each in turn (in a random order per round), before its shuffle
buffer. A buffer of a few
hundred samples spans ~2 % of a default shard: alone it cannot mix what one shard holds (the
slices of a 3D case, written together, or shards cut from a sorted corpus).
``bench/mixing.py`` compares the batch composition with a uniform shuffle.

Determinism: the batch sequence of a rank is a function of (seed, epoch, rank, world_size,
num_workers, batch_size) and the data; DataLoader hands out worker batches round-robin in worker
order. A new epoch reshuffles the shard order, the buffers, the mask picks and the prompts.

Images without masks cannot be prompted: interactive training skips them and counts them
(``batch["skipped_empty"]``: skipped by this worker since its previous batch; the total is logged
when a worker ends). Semantic training keeps them (all-background label maps) unless
``keep_empty=False``. The eval loader keeps every sample and every mask (see ``collate.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data.collate import collate
from pipeline.data.samples import SampleError, SkipCounter, decode, interactive, semantic
from pipeline.data.shards import (
    INTERLEAVE,
    OWN,
    PICK,
    RESAMPLE,
    SHUFFLE,
    TOPUP,
    Shard,
    plan_epoch,
    read_manifest,
    resampled_batches,
    seed_of,
    steps_per_epoch,
    worker_batches,
)
from sharding.tar_reader import read_shard

__all__ = [
    "Shard",
    "ShardStream",
    "build_eval_loader",
    "build_train_loader",
    "interleaved_samples",
    "read_manifest",
    "resampled_shards",
    "steps_per_epoch",
    "tar_samples",
]


log = logging.getLogger(__name__)

Mode = Literal["interactive", "semantic"]

# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def resampled_shards(
    shards: list[Shard], *, rng: random.Random, padding: bool = False
) -> Iterator[dict]:
    """Endless shards drawn with replacement, weighted by their sample counts."""
    weights = [max(s.samples, 0) for s in shards]
    if sum(weights) == 0:
        raise SampleError(f"cannot resample: all shards are empty ({shards[0].url} ...)")
    while True:
        (shard,) = rng.choices(shards, weights=weights)
        yield {
            "url": shard.url,
            "samples": shard.samples,
            "padding": padding,
            "sha256": shard.sha256,
        }


def _checked_shard(shard: dict, *, verify: bool) -> Iterator[dict]:
    """The raw samples of one shard, checked at its end (see ``tar_samples``)."""
    url, count = shard["url"], 0
    expected = shard.get("sha256", "") if verify else ""
    hashed: list[str] | None = [] if expected else None
    try:
        for sample in read_shard(url, hashed=hashed):
            sample["__padding__"] = shard.get("padding", False)
            count += 1
            yield sample
    except SampleError:
        raise
    except Exception as exc:  # tarfile.ReadError, OSError, gzip errors...: name the shard
        raise SampleError(f"shard {url}: cannot read ({type(exc).__name__}: {exc})") from exc
    if count != shard["samples"]:
        raise SampleError(
            f"shard {url}: read {count} samples, the manifest says {shard['samples']} "
            "(truncated or rewritten after the manifest)"
        )
    if hashed and hashed[0] != expected:
        raise SampleError(
            f"shard {url}: sha256 {hashed[0]} is not the manifest's {expected} (damaged or "
            "rewritten after sharding): copy it again or reshard; data.verify_checksums=false "
            "skips this check"
        )


def tar_samples(shards: Iterable[dict], *, verify: bool = True) -> Iterator[dict]:
    """Shards -> raw samples (WebDataset's tar reader), one shard at a time.

    A shard that fails to read raises ``SampleError`` naming its path. Python's streaming tar reader
    ends quietly at a cut (inside a member it returns the member's first bytes), so three checks
    catch damage: ``decode`` names a sample with a missing or broken member, a shard read to its
    end must hold the number of samples the manifest says, and (``verify``) its sha256, taken as
    it streams (no second read), must be the manifest's, which also catches same-size damage that
    still decodes. Samples already read are not undone: the run stops at the shard's end.
    """
    for shard in shards:
        yield from _checked_shard(shard, verify=verify)


def interleaved_samples(
    shards: Iterable[dict], *, open_shards: int, rng: random.Random, verify: bool = True
) -> Iterator[dict]:
    """Raw samples of up to ``open_shards`` shards read at once (each checked as in
    ``tar_samples``), interleaved in rounds.

    Each round takes one sample from every open shard, in a random order of the shards, so the
    samples of a round come from different shards (random draws of a shard per sample would
    often take several of one shard in a row). A shard that ends is replaced, after the round, by
    the next one of ``shards`` (which may be endless). A function of ``rng``'s state and the
    shards' contents.

    Arguments:
      shards: shard dicts (url, samples, padding, sha256), in reading order.
      open_shards: shards open at once (1 = ``tar_samples``).
      rng: the order within each round (seeded by the caller).
      verify: check each shard's sha256 at its end.

    Returns:
      An iterator of raw samples.
    """
    if open_shards <= 1:
        yield from tar_samples(shards, verify=verify)
        return
    pending = iter(shards)
    streams: list[Iterator[dict]] = []
    while True:
        while len(streams) < open_shards:
            shard = next(pending, None)
            if shard is None:
                break
            streams.append(_checked_shard(shard, verify=verify))
        if not streams:
            return
        ended = set()
        for i in rng.sample(range(len(streams)), len(streams)):
            sample = next(streams[i], None)
            if sample is None:  # the shard's checks have run: it was read to its end
                ended.add(i)
            else:
                yield sample
        streams = [s for i, s in enumerate(streams) if i not in ended]


class ShardStream(IterableDataset):
    """The per-rank sample stream (see the module docstring); yields collated batches.

    Arguments:
      shards: the split's shards (``read_manifest``).
      cfg: the data section.
      image_size: the side S of the images and masks (``model.image_size``).
      rank, world_size: this process's place among the data-parallel ranks.
      epoch: the epoch (``set_epoch`` changes it between iterations).
      train: True = shuffled, masks drawn (``cfg.mask_num``) with jittered boxes; False = manifest
        order, every sample once, every mask once, no jitter, partial last batch.
      mode: "interactive" (masks + prompts) or "semantic" (label maps).
      resampled: shards drawn with replacement (train only).
      equalize: top up so that every rank yields the same number of batches (train only).
      keep_empty: keep images without masks (default: only in semantic mode and evaluation).
      split: the split's name, for messages.
    """

    def __init__(
        self,
        shards: list[Shard],
        *,
        cfg: DataConfig,
        image_size: int,
        rank: int,
        world_size: int,
        epoch: int = 0,
        train: bool = True,
        mode: Mode = "interactive",
        resampled: bool = False,
        equalize: bool = True,
        keep_empty: bool | None = None,
        split: str = "",
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if mode not in ("interactive", "semantic"):
            raise ValueError(f"mode must be 'interactive' or 'semantic', got {mode!r}")
        self.shards = shards
        self.cfg = cfg
        self.image_size = image_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.train = train
        self.mode = mode
        self.resampled = resampled and train
        self.equalize = equalize and train and not self.resampled
        self.keep_empty = (mode == "semantic" or not train) if keep_empty is None else keep_empty
        self.split = split

    def set_epoch(self, epoch: int) -> None:
        """Takes effect at the next ``iter()`` (workers are not persistent)."""
        self.epoch = epoch

    def _samples(
        self, shards: Iterable[dict], worker: int, tag: int, skipped: SkipCounter
    ) -> Iterator[dict]:
        """tar -> interleave -> shuffle buffer -> decode -> map, for one run of shards."""
        cfg = self.cfg
        key = (cfg.seed, self.epoch, self.rank, worker, tag)
        samples: Iterator[dict] = interleaved_samples(
            shards,
            open_shards=cfg.open_shards if self.train else 1,
            rng=random.Random(seed_of(*key, INTERLEAVE)),
            verify=cfg.verify_checksums,
        )
        if self.train and cfg.shuffle_buffer > 1:
            rng = random.Random(seed_of(*key, SHUFFLE))
            samples = wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_buffer, rng=rng)(samples)
        decoded = (decode(s, image_size=self.image_size) for s in samples)
        if self.mode == "semantic":
            return semantic(decoded, keep_empty=self.keep_empty, skipped=skipped)
        return interactive(
            decoded,
            mask_num=cfg.mask_num if self.train else 0,
            keep_empty=self.keep_empty,
            jitter=cfg.box_jitter if self.train else 0,
            box_from=cfg.box_from,
            points=cfg.point_num,
            rng=np.random.default_rng(seed_of(*key, PICK)) if self.train else None,
            seed=cfg.seed,
            skipped=skipped,
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        cfg = self.cfg
        total = sum(s.samples for s in self.shards)
        # endless streams (resampled, top-up) must not spin on a split without usable samples
        endless = self.resampled or self.equalize
        skipped = SkipCounter(
            limit=10 * total + 1000 if endless else None,
            what=f"split {self.split!r} ({self.shards[0].url}, ...) rank {self.rank} "
            f"worker {worker}",
        )
        target: int | None = None
        if self.resampled:
            rng = random.Random(seed_of(cfg.seed, self.epoch, self.rank, worker, RESAMPLE))
            stream = self._samples(
                resampled_shards(self.shards, rng=rng), worker, RESAMPLE, skipped
            )
            target = resampled_batches(total, cfg.batch_size, self.world_size, workers)[worker]
        else:
            plan = plan_epoch(
                self.shards,
                seed=cfg.seed,
                epoch=self.epoch,
                shuffle=self.train,
                world_size=self.world_size,
                num_workers=workers,
            )
            mine = plan[self.rank][worker]
            runs = [
                {"url": s.url, "samples": s.samples, "padding": False, "sha256": s.sha256}
                for s in mine
            ]
            stream = self._samples(runs, worker, OWN, skipped)
            if self.equalize:
                rng = random.Random(seed_of(cfg.seed, self.epoch, self.rank, worker, TOPUP))
                top_up = self._samples(
                    resampled_shards(self.shards, rng=rng, padding=True), worker, TOPUP, skipped
                )
                # the top-up starts after this worker's own samples, so none of them is cut off
                stream = chain(stream, top_up)
                target = worker_batches(plan, cfg.batch_size)[worker]

        def collate_counted(batch: list[dict]) -> dict:
            out = collate(batch)
            out["skipped_empty"] = skipped.take()
            return out

        batches = wds.batched(cfg.batch_size, collation_fn=collate_counted, partial=target is None)(
            stream
        )
        if target is not None:
            batches = islice(batches, target)
        yield from batches
        log.info(
            "rank %d worker %d epoch %d: end of stream, %d images without masks skipped",
            self.rank,
            worker,
            self.epoch,
            skipped.total,
        )


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _as_is(batch: dict) -> dict:
    return batch


def _loader(dataset: ShardStream, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # batches are made (and collated) in the workers
        collate_fn=_as_is,  # already tensors: skip default_convert's walk over every field
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # a new iter() re-forks, so set_epoch reaches the workers
    )


def build_train_loader(
    *,
    cfg: DataConfig,
    image_size: int,
    rank: int,
    world_size: int,
    epoch: int = 0,
    mode: Mode = "interactive",
    resampled: bool | None = None,
    equalize: bool = True,
    keep_empty: bool | None = None,
) -> DataLoader:
    """The training loader of one rank (shuffled; see the module docstring for epochs).

    Arguments:
      cfg: the data section.
      image_size: ``model.image_size``; must equal the shards' (checked against manifest.json).
      rank, world_size: data-parallel rank and number of ranks (passed in, never read from the
        environment).
      epoch: seeds the shard order, buffers and picks; or call ``loader.dataset.set_epoch(e)``.
      mode: "interactive" (``train.mode``) or "semantic".
      resampled: override ``cfg.resampled``.
      equalize: same number of batches on every rank (required under DeepSpeed).
      keep_empty: override the default (keep images without masks only in semantic mode).

    Returns:
      A DataLoader of batch dicts (``collate.py``); ``loader.steps_per_epoch`` is the number of
      batches per rank in ``epoch`` (None when ``equalize=False`` and not resampled; after
      ``set_epoch`` ask ``steps_per_epoch()`` again: the dealing of shards changes per epoch).
    """
    resampled = cfg.resampled if resampled is None else resampled
    shards = read_manifest(cfg.shards, split=cfg.train_split, image_size=image_size)
    dataset = ShardStream(
        shards,
        cfg=cfg,
        image_size=image_size,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        train=True,
        mode=mode,
        resampled=resampled,
        equalize=equalize,
        keep_empty=keep_empty,
        split=cfg.train_split,
    )
    loader = _loader(dataset, cfg.num_workers)
    loader.steps_per_epoch = (
        steps_per_epoch(
            cfg=cfg,
            image_size=image_size,
            world_size=world_size,
            epoch=epoch,
            resampled=resampled,
            shards=shards,
        )
        if resampled or equalize
        else None
    )
    return loader


def build_eval_loader(
    *,
    cfg: DataConfig,
    image_size: int,
    rank: int,
    world_size: int,
    split: str | None = None,
    mode: Mode = "interactive",
    batch_size: int | None = None,
) -> DataLoader:
    """An evaluation loader of one rank: every sample of the split exactly once over all ranks.

    No shuffling or resampling; shards in manifest order, dealt to ranks and workers as in
    training; every mask of every image (padded per batch, ``mask_valid``), boxes by the
    training rule (``data.box_from``) without jitter, points drawn from (seed, key) so prompts
    do not depend on ranks or workers; the last batch of a worker may be partial, and ranks may
    get different numbers of batches (reduce metrics once at the end, not per batch).

    Arguments:
      cfg: the data section.
      image_size: ``model.image_size``; must equal the shards' (checked against manifest.json).
      rank, world_size: data-parallel rank and number of ranks.
      split: the split to read (default ``cfg.val_split``).
      mode: "interactive" or "semantic".
      batch_size: override ``cfg.batch_size``.

    Returns:
      A DataLoader of batch dicts (``collate.py``).
    """
    split = cfg.val_split if split is None else split
    if batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    shards = read_manifest(cfg.shards, split=split, image_size=image_size)
    dataset = ShardStream(
        shards,
        cfg=cfg,
        image_size=image_size,
        rank=rank,
        world_size=world_size,
        train=False,
        mode=mode,
        resampled=False,
        equalize=False,
        split=split,
    )
    return _loader(dataset, cfg.num_workers)
