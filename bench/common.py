"""Shared pieces of the data benchmarks (``bench/loader.py``, ``bench/shard.py``).

* a cached synthetic corpus in the SA-Med2D layout (512 px images, 2-5 masks each) under
  ``.bench/`` (gitignored), written once by ``sharding.synthetic.write_sa_med2d``;
* thread pinning, so that "per core" means one core;
* a measurement: a time-bounded window after a warm-up, wall and CPU seconds (this process plus
  the worker processes named), repeated and reduced to the median;
* the table the scripts log.

The machines these run on are often shared, so the scripts interleave the measurements they
compare and report ratios taken in one run; CPU-second rates (samples per CPU second) are less
sensitive to other load than wall-clock rates.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench"
"""Where corpora, shards and the peer's source are cached (in .gitignore)."""

log = logging.getLogger("bench")

# Thread pools of the libraries the data path uses: one thread each for per-core figures. Set as
# environment variables too, so spawned and forked workers inherit them.
_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENCV_FOR_THREADS_NUM": "1",
    "BLOSC_NTHREADS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for a newer version at import
}


def pin_threads() -> None:
    """One thread for torch, OpenCV and Blosc, here and in every child process."""
    os.environ.update(_THREAD_ENV)
    import cv2
    import numcodecs.blosc
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    numcodecs.blosc.set_nthreads(1)
    numcodecs.blosc.use_threads = False


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)


# --------------------------------------------------------------------------------------------
# Corpus and shards
# --------------------------------------------------------------------------------------------


def ensure_corpus(*, cases: int, slices: int, size: int = 512, seed: int = 0) -> Path:
    """The cached SA-Med2D corpus of ``cases * slices`` images (written on first use).

    Arguments:
      cases, slices: cases and images per case (``write_sa_med2d``'s ``n_cases``,
        ``slices_per_case``); 2-5 masks per image.
      size: image side in pixels.
      seed: the generator's seed.

    Returns:
      The corpus root (``images/``, ``masks/``, ``image2label_train.json``).
    """
    from sharding.synthetic import write_sa_med2d

    # "shapes2": the irregular textured organs; corpora of the earlier discs are not reused
    root = CACHE / f"corpus-sa-med2d-{cases}x{slices}-{size}px-seed{seed}-shapes2"
    if (root / ".complete").exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    log.info("writing a synthetic corpus of %d images (%d px) to %s", cases * slices, size, root)
    write_sa_med2d(tmp, n_cases=cases, slices_per_case=slices, size=size, seed=seed)
    (tmp / ".complete").write_text("")
    tmp.rename(root)
    return root


def corpus_items(root: Path) -> list[tuple[Path, list[Path]]]:
    """``(image, [masks])`` of every image of a corpus, sorted by image path."""
    mapping = json.loads((root / "image2label_train.json").read_text())
    return [(root / img, [root / m for m in masks]) for img, masks in sorted(mapping.items())]


def shard_with_cli(
    corpus: Path, out: Path, overrides: list[str], *, fmt: str = "sa-med2d"
) -> Path:
    """Shard ``corpus`` with ``samadapt shard`` (a subprocess) unless ``out`` is complete.

    Returns:
      ``out``, holding manifest.json. Exits when ``out`` holds shards of another format version
      (key the cache folder on ``sharding.format.FORMAT_VERSION``).
    """
    from sharding.manifest import ManifestError, load_manifest

    if (out / "manifest.json").exists():
        try:
            load_manifest(out)
        except ManifestError as err:
            raise SystemExit(f"{err} (remove {out} or use another cache name)") from None
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "samadapt", "shard", "--format", fmt]
    cmd += [str(corpus), str(out), *overrides, "--no-progress"]
    log.info("sharding: %s", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=REPO)
    return out


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def cpu_seconds(pids: Iterable[int] = ()) -> float:
    """User + system CPU seconds of this process (all threads) and of the processes ``pids``."""
    import psutil

    total = time.process_time()
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


@dataclass
class Run:
    """One timed window."""

    items: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        """Items per wall-clock second."""
        return self.items / self.wall

    @property
    def cpu_rate(self) -> float:
        """Items per CPU second (this process + its measured workers)."""
        return self.items / max(self.cpu, 1e-9)


def timed_window(
    stream: Iterator,
    *,
    count: Callable[[object], int],
    warmup: int,
    seconds: float,
    pids: Callable[[], list[int]] = list,
) -> Run:
    """Consume ``warmup`` elements of ``stream``, then time elements until ``seconds`` passed.

    Arguments:
      stream: an iterator (a DataLoader iterator, a generator of samples...).
      count: items (samples, images) in one element.
      warmup: elements consumed before the clock starts.
      seconds: length of the timed window (ends at the first element past it).
      pids: the worker processes whose CPU time counts (asked after the warm-up).

    Returns:
      A ``Run``. Raises ``RuntimeError`` when the stream ends before the window does.
    """
    for _ in range(warmup):
        next(stream)
    workers = pids()
    items, t0, c0 = 0, time.perf_counter(), cpu_seconds(workers)
    while True:
        try:
            element = next(stream)
        except StopIteration:
            raise RuntimeError("the stream ended inside the timed window: make it longer") from None
        items += count(element)
        wall = time.perf_counter() - t0
        if wall >= seconds:
            return Run(items, wall, cpu_seconds(workers) - c0)


@dataclass
class Series:
    """The repeated runs of one measurement."""

    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Median items per wall-clock second."""
        return statistics.median(r.rate for r in self.runs)

    @property
    def cpu_rate(self) -> float:
        """Median items per CPU second."""
        return statistics.median(r.cpu_rate for r in self.runs)

    @property
    def spread(self) -> float:
        """(max - min) / median of the wall-clock rates, in percent."""
        rates = [r.rate for r in self.runs]
        return 100 * (max(rates) - min(rates)) / statistics.median(rates)


def log_table(rows: list[Series], unit: str) -> None:
    """Median wall and CPU-second rates of each series, one line each."""
    width = max(len(s.name) for s in rows)
    log.info(
        "%-*s  %12s  %14s  %7s  %s",
        width,
        "measurement",
        f"{unit}/s",
        f"{unit}/cpu-s",
        "spread",
        "runs",
    )
    for s in rows:
        log.info(
            "%-*s  %12.1f  %14.1f  %6.0f%%  %d",
            width, s.name, s.rate, s.cpu_rate, s.spread, len(s.runs),
        )  # fmt: skip


def write_json(path: str | None, payload: dict) -> None:
    """Write the results as JSON when ``--json PATH`` was given."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")
        log.info("results written to %s", path)
