"""The streaming reader on real tar shards (tests/shardkit.py) and real DataLoader workers."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from shardkit import write_shards  # noqa: E402

from configtree import ConfigError  # noqa: E402
from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.collate import label_map  # noqa: E402
from pipeline.data.prompts import component_boxes, tight_boxes  # noqa: E402
from pipeline.data.samples import SampleError, decode  # noqa: E402
from pipeline.data.stream import (  # noqa: E402
    build_eval_loader,
    build_train_loader,
    read_manifest,
    steps_per_epoch,
)

S = 32
TRAIN = [5, 5, 3, 4, 6, 2, 7]  # 32 samples in 7 shards: uneven over 2 ranks x 2 workers
VAL = [4, 3, 5]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    written = write_shards(out, splits={"train": TRAIN, "val": VAL}, image_size=S, empty_every=5)
    return out, {w.key: w for w in written}


def _cfg(out: Path, **kw) -> DataConfig:
    base = dict(
        shards=str(out),
        batch_size=3,
        num_workers=2,
        shuffle_buffer=6,
        mask_num=3,
        point_num=2,
        seed=7,
    )
    base.update(kw)
    return DataConfig(**base)


def train_loader(*, cfg: DataConfig, **kw):
    """The train loader at the shards' image size S (``model.image_size`` in a run)."""
    return build_train_loader(cfg=cfg, image_size=S, **kw)


def eval_loader(*, cfg: DataConfig, **kw):
    """The eval loader at the shards' image size S."""
    return build_eval_loader(cfg=cfg, image_size=S, **kw)


def _keys(batches, padding: bool | None = None) -> list[str]:
    return [
        k
        for b in batches
        for k, m in zip(b["keys"], b["meta"], strict=True)
        if padding is None or m["padding"] == padding
    ]


def _split_keys(written, split: str, with_masks: bool | None = None) -> list[str]:
    return [
        k
        for k, w in written.items()
        if w.split == split and (with_masks is None or (w.masks.shape[0] > 0) == with_masks)
    ]


def test_decode_round_trip_pixel_exact(shards):
    out, written = shards
    cfg = _cfg(out, num_workers=0, batch_size=4)
    seen = 0
    for batch in eval_loader(cfg=cfg, rank=0, world_size=1, split="train"):
        for i, key in enumerate(batch["keys"]):
            w = written[key]
            image = w.image if w.image.ndim == 3 else np.repeat(w.image[..., None], 3, axis=2)
            np.testing.assert_array_equal(batch["image"][i].numpy().transpose(1, 2, 0), image)
            n = w.masks.shape[0]
            assert batch["mask_valid"][i].sum().item() == n
            assert not batch["mask_valid"][i, n:].any()
            np.testing.assert_array_equal(batch["masks"][i, :n].numpy(), w.masks)
            assert batch["class_ids"][i, :n].tolist() == w.class_ids
            assert batch["meta"][i]["case_id"] in key and batch["meta"][i]["url"] == w.shard
            seen += 1
    assert seen == sum(TRAIN)


def test_semantic_label_map(shards):
    out, written = shards
    cfg = _cfg(out, num_workers=0, batch_size=5)
    n_seen = 0
    for batch in eval_loader(cfg=cfg, rank=0, world_size=1, split="val", mode="semantic"):
        assert batch["label"].dtype == torch.int64 and batch["label"].shape[1:] == (S, S)
        for i, key in enumerate(batch["keys"]):
            w = written[key]
            expect = np.zeros((S, S), np.int64)
            for mask, cid in zip(
                w.masks, w.class_ids, strict=True
            ):  # later masks overwrite earlier ones
                expect[mask > 0] = cid
            np.testing.assert_array_equal(batch["label"][i].numpy(), expect)
            n_seen += 1
    assert n_seen == sum(VAL)
    empty = label_map(np.zeros((0, 4, 4), np.uint8), np.zeros(0, np.int64))
    assert empty.shape == (4, 4) and not empty.any()


def test_eval_every_sample_once_two_ranks_two_workers(shards):
    out, written = shards
    cfg = _cfg(out)
    per_rank = [
        list(eval_loader(cfg=cfg, rank=r, world_size=2, split="train")) for r in range(2)
    ]
    keys = _keys(per_rank[0]) + _keys(per_rank[1])
    assert Counter(keys) == Counter(_split_keys(written, "train"))
    assert set(_keys(per_rank[0])).isdisjoint(_keys(per_rank[1]))
    # the same order every time (no shuffling), partial batches allowed
    again = list(eval_loader(cfg=cfg, rank=0, world_size=2, split="train"))
    assert _keys(again) == _keys(per_rank[0])
    assert any(len(b["keys"]) < cfg.batch_size for b in per_rank[0] + per_rank[1])

    # eval prompts depend on (seed, key) only, not on how samples are dealt to ranks and workers
    def points(batches):
        return {
            k: b["point_coords"][i][b["mask_valid"][i]]
            for b in batches
            for i, k in enumerate(b["keys"])
        }

    single = points(
        eval_loader(cfg=_cfg(out, num_workers=0), rank=0, world_size=1, split="train")
    )
    double = points(per_rank[0] + per_rank[1])
    assert all(torch.equal(single[k], double[k]) for k in single)


def test_train_exactly_once_per_epoch(shards):
    out, written = shards
    cfg = _cfg(out)
    for epoch in (0, 1):
        batches = [
            list(train_loader(cfg=cfg, rank=r, world_size=2, epoch=epoch, equalize=False))
            for r in range(2)
        ]
        keys = _keys(batches[0]) + _keys(batches[1])
        # interactive training skips (and counts) the images without masks
        assert Counter(keys) == Counter(_split_keys(written, "train", with_masks=True))
        skipped = sum(b["skipped_empty"] for r in batches for b in r)
        assert skipped == len(_split_keys(written, "train", with_masks=False)) > 0


def test_train_equal_batches_per_rank(shards):
    out, written = shards
    cfg = _cfg(out)
    batches = []
    for rank in range(2):
        loader = train_loader(cfg=cfg, rank=rank, world_size=2, epoch=3)
        expected = steps_per_epoch(cfg=cfg, image_size=S, world_size=2, epoch=3)
        assert loader.steps_per_epoch == expected
        got = list(loader)
        assert len(got) == loader.steps_per_epoch
        assert all(len(b["keys"]) == cfg.batch_size for b in got)
        batches.append(got)
    # the non-padding samples are the epoch: every image with masks exactly once
    own = _keys(batches[0], padding=False) + _keys(batches[1], padding=False)
    assert Counter(own) == Counter(_split_keys(written, "train", with_masks=True))
    assert len(_keys(batches[0], padding=True)) + len(_keys(batches[1], padding=True)) > 0

    resampled = [
        list(train_loader(cfg=cfg, rank=r, world_size=2, resampled=True)) for r in range(2)
    ]
    n = steps_per_epoch(cfg=cfg, image_size=S, world_size=2, resampled=True)
    assert n == -(-sum(TRAIN) // (cfg.batch_size * 2))
    assert [len(r) for r in resampled] == [n, n]
    assert all(len(b["keys"]) == cfg.batch_size for r in resampled for b in r)
    assert set(_keys(resampled[0]) + _keys(resampled[1])) <= set(written)


def _fingerprint(batches) -> list:
    return [
        (
            b["keys"],
            b["masks"].sum().item(),
            b["boxes"].sum().item(),
            b["point_coords"].sum().item(),
            b["image"].sum().item(),
        )
        for b in batches
    ]


def test_deterministic_batches(shards):
    out, _ = shards
    cfg = _cfg(out)
    first = list(train_loader(cfg=cfg, rank=1, world_size=2, epoch=0))
    second = list(train_loader(cfg=cfg, rank=1, world_size=2, epoch=0))
    assert _fingerprint(first) == _fingerprint(second)
    for a, b in zip(first, second, strict=True):
        for name in ("image", "masks", "boxes", "point_coords", "point_labels", "class_ids"):
            assert torch.equal(a[name], b[name])
    loader = train_loader(cfg=cfg, rank=1, world_size=2, epoch=0)
    loader.dataset.set_epoch(1)
    other = list(loader)
    assert _keys(other) != _keys(first)
    reseeded = list(train_loader(cfg=_cfg(out, seed=8), rank=1, world_size=2, epoch=0))
    assert _fingerprint(reseeded) != _fingerprint(first)


def test_prompts_in_batches_match_masks(shards):
    out, _ = shards
    cfg = _cfg(out, box_jitter=0, num_workers=0)
    for batch in train_loader(cfg=cfg, rank=0, world_size=1):
        masks = batch["masks"].numpy()
        b, m = masks.shape[:2]
        assert batch["boxes"].shape == (b, m, 4) and batch["point_labels"].shape == (b, m, 2)
        for i in range(b):
            # SAM-Med2D's box: its largest component's (test_data_prompts checks that rule)
            assert batch["boxes"][i].tolist() == component_boxes(masks[i]).tolist()
            for j in range(m):
                ys, xs = np.nonzero(masks[i, j])
                x0, y0, x1, y1 = batch["boxes"][i, j].tolist()
                assert xs.min() <= x0 < x1 <= xs.max() + 1 and ys.min() <= y0 < y1 <= ys.max() + 1
                for x, y in batch["point_coords"][i, j].long().tolist():
                    assert masks[i, j, y, x] == 1
        assert (batch["point_labels"] == 1).all()
    # data.box_from=whole_mask: the box of every pixel of the mask, on the same draws
    whole = _cfg(out, box_jitter=0, num_workers=0, box_from="whole_mask")
    differ = 0
    for a, b in zip(train_loader(cfg=cfg, rank=0, world_size=1),
                    train_loader(cfg=whole, rank=0, world_size=1), strict=True):  # fmt: skip
        assert torch.equal(a["masks"], b["masks"])
        for i, masks in enumerate(b["masks"].numpy()):
            assert b["boxes"][i].tolist() == tight_boxes(masks)[0].tolist()
        differ += int((a["boxes"] != b["boxes"]).any(dim=-1).sum())
    assert differ > 0
    # validation boxes follow the same rule (data.box_from), never jittered
    for batch in eval_loader(cfg=_cfg(out, num_workers=0), rank=0, world_size=1):
        for i, masks in enumerate(batch["masks"].numpy()):
            valid = batch["mask_valid"][i].numpy()
            expected = component_boxes(masks[valid]).tolist()
            assert batch["boxes"][i][valid].tolist() == expected


def _copy(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def _set_bytes(root: Path, shard: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if (root / entry["path"]) == shard:
            entry["bytes"] = shard.stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_truncated_shard_names_its_path(shards, tmp_path):
    out, _ = shards
    root = _copy(out, tmp_path)
    shard = root / "train" / "shard-000004.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    cfg = _cfg(root)
    with pytest.raises(SampleError, match=str(shard)):
        train_loader(cfg=cfg, rank=0, world_size=1)
    # with the size check passed, the read itself fails and names the shard (from a worker)
    _set_bytes(root, shard)
    for world in (1, 2):
        with pytest.raises(Exception, match=str(shard)):
            for rank in range(world):
                list(eval_loader(cfg=cfg, rank=rank, world_size=world, split="train"))


def test_shard_cut_at_member_boundary_is_detected(shards, tmp_path):
    out, _ = shards
    root = _copy(out, tmp_path)
    shard = root / "val" / "shard-000009.tar"
    import tarfile

    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # keep the first sample (3 members) and nothing else: a valid-looking, shorter tar
    cut = members[3].offset
    shard.write_bytes(shard.read_bytes()[:cut])
    _set_bytes(root, shard)
    with pytest.raises(Exception, match=f"{shard}.*manifest says 5"):
        list(eval_loader(cfg=_cfg(root, num_workers=0), rank=0, world_size=1))


def test_same_size_damage_fails_the_checksum(shards, tmp_path):
    """A flipped byte inside an image member keeps the size and still decodes (to wrong pixels):
    the sha256 taken while streaming names the shard; data.verify_checksums=false reads it."""
    import tarfile

    out, _ = shards
    root = _copy(out, tmp_path)
    shard = root / "val" / "shard-000009.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".img"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    for workers in (0, 2):
        cfg = _cfg(root, num_workers=workers)
        with pytest.raises(Exception, match=f"shard {shard}: sha256 .* manifest"):
            list(eval_loader(cfg=cfg, rank=0, world_size=1))
    unchecked = _cfg(root, num_workers=0, verify_checksums=False)
    batches = list(eval_loader(cfg=unchecked, rank=0, world_size=1))
    assert sum(len(b["keys"]) for b in batches) == sum(
        s.samples for s in read_manifest(str(root), split="val", image_size=S)
    )


def test_image_size_mismatch_names_the_key(shards):
    out, _ = shards
    with pytest.raises(ConfigError, match=r"model\.image_size=64 .*image_size=32.*manifest\.json"):
        build_train_loader(cfg=_cfg(out), image_size=64, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="data.shards"):
        read_manifest(str(out / "nowhere"), split="train", image_size=S)
    with pytest.raises(SampleError, match="no shards for split 'test'"):
        eval_loader(cfg=_cfg(out), rank=0, world_size=1, split="test")


def test_trainer_preflight_checks_the_input_size(shards, tmp_path):
    """model.image_size is the one input size: `samadapt train` stops on it before any rank."""
    from pipeline.config import PipelineConfig
    from pipeline.model.config import ModelConfig
    from pipeline.trainer import check_config

    out, _ = shards

    def run(size: int) -> PipelineConfig:
        return PipelineConfig(
            run_dir=str(tmp_path / "run"), data=_cfg(out), model=ModelConfig(image_size=size)
        )

    with pytest.raises(ConfigError) as err:
        check_config(run(64))
    message = str(err.value)
    stored = f"does not match image_size=32 of the shards in {out} "
    assert message.startswith(f"model.image_size=64 {stored}")
    assert "set model.image_size=32" in message and "\n" not in message
    check_config(run(S))


def test_split_without_masks_fails_instead_of_spinning(tmp_path):
    root = tmp_path / "empty"
    write_shards(root, splits={"train": [3, 2]}, image_size=S, empty_every=1)
    cfg = _cfg(root, num_workers=0)
    with pytest.raises(SampleError, match="samples in a row without masks"):
        list(train_loader(cfg=cfg, rank=0, world_size=1, resampled=True))
    # semantic training keeps them; the exactly-once pass just yields nothing in interactive mode
    sem = list(train_loader(cfg=cfg, rank=0, world_size=1, mode="semantic"))
    assert len(_keys(sem, padding=False)) == 5 and all(not b["label"].any() for b in sem)
    assert list(train_loader(cfg=cfg, rank=0, world_size=1, equalize=False)) == []


def test_masks_drawn_with_replacement_from_the_sample(shards):
    out, written = shards
    cfg = _cfg(out, mask_num=6)  # more than any sample has: repeats are required
    picked: Counter = Counter()
    for batch in train_loader(cfg=cfg, rank=0, world_size=1, equalize=False):
        assert batch["masks"].shape[1] == 6 and batch["mask_valid"].all()
        for i, key in enumerate(batch["keys"]):
            w = written[key]
            flat = w.masks.reshape(len(w.masks), -1)
            for j in range(6):
                got = batch["masks"][i, j].numpy().reshape(-1)
                (index,) = np.flatnonzero((flat == got).all(axis=1))[:1]
                assert batch["class_ids"][i, j].item() == w.class_ids[index]
                picked[index] += 1
    # uniform over the sample's masks: later masks are picked too, not only the first
    assert len(picked) == 4 and min(picked.values()) > 0


def test_worker_batches_keep_the_layout_in_one_shared_buffer(shards):
    out, _ = shards
    cfg = _cfg(out, num_workers=2)  # batch 3, mask_num 3, point_num 2
    expected = {
        "image": (torch.uint8, (3, 3, S, S)),
        "masks": (torch.uint8, (3, 3, S, S)),
        "boxes": (torch.float32, (3, 3, 4)),
        "point_coords": (torch.float32, (3, 3, 2, 2)),
        "point_labels": (torch.int64, (3, 3, 2)),
        "class_ids": (torch.int64, (3, 3)),
        "mask_valid": (torch.bool, (3, 3)),
    }
    batches = list(train_loader(cfg=cfg, rank=0, world_size=1))
    assert batches
    for batch in batches:
        for name, (dtype, shape) in expected.items():
            t = batch[name]
            assert t.dtype == dtype and tuple(t.shape) == shape and t.is_contiguous(), name
        # made in shared memory by the worker: one segment per batch, none copied at send time
        assert len({batch[k].untyped_storage().data_ptr() for k in expected}) == 1
        assert batch["image"].untyped_storage().is_shared()
        assert batch["mask_valid"].all() and len(batch["keys"]) == len(batch["meta"]) == 3


def test_format_version_1_shards_are_refused(shards, tmp_path):
    out, _ = shards
    root = _copy(out, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SampleError, match=rf"{root / 'manifest.json'}: format_version 1.*reshard"):
        train_loader(cfg=_cfg(root), rank=0, world_size=1)
    # a version-1 sample (PNG image member) inside a current shard set: named, not misread
    sample = {
        "__key__": "toy/case0001/z00001",
        "__url__": "/x/shard-000000.tar",
        "png": b"\x89PNG\r\n\x1a\n",
        "mpk": b"",
        "json": b"{}",
    }
    with pytest.raises(
        SampleError, match=r"shard-000000\.tar: sample toy/case0001/z00001: a \.png"
    ):
        decode(sample, image_size=S)
