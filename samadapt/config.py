"""The root config of a run: the pipeline's sections plus ``sharding`` and ``launch``.

It lives in the entry layer because it composes packages that must not import each other:
``pipeline/`` never imports ``launch/``, and ``sharding/`` and ``launch/`` import nothing of
``pipeline/``. Every command loads this tree (so a preset holds all sections and a typo anywhere
fails at load), then hands each package the section it reads: ``cfg.sharding`` to
``sharding.run``, ``cfg.launch`` to ``launch.run``, the config itself (a ``PipelineConfig``) to
the trainer. The resolved config written to ``RUN_DIR/config.yaml`` holds every section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import configtree
from launch.config import LaunchConfig
from pipeline.config import PipelineConfig
from sharding.config import ShardingConfig

__all__ = ["Config", "from_dict", "load_config"]


@dataclass
class Config(PipelineConfig):
    """The root of the tree: ``PipelineConfig`` + the sharding and launch sections. No check
    spans them today; one would go in ``__post_init__`` after ``super().__post_init__()``."""

    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Load a config: YAML file (with its ``defaults``) <- ``key=value`` overrides.

    Arguments:
      path: a YAML file, or None for the built-in defaults.
      overrides: strings like ``train.steps=10`` or ``model.peft=[lora,fact]``.

    Returns:
      The validated ``Config``. Raises ``configtree.ConfigError`` naming the key and the file.
    """
    return configtree.load(Config, path, overrides)


def from_dict(values: dict) -> Config:
    """Rebuild a ``Config`` from ``configtree.to_dict`` output (e.g. a saved resolved config)."""
    return configtree.from_dict(Config, values)
