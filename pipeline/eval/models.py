"""The models ``samadapt eval`` compares: the trained one (checkpoint or export) and its base.

A training checkpoint (``RUN_DIR/checkpoints/step-N``, see ``pipeline/checkpoint.py``) is read in
this one process: DeepSpeed's consolidation of its ZeRO partitions gives the fp32 trained tensors
(``pipeline.engine.read_zero_checkpoint``), which go onto the base built as the trainer built it
(``torch.manual_seed(seed)``, then ``build_model``: Meta's weights when ``model.checkpoint`` names
a file, else the run's random init). An export loads with ``load_exported`` (its own base).
Every failure is a ``WeightsError`` with one line naming the file (and the key that differs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import PipelineConfig
from pipeline.model import WeightsError, build_model, load_exported
from pipeline.model.wrapper import SamAdapt

__all__ = ["Loaded", "base_model", "load_trained"]

log = logging.getLogger(__name__)

# model keys that may differ between a run's config and its export without changing the model
_IGNORED = {"compile", "checkpoint"}


@dataclass
class Loaded:
    """A trained model and where it came from."""

    model: SamAdapt
    kind: str
    """"checkpoint" or "export"."""
    run_id: str | None
    """The MLflow run that trained it, when the checkpoint or export records it."""
    step: int | None


def base_model(cfg: PipelineConfig) -> SamAdapt:
    """The untrained model of a run: its base as the trainer initialised it.

    Arguments:
      cfg: the run's config (``model`` and ``seed`` are read).

    Returns:
      SamAdapt in eval mode; the caller's RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # as Trainer.__init__
        model = build_model(cfg=dataclasses.replace(cfg.model, compile=False))
    return model.eval()


def load_trained(cfg: PipelineConfig, path: str | Path) -> Loaded:
    """The trained model from a checkpoint folder or an export file.

    Arguments:
      cfg: the run's config.
      path: ``RUN_DIR/checkpoints/step-N`` or an export ``.pt``.

    Returns:
      Loaded. Raises ``WeightsError`` (one line naming ``path``) when it is missing, incomplete,
      unreadable, or does not fit the config's model.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such checkpoint folder or export file")
    if path.is_dir():
        return _from_checkpoint(cfg, path)
    model = load_exported(path)
    _check_export_config(cfg, model, path)
    meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
    step = meta.get("step")
    return Loaded(model.eval(), "export", meta.get("run_id"), None if step is None else int(step))


def _check_export_config(cfg: PipelineConfig, model: SamAdapt, path: Path) -> None:
    ours, theirs = dataclasses.asdict(cfg.model), dataclasses.asdict(model.cfg)
    for key in sorted(set(ours) - _IGNORED):
        if ours[key] != theirs.get(key):
            raise WeightsError(
                f"{path}: does not match the config: the export has model.{key}="
                f"{theirs.get(key)!r}, the config model.{key}={ours[key]!r}"
            )


def _from_checkpoint(cfg: PipelineConfig, path: Path) -> Loaded:
    from pipeline.checkpoint import COMPLETE, META
    from pipeline.checkpoint_marker import find_damage, read_marker
    from pipeline.engine import read_zero_checkpoint  # DeepSpeed stays behind the engine

    if not (path / COMPLETE).is_file():
        raise WeightsError(
            f"{path}: not a complete training checkpoint (no {COMPLETE} marker; expected "
            "RUN_DIR/checkpoints/step-N)"
        )
    marker = read_marker(path)
    damage = (
        f"{path / COMPLETE}: unreadable marker" if marker is None else find_damage(path, marker)
    )
    if damage:
        raise WeightsError(f"{path}: damaged checkpoint: {damage}")
    state = read_zero_checkpoint(path)
    model = base_model(cfg)
    wanted = set(model.trainable_names)
    try:
        model.load_trainable_state_dict({k: v for k, v in state.items() if k in wanted})
    except (KeyError, ValueError) as err:
        raise WeightsError(f"{path}: does not match the config's model: {err}") from None
    # train.save_frozen checkpoints hold the base too; where they do, it wins over the rebuild
    own = model.state_dict()
    frozen = {k: v for k, v in state.items() if k in own and k not in wanted}
    bad = [k for k, v in frozen.items() if v.shape != own[k].shape]
    if bad:
        raise WeightsError(f"{path}: does not match the config's model: shapes differ at {bad[0]}")
    if frozen:
        model.load_state_dict(frozen, strict=False)
    meta_file = path / META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    log.info("loaded %d trained tensors from %s", len(wanted), path)
    step = meta.get("step")
    return Loaded(model.eval(), "checkpoint", meta.get("run_id"), None if step is None else step)
