"""One task per ``train.mode``: the registry the trainer builds its task from.

A new mode is a ``Task`` subclass (``pipeline/tasks/base.py``) named here; the trainer has no
branch on the mode.
"""

from __future__ import annotations

from typing import Any

from configtree import ConfigError
from pipeline.config import PipelineConfig
from pipeline.distributed import DistEnv
from pipeline.tasks.base import NonFiniteLoss, Task
from pipeline.tasks.interactive import InteractiveTask
from pipeline.tasks.semantic import SemanticTask

__all__ = ["TASKS", "InteractiveTask", "NonFiniteLoss", "SemanticTask", "Task", "build_task"]

TASKS: dict[str, type[Task]] = {"interactive": InteractiveTask, "semantic": SemanticTask}
"""``train.mode`` -> its task."""


def task_class(mode: str) -> type[Task]:
    """The task registered for ``train.mode=mode``."""
    if mode not in TASKS:
        raise ConfigError(f"train.mode={mode} has no task (known: {', '.join(TASKS)})")
    return TASKS[mode]


def build_task(cfg: PipelineConfig, *, engine: Any, env: DistEnv, phases: tuple[str, ...]) -> Task:
    """The task of ``cfg.train.mode`` for a built engine (see ``Task.build``)."""
    return task_class(cfg.train.mode).build(cfg, engine=engine, env=env, phases=phases)
