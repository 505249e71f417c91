"""``samadapt shard``: plan, write the shards in parallel, and finalize when all are complete.

    samadapt shard --format {sa-med2d,nifti,dicom,folder} INPUT OUTPUT [key=value ...]
                   [--config YAML] [--workers N] [--shard-range i:j] [--no-progress]

Overrides are keys of the ``sharding`` section, written ``sharding.image_size=64`` or just
``image_size=64``. The run is resumable: complete shards (those with a sidecar) are skipped, so
rerunning the same command after a crash or a kill finishes the job and gives the same bytes as
an uninterrupted run. ``--shard-range i:j`` (half-open, over the global shard numbering of
plan.json) writes one slice of the shards, e.g. one task of a Slurm job array:

    samadapt shard ... --shard-range $((SLURM_ARRAY_TASK_ID*10)):$(((SLURM_ARRAY_TASK_ID+1)*10))

Whichever run finds every shard of the plan complete (also a rerun with nothing left to do)
writes manifest.json, summary.json, rejected.jsonl and indexes the Zarr volumes.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.config import ConfigError, ShardingConfig, load_config
from sharding.format import SPLITS
from sharding.manifest import REJECTED_FILE, finalize
from sharding.plan import Plan, PlanMismatch, ShardSpec, load_or_create_plan, split_of
from sharding.readers import FORMATS, get_reader
from sharding.records import Reader, RejectedInput
from sharding.volumes import finalize_volumes
from sharding.writer import ShardError, estimate_unit_bytes, read_sidecar, write_shard

__all__ = ["RunResult", "cli", "parse_range", "run_shard", "sharding_overrides"]

log = logging.getLogger(__name__)

_LOCK_FILE = ".finalize.lock"


@dataclass
class RunResult:
    """What one ``run_shard`` call did."""

    planned: int
    """Shards in the plan."""
    written: int
    """Shards written by this call."""
    complete: int
    """Shards of the plan complete after this call."""
    manifest: dict | None
    """The manifest when the whole plan is complete (finalized), else None."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """``"i:j"`` -> (i, j), half-open; either side may be empty (0 / no limit)."""
    if ":" not in text:
        raise ValueError(f"--shard-range must be i:j (half-open), got {text!r}")
    lo_s, hi_s = text.split(":", 1)
    try:
        lo = int(lo_s) if lo_s.strip() else 0
        hi = int(hi_s) if hi_s.strip() else sys.maxsize
    except ValueError:
        raise ValueError(f"--shard-range must be two integers i:j, got {text!r}") from None
    if lo < 0 or hi < lo:
        raise ValueError(f"--shard-range needs 0 <= i <= j, got {text!r}")
    return lo, hi


def sharding_overrides(items: list[str]) -> list[str]:
    """``x=1`` -> ``sharding.x=1``; ``sharding.x=1`` kept; other sections refused."""
    out = []
    for item in items:
        key = item.split("=", 1)[0]
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        if key.startswith("sharding."):
            out.append(item)
        elif "." in key:
            raise ConfigError(
                f"command line: {key}: samadapt shard only takes sharding.* keys "
                "(write sharding.KEY=VALUE or KEY=VALUE)"
            )
        else:
            out.append(f"sharding.{item}")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samadapt shard",
        description="Corpus -> WebDataset tar shards (+ Zarr v3 volumes for 3D inputs).",
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="input layout")
    p.add_argument("input", help="corpus root folder")
    p.add_argument("output", help="output folder (created; reruns resume it)")
    p.add_argument("overrides", nargs="*", help="sharding.KEY=VALUE or KEY=VALUE")
    p.add_argument("--config", default=None, help="YAML config (its sharding section is used)")
    p.add_argument("--workers", type=int, default=None, help="processes (0 = all cores)")
    p.add_argument("--shard-range", default=None, help="i:j, half-open, global shard indices")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


def _build_reader(fmt: str, root: str, cfg: ShardingConfig) -> Reader:
    return get_reader(fmt, root, cfg=cfg)


def _init_worker() -> None:
    """Pool initializer (spawn): quiet logging, and the worker exits when its parent dies.

    Without the watch, a SIGKILL of the parent alone (``kill -9 PID``; Slurm and the OOM killer
    kill the whole group) leaves the workers writing the shards queued to them and then waiting
    forever, racing a rerun. A shard cut off here leaves only a temp file, which a rerun removes.
    """
    logging.basicConfig(level=logging.WARNING)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()  # returns when the parent's end of the pipe closes: it has died
    os._exit(1)


def _task_reader(reader: Reader, spec: ShardSpec) -> Reader:
    """What a worker needs to write ``spec``: the reader cut down to the shard's units where the
    reader supports it (its index of the whole corpus is not sent or rebuilt per worker)."""
    subset = getattr(reader, "for_units", None)
    return subset(spec.units) if subset is not None else reader


def _work(
    reader: Reader, spec: ShardSpec, cfg: ShardingConfig, output: str
) -> tuple[int, int, int]:
    side = write_shard(reader, spec, output=Path(output), cfg=cfg)
    return spec.index, side["samples"], side["counts"]["rejected"]


def _resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def _write_all(
    todo: list[ShardSpec],
    *,
    reader: Reader,
    fmt: str,
    input_path: str,
    output: Path,
    cfg: ShardingConfig,
    workers: int,
    progress: bool,
) -> None:
    bar = tqdm(total=len(todo), unit="shard", disable=not progress, file=sys.stderr)
    start, samples = time.monotonic(), 0

    def advance(n_samples: int) -> None:
        nonlocal samples
        samples += n_samples
        bar.update(1)
        bar.set_postfix_str(f"{samples / max(time.monotonic() - start, 1e-9):.1f} samples/s")

    try:
        if workers <= 1 or len(todo) <= 1:
            for spec in todo:
                advance(write_shard(reader, spec, output=output, cfg=cfg)["samples"])
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(workers, len(todo)),
            mp_context=ctx,
            initializer=_init_worker,
        ) as pool:
            futures = [
                pool.submit(_work, _task_reader(reader, spec), spec, cfg, str(output))
                for spec in todo
            ]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    if fut.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise fut.exception()
                    advance(fut.result()[1])
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@contextmanager
def _finalize_lock(output: Path) -> Iterator[None]:
    """Serialise finalization between runs sharing OUTPUT (job-array tasks finishing together)."""
    fh = open(output / _LOCK_FILE, "a")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # file systems without flock: finalization is idempotent anyway
            pass
        yield
    finally:
        fh.close()


def _finalize(output: Path, plan: Plan) -> dict:
    with _finalize_lock(output):
        sidecars = [read_sidecar(spec, output) for spec in plan.shards]
        # every shard is complete, so temp files left here are from killed runs
        for folder in (output, *(output / split for split in SPLITS)):
            for stale in folder.glob("*.tmp-*"):
                if stale.is_file():
                    stale.unlink(missing_ok=True)
        finalize_volumes(output)
        return finalize(output, plan, sidecars)


def run_shard(
    fmt: str,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    cfg: ShardingConfig,
    workers: int | None = None,
    shard_range: tuple[int, int] | None = None,
    progress: bool = False,
) -> RunResult:
    """Plan (or check the plan), write the shards of ``shard_range`` that are not complete, and
    finalize when the whole plan is complete.

    Arguments:
      fmt: reader format (one of ``FORMATS``).
      input_path: corpus root.
      output: output folder.
      cfg: the sharding section.
      workers: processes (None = ``cfg.workers``; 0 = all cores; 1 = in this process).
      shard_range: half-open global shard indices, or None for all.
      progress: show a tqdm bar on stderr.

    Returns:
      A ``RunResult``. Raises ``ValueError`` (bad input / plan mismatch) or ``ShardError``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    input_path = str(Path(input_path).resolve())
    if not Path(input_path).exists():
        raise ValueError(f"input {input_path} does not exist")
    output = Path(output)
    try:
        reader = _build_reader(fmt, input_path, cfg)
        units = sorted(reader.list_units(), key=lambda u: u.id)
    except RejectedInput as err:
        raise ValueError(f"cannot read {fmt} corpus at {err.path}: {err.reason}") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {fmt} corpus at {input_path}: {err}") from err
    if not units:
        raise ValueError(f"no {fmt} inputs found under {input_path}")
    output.mkdir(parents=True, exist_ok=True)

    def bytes_per_unit(sample: list) -> float:
        splits = {
            u.id: split_of(
                u.dataset, u.case_id, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction
            )
            for u in sample
        }
        return estimate_unit_bytes(reader, sample, splits=splits, cfg=cfg)

    plan = load_or_create_plan(
        output, units, fmt=fmt, input_path=input_path, cfg=cfg, bytes_per_unit=bytes_per_unit
    )
    selected = plan.select(shard_range)
    todo = [spec for spec in selected if read_sidecar(spec, output) is None]
    log.info(
        "%d shards planned, %d selected, %d to write", len(plan.shards), len(selected), len(todo)
    )
    _write_all(
        todo,
        reader=reader,
        fmt=fmt,
        input_path=input_path,
        output=output,
        cfg=cfg,
        workers=_resolve_workers(cfg.workers if workers is None else workers),
        progress=progress,
    )
    complete = sum(spec.sidecar_path(output).exists() for spec in plan.shards)
    manifest = _finalize(output, plan) if complete == len(plan.shards) else None
    return RunResult(len(plan.shards), len(todo), complete, manifest)


def cli(argv: list[str]) -> int:
    """Entry point of ``samadapt shard`` (see the module docstring)."""
    args = _parser().parse_intermixed_args(argv)
    try:
        shard_range = parse_range(args.shard_range) if args.shard_range else None
        cfg = load_config(args.config, sharding_overrides(args.overrides)).sharding
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        result = run_shard(
            args.format,
            args.input,
            args.output,
            cfg=cfg,
            workers=args.workers,
            shard_range=shard_range,
            progress=not args.no_progress,
        )
    except ConfigError as err:
        print(f"samadapt shard: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, PlanMismatch) as err:
        print(f"samadapt shard: {err}", file=sys.stderr)
        return 2
    except ShardError as err:
        print(f"samadapt shard: {err}", file=sys.stderr)
        return 1
    except BrokenProcessPool as err:
        print(
            f"samadapt shard: a worker process died ({err}); out of memory? Complete shards are "
            "kept: rerun (maybe with fewer --workers) to finish",
            file=sys.stderr,
        )
        return 1
    if result.manifest is None:
        print(
            f"wrote {result.written} shards; {result.complete} of {result.planned} shards of the "
            f"plan are complete (manifest.json is written when all are)"
        )
        return 0
    totals = result.manifest["totals"]
    print(
        f"{totals['samples']} samples in {totals['shards']} shards, {totals['rejected']} rejected "
        f"(see {Path(args.output) / REJECTED_FILE})"
    )
    return 0
