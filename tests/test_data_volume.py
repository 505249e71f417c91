"""The 3D adjacent-slice reader on real Zarr v3 stores written by the shard writer."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import zarr

from pipeline.config import DataConfig
from pipeline.data.samples import SampleError
from pipeline.data.volume import VolumeSliceDataset, build_volume_loader
from sharding.config import ShardingConfig
from sharding.format import FORMAT_VERSION
from sharding.intensity import percentile_bounds
from sharding.manifest import FORMAT_NAME
from sharding.records import Volume
from sharding.volumes import finalize_volumes, store_path, write_case

S = 32
CFG = ShardingConfig()  # CT window [40, 400] (-160..240 HU), MR percentiles [0.5, 99.5]


def _write_case(out, case_id, image, label, *, split, modality, dataset="toy") -> None:
    volume = Volume(
        image=image.astype(np.float32),
        label=label,
        spacing=(2.0, 1.0, 1.0),
        affine=np.eye(4),
        class_map={1: "liver", 2: "tumour"},
        dataset=dataset,
        case_id=case_id,
        modality=modality,
    )
    write_case(out, volume, split=split, cfg=CFG)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("vol")
    rng = np.random.default_rng(0)
    cases = {}
    # CT in HU (integers: stored as int16) with the window
    ct = rng.integers(-1000, 1500, size=(7, S, S)).astype(np.int16)
    ct_label = np.zeros((7, S, S), np.uint8)
    ct_label[2:5, 8:20, 10:22] = 1
    ct_label[3, 0:4, 0:4] = 2
    _write_case(out, "ct01", ct, ct_label, split="train", modality="ct")
    cases["ct01"] = (ct, ct_label, (-160.0, 240.0))
    # MR float32 at another size (resized on read), bounds from the writer's percentiles
    mr = rng.normal(300, 80, size=(4, 40, 40)).astype(np.float32)
    mr_label = np.zeros((4, 40, 40), np.int16)
    mr_label[1, 10:30, 10:30] = 2
    _write_case(out, "mr01", mr, mr_label, split="train", modality="mr")
    cases["mr01"] = (mr, mr_label, tuple(np.percentile(mr, [0.5, 99.5]).tolist()))
    # unlabelled, val split
    us = rng.integers(0, 256, size=(3, S, S), dtype=np.uint8)
    _write_case(out, "us01", us, None, split="val", modality="us")
    cases["us01"] = (us, None, percentile_bounds(us, (0.5, 99.5)))
    # non-square MR (test split)
    mr2 = rng.normal(0, 1, size=(2, 20, 40)).astype(np.float32)
    mr2_label = (mr2 > 1).astype(np.uint8)
    _write_case(out, "mr02", mr2, mr2_label, split="test", modality="mr")
    cases["mr02"] = (mr2, mr2_label, percentile_bounds(mr2, (0.5, 99.5)))
    finalize_volumes(out)
    return store_path(out, "toy"), cases


def _uint8(raw: np.ndarray, bounds) -> np.ndarray:
    """An independent statement of the documented rule."""
    if bounds is None:
        return raw
    lo, hi = bounds
    v = (np.clip(raw.astype(np.float64), lo, hi) - lo) * 255.0 / (hi - lo)
    return np.floor(v + 0.5).astype(np.uint8)


def _expected(case, z: int, d: int, letterbox: bool = False):
    raw, label, bounds = case
    zs = np.clip(np.arange(z - d // 2, z + d // 2 + 1), 0, raw.shape[0] - 1)
    image = _uint8(raw[zs], bounds)
    lab = label[zs].astype(np.int64) if label is not None else np.zeros_like(image, np.int64)
    h, w = raw.shape[1:]
    if (h, w) != (S, S):
        nh, nw = (round(h * S / max(h, w)), round(w * S / max(h, w))) if letterbox else (S, S)
        interp = cv2.INTER_AREA if S < max(h, w) else cv2.INTER_LINEAR
        image = np.stack([cv2.resize(i, (nw, nh), interpolation=interp) for i in image])
        near = cv2.INTER_NEAREST
        lab = np.stack([cv2.resize(x.astype(np.int32), (nw, nh), interpolation=near) for x in lab])
        pad = ((0, 0), (0, S - nh), (0, S - nw))
        image, lab = np.pad(image, pad), np.pad(lab.astype(np.int64), pad)
    return image, lab


@pytest.mark.parametrize("slices", [1, 3, 5])
def test_adjacent_slices_match_numpy(store, slices):
    path, cases = store
    ds = VolumeSliceDataset(path, cfg=DataConfig(), image_size=S, slices=slices, split="train")
    assert len(ds) == 7 + 4
    for i in range(len(ds)):
        item = ds[i]
        image, label = _expected(cases[item["case_id"]], item["z"], slices)
        assert item["image"].shape == (slices, 3, S, S) and item["image"].dtype == torch.uint8
        assert item["label"].shape == (slices, S, S) and item["label"].dtype == torch.int64
        for c in range(3):
            np.testing.assert_array_equal(item["image"][:, c].numpy(), image)
        np.testing.assert_array_equal(item["label"].numpy(), label)


def test_edge_slices_are_replicated(store):
    path, cases = store
    ds = VolumeSliceDataset(path, cfg=DataConfig(), image_size=S, slices=5, split="train")
    first = ds[0]
    assert (first["case_id"], first["z"]) == ("ct01", 0)
    img = first["image"][:, 0].numpy()
    np.testing.assert_array_equal(img[0], img[1])
    np.testing.assert_array_equal(img[1], img[2])
    np.testing.assert_array_equal(img[2], _uint8(cases["ct01"][0][0], (-160.0, 240.0)))
    last = ds[6]
    assert last["z"] == 6
    np.testing.assert_array_equal(last["image"][4, 0], last["image"][2, 0])
    assert not torch.equal(last["image"][1, 0], last["image"][2, 0])


def test_centre_label_foreground_only_and_unlabelled(store):
    path, cases = store
    cfg = DataConfig(foreground_only=True)
    ds = VolumeSliceDataset(
        path, cfg=cfg, image_size=S, slices=3, split="train", centre_label=True
    )
    assert [(c, z) for c, z in ((ds[i]["case_id"], ds[i]["z"]) for i in range(len(ds)))] == [
        ("ct01", 2),
        ("ct01", 3),
        ("ct01", 4),
        ("mr01", 1),
    ]
    item = ds[1]
    assert item["label"].shape == (S, S)
    np.testing.assert_array_equal(item["label"].numpy(), cases["ct01"][1][3].astype(np.int64))
    val = VolumeSliceDataset(path, cfg=DataConfig(), image_size=S, slices=1, split="val")
    assert len(val) == 3 and not val[2]["label"].any()
    us, _, bounds = cases["us01"]
    np.testing.assert_array_equal(val[2]["image"][0, 1].numpy(), _uint8(us[2], bounds))


def test_loader_with_workers_reads_every_stack_once(store):
    path, cases = store
    ds = VolumeSliceDataset(path, cfg=DataConfig(), image_size=S, slices=3, split="train")
    seen = []
    for rank in range(2):
        loader = build_volume_loader(
            ds, rank=rank, world_size=2, batch_size=2, shuffle=True, num_workers=2, seed=1
        )
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 3, S, S)
            for j, (case, z) in enumerate(zip(batch["case_id"], batch["z"].tolist(), strict=True)):
                image, _ = _expected(cases[case], z, 3)
                np.testing.assert_array_equal(batch["image"][j, :, 0].numpy(), image)
                seen.append((case, z))
    # DistributedSampler pads 11 items to 12: one repeat, every item at least once
    assert len(seen) == 12 and len(set(seen)) == 11


def _set_attrs(out, group: str, **attrs) -> None:
    """Change a case's attrs in place and consolidate again, as a damaged store would read."""
    root = zarr.open_group(str(store_path(out, "bad")), mode="r+", use_consolidated=False)
    root[group].attrs.update(attrs)
    finalize_volumes(out)


def test_bad_stores_name_the_case(tmp_path):
    out = tmp_path / "out"
    path = store_path(out, "bad")
    one = dict(cfg=DataConfig(), image_size=S, slices=1)
    _write_case(out, "c1", np.zeros((2, S, S)), None, split="train", modality="mr", dataset="bad")
    with pytest.raises(SampleError, match=r"bad\.zarr: no case index"):
        VolumeSliceDataset(path, **one, split="train")  # not finalized
    finalize_volumes(out)
    assert len(VolumeSliceDataset(path, **one, split="train")) == 2
    _set_attrs(out, "c1", intensity=None)
    with pytest.raises(SampleError, match=r"bad\.zarr/c1.*intensity"):
        VolumeSliceDataset(path, **one, split="train")
    _set_attrs(out, "c1", intensity={"mapping": "gamma"})
    with pytest.raises(SampleError, match="c1.*unknown mapping 'gamma'"):
        VolumeSliceDataset(path, **one, split="train")
    with pytest.raises(SampleError, match="no case of split 'test'"):
        VolumeSliceDataset(path, **one, split="test")
    with pytest.raises(SampleError, match="nowhere.zarr"):
        VolumeSliceDataset(tmp_path / "nowhere.zarr", **one, split="train")
    with pytest.raises(ValueError, match=r"slices must be odd and >= 1 \(model\.slices\), got 2"):
        VolumeSliceDataset(path, cfg=DataConfig(), image_size=S, slices=2, split="train")


def test_letterbox_follows_the_manifest(store, tmp_path):
    path, cases = store
    cfg = dict(cfg=DataConfig(), image_size=S, slices=3)
    square = VolumeSliceDataset(path, **cfg, split="test")
    assert square.resize == "square"  # no manifest next to this store
    boxed = VolumeSliceDataset(path, **cfg, split="test", resize="letterbox")
    for ds, letterbox in ((square, False), (boxed, True)):
        for i in range(len(ds)):
            item = ds[i]
            image, label = _expected(cases["mr02"], item["z"], 3, letterbox=letterbox)
            np.testing.assert_array_equal(item["image"][:, 0].numpy(), image)
            np.testing.assert_array_equal(item["label"].numpy(), label)
    assert not boxed[0]["image"][:, :, 16:].any()  # 20 x 40 -> 16 x 32, zeros below
    # OUT/manifest.json next to OUT/volumes/NAME.zarr sets the mode
    out = tmp_path / "out"
    (out / "volumes").mkdir(parents=True)
    shutil.copytree(path, out / "volumes" / "toy.zarr")
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "shards": []}
    manifest.update(image_size=S, resize="letterbox")
    (out / "manifest.json").write_text(json.dumps(manifest))
    auto = VolumeSliceDataset(out / "volumes" / "toy.zarr", **cfg, split="test")
    assert auto.resize == "letterbox" and torch.equal(auto[1]["image"], boxed[1]["image"])
