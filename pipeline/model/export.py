"""Small deployable artifacts: the trained tensors only, with the config that built them.

An export holds ``{"format", "model" (the ModelConfig as a dict), "tensors", "meta"}``. It is
loaded onto a stock Meta checkpoint by ``load_exported`` (optionally merging LoRA/FacT into the
base weights). ``export_state`` (``samadapt export CONFIG STATE OUT``) writes one from a trained
state: a file saved with ``torch.save`` (a full or trainable-only state dict, possibly under
``module``/``model``) or a DeepSpeed checkpoint directory (consolidated by
``pipeline.engine.read_zero_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from configtree import ConfigError, from_dict
from pipeline.model.build import build_model
from pipeline.model.config import ModelConfig
from pipeline.model.weights import WeightsError, read_state_dict
from pipeline.model.wrapper import SamAdapt
from sharding.files import atomic_write

log = logging.getLogger(__name__)

EXPORT_FORMAT = "samadapt-trainable/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_trainable(
    model: SamAdapt,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    meta: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's trained tensors and its config (temp file + rename).

    Arguments:
      model (SamAdapt): the trained model (gathered, if it was trained under ZeRO-3).
      path (str): output file.
      dtype (torch.dtype or None): cast floating tensors (e.g. bf16 halves the file).
      meta (dict or None): extra information stored alongside (run id, step...).
      tensors (dict or None): the trained tensors by name when they are not the model's own
        (gathered from ZeRO-3 partitions by ``Engine.trainable_state_dict``); None = the model's.

    Returns:
      Path: the written file.
    """
    source = model.trainable_state_dict() if tensors is None else tensors
    expected = set(model.trainable_names)
    if tensors is not None and set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"export: tensors do not match the model (missing {missing[:5]}, "
            f"unexpected {extra[:5]})"
        )
    tensors = {}
    for name, tensor in source.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.clone()
    payload = {
        "format": EXPORT_FORMAT,
        "model": dataclasses.asdict(model.cfg),
        "tensors": tensors,
        "meta": {
            "parameters": sum(t.numel() for t in tensors.values()),
            "torch": str(torch.__version__),
            **(meta or {}),
        },
    }
    path = atomic_write(path, lambda tmp: torch.save(payload, tmp))
    log.info(
        "exported %d tensors (%.2f MB) to %s",
        len(tensors),
        path.stat().st_size / 2**20,
        path,
    )
    return path


def read_export(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an export file (clear errors for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: export file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable PyTorch file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise WeightsError(f"{path}: not a samadapt export (format {found!r})")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    stored = payload["model"]
    unknown = sorted(set(stored) - known)
    if unknown:
        raise WeightsError(f"{path}: model config has keys this version lacks: {unknown}")
    try:
        cfg = from_dict(ModelConfig, stored, prefix="model.")
    except ConfigError as err:
        raise WeightsError(f"{path}: {err}") from None
    return cfg, payload["tensors"]


def load_exported(
    path: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    merge: bool = False,
    device: str | torch.device = "cpu",
) -> SamAdapt:
    """Rebuild a trained model: base SAM checkpoint + exported tensors.

    Arguments:
      path (str): an ``export_trainable`` file.
      checkpoint (str or None): Meta's SAM checkpoint; None = the path stored in the export
        ("" = random base, for tests).
      merge (bool): fold LoRA/FacT into the base weights (no extra inference latency).
      device: where the model goes.

    Returns:
      SamAdapt: in eval mode.
    """
    cfg, tensors = read_export(path)
    overrides: dict[str, Any] = {"compile": False}
    if checkpoint is not None:
        overrides["checkpoint"] = checkpoint
    cfg = dataclasses.replace(cfg, **overrides)
    model = build_model(cfg=cfg)
    try:
        model.load_trainable_state_dict(tensors, strict=True)
    except (KeyError, ValueError) as err:
        raise WeightsError(f"{path}: {err}") from err
    if merge:
        merged = model.merge_peft()
        log.info("merged %s into the base weights", merged or "nothing")
    return model.to(device).eval()


def read_trained_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A trained model's tensors from a ``torch.save`` file or a DeepSpeed checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        from pipeline.engine import read_zero_checkpoint  # DeepSpeed stays in the engine

        return read_zero_checkpoint(path)
    return read_state_dict(path)


def export_state(
    cfg: ModelConfig,
    state: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
) -> Path:
    """Export the trained tensors of a saved training state (``samadapt export``).

    Arguments:
      cfg: the model section the state was trained with (e.g. from ``RUN_DIR/config.yaml``).
      state: a ``torch.save`` file (full or trainable-only state dict) or a DeepSpeed checkpoint
        folder.
      out: the export file to write.
      dtype: "fp32", "bf16" or "fp16" (``DTYPES``) for the floating tensors.

    Returns:
      Path: the written export. Raises ``WeightsError`` naming ``state`` when it lacks the
      model's trained tensors.
    """
    # Base weights are not needed to pick out trained tensors; keep the base path in the config.
    model = build_model(cfg=dataclasses.replace(cfg, checkpoint="", compile=False))
    model.cfg = dataclasses.replace(model.cfg, checkpoint=cfg.checkpoint)
    tensors = read_trained_state(state)
    wanted = set(model.trainable_names)
    found = {k: v for k, v in tensors.items() if k in wanted}
    try:
        model.load_trainable_state_dict(found, strict=True)
    except KeyError as err:
        raise WeightsError(f"{state}: {err}") from None
    return export_trainable(
        model,
        out,
        dtype=DTYPES[dtype],
        meta={"source": str(Path(state).resolve()), "checkpoint": cfg.checkpoint},
    )


def write_merged(export: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Base checkpoint + export, LoRA/FacT folded in, as one full state dict (temp + rename).

    Keys are Meta's for everything SAM has; methods that cannot be folded (adapters) and heads
    other than ``sam`` add their own keys, and then the file loads with ``build_model`` only.

    Returns:
      Path: the written file.
    """
    model = load_exported(export, merge=True)
    left = list(model.cfg.peft)
    if left or model.cfg.head != "sam":
        log.warning(
            "merged checkpoint keeps %s%s: load it with samadapt's build_model, not stock SAM",
            ", ".join(left) or "no PEFT",
            f" and head {model.cfg.head!r}" if model.cfg.head != "sam" else "",
        )
    state = model.state_dict()
    path = atomic_write(path, lambda tmp: torch.save(state, tmp))
    log.info("wrote the merged state dict to %s", path)
    return path

