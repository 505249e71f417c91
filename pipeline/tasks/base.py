"""What a training mode is to the trainer: the contract every task keeps.

The trainer owns what every mode shares: the step loop, the data position, logging, validation's
schedule and overlays, checkpoints and resume, the export and MLflow. A task owns what differs
between modes (``train.mode``): which loader feeds it, what one training step does, which figures
a step reports and how validation scores the model. The trainer calls a task only through the
methods below, so a new mode is a new ``Task`` subclass named in ``pipeline.tasks.TASKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.distributed import DistEnv
    from pipeline.evaluate import Example


class NonFiniteLoss(RuntimeError):
    """A training step's loss is NaN or Inf: the run stops (its last checkpoint is older)."""


class Task(ABC):
    """One ``train.mode``: its loader, training step, step metrics and validation.

    Attributes:
      generators: the torch.Generators the task draws from, by name. The trainer saves their
        states in every checkpoint and restores them on resume, so the names are part of the
        checkpoint format: never rename one (a resumed run would not find its state).
    """

    generators: dict[str, torch.Generator]

    @classmethod
    def check(cls, cfg: PipelineConfig) -> None:
        """Fail (``ConfigError``, naming the key) on what the config alone cannot tell, before
        anything is built, e.g. the data's classes against the head. The default checks nothing.
        """
        return None

    @classmethod
    @abstractmethod
    def build(
        cls, cfg: PipelineConfig, *, engine: Any, env: DistEnv, phases: tuple[str, ...]
    ) -> Task:
        """The task of a run: takes the sections it needs from ``cfg``.

        Arguments:
          cfg: the run's config.
          engine: the ``pipeline.engine.Engine`` to train.
          env: this process's place among the ranks.
          phases: the model's trainable phases (``SamAdapt.param_groups``), in order.
        """

    @abstractmethod
    def loader(self, epoch: int, *, split: str | None = None) -> Iterable[dict[str, Any]]:
        """This rank's training batches of ``epoch`` (a deterministic function of the epoch, so
        that a resumed run can replay the consumed part); with ``split``, that split's evaluation
        batches (every sample once over all ranks)."""

    @abstractmethod
    def step(self, batch: dict[str, Any], *, step: int) -> dict[str, torch.Tensor]:
        """Train on one batch (forward, backward and optimizer update(s)).

        Arguments:
          batch: one batch of ``loader``.
          step: the trainer's step counter (for the learning-rate schedule).

        Returns:
          Detached device tensors, read only by this task's ``metrics``.
        """

    @abstractmethod
    def metrics(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, Any], *, step: int
    ) -> dict[str, float]:
        """The step's figures as logged (the names are MLflow history: keep them stable). They
        include ``loss``, which the progress bar and the log line show.

        Raises:
          NonFiniteLoss: the step's loss is NaN or Inf (the message names the batch's keys).
        """

    @abstractmethod
    def validate(
        self, loader: Iterable[dict[str, Any]], *, keep: int
    ) -> tuple[dict[str, float], list[Example]]:
        """Score the model on ``loader`` (batches of ``self.loader(..., split=...)``); the same
        figures on every rank. The model is already in eval mode.

        Arguments:
          loader: this rank's evaluation batches.
          keep: examples to return for overlays (0 = none).

        Returns:
          ``{"val/...": value}`` and up to ``keep`` examples.
        """


def with_epoch(loader: Iterable[dict[str, Any]], epoch: int) -> Iterable[dict[str, Any]]:
    """The training batches of ``epoch``, each told its epoch (``batch["epoch"]``): a sample's
    augmentation is seeded by (data.seed, epoch, key)."""
    return ({**batch, "epoch": epoch} for batch in loader)


def to_host(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step's figures on the host as float32, fetched together once per step: the loop's
    only wait for the device."""
    return {k: v.detach().float().cpu() for k, v in outputs.items()}
