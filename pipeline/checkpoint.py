"""Checkpoints that resume exactly, and that are never picked half-written.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-0000200/``::

    <DeepSpeed files>        weights (trainable only unless train.save_frozen) and optimizer
                             partitions, written by every rank (Engine.save)
    rank-00000.pt ...        per rank: data position, RNG states (python, numpy, torch CPU/CUDA,
                             registered torch.Generators), as tensors and plain values only
    meta.json                step, world size, MLflow run id, the keys resume compares
                             (``pipeline/resume.py``), trainer extras (rank 0)
    COMPLETE                 written last by rank 0, after a barrier, by temp file + rename:
                             the size and sha256 of every other file (``checkpoint_marker.py``)

(DeepSpeed also drops its ``zero_to_fp32.py`` recovery script into ``RUN_DIR/checkpoints``.)
A folder without ``COMPLETE`` (a job killed mid-save) is ignored by ``latest_complete`` and refused
by ``resolve_resume``. Rank 0 keeps the last ``train.keep_checkpoints`` complete ones. (Saving on
SIGTERM / SIGUSR1 and the requeue exit status are ``pipeline/process.py``'s.)

Reading back: ``resolve_resume`` checks the files against the marker; with ``resume=auto`` a
damaged checkpoint is named, marked ``DAMAGED`` and skipped for the previous complete one.
``load_checkpoint`` runs no code from the files: every one is loaded ``weights_only``
(``pipeline/safe_load.py``), after a static check that names a file that would.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configtree import ConfigError
from pipeline.checkpoint_marker import (
    COMPLETE,
    DAMAGED,
    demote,
    find_damage,
    hash_files,
    read_marker,
    write_marker,
)
from pipeline.distributed import barrier, get_rank, get_world_size
from pipeline.safe_load import UnsafeFileError, safe_torch_load
from sharding.files import atomic_write_text

__all__ = [
    "CheckpointError",
    "Resumed",
    "checkpoint_dir",
    "latest_complete",
    "load_checkpoint",
    "prune_checkpoints",
    "read_meta",
    "resolve_resume",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


@dataclass
class Resumed:
    """What ``load_checkpoint`` gives back to the trainer."""

    path: Path
    step: int
    """Training steps done when it was saved (the next step to run)."""
    data_state: dict[str, Any]
    """This rank's data position, as passed to ``save_checkpoint``."""
    run_id: str | None
    """MLflow run to continue."""
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    """The keys resume compares, as saved (``pipeline.resume.resume_record``; empty for
    checkpoints written before they were saved)."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/step-NNNNNNN``."""
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def _rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank-{rank:05d}.pt"


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    # numpy's state as plain values and a tensor: an ndarray in the file would need numpy's
    # reconstruction functions on the weights_only allow-list
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = dict(numpy_state["state"])
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    missing = set(generators) - set(state["generators"])
    if missing:
        raise CheckpointError(f"checkpoint has no state for generator(s) {sorted(missing)}")
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])


def save_checkpoint(
    engine: Any,
    *,
    run_dir: str | Path,
    step: int,
    data_state: dict[str, Any],
    run_id: str | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Save a checkpoint (collective: every rank calls it with the same ``step``).

    Arguments:
      engine: a ``pipeline.engine.Engine``.
      run_dir: the run directory.
      step: training steps done (the step to continue from).
      data_state: this rank's data position (e.g. samples consumed per worker).
      run_id: the MLflow run id (rank 0's counts).
      generators: torch.Generators the trainer draws from (prompt sampling...), by name.
      extra: small JSON-able trainer state (rank 0's counts), e.g. best validation score.
      config: the config keys a resume compares (``pipeline.resume.resume_record``).
      keep: complete checkpoints to keep (``train.keep_checkpoints``; 0 = all).

    Returns:
      The checkpoint folder.
    """
    started = time.perf_counter()
    ckpt = checkpoint_dir(run_dir, step)
    rank, world = get_rank(), get_world_size()
    if (ckpt / COMPLETE).exists():
        # Same step saved already (a periodic save, then a stop signal): nothing new to write.
        # Every rank sees the marker, since the earlier save ended with a barrier after it.
        log.info("checkpoint %s exists, not saved again", ckpt)
        return ckpt
    if rank == 0 and ckpt.exists():
        shutil.rmtree(ckpt)  # the leftover of a save that was killed: start clean
    barrier()
    ckpt.mkdir(parents=True, exist_ok=True)
    engine.save(ckpt, {"step": step})
    torch.save(
        {"step": step, "rank": rank, "data": data_state, "rng": _rng_state(generators or {})},
        _rank_file(ckpt, rank),
    )
    # Every rank's files are closed before rank 0 declares the checkpoint complete.
    barrier()
    if rank == 0:
        meta = {
            "step": step,
            "world_size": world,
            "run_id": run_id,
            "config": config or {},
            "extra": extra or {},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(ckpt / META, json.dumps(meta, indent=2))
    # What is on the disk now is what the marker vouches for (the ranks share the hashing).
    files = hash_files(ckpt)
    expected = [META, *(_rank_file(ckpt, r).name for r in range(world))]
    absent = [name for name in expected if files.get(name, {}).get("bytes", -1) < 0]
    if absent:  # the same on every rank: all of them stop here
        raise CheckpointError(f"{ckpt}: {', '.join(absent)} missing after the save; not complete")
    if rank == 0:
        write_marker(ckpt, step, files)
        prune_checkpoints(run_dir, keep=keep)
        log.info("checkpoint %s saved in %.1fs", ckpt, time.perf_counter() - started)
    barrier()
    return ckpt


def load_checkpoint(
    engine: Any,
    path: str | Path,
    *,
    generators: dict[str, torch.Generator] | None = None,
) -> Resumed:
    """Restore weights, optimizer, RNG states and return the trainer's state (collective).

    Arguments:
      engine: a ``pipeline.engine.Engine`` built the same way as the one that saved.
      path: a complete checkpoint folder (from ``resolve_resume``).
      generators: the same named torch.Generators that were saved; restored in place.

    Returns:
      ``Resumed`` with the step, this rank's data position and the MLflow run id.
    """
    ckpt = Path(path)
    if not (ckpt / COMPLETE).is_file():
        raise CheckpointError(f"{ckpt}: no {COMPLETE} marker (half-written checkpoint)")
    meta = read_meta(ckpt)
    rank, world = get_rank(), get_world_size()
    if meta["world_size"] != world:
        raise CheckpointError(
            f"{ckpt}: saved by {meta['world_size']} ranks, this run has {world}; "
            "resume with the same launch.ranks x launch.nodes"
        )
    try:
        # The engine first: it refuses any file of the folder that would run code, ours too, on
        # every rank alike (a rank refusing alone would leave the others in a collective).
        engine.load(ckpt)
        # Ours holds tensors and plain values only: no allow-list at all.
        own = safe_torch_load(_rank_file(ckpt, rank))
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None
    # RNG last: nothing after this may draw random numbers before training continues.
    _set_rng_state(own["rng"], generators or {})
    log.info("resumed from %s (step %d)", ckpt, meta["step"])
    return Resumed(
        path=ckpt,
        step=int(meta["step"]),
        data_state=own["data"],
        run_id=meta.get("run_id"),
        extra=meta.get("extra", {}),
        config=meta.get("config", {}),
    )


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint; ``CheckpointError`` naming it when unreadable."""
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_text())
        int(meta["step"]), int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({err})") from None
    return meta


def _complete(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``RUN_DIR/checkpoints``, or None."""
    found = _complete(run_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, run_dir: str | Path, *, verify: bool = True) -> Path | None:
    """Turn ``train.resume`` into a checkpoint folder.

    Arguments:
      resume: ``""`` (fresh start), ``"auto"`` (latest complete checkpoint, or fresh when there is
        none), or a checkpoint folder, which must be complete.
      run_dir: the run directory.
      verify: check the files against the marker (False: only that an explicit path is a
        complete checkpoint folder; ``auto`` then picks the latest complete one).

    Returns:
      The folder to load, or None for a fresh start. Raises ``ConfigError`` naming
      ``train.resume`` for a path that is missing or incomplete, ``CheckpointError`` naming the
      file for a damaged one (or, with ``auto``, when every complete one is damaged).
      Collective once a checkpoint exists: every rank verifies a share of its files.
    """
    if resume == "":
        return None
    if resume == "auto":
        return _latest_intact(run_dir) if verify else latest_complete(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume: {path} is not a checkpoint folder")
    if not (path / COMPLETE).is_file():
        raise ConfigError(
            f"train.resume: {path} has no {COMPLETE} marker (a half-written checkpoint); "
            "pick another or use resume=auto"
        )
    damage = _damage(path) if verify else None
    if damage:
        raise CheckpointError(
            f"train.resume: checkpoint {path.name} is damaged: {damage}; pick another or use "
            "resume=auto (the latest intact one)"
        )
    return path


def _damage(ckpt: Path) -> str | None:
    """One line on what is wrong with a complete checkpoint's files, or None (collective)."""
    marker = read_marker(ckpt)
    if marker is None:
        return f"{ckpt / COMPLETE}: unreadable marker"
    if marker.files is None:
        log.info("%s: its marker lists no files (an older save): not verified", ckpt.name)
    return find_damage(ckpt, marker)


def _latest_intact(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match its marker (collective). Damaged ones
    are named, marked DAMAGED (rank 0) and skipped; none intact among several is an error."""
    found = _complete(run_dir)
    if not found:
        log.info("resume=auto: no complete checkpoint in %s, starting fresh", run_dir)
        return None
    skipped = []
    for step, ckpt in reversed(found):
        damage = _damage(ckpt)
        if damage is None:
            if skipped:
                log.warning("resume=auto: falling back to checkpoint %s (step %d)", ckpt, step)
            return ckpt
        log.warning("checkpoint %s (step %d) is damaged: %s; skipping it", ckpt.name, step, damage)
        skipped.append(ckpt.name)
        barrier()  # every rank has read the marker before rank 0 renames it
        if get_rank() == 0:
            demote(ckpt, damage)
    raise CheckpointError(
        f"resume=auto: no intact checkpoint in {Path(run_dir) / 'checkpoints'} (damaged: "
        f"{', '.join(skipped)}; see their {DAMAGED} files); resume from elsewhere or start a "
        "new run_dir"
    )


def prune_checkpoints(run_dir: str | Path, *, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (0 = keep all); rank 0 calls it.

    Incomplete folders older than the newest complete one are deleted too (dead saves);
    a newer incomplete one may be a save in progress and is left alone.

    Returns:
      The folders deleted.
    """
    found = _complete(run_dir)
    doomed = [path for _, path in found[:-keep]] if keep and len(found) > keep else []
    if found:
        newest = found[-1][0]
        for child in (Path(run_dir) / "checkpoints").iterdir():
            match = _STEP_DIR.match(child.name)
            if match and int(match.group(1)) < newest and not (child / COMPLETE).exists():
                doomed.append(child)
    for path in doomed:
        # Marker first, so a crash mid-delete leaves an incomplete folder, never a broken
        # "complete" one.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed
