"""Deployable artifacts: the trained tensors, the config that built them, and their base.

An export holds ``{"format", "model" (the ModelConfig as a dict), "tensors", "base", "meta"}``.
``base`` (``pipeline.model.base``) names the base checkpoint by path and sha256, or carries every
untrained tensor when the base was random or came from a file the config does not name, so that
``load_exported`` rebuilds the trained model exactly whatever the caller's RNG state (optionally
merging LoRA/FacT into the base weights); it refuses a base file with another sha256. Exports
written before the base was recorded (``samadapt-trainable/1``) still load, unchecked.
``export_state`` (``samadapt export CONFIG STATE OUT``) writes one from a trained state: a file
saved with ``torch.save`` (a full or trainable-only state dict, possibly under ``module`` /
``model``) or a DeepSpeed checkpoint directory (``pipeline.engine.read_zero_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from configtree import ConfigError, from_dict
from pipeline.model.base import base_record, check_base_file, frozen_tensors, needs_frozen
from pipeline.model.build import build_model
from pipeline.model.config import ModelConfig
from pipeline.model.weights import WeightsError, key_mismatch, load_torch_file, read_state_dict
from pipeline.model.wrapper import SamAdapt
from sharding.files import atomic_write

log = logging.getLogger(__name__)

EXPORT_FORMAT = "samadapt-trainable/2"
LEGACY_FORMAT = "samadapt-trainable/1"  # no "base" entry: the base is whatever the caller builds
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_trainable(
    model: SamAdapt,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    meta: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    frozen: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's trained tensors, its config and its base (temp file + rename).

    Arguments:
      model (SamAdapt): the trained model (gathered, if it was trained under ZeRO-3).
      path (str): output file.
      dtype (torch.dtype or None): cast floating tensors (e.g. bf16 halves the file).
      meta (dict or None): extra information stored alongside (run id, step...).
      tensors (dict or None): the trained tensors by name when they are not the model's own
        (gathered from ZeRO-3 partitions by ``Engine.trainable_state_dict``); None = the model's.
      frozen (dict or None): the untrained tensors, needed in the export when the base is not a
        checkpoint file (``Engine.frozen_state_dict`` under ZeRO-3); None = the model's. They keep
        their dtype (``dtype`` casts the trained tensors only).

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
    if frozen is None and needs_frozen(model.cfg.checkpoint):
        frozen = frozen_tensors(model, set(model.trainable_names))
    payload = {
        "format": EXPORT_FORMAT,
        "model": dataclasses.asdict(model.cfg),
        "tensors": tensors,
        "base": base_record(model.cfg.checkpoint, frozen),
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
    """The config and trained tensors of an export file (clear errors for anything else)."""
    cfg, payload = read_payload(path)
    return cfg, payload["tensors"]


def read_payload(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The config and the whole content of an export file.

    Arguments:
      path: an export file.

    Returns:
      (ModelConfig, dict): the stored config and the payload (``base`` is None in exports of
      format ``LEGACY_FORMAT``). Raises ``WeightsError`` naming the file for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: export file not found")
    payload = load_torch_file(path, "file")
    if not isinstance(payload, dict) or payload.get("format") not in (EXPORT_FORMAT, LEGACY_FORMAT):
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
    return cfg, {"base": None, **payload}


def load_exported(
    path: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    merge: bool = False,
    device: str | torch.device = "cpu",
) -> SamAdapt:
    """Rebuild a trained model: its base (named file or carried tensors) + the trained tensors.

    Arguments:
      path (str): an ``export_trainable`` file.
      checkpoint (str or None): the base SAM checkpoint; None = the export's own base (the file
        it names, checked by sha256, or the tensors it carries). A file given here must have the
        sha256 the export records. "" = a random base regardless (tests only: it depends on the
        caller's RNG).
      merge (bool): fold LoRA/FacT into the base weights (no extra inference latency).
      device: where the model goes.

    Returns:
      SamAdapt: in eval mode. Raises ``WeightsError`` (one line) for a base file with another
      sha256, a missing base file, or tensors that do not fit.
    """
    cfg, payload = read_payload(path)
    base = payload["base"] or {}
    carried = base.get("tensors") if checkpoint is None else None
    chosen = cfg.checkpoint if checkpoint is None else checkpoint
    if carried is not None:
        chosen = ""  # every base tensor is in the export; nothing random survives the load
    elif chosen and "sha256" in base:
        check_base_file(path, base, chosen)
    elif checkpoint and "tensors" in base:
        raise WeightsError(f"{path}: carries its own base weights; load it without a checkpoint")
    model = build_model(cfg=dataclasses.replace(cfg, compile=False, checkpoint=chosen))
    try:
        if carried is not None:
            _load_base_tensors(model, carried)
        model.load_trainable_state_dict(payload["tensors"], strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: {err}") from err
    if merge:
        merged = model.merge_peft()
        log.info("merged %s into the base weights", merged or "nothing")
    return model.to(device).eval()


def _load_base_tensors(model: SamAdapt, frozen: dict[str, torch.Tensor]) -> None:
    """Copy an export's carried base into ``model``: exactly every untrained state tensor."""
    wanted = set(model.state_dict()) - set(model.trainable_names)
    if set(frozen) != wanted:
        raise KeyError(
            "carried base weights do not match the model: "
            + key_mismatch(sorted(wanted - set(frozen)), sorted(set(frozen) - wanted))
        )
    model.load_state_dict(frozen, strict=False)


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
    seed: int | None = None,
) -> Path:
    """Export the trained tensors of a saved training state (``samadapt export``).

    Arguments:
      cfg: the model section the state was trained with (e.g. from ``RUN_DIR/config.yaml``).
      state: a ``torch.save`` file (full or trainable-only state dict) or a DeepSpeed checkpoint
        folder.
      out: the export file to write.
      dtype: "fp32", "bf16" or "fp16" (``DTYPES``) for the trained floating tensors.
      seed: the run's ``seed``: when ``cfg.checkpoint`` names no file and ``state`` holds only the
        trained tensors, the random base is rebuilt as the trainer built it (seeded, as a resume
        does) and carried in the export.

    Returns:
      Path: the written export. Raises ``WeightsError`` naming ``state`` when it lacks the
      model's trained tensors, or lacks the random base and no seed is given.
    """
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state stays as it was
        if seed is not None:
            torch.manual_seed(seed)  # the trainer's own init, as in Trainer.__init__
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
        frozen=_base_in_state(model, tensors, state=state, seeded=seed is not None),
    )


def _base_in_state(
    model: SamAdapt, tensors: dict[str, torch.Tensor], *, state: str | os.PathLike, seeded: bool
) -> dict[str, torch.Tensor] | None:
    """The untrained tensors an export must carry (None: the model's own, or a named file).

    A full state dict holds the base and wins; else a seeded rebuild is the run's random base;
    else there is no way to know it, and ``WeightsError`` says so.
    """
    if not needs_frozen(model.cfg.checkpoint):
        return None
    base = set(model.state_dict()) - set(model.trainable_names)
    if base <= set(tensors):
        return {k: tensors[k].detach().to("cpu").clone() for k in base}
    if not seeded:
        raise WeightsError(
            f"{state}: holds only the trained tensors and model.checkpoint names no file: "
            "the random base needs the run's seed"
        )
    log.info("%s: no base weights inside; the random base is rebuilt from the run's seed", state)
    return None


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
