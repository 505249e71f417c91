"""What a resumed run may change, and the checks of ``train.resume`` before any rank starts.

Every checkpoint records (``meta.json``, ``"config"``) the keys below as they were when it was
saved. On resume:

- ``APPLIED`` (optimisation and schedule keys) may change: the new value is in force from the
  resumed step on (``Engine.load`` keeps the config's optimizer hyper-parameters over the
  checkpoint's; the schedule and clipping are read from the config at every step). Each change
  is logged in one line, and is what ``RUN_DIR/config.yaml`` records; MLflow params are
  write-once, so the tracker adds a tag per changed key (``pipeline/tracking.py``).
- ``FIXED`` keys shape the checkpoint's files (DeepSpeed's partitioning, the dtype of the
  saved weights, whether frozen weights are in them): a change is refused with one line.
- the number of ranks is fixed too (the ZeRO partitions and the data position are per rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configtree import ConfigError
from pipeline.checkpoint import CheckpointError, read_meta, resolve_resume
from pipeline.config import PipelineConfig, TrainConfig

__all__ = ["APPLIED", "FIXED", "Change", "check_resume", "compare", "resume_record"]

log = logging.getLogger(__name__)

APPLIED = (
    "lr",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "poly_power",
    "decay_steps",
    "grad_clip",
    "grad_accum",
)
FIXED = ("zero_stage", "precision", "offload", "save_frozen")


@dataclass(frozen=True)
class Change:
    """A key whose value differs from the checkpoint's."""

    key: str
    """Dotted, e.g. ``train.lr``."""
    saved: Any
    now: Any


def resume_record(train: TrainConfig) -> dict[str, Any]:
    """The keys a checkpoint records, ``{"train.lr": 1e-4, ...}`` (JSON values)."""
    return {f"train.{key}": _plain(getattr(train, key)) for key in (*APPLIED, *FIXED)}


def compare(saved: dict[str, Any], train: TrainConfig, *, where: str | Path) -> list[Change]:
    """The changes of ``APPLIED`` keys since the checkpoint ``where`` was saved.

    Arguments:
      saved: the checkpoint's record (``Resumed.config`` / ``meta.json["config"]``; empty for
        checkpoints older than the record: nothing to compare).
      train: this run's training section.
      where: the checkpoint, for the messages.

    Returns:
      The changes, in ``APPLIED`` order. Raises ``ConfigError`` naming the key when a ``FIXED``
      key changed.
    """
    now = resume_record(train)
    for key in FIXED:
        dotted = f"train.{key}"
        if dotted in saved and saved[dotted] != now[dotted]:
            raise ConfigError(
                f"{dotted}={now[dotted]}, but checkpoint {where} was saved with "
                f"{dotted}={saved[dotted]}, which its files depend on: resume with "
                f"{dotted}={saved[dotted]} or start a new run_dir"
            )
    return [
        Change(f"train.{key}", saved[f"train.{key}"], now[f"train.{key}"])
        for key in APPLIED
        if f"train.{key}" in saved and saved[f"train.{key}"] != now[f"train.{key}"]
    ]


def check_resume(cfg: PipelineConfig, *, world_size: int) -> Path | None:
    """Check ``train.resume`` against this run before any rank starts: the checkpoint exists
    and is complete (an explicit path), was saved by as many ranks, and with the same
    ``FIXED`` keys. The files are verified later, by the ranks (``resolve_resume``).

    Arguments:
      cfg: the run's config.
      world_size: ranks of this run (``launch.ranks * launch.nodes``).

    Returns:
      The checkpoint it looked at (None: fresh start). Raises ``ConfigError`` in one line.
    """
    resume = cfg.train.resume
    path = resolve_resume(resume, cfg.run_dir, verify=False)
    if path is None:
        return None
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        if resume == "auto":
            return path  # the ranks verify it and fall back to an intact one
        raise ConfigError(f"train.resume: {err}") from None
    if int(meta["world_size"]) != world_size:
        raise ConfigError(
            f"train.resume: checkpoint {path} was saved by {meta['world_size']} ranks, this run "
            f"has {world_size} (launch.ranks x launch.nodes): resume with "
            f"launch.ranks x launch.nodes = {meta['world_size']}"
        )
    compare(meta.get("config", {}), cfg.train, where=path)
    return path


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
