"""The 3D adjacent-slice reader on real Zarr v3 stores written here in the documented layout."""

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

S = 32


def _write_case(
    root: zarr.Group, group: str, image: np.ndarray, label: np.ndarray | None, **attrs
) -> None:
    node = root.create_group(group)
    z, h, w = image.shape
    arr = node.create_array("image", shape=image.shape, chunks=(1, h, w), dtype=image.dtype)
    arr[...] = image
    if label is not None:
        lab = node.create_array("label", shape=label.shape, chunks=(1, h, w), dtype=label.dtype)
        lab[...] = label
    node.attrs.update(
        {
            "case_id": group,
            "spacing": [2.0, 1.0, 1.0],
            "affine": np.eye(4).tolist(),
            "class_map": {"1": "liver", "2": "tumour"},
            **attrs,
        }
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("vol") / "toy.zarr"
    rng = np.random.default_rng(0)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    cases = {}
    # CT in HU (int16) with a window
    ct = rng.integers(-1000, 1500, size=(7, S, S), dtype=np.int16)
    ct_label = np.zeros((7, S, S), np.uint8)
    ct_label[2:5, 8:20, 10:22] = 1
    ct_label[3, 0:4, 0:4] = 2
    _write_case(
        root,
        "ct01",
        ct,
        ct_label,
        split="train",
        modality="ct",
        intensity={"kind": "ct_window", "level": 40, "width": 400},
    )
    cases["ct01"] = (ct, ct_label, (-160.0, 240.0))
    # MR float32 at another size (resized on read), percentiles computed by the reader
    mr = rng.normal(300, 80, size=(4, 40, 40)).astype(np.float32)
    mr_label = np.zeros((4, 40, 40), np.int16)
    mr_label[1, 10:30, 10:30] = 2
    _write_case(
        root,
        "mr01",
        mr,
        mr_label,
        split="train",
        modality="mr",
        intensity={"kind": "percentile", "low": 0.5, "high": 99.5},
    )
    cases["mr01"] = (mr, mr_label, tuple(np.percentile(mr, [0.5, 99.5]).tolist()))
    # uint8, unlabelled, val split
    us = rng.integers(0, 256, size=(3, S, S), dtype=np.uint8)
    _write_case(root, "us01", us, None, split="val", modality="us")
    cases["us01"] = (us, None, None)
    # non-square MR, bounds stored by the writer as sharding/volumes.py does (test split)
    mr2 = rng.normal(0, 1, size=(2, 20, 40)).astype(np.float32)
    mr2_label = (mr2 > 1).astype(np.uint8)
    intensity = {"mapping": "percentiles", "percentiles": [1, 99], "lo": -1.5, "hi": 2}
    _write_case(root, "mr02", mr2, mr2_label, split="test", modality="mr", intensity=intensity)
    cases["mr02"] = (mr2, mr2_label, (-1.5, 2.0))
    root.attrs["cases"] = [
        {"group": g, "case_id": g, "split": root[g].attrs["split"]}
        for g in ("ct01", "mr01", "us01", "mr02")
    ]
    return path, cases


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
    np.testing.assert_array_equal(val[2]["image"][0, 1].numpy(), cases["us01"][0][2])


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


def test_bad_stores_name_the_case(tmp_path):
    path = tmp_path / "bad.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    _write_case(root, "c1", np.zeros((2, S, S), np.float32), None, split="train")
    with pytest.raises(SampleError, match=r"bad\.zarr/c1.*intensity"):
        VolumeSliceDataset(path, cfg=DataConfig(), image_size=S, slices=1, split="train")
    root["c1"].attrs["intensity"] = {"kind": "gamma"}
    ds = VolumeSliceDataset(path, cfg=DataConfig(), image_size=S, slices=1, split="train")
    with pytest.raises(SampleError, match="c1.*unknown mapping 'gamma'"):
        ds[0]
    with pytest.raises(SampleError, match="no case of split 'test'"):
        VolumeSliceDataset(path, cfg=DataConfig(), image_size=S, slices=1, split="test")
    with pytest.raises(SampleError, match="nowhere.zarr"):
        VolumeSliceDataset(
            tmp_path / "nowhere.zarr", cfg=DataConfig(), image_size=S, slices=1, split="train"
        )
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
    (out / "manifest.json").write_text(json.dumps({"resize": "letterbox"}))
    auto = VolumeSliceDataset(out / "volumes" / "toy.zarr", **cfg, split="test")
    assert auto.resize == "letterbox" and torch.equal(auto[1]["image"], boxed[1]["image"])


def test_uint8_rule_rounds_halves_up():
    from pipeline.data.volume import to_uint8

    raw = np.array([200, 40, -160, 240, -2000, 3000, np.nan], np.float32)
    # (200 + 160) * 255 / 400 = 229.5 exactly: must round to 230 as the shard writer does
    assert to_uint8(raw, -160.0, 240.0).tolist() == [230, 128, 0, 255, 0, 255, 0]
    assert to_uint8(raw, 5.0, 5.0).tolist() == [0] * 7
    with pytest.raises(ValueError, match="no intensity rule"):
        to_uint8(raw, None, None)
