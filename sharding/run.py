"""``samadapt shard``'s library: plan, write the shards in parallel, and finalize when all are
complete (``run_shard``; the command line is parsed in ``samadapt/cli.py``).

The run is resumable: complete shards (those with a sidecar) are skipped, so rerunning the same
command after a crash or a kill finishes the job and gives the same bytes as an uninterrupted
run. ``shard_range=(i, j)`` (half-open, over the global shard numbering of plan.json; on the
command line ``--shard-range i:j``) writes one slice of the shards, e.g. one task of a Slurm job
array:

    samadapt shard ... --shard-range $((SLURM_ARRAY_TASK_ID*10)):$(((SLURM_ARRAY_TASK_ID+1)*10))

Whichever run finds every shard of the plan complete (also a rerun with nothing left to do)
writes manifest.json, summary.json, rejected.jsonl and indexes the Zarr volumes.

Runs may share an output folder, also with overlapping ranges (``sharding/locks.py``): a shard
another run is writing is skipped at first and waited for at the end, so every run ends with its
range complete, and the shards are the bytes a single run writes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sharding.config import ShardingConfig
from sharding.inputs import Provenance, corpus_record, stale_reason
from sharding.locks import output_lock, shard_lock
from sharding.manifest import REJECTED_FILE, finalize, load_summary
from sharding.plan import (
    Plan,
    ShardSpec,
    load_or_create_plan,
    plan_settings,
    save_plan,
    unit_split,
)
from sharding.readers import FORMATS, get_reader
from sharding.reconcile import InputsChanged, discard, find_stale, refusal
from sharding.records import Reader, RejectedInput
from sharding.volumes import finalize_volumes
from sharding.writer import estimate_unit_bytes, read_sidecar, stale_tmps, write_shard

__all__ = ["NoSamples", "RunResult", "run_shard"]

log = logging.getLogger(__name__)


class NoSamples(ValueError):
    """The whole shard set holds no sample: every input was rejected or dropped."""


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


def _work(reader: Reader, spec: ShardSpec, output: str, job: dict) -> int | None:
    side = write_shard(reader, spec, output=Path(output), **job)
    return None if side is None else side["samples"]


def _resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def _pool_round(
    pool: ProcessPoolExecutor,
    specs: list[ShardSpec],
    *,
    reader: Reader,
    output: Path,
    job: dict,
    advance: Callable[[int], None],
) -> list[ShardSpec]:
    """Write ``specs`` in the pool (``job``: ``write_shard``'s other keyword arguments); returns
    those another run held (only with ``wait=False``)."""
    futures = {
        pool.submit(_work, _task_reader(reader, spec), spec, str(output), job): spec
        for spec in specs
    }
    pending, busy = set(futures), []
    while pending:
        done, pending = wait_for(pending, return_when=FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                for other in pending:
                    other.cancel()
                raise fut.exception()
            if fut.result() is None:
                busy.append(futures[fut])
            else:
                advance(fut.result())
    return sorted(busy, key=lambda spec: spec.index)


def _write_all(
    todo: list[ShardSpec],
    *,
    reader: Reader,
    output: Path,
    cfg: ShardingConfig,
    source: Provenance,
    overwrite: bool,
    workers: int,
    progress: bool,
) -> None:
    """Write ``todo``: first every shard no other run holds, then wait for the others (each is
    then complete, or written here when the run that held it died)."""
    bar = tqdm(total=len(todo), unit="shard", disable=not progress, file=sys.stderr)
    start, samples = time.monotonic(), 0

    def advance(n_samples: int) -> None:
        nonlocal samples
        samples += n_samples
        bar.update(1)
        bar.set_postfix_str(f"{samples / max(time.monotonic() - start, 1e-9):.1f} samples/s")

    def held_elsewhere(busy: list[ShardSpec]) -> None:
        if busy:
            log.info("%d shards are held by another run: waiting for them", len(busy))

    job = {"cfg": cfg, "source": source, "overwrite": overwrite}
    try:
        if workers <= 1 or len(todo) <= 1:
            busy = []
            for spec in todo:
                side = write_shard(reader, spec, output=output, wait=False, **job)
                if side is None:
                    busy.append(spec)
                else:
                    advance(side["samples"])
            held_elsewhere(busy)
            for spec in busy:
                advance(write_shard(reader, spec, output=output, **job)["samples"])
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(workers, len(todo)),
            mp_context=ctx,
            initializer=_init_worker,
        ) as pool:
            rounds = {"reader": reader, "output": output, "advance": advance}
            busy = _pool_round(pool, todo, job={**job, "wait": False}, **rounds)
            held_elsewhere(busy)
            _pool_round(pool, busy, job=job, **rounds)
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _finalize(output: Path, plan: Plan, source: Provenance) -> dict | None:
    """Under the output lock: clean up temp files left by killed runs, index the Zarr volumes,
    write manifest.json, summary.json and rejected.jsonl; None when a shard is not complete after
    all (another run took it back to rewrite it).

    Shards outside this run's range were checked by the runs that wrote them; here each gets the
    checks that touch no input file (settings, units, input folder), so a set is never finalized
    from shards of two corpora."""
    with output_lock(output):
        sidecars = []
        for spec in plan.shards:
            side = read_sidecar(spec, output)
            if side is None:
                return None
            reason = stale_reason(side, spec.units, source, files=False)
            if reason:
                raise InputsChanged(
                    f"{spec.relpath()}: {reason}; rerun its --shard-range (with --overwrite to "
                    "rewrite it), or shard into a new output folder"
                )
            side.pop("sources", None)  # the bulk of a sidecar; the manifest does not need it
            sidecars.append(side)
        for spec in plan.shards:
            # a shard whose lock is free has no writer: its temp files are from killed runs
            with shard_lock(output, spec.name, wait=False) as held:
                for stale in stale_tmps(spec, output) if held else ():
                    stale.unlink(missing_ok=True)
        # plan.json and the files written here are only written under the output lock
        for stale in output.glob("*.tmp-*"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
        finalize_volumes(output)
        return finalize(output, plan, sidecars)


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file, not a folder (give a folder to create)")


def _make_output(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {output}: {err.strerror}") from err


def _check_written(
    plan: Plan,
    selected: list[ShardSpec],
    output: Path,
    *,
    source: Provenance,
    content: bool,
    overwrite: bool,
    locked: bool,
) -> None:
    """Refuse, or with ``overwrite`` take back, the shards on disk that this run would not write
    as they are (``sharding/reconcile.py``); ``locked``: the caller holds the output lock (shards
    are only taken back under it, so a finalizing run never sees half a set)."""
    stale = find_stale(plan, selected, output, source, content=content, overwrite=overwrite)
    if stale and not overwrite:
        raise refusal(stale, selected)
    if stale and locked:
        discard(stale, output)
    elif stale:
        with output_lock(output):
            discard(stale, output)


def run_shard(
    fmt: str,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    cfg: ShardingConfig,
    workers: int | None = None,
    shard_range: tuple[int, int] | None = None,
    progress: bool = False,
    overwrite: bool = False,
    verify_content: bool = False,
) -> RunResult:
    """Plan (or check the plan), check the complete shards of ``shard_range`` against this run's
    inputs, write the shards of the range that are not complete, and finalize when the whole
    plan is complete.

    Arguments:
      fmt: reader format (one of ``FORMATS``).
      input_path: corpus root.
      output: output folder.
      cfg: the sharding section.
      workers: processes (None = ``cfg.workers``; 0 = all cores; 1 = in this process).
      shard_range: half-open global shard indices, or None for all.
      progress: show a tqdm bar on stderr.
      overwrite: replan when plan.json differs from this run, and rewrite the shards that were
        written from other inputs (``sharding/reconcile.py``) instead of refusing.
      verify_content: compare the contents of the complete shards' inputs (hashes) instead of
        their modification times.

    Returns:
      A ``RunResult``. Raises ``ValueError`` (bad input or output), ``PlanMismatch`` (OUTPUT
      holds another plan), ``InputsChanged`` (complete shards from other inputs),
      ``NoSamples`` (the whole set holds no sample), ``ShardError``, or ``BrokenProcessPool``
      (a worker process died).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    input_path = str(Path(input_path).resolve())
    if not Path(input_path).exists():
        raise ValueError(f"input {input_path} does not exist")
    output = Path(output)
    _check_output(output)
    try:
        reader = _build_reader(fmt, input_path, cfg)
        units = sorted(reader.list_units(), key=lambda u: u.id)
    except RejectedInput as err:
        raise ValueError(f"cannot read {fmt} corpus at {err.path}: {err.reason}") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {fmt} corpus at {input_path}: {err}") from err
    if not units:
        raise ValueError(f"no {fmt} inputs found under {input_path}")
    _make_output(output)
    source = Provenance(input_path, plan_settings(fmt, cfg), corpus_record(input_path))

    def bytes_per_unit(sample: list) -> float:
        splits = {u.id: unit_split(u, cfg) for u in sample}
        return estimate_unit_bytes(reader, sample, splits=splits, cfg=cfg)

    check = {"source": source, "content": verify_content, "overwrite": overwrite}
    with output_lock(output):  # two runs starting together make one plan, not two
        plan, new = load_or_create_plan(
            output,
            units,
            fmt=fmt,
            input_path=input_path,
            cfg=cfg,
            bytes_per_unit=bytes_per_unit,
            replace=overwrite,
        )
        selected = plan.select(shard_range)
        if new:  # check what the output holds first: a refused run leaves no plan.json
            _check_written(plan, selected, output, locked=True, **check)
            save_plan(output, plan)
    if not new:  # stats every input of the range: not under the lock job-array tasks share
        _check_written(plan, selected, output, locked=False, **check)
    todo = [spec for spec in selected if read_sidecar(spec, output) is None]
    log.info(
        "%d shards planned, %d selected, %d to write", len(plan.shards), len(selected), len(todo)
    )
    _write_all(
        todo,
        reader=reader,
        output=output,
        cfg=cfg,
        source=source,
        overwrite=overwrite,
        workers=_resolve_workers(cfg.workers if workers is None else workers),
        progress=progress,
    )
    complete = sum(spec.sidecar_path(output).exists() for spec in plan.shards)
    manifest = _finalize(output, plan, source) if complete == len(plan.shards) else None
    if manifest is not None and not manifest["totals"]["samples"]:
        raise NoSamples(_no_samples(output, cfg))
    return RunResult(len(plan.shards), len(todo), complete, manifest)


def _no_samples(output: Path, cfg: ShardingConfig) -> str:
    """The one line of a finished set without any sample: how many inputs were rejected (and
    the first reason), or how many empty slices were dropped."""
    counts = load_summary(output)
    rejected = output / REJECTED_FILE
    lines = rejected.read_text().splitlines() if rejected.is_file() else []
    what = f"no sample written: {counts['units_rejected']} of {counts['units']} inputs rejected"
    if lines:
        first = json.loads(lines[0])
        what += f" (first: {first.get('path') or first.get('unit')}: {first.get('reason')})"
    if counts["empty_dropped"]:
        what += (
            f", {counts['empty_dropped']} slices without a mask dropped "
            f"(keep_empty_ratio={cfg.keep_empty_ratio})"
        )
    return f"{what}; see {rejected}"
