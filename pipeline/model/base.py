"""What an export says about its frozen base, so that loading it never depends on RNG state.

An export's ``base`` entry is one of:

- ``{"checkpoint": PATH, "sha256": HEX}``: the base came from a named checkpoint file; loading
  hashes the file found at PATH (or the one the caller names) and refuses another;
- ``{"tensors": {name: tensor}}``: every tensor of the model that is not trained (frozen
  parameters and persistent buffers), carried in the export because the base came from random
  initialisation (``model.checkpoint`` empty) or from a file the config does not name.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.model.weights import WeightsError, resolve_checkpoint

log = logging.getLogger(__name__)

_CHUNK = 1 << 24


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 16 MiB chunks.

    Arguments:
      path: the file.

    Returns:
      str: the hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _as_file(checkpoint: str) -> Path:
    """``model.checkpoint`` as a file path: a name (``lite_medsam``) resolved to its installed
    file, when the package is there."""
    try:
        return resolve_checkpoint(checkpoint)
    except WeightsError:  # the named file's package is missing: as a plain path, not a file
        return Path(checkpoint)


def needs_frozen(checkpoint: str) -> bool:
    """Whether an export must carry the base tensors: the base is random (``checkpoint`` empty)
    or its named file is gone, so there is nothing to name by hash."""
    return not (checkpoint and _as_file(checkpoint).is_file())


def frozen_tensors(model: nn.Module, trainable: set[str]) -> dict[str, torch.Tensor]:
    """CPU copies of every state-dict tensor of ``model`` whose name is not in ``trainable``.

    Arguments:
      model: the model (its frozen parameters must be whole, i.e. not ZeRO-3 partitions).
      trainable: names of the trained tensors (they travel separately).

    Returns:
      dict[str, torch.Tensor]: by state-dict name.
    """
    return {
        name: tensor.detach().to("cpu").clone()
        for name, tensor in model.state_dict().items()
        if name not in trainable
    }


def base_record(checkpoint: str, frozen: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """The ``base`` entry of an export.

    Arguments:
      checkpoint: ``model.checkpoint`` of the trained model ("" = random initialisation).
      frozen: the model's untrained tensors (``frozen_tensors``); used when ``checkpoint`` is
        empty or no longer a file, and then required.

    Returns:
      dict: ``{"checkpoint", "sha256"}`` or ``{"tensors"}``.
    """
    if not needs_frozen(checkpoint):
        return {"checkpoint": checkpoint, "sha256": file_sha256(_as_file(checkpoint))}
    if frozen is None:
        what = f"model.checkpoint {checkpoint} is not a file" if checkpoint else "it is random"
        raise WeightsError(f"export: the base weights are needed in the export ({what})")
    if checkpoint:
        log.warning("base checkpoint %s not found: the export carries the base weights", checkpoint)
    return {"tensors": frozen}


def check_base_file(export: str | os.PathLike, base: dict[str, Any], checkpoint: str) -> None:
    """Refuse a base checkpoint whose sha256 is not the one the export was trained on.

    Arguments:
      export: the export file, for the message.
      base: the export's ``base`` entry with ``sha256``.
      checkpoint: the file about to be loaded.

    Raises:
      WeightsError: one line naming the file and both hashes.
    """
    if not _as_file(checkpoint).is_file():
        raise WeightsError(
            f"{export}: base checkpoint {checkpoint} not found (the export was trained on a file "
            f"with sha256 {base['sha256']})"
        )
    found = file_sha256(_as_file(checkpoint))
    if found != base["sha256"]:
        raise WeightsError(
            f"{export}: base checkpoint {checkpoint} has sha256 {found}, but the export was "
            f"trained on sha256 {base['sha256']} ({base['checkpoint']})"
        )
