"""Images/s per core of ``samadapt shard`` vs the decode+encode limit, measured in one run.

* limit: in this process, for every image of the corpus: ``cv2.imread`` the image PNG and each of
  its mask PNGs, resize to 256 px (image ``INTER_AREA``, each mask ``INTER_NEAREST``: the pixels
  of ``sharding.transform``) and encode the output members with ``sharding.format.encode_image`` /
  ``encode_masks``; no JSON, no tar, no files written;
* ours: ``sharding.run.run_shard`` (the ``samadapt shard`` entry point) on the same corpus into a
  fresh output folder, workers = 1 (in process) and 2 (a spawned pool); everything counts:
  listing, planning, tar writing with fsync, sidecars, manifest and summary.

Torch, OpenCV and Blosc run one thread each (also in the spawned workers). The measurements are
interleaved and repeated ``--repeats`` times; medians are reported in images per wall-clock second
and per CPU second (this process + its finished child processes).

    python bench/shard.py                 # 1200 images of 512 px, 2-5 masks each, cached in .bench/
    python bench/shard.py --cases 100     # smaller
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    CACHE,
    Run,
    Series,
    corpus_items,
    ensure_corpus,
    log_table,
    pin_threads,
    setup_logging,
    write_json,
)

log = logging.getLogger("bench.shard")

IMAGE_SIZE = 256


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(fn, items: int) -> Run:
    """Run ``fn()`` once; wall and CPU seconds of this process and of children that ended."""
    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    fn()
    wall = time.perf_counter() - t0
    return Run(items, wall, time.process_time() - c0 + _children_cpu() - k0)


def limit_pass(items: list[tuple[Path, list[Path]]], *, size: int, level: int) -> int:
    """Decode every input PNG and encode the output members; returns the encoded bytes."""
    import cv2
    import numpy as np

    from sharding.format import encode_image, encode_masks

    total = 0
    for image_path, mask_paths in items:
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        # one 2D resize per mask: the cheapest exact way (no (N, H, W) -> (H, W, N) transpose)
        masks = [
            cv2.resize(
                cv2.imread(str(m), cv2.IMREAD_UNCHANGED), (size, size),
                interpolation=cv2.INTER_NEAREST,
            )
            for m in mask_paths
        ]  # fmt: skip
        stack = np.stack(masks) > 0
        total += len(encode_image(small, level=level)) + len(encode_masks(stack, level=level))
    return total


def ours_pass(corpus: Path, out: Path, *, workers: int, inputs_per_shard: int) -> int:
    """``run_shard`` of the whole corpus into ``out`` (must not exist); returns the samples."""
    from sharding.config import ShardingConfig
    from sharding.run import run_shard

    cfg = ShardingConfig(image_size=IMAGE_SIZE, inputs_per_shard=inputs_per_shard)
    result = run_shard("sa-med2d", corpus, out, cfg=cfg, workers=workers)
    if result.manifest is None:
        raise RuntimeError(f"run_shard left {out} incomplete")
    return int(result.manifest["totals"]["samples"])


def _profile(fn, top: int) -> None:
    prof = cProfile.Profile()
    prof.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    log.info("%s", buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300, help="cases in the corpus (300)")
    parser.add_argument("--slices", type=int, default=4, help="images per case (4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (3)")
    parser.add_argument("--inputs-per-shard", type=int, default=50, help="images per shard (50)")
    parser.add_argument("--workers", default="1,2", help="worker counts of ours (1,2)")
    parser.add_argument("--profile", action="store_true", help="also cProfile ours, 1 worker")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    setup_logging()
    pin_threads()
    # the sharding driver logs per run; keep the table readable
    logging.getLogger("sharding").setLevel(logging.WARNING)

    from sharding.config import ShardingConfig

    level = ShardingConfig().zstd_level
    corpus = ensure_corpus(cases=args.cases, slices=args.slices)
    items = corpus_items(corpus)
    n = len(items)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    scratch = CACHE / "shard-bench-out"
    log.info("corpus: %s (%d images, 512 px, %d masks)", corpus, n, sum(len(m) for _, m in items))
    log.info("cores: %d; load average at start %.2f %.2f %.2f", os.cpu_count() or 0,
             *os.getloadavg())  # fmt: skip

    def ours(w: int) -> None:
        samples = ours_pass(
            corpus, scratch / f"w{w}", workers=w, inputs_per_shard=args.inputs_per_shard
        )
        if samples != n:
            raise RuntimeError(f"ours wrote {samples} samples from {n} images")

    import sharding.run  # noqa: F401  (imported before the clock, as a CLI run has it)

    limit_pass(items[:20], size=IMAGE_SIZE, level=level)  # warm the page cache and the imports
    plan: list[tuple[Series, int | None]] = [(Series("limit: decode + encode, 1 process"), None)]
    for w in workers:
        plan.append((Series(f"ours: samadapt shard, {w} worker{'s' if w > 1 else ''}"), w))
    for r in range(args.repeats):
        # A B C, C B A, ...: on a machine whose speed drifts (other jobs come and go), reversing
        # the order every other repeat cancels a linear drift out of the paired ratios below
        for series, w in plan if r % 2 == 0 else plan[::-1]:
            if w is None:
                run = _timed(lambda: limit_pass(items, size=IMAGE_SIZE, level=level), n)
            else:
                shutil.rmtree(scratch / f"w{w}", ignore_errors=True)  # a fresh run, not a resume
                run = _timed(lambda w=w: ours(w), n)
            series.runs.append(run)
            log.info("[%d/%d] %-40s %7.1f images/s  %7.1f images/cpu-s", r + 1, args.repeats,
                     series.name, run.rate, run.cpu_rate)  # fmt: skip

    rows = [series for series, _ in plan]
    log.info("")
    log_table(rows, "images")
    log.info("load average at end %.2f %.2f %.2f", *os.getloadavg())
    limit = rows[0]
    by_workers = dict(zip(workers, rows[1:], strict=True))
    log.info("")
    if 1 in by_workers:
        one = by_workers[1]
        log.info("ours(1 worker) / limit:   %5.1f%% wall   %5.1f%% per cpu-s   (target >= 90%%)",
                 100 * one.rate / limit.rate, 100 * one.cpu_rate / limit.cpu_rate)  # fmt: skip
        paired = [o.cpu_rate / m.cpu_rate for o, m in zip(one.runs, limit.runs, strict=True)]
        log.info("  paired per repeat:       %s per cpu-s, median %.1f%%",
                 " ".join(f"{100 * x:.0f}%" for x in paired),
                 100 * statistics.median(paired))  # fmt: skip
        for w, s in by_workers.items():
            if w > 1:
                log.info("%d workers / 1 worker:     %5.2fx wall   %5.2fx per cpu-s   "
                         "(near-linear: ~%dx wall on %d free cores)",
                         w, s.rate / one.rate, s.cpu_rate / one.cpu_rate, w, w)  # fmt: skip
    if args.profile:
        log.info("cProfile of ours, 1 worker (cumulative, top 40):")
        shutil.rmtree(scratch / "w1", ignore_errors=True)
        _profile(lambda: ours(1), 40)
    shutil.rmtree(scratch, ignore_errors=True)
    write_json(
        args.json,
        {
            "corpus": str(corpus),
            "images": n,
            "repeats": args.repeats,
            "results": {
                s.name: {
                    "images_per_s": s.rate,
                    "images_per_cpu_s": s.cpu_rate,
                    "runs": [vars(run) for run in s.runs],
                }
                for s in rows
            },
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
