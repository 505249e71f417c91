"""Training samples/s per core: our shard reader vs SAM-Med2D's ``TrainingDataset``, one run.

Both produce the same content per sample: a 256 px image, 5 masks drawn with replacement from the
image's masks, one box prompt (jittered) and one point prompt per mask.

* peer: SAM-Med2D's ``TrainingDataset(data_dir, image_size=256, mode="train", mask_num=5)``
  (DataLoader.py + utils.py of github.com/OpenGVLab/SAM-Med2D, obtained at run time and never
  stored in this repository) through ``DataLoader(batch_size=2, shuffle=True, num_workers=0)``,
  on the SA-Med2D-layout corpus (512 px PNG images, one PNG per mask);
* ours: ``pipeline.data.build_train_loader`` (batch_size=2) on the same corpus sharded by
  ``samadapt shard ... image_size=256``, with num_workers 0 (one core), 1 and 2;
* floor: Blosc-zstd decode of a pre-sized 256 px image + uint8 label map chunk (as the Zarr
  volumes store them), and our member decode alone (Blosc image + packed masks, from memory).

Torch, OpenCV and Blosc run one thread each. Every measurement is a window of ``--seconds`` after
a warm-up; the measurements are interleaved and repeated ``--repeats`` times, and the medians are
reported, in samples per wall-clock second and per CPU second (this process + its DataLoader
workers; steadier than wall clock on a shared machine).

Our stream is made long enough for a steady window by a manifest that lists the corpus' shards
many times over (``.bench/.../loop/manifest.json``, absolute paths): each pass reads, decodes and
prompts every sample again, exactly as a longer corpus would.

    python bench/loader.py --peer-src PATH      # a SAM-Med2D checkout or bare git repository
    python bench/loader.py                      # clones SAM-Med2D into .bench/ (needs network)
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    CACHE,
    Series,
    corpus_items,
    ensure_corpus,
    log_table,
    pin_threads,
    setup_logging,
    shard_with_cli,
    timed_window,
    write_json,
)

log = logging.getLogger("bench.loader")

PEER_URL = "https://github.com/OpenGVLab/SAM-Med2D"
PEER_FILES = ("DataLoader.py", "utils.py")
IMAGE_SIZE = 256
MASK_NUM = 5
BATCH = 2
_MAX_RATE = 5000.0  # samples/s our loop manifest must sustain for the window (2 workers)


# --------------------------------------------------------------------------------------------
# The peer
# --------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    )
    return done.stdout


def _commit(repo: Path) -> str:
    try:
        return _git(repo, "rev-parse", "HEAD").strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def peer_source(peer_src: str | None, dest: Path) -> str:
    """Put SAM-Med2D's DataLoader.py and utils.py into ``dest``; returns where they came from.

    Arguments:
      peer_src: a checkout holding the two files, or a git repository (bare or not) to extract
        them from with ``git show HEAD:...``; None = ``git clone --depth 1`` into ``.bench/``.
      dest: an empty folder (outside the repository's tracked files).

    Returns:
      A description: the source path or URL and its commit when known. Exits with a message
      when the source cannot be had.
    """
    if peer_src is None:
        clone = CACHE / "SAM-Med2D"
        if not (clone / ".git").is_dir():
            shutil.rmtree(clone, ignore_errors=True)
            log.info("cloning %s into %s", PEER_URL, clone)
            done = subprocess.run(
                ["git", "clone", "--depth", "1", PEER_URL, str(clone)],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode != 0:
                shutil.rmtree(clone, ignore_errors=True)
                raise SystemExit(
                    f"bench/loader.py: cannot clone {PEER_URL} ({done.stderr.strip()[-200:]}).\n"
                    "Pass the peer's source with --peer-src PATH: a SAM-Med2D checkout, or a git "
                    "repository of it (bare works), holding DataLoader.py and utils.py."
                )
        peer_src = str(clone)
    src = Path(peer_src)
    if all((src / name).is_file() for name in PEER_FILES):
        for name in PEER_FILES:
            shutil.copy(src / name, dest / name)
        return f"{src} (commit {_commit(src)})"
    try:
        for name in PEER_FILES:
            (dest / name).write_text(_git(src, "show", f"HEAD:{name}"))
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        detail = getattr(err, "stderr", "") or err
        raise SystemExit(
            f"bench/loader.py: --peer-src {src} holds neither {' and '.join(PEER_FILES)} nor a git "
            f"repository with them at HEAD ({str(detail).strip()[-200:]})"
        ) from None
    return f"{src} (commit {_commit(src)})"


def import_peer(folder: Path) -> type:
    """Import the peer's ``TrainingDataset`` from ``folder`` (it imports ``utils`` by that name)."""
    for name in ("DataLoader", "utils"):
        if name in sys.modules:
            raise SystemExit(f"bench/loader.py: a module {name!r} is already imported")
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("DataLoader")
    except ImportError as err:
        raise SystemExit(
            f"bench/loader.py: the peer's code needs {err.name!r}: install the bench extra "
            "(pip install -e '.[bench]')"
        ) from None
    finally:
        sys.path.remove(str(folder))
    for name in ("DataLoader", "utils"):
        where = Path(sys.modules[name].__file__).resolve().parent
        if where != folder.resolve():
            raise SystemExit(f"bench/loader.py: {name} was imported from {where}, not {folder}")
    return module.TrainingDataset


def peer_data_dir(corpus: Path) -> Path:
    """A folder with the corpus' ``image2label_train.json`` in absolute paths (the peer opens the
    paths as given, relative to the working directory)."""
    out = CACHE / f"{corpus.name}-peer"
    out.mkdir(parents=True, exist_ok=True)
    mapping = {str(img): [str(m) for m in masks] for img, masks in corpus_items(corpus)}
    (out / "image2label_train.json").write_text(json.dumps(mapping, indent=1))
    return out


def peer_stream(dataset_cls: type, data_dir: Path) -> Iterator[dict]:
    """Endless peer batches, as SAM-Med2D's train.py makes them (shuffled, batch_size=2)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dataset = dataset_cls(str(data_dir), image_size=IMAGE_SIZE, mode="train", mask_num=MASK_NUM)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0)
    while True:
        yield from loader


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------


def loop_manifest(shards: Path, *, seconds: float) -> Path:
    """A manifest listing the train shards of ``shards`` enough times for a timed window."""
    from sharding.manifest import load_manifest

    manifest = dict(load_manifest(shards).document)
    train = [dict(e) for e in manifest["shards"] if e["split"] == "train"]
    samples = sum(e["samples"] for e in train)
    repeats = max(2, math.ceil(_MAX_RATE * (seconds + 10) / samples))
    for entry in train:
        entry["path"] = str((shards / entry["path"]).resolve())
    manifest["shards"] = train * repeats
    out = shards.with_name(shards.name + "-loop")
    out.mkdir(exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def ours_stream(loop: Path, workers: int) -> tuple[Iterator[dict], list[int]]:
    """Our train loader's batches and its worker pids."""
    from pipeline.config import DataConfig
    from pipeline.data.stream import build_train_loader

    cfg = DataConfig(
        shards=str(loop),
        mask_num=MASK_NUM,
        batch_size=BATCH,
        num_workers=workers,
        seed=0,
    )
    it = iter(build_train_loader(cfg=cfg, image_size=IMAGE_SIZE, rank=0, world_size=1))
    pids = [w.pid for w in getattr(it, "_workers", [])]
    return it, pids


def _members(shards: Path, limit: int) -> list[dict]:
    """Raw samples (members as bytes) of the first train shard(s), as the stream reads them."""
    from sharding.manifest import load_manifest
    from sharding.tar_reader import read_shard

    samples = (raw for s in load_manifest(shards).split("train") for raw in read_shard(s.url))
    return list(itertools.islice(samples, limit))


def decode_stream(raw: list[dict]) -> Iterator[int]:
    """Our member decode alone (Blosc image + packed masks + JSON), from memory."""
    from pipeline.data.samples import decode

    for sample in itertools.cycle(raw):
        decode(sample, image_size=IMAGE_SIZE)
        yield 1


def blosc_floor_stream(raw: list[dict]) -> Iterator[int]:
    """Blosc-zstd (bit shuffle, level 5, as the Zarr volumes) decode of a 256 px uint8 image
    chunk + a uint8 label-map chunk per sample."""
    import numpy as np
    from numcodecs import Blosc

    from pipeline.data.samples import decode

    codec = Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE)
    chunks = []
    for sample in raw:
        d = decode(sample, image_size=IMAGE_SIZE)
        label = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        for i, mask in enumerate(d["masks"]):
            label[mask > 0] = i + 1
        chunks.append((codec.encode(np.ascontiguousarray(d["image"][0])), codec.encode(label)))
    shape = (IMAGE_SIZE, IMAGE_SIZE)
    for image, label in itertools.cycle(chunks):
        np.frombuffer(codec.decode(image), np.uint8).reshape(shape)
        np.frombuffer(codec.decode(label), np.uint8).reshape(shape)
        yield 1


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def shm_left(pids: set[int], wait: float = 10.0) -> list[str]:
    """Shared-memory files that processes ``pids`` created and nobody removed (``file_system``
    sharing names them ``/dev/shm/torch_<pid>_...``; torch's shm manager removes them shortly
    after the last user is gone, so wait up to ``wait`` seconds)."""
    import time

    shm = Path("/dev/shm")
    if not shm.is_dir():
        return []
    prefixes = tuple(f"torch_{pid}_" for pid in pids)
    deadline = time.monotonic() + wait
    while True:
        left = sorted(f.name for f in shm.iterdir() if f.name.startswith(prefixes))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _count_batch(batch: dict) -> int:
    return int(batch["image"].shape[0])


def _describe(name: str, batch: dict) -> None:
    shapes = {
        k: f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        for k, v in batch.items()
        if hasattr(v, "shape")
    }
    log.info("%s batch: %s", name, ", ".join(f"{k} {v}" for k, v in shapes.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-src", default=None, help="SAM-Med2D checkout or git repository")
    parser.add_argument("--cases", type=int, default=100, help="cases in the corpus (100)")
    parser.add_argument("--slices", type=int, default=4, help="images per case (4)")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed window (6 s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (3)")
    parser.add_argument("--warmup", type=int, default=10, help="batches before the clock (10)")
    parser.add_argument("--workers", default="1,2", help="DataLoader workers to try (1,2)")
    parser.add_argument(
        "--sharing",
        choices=("file_descriptor", "file_system"),
        default=None,
        help="torch.multiprocessing sharing strategy for worker -> main tensors (default: torch's)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    setup_logging()
    pin_threads()
    import torch.multiprocessing

    if args.sharing:
        torch.multiprocessing.set_sharing_strategy(args.sharing)

    with tempfile.TemporaryDirectory(prefix="sam-med2d-src-") as tmp:
        origin = peer_source(args.peer_src, Path(tmp))  # first: fail before the slow set-up
        peer_cls = import_peer(Path(tmp))
    corpus = ensure_corpus(cases=args.cases, slices=args.slices)
    from sharding.format import FORMAT_VERSION

    # keyed on the shard format, so shards of an older format are never read (bench/train.py too)
    shards = shard_with_cli(
        corpus,
        CACHE / f"{corpus.name}-shards{IMAGE_SIZE}-v{FORMAT_VERSION}",
        [f"image_size={IMAGE_SIZE}", "inputs_per_shard=25", "val_fraction=0", "test_fraction=0"],
    )
    loop = loop_manifest(shards, seconds=args.seconds)
    log.info("peer: SAM-Med2D TrainingDataset from %s", origin)
    peer_dir = peer_data_dir(corpus)
    raw = _members(shards, 200)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]

    import torch

    log.info("corpus: %s (%d images, 512 px, 2-5 masks each)", corpus, len(corpus_items(corpus)))
    log.info("torch threads: %d; batch size %d; %d masks per image; worker tensors shared by %s",
             torch.get_num_threads(), BATCH, MASK_NUM,
             torch.multiprocessing.get_sharing_strategy())  # fmt: skip
    log.info("cores: %d; load average at start %.2f %.2f %.2f", os.cpu_count() or 0,
             *os.getloadavg())  # fmt: skip
    _describe("peer", next(peer_stream(peer_cls, peer_dir)))
    it, _ = ours_stream(loop, 0)
    _describe("ours", next(it))
    del it

    series = {
        "peer (SAM-Med2D TrainingDataset), 0 workers": "peer",
        "ours (build_train_loader), 0 workers": 0,
        **{f"ours, {w} worker{'s' if w > 1 else ''}": w for w in workers},
        "ours: member decode only (no prompts/collate)": "decode",
        "floor: Blosc-zstd decode, 256 px image + label": "floor",
    }
    results = {name: Series(name) for name in series}
    all_pids = {os.getpid()}
    window = {"seconds": args.seconds}
    for r in range(args.repeats):
        for name, what in series.items():
            if what == "peer":
                run = timed_window(
                    peer_stream(peer_cls, peer_dir), count=_count_batch, warmup=2, **window
                )
            elif isinstance(what, int):
                it, pids = ours_stream(loop, what)
                all_pids.update(pids)
                run = timed_window(
                    it, count=_count_batch, warmup=args.warmup, pids=lambda p=pids: p, **window
                )
                del it
            elif what == "decode":
                run = timed_window(decode_stream(raw), count=int, warmup=50, **window)
            else:
                run = timed_window(blosc_floor_stream(raw), count=int, warmup=50, **window)
            results[name].runs.append(run)
            log.info("[%d/%d] %-48s %8.1f samples/s  %8.1f samples/cpu-s", r + 1, args.repeats,
                     name, run.rate, run.cpu_rate)  # fmt: skip

    rows = list(results.values())
    log.info("")
    log_table(rows, "samples")
    log.info("load average at end %.2f %.2f %.2f", *os.getloadavg())
    left = shm_left(all_pids)
    log.info("shared-memory files left in /dev/shm by this run and its workers: %d%s", len(left),
             f" ({', '.join(left[:5])} ...)" if left else "")  # fmt: skip
    peer, ours0 = rows[0], rows[1]
    log.info("")
    log.info("ours / peer, one core:      %6.1fx wall   %6.1fx per cpu-s   (target >= 20x)",
             ours0.rate / peer.rate, ours0.cpu_rate / peer.cpu_rate)  # fmt: skip
    by_workers = {w: results[name] for name, w in series.items() if isinstance(w, int)}
    if 1 in by_workers:
        one = by_workers[1]
        for w, s in by_workers.items():
            if w > 1:
                log.info("%d workers / 1 worker:       %6.2fx wall   %6.2fx per cpu-s   "
                         "(near-linear: ~%dx wall on %d free cores)",
                         w, s.rate / one.rate, s.cpu_rate / one.cpu_rate, w, w)  # fmt: skip
    floor = rows[-1]
    log.info("ours(0 workers) / Blosc floor: %5.1f%% per cpu-s", 100 * ours0.cpu_rate /
             floor.cpu_rate)  # fmt: skip
    write_json(
        args.json,
        {
            "peer_source": origin,
            "corpus": str(corpus),
            "seconds": args.seconds,
            "repeats": args.repeats,
            "sharing": torch.multiprocessing.get_sharing_strategy(),
            "shm_files_left": left,
            "results": {
                s.name: {
                    "samples_per_s": s.rate,
                    "samples_per_cpu_s": s.cpu_rate,
                    "runs": [vars(run) for run in s.runs],
                }
                for s in rows
            },
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
