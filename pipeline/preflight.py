"""What a training run checks against the files before anything is built.

``check_config`` runs in ``samadapt train`` before any rank starts (and again in each rank): the
config alone cannot tell that the shards hold samples of the splits it names, that
``model.checkpoint`` fits the model, that ``train.resume`` fits this run, or that the run
directory is not another run's. Each problem is one line and exit code 2, never a traceback:
``samadapt train: config error: ...`` naming the key (``ConfigError``), or, for the base
checkpoint, ``samadapt train: FILE: ...`` (``WeightsError``).
"""

from __future__ import annotations

from configtree import ConfigError
from pipeline.checkpoint import latest_complete
from pipeline.config import PipelineConfig
from pipeline.data.samples import SampleError
from pipeline.data.shards import read_manifest
from pipeline.model.weights import check_checkpoint
from pipeline.resume import check_resume
from pipeline.tasks import task_class

__all__ = ["check_config", "check_split"]


def check_config(
    cfg: PipelineConfig, *, world_size: int | None = None, weights: bool = True
) -> None:
    """Fail with one line naming the key or the file on what only the files can tell
    (``ConfigError``; ``WeightsError`` for a base checkpoint that does not fit the model).

    Arguments:
      cfg: the run's config (combinations of keys were checked when it was built).
      world_size: ranks of the run (``launch.ranks * launch.nodes``); None skips the
        checks of ``train.resume`` against it.
      weights: check model.checkpoint against the model (memory-mapped, on the meta device;
        False where the model is built and the file loaded, with the same checks, right after).
    """
    if not cfg.data.shards and not cfg.data.volumes:
        raise ConfigError("data.shards is empty: point it at the output of samadapt shard")
    if not cfg.data.volumes:
        # The input size is the model's; the shards must have been written at it. Checked here
        # too (the loaders check it again) so that it fails before any rank starts.
        check_split(cfg, "train_split")
        if cfg.train.val_every:
            check_split(cfg, "val_split")
    task_class(cfg.train.mode).check(cfg)
    if weights:
        check_checkpoint(cfg.model)
    if world_size is not None:
        check_resume(cfg, world_size=world_size)
    existing = None if cfg.train.resume else latest_complete(cfg.run_dir)
    if existing is not None:
        # Never overwrite a run's checkpoints by starting it again from scratch.
        raise ConfigError(
            f"run_dir {cfg.run_dir} already holds checkpoint {existing.name}: pass "
            "train.resume=auto to continue that run, or choose another run_dir"
        )


def check_split(cfg: PipelineConfig, key: str) -> None:
    """The split ``data.<key>`` names has shards with samples in ``data.shards`` (a split
    whose every input was rejected would train on nothing, forever).

    Arguments:
      cfg: the run's config.
      key: ``"train_split"`` or ``"val_split"``.
    """
    split = getattr(cfg.data, key)
    try:
        shards = read_manifest(
            cfg.data.shards, split=split, image_size=cfg.model.image_size, check_files=False
        )
    except SampleError as err:  # a manifest without that split, or a malformed one
        raise ConfigError(f"data.{key}={split}: {err}") from None
    if sum(shard.samples for shard in shards) == 0:
        raise ConfigError(
            f"data.{key}={split}: split {split!r} of data.shards={cfg.data.shards} has no samples "
            f"({len(shards)} empty shards; its inputs were rejected: see rejected.jsonl there)"
        )
