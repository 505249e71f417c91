"""Batch composition of the training stream against a uniform shuffle of the same samples.

A synthetic corpus (SA-Med2D layout: one input per slice; or NIfTI: one input per 3D case, its
slices written together) is sharded with ``samadapt shard`` (``sharding.run.run_shard``) at the
ratio of shard size to shuffle buffer of the defaults: a 500-sample buffer spans ~2 % of a
1000 MB shard of 256 px slices (~25k samples), so here 500 samples per shard and a buffer of 10.
The training stream (``build_train_loader``, 2 workers, every sample once per epoch) is read for a
few epochs and compared with a uniform shuffle (``DataLoader(shuffle=True)``, what the SAM-Med2D
authors train with) of the samples it yielded:

* same-case pairs per batch (pairs of images of one case in a batch), and the fraction of batches
  that hold two images of one case;
* distinct cases among the first ``--first`` batches.

The uniform figures are exact expectations (``pipeline/data/mixing.py``), the fraction a mean over
shuffles. Target: same-case pairs within 1.5x of uniform. Images are small (32 px): the decode cost
does not matter here, only which samples end up together. Corpora and shards are cached in
``.bench/``.

    python bench/mixing.py                         # 200 cases x 24 slices, batch 16, 3 epochs
    python bench/mixing.py --format nifti          # the same as 3D cases (slices written together)
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CACHE, ensure_corpus, pin_threads, setup_logging, write_json  # noqa: E402

log = logging.getLogger("bench.mixing")

SIZE = 32


def ensure_shards(fmt: str, *, cases: int, slices: int, per_shard: int) -> Path:
    """The cached shard set of a synthetic corpus (written and sharded on first use)."""
    from sharding.config import ShardingConfig
    from sharding.format import FORMAT_VERSION
    from sharding.run import run_shard
    from sharding.synthetic import write_nifti

    name = f"mixing-{fmt}-{cases}x{slices}-{SIZE}px-{per_shard}per-shard-v{FORMAT_VERSION}"
    out = CACHE / name / "shards"
    if (out / "manifest.json").exists():
        return out
    if fmt == "sa-med2d":
        corpus = ensure_corpus(cases=cases, slices=slices, size=SIZE)
    else:
        corpus = CACHE / name / "corpus"
        shutil.rmtree(corpus, ignore_errors=True)
        write_nifti(corpus, n_cases=cases, shape=(slices, SIZE, SIZE), seed=0)
    shutil.rmtree(out, ignore_errors=True)
    # keep every slice: the composition of the whole split is what is compared
    cfg = ShardingConfig(image_size=SIZE, inputs_per_shard=per_shard, keep_empty_ratio=1.0)
    log.info("sharding %s -> %s", corpus, out)
    run_shard(fmt, corpus, out, cfg=cfg, workers=2)
    return out


def stream_cases(shards: Path, args: argparse.Namespace, open_shards: int) -> list[list[list[str]]]:
    """The cases of each full batch of the training stream, per epoch."""
    from pipeline.config import DataConfig
    from pipeline.data.mixing import case_of
    from pipeline.data.stream import build_train_loader

    cfg = DataConfig(
        shards=str(shards),
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        open_shards=open_shards,
        mask_num=1,
    )
    epochs = []
    for epoch in range(args.epochs):
        loader = build_train_loader(
            cfg=cfg,
            image_size=SIZE,
            rank=0,
            world_size=1,
            epoch=epoch,
            equalize=False,
            keep_empty=True,
        )
        batches = [[case_of(m) for m in b["meta"]] for b in loader]
        epochs.append([b for b in batches if len(b) == args.batch_size])
    return epochs


def _with_pair(batches: list[list[str]]) -> float:
    """Fraction of batches holding two (or more) images of one case."""
    return sum(max(Counter(b).values()) > 1 for b in batches) / max(len(batches), 1)


def measure(epochs: list[list[list[str]]], args: argparse.Namespace) -> dict:
    """The stream's figures (mean over epochs) and the uniform shuffle's."""
    from pipeline.data.mixing import (
        distinct_cases,
        same_case_pairs,
        uniform_distinct_cases,
        uniform_same_case_pairs,
    )

    pool = [c for b in epochs[0] for c in b]
    sizes = list(Counter(pool).values())
    rng = random.Random(0)
    shuffled = []
    for _ in range(args.shuffles):
        rng.shuffle(pool)
        shuffled.append(_with_pair([pool[i : i + args.batch_size]
                                    for i in range(0, len(pool), args.batch_size)]))  # fmt: skip
    n = len(epochs)
    return {
        "samples": len(pool),
        "cases": len(sizes),
        "batches_per_epoch": len(epochs[0]),
        "pairs": sum(same_case_pairs(e) for e in epochs) / n,
        "uniform_pairs": uniform_same_case_pairs(sizes, args.batch_size),
        "with_pair": sum(_with_pair(e) for e in epochs) / n,
        "uniform_with_pair": sum(shuffled) / len(shuffled),
        "distinct": sum(distinct_cases(e, args.first) for e in epochs) / n,
        "uniform_distinct": uniform_distinct_cases(sizes, args.first * args.batch_size),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=("sa-med2d", "nifti"), default="sa-med2d")
    parser.add_argument("--cases", type=int, default=200, help="cases in the corpus (200)")
    parser.add_argument("--slices", type=int, default=24, help="images per case (24)")
    parser.add_argument("--shard-samples", type=int, default=500,
                        help="samples per shard (500; NIfTI: whole cases)")  # fmt: skip
    parser.add_argument("--shuffle-buffer", type=int, default=10, help="data.shuffle_buffer (10)")
    parser.add_argument("--open-shards", default="4,1", help="data.open_shards values (4,1)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (16)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (2)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs read (3)")
    parser.add_argument("--first", type=int, default=10, help="batches for distinct cases (10)")
    parser.add_argument("--shuffles", type=int, default=50, help="uniform shuffles (50)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    setup_logging()
    pin_threads()
    logging.getLogger("sharding").setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    log.info("cores: %d; load average at start %.2f %.2f %.2f", os.cpu_count() or 0,
             *os.getloadavg())  # fmt: skip
    # an SA-Med2D input is one slice, a NIfTI input a whole case
    per_shard = args.shard_samples // (args.slices if args.format == "nifti" else 1)
    shards = ensure_shards(args.format, cases=args.cases, slices=args.slices, per_shard=per_shard)
    results = {}
    for open_shards in (int(v) for v in args.open_shards.split(",") if v.strip()):
        t0 = time.perf_counter()
        figures = measure(stream_cases(shards, args, open_shards), args)
        results[f"open_shards={open_shards}"] = figures
        log.info("open_shards=%d: %d train samples of %d cases, %d batches of %d per epoch, "
                 "%d epochs read in %.1f s", open_shards, figures["samples"], figures["cases"],
                 figures["batches_per_epoch"], args.batch_size, args.epochs,
                 time.perf_counter() - t0)  # fmt: skip
    log.info("")
    log.info("%-28s %12s %12s %14s", "", "pairs/batch", "batches w/", "cases in first")
    log.info("%-28s %12s %12s %14s", "", "(same case)", "a pair", f"{args.first} batches")
    first = next(iter(results.values()))
    log.info("%-28s %12.3f %11.1f%% %14.1f", "uniform shuffle", first["uniform_pairs"],
             100 * first["uniform_with_pair"], first["uniform_distinct"])  # fmt: skip
    for name, f in results.items():
        log.info("%-28s %12.3f %11.1f%% %14.1f", f"stream, {name}", f["pairs"],
                 100 * f["with_pair"], f["distinct"])  # fmt: skip
    log.info("")
    for name, f in results.items():
        ratio = f["pairs"] / f["uniform_pairs"]
        log.info("stream (%s) / uniform: same-case pairs %.2fx (target <= 1.5x: %s), distinct "
                 "cases %.2fx", name, ratio, "met" if ratio <= 1.5 else "NOT met",
                 f["distinct"] / f["uniform_distinct"])  # fmt: skip
    log.info("load average at end %.2f %.2f %.2f", *os.getloadavg())
    write_json(args.json, {"format": args.format, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
