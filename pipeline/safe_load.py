"""Reading ``torch.save`` files without running code from them.

A ``torch.save`` file is a pickle, and unpickling can call any function the file names (a
crafted checkpoint given through ``train.resume`` could run a shell command). Every file we
read is therefore loaded with ``torch.load(weights_only=True)``: tensors, containers and plain
Python values only, plus the few classes on an explicit allow-list:

- our own files (per-rank checkpoint state, exports, base weights) hold nothing else: no
  allow-list at all;
- DeepSpeed 0.19's checkpoint files (checked for ZeRO 0-3, fp32 and bf16, with and without
  offload) add four plain classes to the ZeRO optimizer files: the loss scalers
  (``LossScaler``, ``DynamicLossScaler`` for fp16), ``ZeroStageEnum`` and ``fragment_address``
  (a dataclass of two ints); ``pipeline.engine.deepspeed_globals()`` lists them (DeepSpeed
  stays behind the engine).

DeepSpeed calls ``torch.load(weights_only=False)`` itself; ``weights_only_loads()`` forces
those calls to ``weights_only=True`` for as long as DeepSpeed reads (torch's
``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), and ``refuse_code`` names the first file of a folder that
would run code, read statically (the pickle is disassembled, never executed) so the error can
name the file before any loading starts.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "UnsafeFileError",
    "refuse_code",
    "refused",
    "safe_torch_load",
    "unsafe_globals",
    "weights_only_loads",
]

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeFileError(ValueError):
    """A file would run code when loaded (it names functions or classes outside the allow-list),
    or it is no ``torch.save`` file at all; the message names the file."""


def unsafe_globals(path: str | os.PathLike, allowed: list[Any] | None = None) -> list[str]:
    """The functions and classes a ``torch.save`` zip file names that ``weights_only`` loading
    does not allow, found by disassembling its pickle (nothing in it runs).

    Arguments:
      path: the file.
      allowed: classes allowed beyond torch's defaults (e.g. ``engine.deepspeed_globals()``).

    Returns:
      Their dotted names, sorted; empty when the file is safe to load. A file that is not a
      ``torch.save`` zip (legacy format) gives an empty list: ``weights_only`` loading checks
      it as it reads.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return []
    with torch.serialization.safe_globals(allowed or []):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
            raise UnsafeFileError(
                f"{path}: not a readable torch.save file ({_first_line(exc)})"
            ) from None


def refuse_code(folder: str | os.PathLike, allowed: list[Any] | None = None) -> None:
    """Raise ``UnsafeFileError`` naming the first ``*.pt`` file of ``folder`` that would run
    code when loaded (static check: nothing is unpickled)."""
    for path in sorted(Path(folder).glob("*.pt")):
        names = unsafe_globals(path, allowed)
        if names:
            raise UnsafeFileError(_refusal(path, names))


def safe_torch_load(
    path: str | os.PathLike, *, allowed: list[Any] | None = None, map_location: Any = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` with ``allowed`` classes on the allow-list.

    Returns:
      What the file holds. Raises ``UnsafeFileError`` naming the file and what it would have
      run; ``OSError`` and torch's own errors for unreadable files pass through.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refused(path, exc) from None


def refused(path: str | os.PathLike, exc: pickle.UnpicklingError) -> UnsafeFileError:
    """The one-line error for a ``weights_only`` load of ``path`` that refused a global."""
    return UnsafeFileError(_refusal(Path(path), [_refused_global(exc)]))


@contextmanager
def weights_only_loads(allowed: list[Any] | None = None) -> Iterator[None]:
    """Within the block every ``torch.load`` (a library's too) reads ``weights_only=True`` with
    ``allowed`` on the allow-list. Not thread-safe: it sets an environment variable that torch
    reads at each load."""
    before = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(allowed or []):
            yield
    finally:
        if before is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = before


def _refusal(path: Path, names: list[str]) -> str:
    return (
        f"{path}: refused: loading it would run code ({', '.join(names[:3])}); only tensors "
        "and plain values are read from checkpoint files"
    )


def _refused_global(exc: BaseException) -> str:
    # torch's message is a paragraph; the name of the refused global is what matters
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
