"""``train.mode=interactive``: SAM-Med2D's simulated interaction on the promptable head.

Batches of masks with their prompts come from the shards; each batch runs the n-step interaction
loop (``pipeline/steps.py``); validation scores one box and/or one point prompt per mask
(``pipeline/evaluate.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from pipeline.augment import Augmenter
from pipeline.config import DataConfig, EvalConfig, PipelineConfig, TrainConfig
from pipeline.data.stream import build_eval_loader, build_train_loader
from pipeline.distributed import DistEnv
from pipeline.embedding_cache import EmbeddingCache, build_embedding_cache
from pipeline.evaluate import Example, validate_interactive
from pipeline.steps import build_loss, interactive_step
from pipeline.tasks.base import NonFiniteLoss, Task, to_host, with_epoch

log = logging.getLogger(__name__)


# Losses whose 20x focal term was tuned for fine-tuning Meta's pretrained SAM.
_PRETRAINED_LOSSES = ("sam_med2d", "focal_dice")


def warn_random_start(cfg: PipelineConfig) -> None:
    """Warn when a loss made for a pretrained SAM trains a model from random weights."""
    loss = cfg.train.loss
    if cfg.model.checkpoint or loss.name not in _PRETRAINED_LOSSES or loss.focal_weight == 0:
        return
    log.warning(
        "train.loss.name=%s is a recipe for fine-tuning a pretrained SAM, but model.checkpoint "
        "is empty: the model starts from random weights, where its 20x focal term drives every "
        "mask to empty (Dice ~0). From random weights use train.loss.name=bce_dice "
        "(per-mask BCE + Dice + IoU) and model.train_encoder=true, as configs/debug.yaml does.",
        loss.name,
    )


class InteractiveTask(Task):
    """The interaction loop on shards of masks and prompts.

    Arguments:
      data, train, evaluation: the config's data, train and eval sections.
      image_size: the side of the model's input (``model.image_size``; the shards' too).
      seed: the run's seed (``cfg.seed``).
      engine: the ``pipeline.engine.Engine`` around a ``SamAdapt`` with head=sam.
      env: this process's place among the ranks.
      phases: the trainable phases, all updated by the first interaction step.
      cache: a frozen encoder's embeddings (``train.embedding_cache``), or None.
    """

    def __init__(
        self,
        *,
        data: DataConfig,
        train: TrainConfig,
        evaluation: EvalConfig,
        image_size: int,
        seed: int,
        engine: Any,
        env: DistEnv,
        phases: tuple[str, ...],
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.data, self.train, self.evaluation = data, train, evaluation
        self.cache = cache
        self.image_size = image_size
        self.engine, self.env, self.phases = engine, env, phases
        # The step plan (box or point first, which step is mask-only, k) is the same on every
        # rank: a prompt kind decides which prompt-encoder weights get a gradient, and ZeRO's
        # gradient buckets must match across ranks. A CPU generator: it drives control flow.
        # Clicks differ per rank and are drawn on the device.
        self.plan_gen = torch.Generator().manual_seed(seed * 1009)
        self.click_gen = torch.Generator(device=engine.device)
        self.click_gen.manual_seed(seed * 2003 + env.rank)
        self.generators = {"plan": self.plan_gen, "click": self.click_gen}
        self.loss_fn = build_loss(train)
        # per-sample draws seeded by (data.seed, epoch, key): no generator state to checkpoint
        self.augmenter = Augmenter.for_data(data, device=engine.device)

    @classmethod
    def build(
        cls, cfg: PipelineConfig, *, engine: Any, env: DistEnv, phases: tuple[str, ...]
    ) -> InteractiveTask:
        if env.is_main:
            warn_random_start(cfg)
        return cls(
            data=cfg.data,
            train=cfg.train,
            evaluation=cfg.eval,
            image_size=cfg.model.image_size,
            seed=cfg.seed,
            engine=engine,
            env=env,
            phases=phases,
            cache=build_embedding_cache(cfg, engine),
        )

    def loader(self, epoch: int, *, split: str | None = None) -> Iterable[dict[str, Any]]:
        kwargs = dict(
            cfg=self.data,
            image_size=self.image_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
            mode="interactive",
        )
        if split is not None:
            return build_eval_loader(split=split, **kwargs)
        return with_epoch(build_train_loader(epoch=epoch, **kwargs), epoch)

    def step(self, batch: dict[str, Any], *, step: int) -> dict[str, torch.Tensor]:
        if self.augmenter.enabled:
            batch = self.augmenter.interactive(batch)
        return interactive_step(
            self.engine,
            batch,
            train=self.train,
            step=step,
            plan_generator=self.plan_gen,
            click_generator=self.click_gen,
            phases=self.phases,
            loss_fn=self.loss_fn,
            encode=self.cache,
        )

    def metrics(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, Any], *, step: int
    ) -> dict[str, float]:
        """``loss`` (mean over the interaction steps), ``loss_step1..n``, the mean loss terms
        (``focal`` or ``bce``, ``dice``, ``iou``), ``first_prompt_point`` (1 = the first prompt
        was a point), and with a cache ``embedding_cache_hit_rate`` (over the run so far)."""
        host = to_host(outputs)
        steps = host["loss_steps"]
        if not torch.isfinite(steps).all():
            bad = int((~torch.isfinite(steps)).nonzero()[0, 0]) + 1
            raise NonFiniteLoss(
                f"step {step}: non-finite loss at interaction step {bad} of batch "
                f"{batch.get('keys')}"
            )
        metrics = {"loss": float(steps.mean())}
        metrics.update({f"loss_step{i + 1}": float(v) for i, v in enumerate(steps)})
        for part in (self.loss_fn.pixel, "dice", "iou"):
            metrics[part] = float(host[part].mean())
        metrics["first_prompt_point"] = float(host["prompt_kind"])
        if self.cache is not None:
            metrics["embedding_cache_hit_rate"] = self.cache.hit_rate
        return metrics

    def validate(
        self, loader: Iterable[dict[str, Any]], *, keep: int
    ) -> tuple[dict[str, float], list[Example]]:
        return validate_interactive(
            self.engine,
            loader,
            prompts=tuple(self.evaluation.prompts),
            clicks=self.evaluation.clicks,
            keep=keep,
            encode=self.cache,
        )
