"""``train.mode=semantic``: prompt-free heads (SAMed / MA-SAM / AutoSAM) with CE + Dice.

2D samples come from the shards as label maps; with ``data.volumes`` (3D adapters), stacks of
``model.slices`` adjacent slices come from the Zarr store. Validation is per-class Dice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from configtree import ConfigError
from pipeline.augment import Augmenter
from pipeline.config import DataConfig, PipelineConfig, TrainConfig
from pipeline.data.shards import read_class_map
from pipeline.data.stream import build_eval_loader, build_train_loader
from pipeline.data.volume import VolumeSliceDataset, build_volume_loader
from pipeline.distributed import DistEnv
from pipeline.embedding_cache import EmbeddingCache, build_embedding_cache
from pipeline.evaluate import Example, validate_semantic
from pipeline.model.config import ModelConfig
from pipeline.steps import semantic_step
from pipeline.tasks.base import NonFiniteLoss, Task, to_host, with_epoch

log = logging.getLogger(__name__)


def flatten_stacks(batch: dict[str, Any]) -> dict[str, Any]:
    """(B, D, ...) slice stacks -> (B*D, ...), each stack's D slices consecutive; ``keys`` names
    each stack by its case group and centre slice (``group/z``), as a shard key names a sample.
    """
    out = dict(batch)
    out["keys"] = [f"{g}/{int(z)}" for g, z in zip(batch["group"], batch["z"], strict=True)]
    for key in ("image", "label"):
        value = batch[key]
        out[key] = value.reshape(-1, *value.shape[2:])
    return out


def check_classes(cfg: PipelineConfig) -> None:
    """The shards' class ids fit the head: a prompt-free head predicts num_classes + 1 channels
    from them, and ids beyond that, or no ids at all, cannot train (the loss would fail mid-run
    or learn nothing)."""
    classes = read_class_map(cfg.data.shards)
    if classes is None:
        log.warning(
            "data.shards=%s: the manifest has no class map (made by an older samadapt shard); "
            "model.num_classes=%d is not checked against the class ids",
            cfg.data.shards,
            cfg.model.num_classes,
        )
        return
    if not classes:
        raise ConfigError(
            f"model.head={cfg.model.head} needs class ids, but the masks in data.shards="
            f"{cfg.data.shards} carry none (every mask has class id 0): shard with a class map "
            "(dataset.json labels, classes.json) or train the promptable head (train.mode="
            "interactive, model.head=sam)"
        )
    top = max(classes)
    if top > cfg.model.num_classes:
        named = ", ".join(f"{i}={n}" for i, n in sorted(classes.items())[:8])
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes}, but data.shards={cfg.data.shards} has "
            f"class ids up to {top} ({named}{', ...' if len(classes) > 8 else ''}): set "
            f"model.num_classes={top}"
        )


class SemanticTask(Task):
    """Prompt-free training on label maps (2D shards or 3D slice stacks).

    Arguments:
      data, model, train: the config's data, model and train sections.
      seed: the run's seed (``cfg.seed``; shuffles the 3D sampler).
      engine: the ``pipeline.engine.Engine`` around a ``SamAdapt`` with a prompt-free head.
      env: this process's place among the ranks.
      phases: the trainable phases, all updated every step.
      cache: a frozen encoder's embeddings (``train.embedding_cache``), or None.
    """

    def __init__(
        self,
        *,
        data: DataConfig,
        model: ModelConfig,
        train: TrainConfig,
        seed: int,
        engine: Any,
        env: DistEnv,
        phases: tuple[str, ...],
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.data, self.model, self.train, self.seed = data, model, train, seed
        self.cache = cache
        self.engine, self.env, self.phases = engine, env, phases
        # nothing random beyond the global RNGs the checkpoint keeps: augmentation draws per
        # sample from (data.seed, epoch, key)
        self.generators = {}
        self.augmenter = Augmenter.for_data(data, device=engine.device)

    @classmethod
    def check(cls, cfg: PipelineConfig) -> None:
        if cfg.data.shards and not cfg.data.volumes:
            check_classes(cfg)

    @classmethod
    def build(
        cls, cfg: PipelineConfig, *, engine: Any, env: DistEnv, phases: tuple[str, ...]
    ) -> SemanticTask:
        return cls(
            data=cfg.data,
            model=cfg.model,
            train=cfg.train,
            seed=cfg.seed,
            engine=engine,
            env=env,
            phases=phases,
            cache=build_embedding_cache(cfg, engine),
        )

    def loader(self, epoch: int, *, split: str | None = None) -> Iterable[dict[str, Any]]:
        """Label maps from the shards, or, with ``data.volumes``, slice stacks from the Zarr store
        flattened to (B*D, ...) with each stack's slices consecutive, as the model expects."""
        data, env = self.data, self.env
        if data.volumes:
            dataset = VolumeSliceDataset(
                data.volumes,
                cfg=data,
                image_size=self.model.image_size,
                slices=self.model.slices,
                split=split or data.train_split,
            )
            loader = build_volume_loader(
                dataset,
                rank=env.rank,
                world_size=env.world_size,
                batch_size=data.batch_size,
                shuffle=split is None,
                epoch=epoch,
                num_workers=data.num_workers,
                seed=self.seed,
            )
            batches = map(flatten_stacks, loader)
            return batches if split is not None else with_epoch(batches, epoch)
        kwargs = dict(
            cfg=data,
            image_size=self.model.image_size,
            rank=env.rank,
            world_size=env.world_size,
            mode="semantic",
        )
        if split is not None:
            return build_eval_loader(split=split, **kwargs)
        return with_epoch(build_train_loader(epoch=epoch, **kwargs), epoch)

    def step(self, batch: dict[str, Any], *, step: int) -> dict[str, torch.Tensor]:
        if self.augmenter.enabled:
            batch = self.augmenter.semantic(batch)
        return semantic_step(
            self.engine,
            batch,
            train=self.train,
            step=step,
            phases=self.phases,
            slices=self.model.slices,
            encode=self.cache,
        )

    def metrics(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, Any], *, step: int
    ) -> dict[str, float]:
        """``loss``, ``ce`` and ``dice`` (the weighted total and its two terms), and with a cache
        ``embedding_cache_hit_rate`` (over the run so far)."""
        host = to_host(outputs)
        if not torch.isfinite(host["loss"]):
            raise NonFiniteLoss(f"step {step}: non-finite loss on batch {batch.get('keys')}")
        metrics = {k: float(v) for k, v in host.items()}
        if self.cache is not None:
            metrics["embedding_cache_hit_rate"] = self.cache.hit_rate
        return metrics

    def validate(
        self, loader: Iterable[dict[str, Any]], *, keep: int
    ) -> tuple[dict[str, float], list[Example]]:
        return validate_semantic(
            self.engine,
            loader,
            num_classes=self.model.num_classes,
            slices=self.model.slices,
            keep=keep,
            encode=self.cache,
        )
