"""Batch composition of the training stream against a uniform shuffle, determinism and exact
resume with several open shards per worker (sharding/plan.py order, pipeline/data/stream.py)."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from shardkit import write_shards  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.mixing import (  # noqa: E402
    distinct_cases,
    same_case_pairs,
    uniform_distinct_cases,
    uniform_same_case_pairs,
)
from pipeline.data.samples import SampleError  # noqa: E402
from pipeline.data.stream import build_train_loader  # noqa: E402
from samadapt.config import load_config  # noqa: E402
from sharding.run import run_shard  # noqa: E402
from sharding.synthetic import write_sa_med2d  # noqa: E402

S = 32
CASES, SLICES = 30, 6
EPOCHS = 4
FIRST = 5  # batches whose distinct cases are counted


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> Path:
    """30 cases x 6 slices through `samadapt shard`, 30 inputs (5 cases' worth) per shard."""
    root = tmp_path_factory.mktemp("mix")
    corpus = write_sa_med2d(root / "corpus", n_cases=CASES, slices_per_case=SLICES, size=S, seed=4)
    cfg = load_config(
        None, [f"sharding.image_size={S}", "sharding.inputs_per_shard=30", "sharding.workers=1"]
    ).sharding
    run_shard("sa-med2d", corpus, root / "shards", cfg=cfg, workers=1)
    return root / "shards"


def _cfg(out: Path, **kw) -> DataConfig:
    base = dict(
        shards=str(out),
        batch_size=4,
        num_workers=0,
        shuffle_buffer=6,  # 1/5 of a shard, as 500 samples are of a ~25k-sample 1000 MB shard
        mask_num=1,
        seed=3,
    )
    base.update(kw)
    return DataConfig(**base)


def _batch_cases(batches: list[dict]) -> list[list[str]]:
    """The cases of each full batch (a worker's last, partial batch is left out)."""
    size = max(len(b["keys"]) for b in batches)
    return [
        [f"{m['dataset']}/{m['case_id']}" for m in b["meta"]]
        for b in batches
        if len(b["keys"]) == size
    ]


def _train_loader(cfg: DataConfig, size: int = S, **kw):
    """The train loader at the shards' image size (``model.image_size`` in a run)."""
    return build_train_loader(cfg=cfg, image_size=size, **kw)


def _composition(cfg: DataConfig, size: int = S) -> tuple[float, float, float, float]:
    """(same-case pairs per batch, distinct cases in the first batches) of the stream over
    ``EPOCHS`` epochs, and their uniform-shuffle expectations."""
    pairs, distinct, sizes = [], [], Counter()
    for epoch in range(EPOCHS):
        loader = _train_loader(cfg, size, rank=0, world_size=1, epoch=epoch, equalize=False)
        cases = _batch_cases(list(loader))
        pairs.append(same_case_pairs(cases))
        distinct.append(distinct_cases(cases, FIRST))
        if epoch == 0:
            sizes = Counter(c for batch in cases for c in batch)
    n = list(sizes.values())
    return (
        sum(pairs) / EPOCHS,
        sum(distinct) / EPOCHS,
        uniform_same_case_pairs(n, cfg.batch_size),
        uniform_distinct_cases(n, FIRST * cfg.batch_size),
    )


def test_batches_mix_cases_like_a_uniform_shuffle(real_shards):
    """Measured: 0.15 same-case pairs per batch of 4 (uniform 0.19), 15.8 cases in the first 5
    batches (uniform 14.7). Shards cut from the sorted corpus (main before the seeded order) held
    5 whole cases each: 2.04 pairs (10.5x uniform) and 4 cases with one shard open at a time,
    1.06 pairs (5.5x) with 4 open."""
    plan = json.loads((real_shards / "plan.json").read_text())
    train = [s for s in plan["shards"] if s["split"] == "train"]
    assert len(train) >= 4 and all(s["count"] == 30 for s in train[:-1])
    pairs, distinct, uniform_pairs, uniform_distinct = _composition(_cfg(real_shards))
    assert uniform_pairs > 0.1 and uniform_distinct > 10
    assert pairs <= 1.5 * uniform_pairs, (pairs, uniform_pairs)
    assert distinct >= uniform_distinct / 1.5, (distinct, uniform_distinct)


def test_open_shards_mix_shards_written_case_by_case(tmp_path):
    """Shards that each hold whole cases (as a sharder writing cases in sorted order, or the
    slices of 3D cases, give): reading 4 at once, one sample of each in turn, puts far fewer
    slices of one case in a batch than reading them one after another (measured: 3.7 -> 0.6
    same-case pairs per batch of 4, uniform 0.08)."""
    write_shards(tmp_path, splits={"train": [30] * 12}, image_size=16, slices_per_case=6)
    one = _composition(_cfg(tmp_path, open_shards=1, shuffle_buffer=2), size=16)
    four = _composition(_cfg(tmp_path, open_shards=4, shuffle_buffer=2), size=16)
    assert four[0] < 0.25 * one[0], (four, one)


def _fingerprint(batches: list[dict]) -> list:
    return [
        (
            b["keys"],
            [m["padding"] for m in b["meta"]],
            b["image"].sum().item(),
            b["boxes"].sum().item(),
        )
        for b in batches
    ]


def test_same_stream_twice_and_exact_resume_mid_epoch(real_shards):
    """Several open shards per worker keep the stream a function of (seed, epoch, rank, worker):
    a rerun yields the same batches, and a loader that skips the first k batches (what the
    trainer does on resume: data position = epoch + batches taken) continues exactly."""
    cfg = _cfg(real_shards, num_workers=2, open_shards=3, batch_size=3)
    for epoch in (0, 1):
        full = list(_train_loader(cfg, rank=1, world_size=2, epoch=epoch))
        again = list(_train_loader(cfg, rank=1, world_size=2, epoch=epoch))
        assert _fingerprint(again) == _fingerprint(full)
        for a, b in zip(full, again, strict=True):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
        for k in (1, len(full) // 2):
            it = iter(_train_loader(cfg, rank=1, world_size=2, epoch=epoch))
            for _ in range(k):
                next(it)
            assert _fingerprint(list(it)) == _fingerprint(full[k:])
    other = list(_train_loader(cfg, rank=1, world_size=2, epoch=2))
    assert _fingerprint(other) != _fingerprint(full)


def test_interleaved_shards_are_still_checked(real_shards, tmp_path):
    """A shard read among others still fails its sha256 check at its end, naming it (here a
    byte of the tar's end padding: every sample still reads and decodes)."""
    root = tmp_path / "copy"
    shutil.copytree(real_shards, root)
    manifest = json.loads((root / "manifest.json").read_text())
    shard = root / next(s["path"] for s in manifest["shards"] if s["split"] == "train")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SampleError, match=f"shard {shard}: sha256"):
        list(_train_loader(_cfg(root, open_shards=4), rank=0, world_size=1))
