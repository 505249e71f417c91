"""``samadapt shard`` end to end on real synthetic corpora of each layout.

Every sample is read back from the tars with WebDataset and compared pixel-exactly with the
reader's output after ``resize_sample`` (the documented resize); Zarr volumes are compared with
the reader's volumes; bad inputs must show up in rejected.jsonl and summary.json while every good
sample is still written.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import webdataset as wds
import zarr

from samadapt.cli import main
from samadapt.config import load_config
from sharding import synthetic
from sharding.format import (
    FORMAT_VERSION,
    IMAGE_EXT,
    MASKS_EXT,
    META_EXT,
    decode_image,
    decode_masks,
    encode_image,
    encode_masks,
    sample_key,
    shard_name,
)
from sharding.manifest import load_manifest, verify_shards
from sharding.plan import ESTIMATE_UNITS, split_of
from sharding.readers import get_reader
from sharding.records import RejectedInput, Volume
from sharding.transform import resize_sample, volume_slices
from sharding.writer import _keep_empty, estimate_unit_bytes

SIZE = 64
COMMON = [f"image_size={SIZE}", "val_fraction=0.25", "test_fraction=0.25"]


def cli(argv: list[str]) -> int:
    """``samadapt shard ARGV`` in this process."""
    return main(["shard", *argv])


# ------------------------------------------------------------------------------------ helpers


def make_corpus(fmt: str, root: Path) -> Path:
    if fmt == "sa-med2d":
        return synthetic.write_sa_med2d(
            root, n_cases=6, slices_per_case=3, size=96, masks_per_image=(1, 3), seed=1
        )
    if fmt == "folder":
        return synthetic.write_folder(root, n_cases=5, slices_per_case=2, size=(80, 96), seed=2)
    if fmt == "nifti":
        return synthetic.write_nifti(root, n_cases=4, shape=(6, 40, 48), seed=3)
    return synthetic.write_dicom(root, n_cases=3, shape=(5, 40, 48), seed=4)


def shard(fmt: str, corpus: Path, out: Path, *overrides: str, workers: int = 1) -> int:
    argv = ["--format", fmt, str(corpus), str(out), *COMMON, *overrides]
    return cli([*argv, "--workers", str(workers), "--no-progress"])


def cfg_of(*overrides: str):
    items = [o if o.startswith("sharding.") else f"sharding.{o}" for o in (*COMMON, *overrides)]
    return load_config(None, items).sharding


def read_tars(out: Path) -> dict[str, dict]:
    """All samples of the manifest's shards, read with WebDataset: key -> decoded sample."""
    manifest = load_manifest(out)
    urls = [s.url for s in manifest.shards]
    samples = {}
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = raw["__key__"]
        assert key not in samples, f"sample key {key} written twice"
        assert {k for k in raw if not k.startswith("__")} == {IMAGE_EXT, MASKS_EXT, META_EXT}
        samples[key] = {
            "image": decode_image(raw[IMAGE_EXT]),
            "masks": decode_masks(raw[MASKS_EXT]).astype(bool),
            "meta": json.loads(raw[META_EXT]),
            "shard": raw["__url__"],
        }
    return samples


def expected_samples(fmt: str, corpus: Path, cfg) -> dict[str, dict]:
    """The reference: reader output -> resize_sample -> masks >= min_mask_pixels (all empties
    kept: the tests run with keep_empty_ratio=1 unless they check dropping)."""
    reader = get_reader(fmt, corpus, cfg=cfg)
    out = {}
    for unit in reader.list_units():
        try:
            loaded = reader.load(unit)
            items = list(volume_slices(loaded, cfg=cfg)) if isinstance(loaded, Volume) else [loaded]
        except RejectedInput:
            continue
        for item in items:
            image, masks = resize_sample(
                item.image, item.masks, size=cfg.image_size, mode=cfg.resize
            )
            keep = [i for i in range(masks.shape[0]) if masks[i].sum() >= cfg.min_mask_pixels]
            key = sample_key(item.dataset, item.case_id, item.slice_index)
            out[key] = {
                "image": image,
                "masks": masks[keep],
                "class_ids": [item.class_ids[i] for i in keep],
                "class_names": [item.class_names[i] for i in keep],
                "case_id": item.case_id,
                "dataset": item.dataset,
                "slice_index": item.slice_index,
                "original_size": list(item.image.shape[:2]),
                "unit": unit.id,
            }
    return out


def recount(samples: dict[str, dict]) -> dict:
    """summary.json's sample counters, counted again from samples read back from the tars."""
    by = {name: Counter() for name in ("by_split", "by_dataset", "by_modality", "by_class")}
    for sample in samples.values():
        meta = sample["meta"]
        assert len(meta["class_ids"]) == len(meta["class_names"]) == sample["masks"].shape[0]
        by["by_split"][meta["split"]] += 1
        by["by_dataset"][meta["dataset"]] += 1
        by["by_modality"][meta["modality"] or "unknown"] += 1
        by["by_class"].update(name or "unknown" for name in meta["class_names"])
    return {
        "samples": len(samples),
        "masks": sum(s["masks"].shape[0] for s in samples.values()),
        "empty_kept": sum(not s["meta"]["class_ids"] for s in samples.values()),
        **{name: dict(counter) for name, counter in by.items()},
    }


def rejected_lines(out: Path) -> dict[str, dict]:
    """rejected.jsonl as path -> record (each path once)."""
    lines = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    by_path = {r["path"]: r for r in lines}
    assert len(by_path) == len(lines), f"a path rejected twice: {lines}"
    return by_path


def assert_written_as_read(fmt: str, corpus: Path, out: Path, *overrides: str) -> dict:
    """The tars hold exactly the samples of the corpus' readable units, pixel-exact, the
    shards match the manifest; returns the samples read back."""
    expected = expected_samples(fmt, corpus, cfg_of(*overrides))
    got = read_tars(out)
    assert sorted(got) == sorted(expected)
    for key, ref in expected.items():
        np.testing.assert_array_equal(got[key]["image"], ref["image"], err_msg=key)
        np.testing.assert_array_equal(got[key]["masks"], ref["masks"], err_msg=key)
        assert got[key]["meta"]["class_ids"] == ref["class_ids"]
    assert verify_shards(out) == []
    return got


def test_members_round_trip_and_damage_is_an_error():
    rng = np.random.default_rng(0)
    assert FORMAT_VERSION == 2 and IMAGE_EXT == "img"
    for shape in [(37, 23), (16, 16, 3), (1, 5)]:
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        data = encode_image(image, level=3)
        assert data[:4] == b"SIMG"
        back = decode_image(data)
        assert back.dtype == np.uint8 and back.flags.writeable
        np.testing.assert_array_equal(back, image)
    masks = rng.random((3, 19, 21)) < 0.4
    np.testing.assert_array_equal(decode_masks(encode_masks(masks)), masks.astype(np.uint8))
    assert decode_masks(encode_masks(np.zeros((0, 4, 5), bool))).shape == (0, 4, 5)
    # a cut or padded member raises instead of decoding garbage (Blosc itself would not)
    data = encode_image(rng.integers(0, 256, size=(32, 32), dtype=np.uint8))
    for bad in (data[:10], data[:20], data[:-1], data + b"\0"):
        with pytest.raises(ValueError, match="image member is truncated"):
            decode_image(bad)
    packed = encode_masks(masks)
    with pytest.raises(ValueError, match="mask member is truncated"):
        decode_masks(packed[:-3])
    # a PNG (the image member of format version 1) is named as such
    with pytest.raises(ValueError, match="format-version-1"):
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        encode_image(np.zeros((4, 4, 4), np.uint8))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """fmt -> (corpus, output), each sharded once with keep_empty_ratio=1."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(fmt: str) -> tuple[Path, Path]:
        if fmt not in cache:
            base = tmp_path_factory.mktemp(fmt)
            corpus = make_corpus(fmt, base / "corpus")
            out = base / "out"
            # SA-Med2D, folder and DICOM through the process pool (each worker gets a reader cut
            # down to its shard's units), NIfTI in process
            workers = 2 if fmt in ("sa-med2d", "folder", "dicom") else 1
            rc = shard(
                fmt, corpus, out, "inputs_per_shard=2", "keep_empty_ratio=1.0", workers=workers
            )
            assert rc == 0
            cache[fmt] = (corpus, out)
        return cache[fmt]

    return get


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("fmt", ["sa-med2d", "folder", "nifti", "dicom"])
def test_round_trip_pixel_exact(fmt, sharded):
    corpus, out = sharded(fmt)
    cfg = cfg_of("inputs_per_shard=2", "keep_empty_ratio=1.0")
    expected = expected_samples(fmt, corpus, cfg)
    got = read_tars(out)
    assert expected, "the reference produced no samples"
    assert sorted(got) == sorted(expected)
    for key, ref in expected.items():
        sample = got[key]
        np.testing.assert_array_equal(sample["image"], ref["image"], err_msg=key)
        np.testing.assert_array_equal(sample["masks"], ref["masks"], err_msg=key)
        meta = sample["meta"]
        assert meta["class_ids"] == ref["class_ids"]
        assert meta["class_names"] == ref["class_names"]
        assert meta["case_id"] == ref["case_id"]
        assert meta["slice_index"] == ref["slice_index"]
        assert meta["original_size"] == ref["original_size"]
        split = split_of(ref["dataset"], ref["case_id"], val_fraction=0.25, test_fraction=0.25)
        assert meta["split"] == split
        assert f"/{split}/" in sample["shard"]
        assert set(meta) >= {"dataset", "modality", "spacing", "source"}
    manifest = load_manifest(out)
    summary = json.loads((out / "summary.json").read_text())
    assert manifest.totals["samples"] == len(expected) == summary["samples"]
    assert summary["masks"] == sum(len(r["class_ids"]) for r in expected.values())
    assert sum(summary["by_split"].values()) == len(expected)
    assert manifest.image_size == SIZE and manifest.document["input_format"] == fmt
    assert [s["index"] for s in manifest.document["shards"]] == list(range(len(manifest.shards)))
    assert verify_shards(out) == []


@pytest.mark.parametrize("fmt", ["sa-med2d", "folder"])
def test_split_is_per_case(fmt, sharded):
    corpus, out = sharded(fmt)
    cases: dict[str, set[str]] = {}
    for sample in read_tars(out).values():
        meta = sample["meta"]
        cases.setdefault(meta["split"], set()).add(f"{meta['dataset']}/{meta['case_id']}")
    splits = list(cases)
    assert len(splits) >= 2, "the corpus should spread over several splits"
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not cases[a] & cases[b], f"cases in both {a} and {b}: {cases[a] & cases[b]}"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["inputs_per_shard"] == 2
    assert all(s["count"] <= 2 for s in plan["shards"])
    # a case's units may span shards, but never splits; each shard's sidecar lists its units
    planned = {}
    for s in plan["shards"]:
        units = json.loads((out / s["split"] / f"{shard_name(s['index'])}.json").read_text())[
            "units"
        ]
        assert (len(units), units[0], units[-1]) == (s["count"], s["first"], s["last"])
        planned.update({uid: s["split"] for uid in units})
    reader = get_reader(fmt, corpus, cfg=cfg_of())
    for unit in reader.list_units():
        split = split_of(unit.dataset, unit.case_id, val_fraction=0.25, test_fraction=0.25)
        assert planned[unit.id] == split


def test_zarr_volumes_round_trip(sharded):
    corpus, out = sharded("nifti")
    cfg = cfg_of()
    reader = get_reader("nifti", corpus, cfg=cfg)
    units = reader.list_units()
    store_dirs = list((out / "volumes").glob("*.zarr"))
    assert len(store_dirs) == 1
    root = zarr.open_group(str(store_dirs[0]), mode="r")
    index = root.attrs["cases"]
    assert len(index) == len(units)
    root_meta = json.loads((store_dirs[0] / "zarr.json").read_text())
    assert "consolidated_metadata" in root_meta
    for unit in units:
        vol = reader.load(unit)
        group = root[vol.case_id]
        image, label = group["image"], group["label"]
        assert image.dtype == np.int16  # integer HU: stored exactly in int16
        np.testing.assert_array_equal(image[:].astype(np.float32), vol.image)
        np.testing.assert_array_equal(label[:], vol.label)
        z, h, w = vol.image.shape
        for arr in (image, label):
            assert arr.shape == (z, h, w)
            assert arr.chunks == (1, h, w)
            (codec,) = arr.compressors
            assert type(codec).__name__ == "BloscCodec"
            assert codec.cname.value == "zstd" and codec.shuffle.value == "bitshuffle"
            assert codec.clevel == cfg.zstd_level
        attrs = group.attrs
        assert attrs["spacing"] == pytest.approx(list(vol.spacing))
        np.testing.assert_allclose(np.array(attrs["affine"]), vol.affine)
        assert attrs["class_map"] == {str(k): v for k, v in vol.class_map.items()}
        assert attrs["modality"] == vol.modality and attrs["case_id"] == vol.case_id
        split = split_of(vol.dataset, vol.case_id, val_fraction=0.25, test_fraction=0.25)
        assert attrs["split"] == split == index[vol.case_id]["split"]
        assert attrs["intensity"] == {"mapping": "ct_window", "level": 40.0, "width": 400.0}
        assert index[vol.case_id]["shape"] == [z, h, w]
        assert attrs["foreground_slices"] == [i for i in range(z) if vol.label[i].any()]


def test_float_mr_volume_is_stored_exactly(tmp_path):
    """A non-integer MR volume goes to float32 (lossless) with its percentile mapping."""
    corpus = synthetic.write_nifti(tmp_path / "mr", n_cases=1, shape=(3, 24, 20), modality="MRI")
    path = next((corpus / "imagesTr").glob("*.nii.gz"))
    img = nib.load(path)
    data = img.get_fdata().astype(np.float32) + np.float32(0.25)
    nib.save(nib.Nifti1Image(data, img.affine), path)
    out = tmp_path / "out"
    assert shard("nifti", corpus, out, "keep_empty_ratio=1.0") == 0
    cfg = cfg_of()
    reader = get_reader("nifti", corpus, cfg=cfg)
    (unit,) = reader.list_units()
    vol = reader.load(unit)
    group = zarr.open_group(str(next((out / "volumes").glob("*.zarr"))), mode="r")[vol.case_id]
    assert group["image"].dtype == np.float32
    np.testing.assert_array_equal(group["image"][:], vol.image)
    lo, hi = np.percentile(vol.image, cfg.mr_percentiles)
    assert group.attrs["intensity"]["mapping"] == "percentiles"
    assert group.attrs["intensity"]["lo"] == pytest.approx(lo)
    assert group.attrs["intensity"]["hi"] == pytest.approx(hi)


def test_empty_slices_and_small_masks(tmp_path):
    corpus = synthetic.write_nifti(tmp_path / "c", n_cases=2, shape=(6, 40, 48), seed=5)
    for path in (corpus / "labelsTr").glob("*.nii.gz"):  # no foreground in the end slices
        lab = nib.load(path)
        data = np.asarray(lab.dataobj).copy()
        data[:, :, [0, -1]] = 0
        nib.save(nib.Nifti1Image(data, lab.affine), path)
    cfg = cfg_of()
    reader = get_reader("nifti", corpus, cfg=cfg)
    areas = []
    for unit in reader.list_units():
        for item in volume_slices(reader.load(unit), cfg=cfg):
            _, masks = resize_sample(item.image, item.masks, size=SIZE, mode="square")
            areas += masks.reshape(masks.shape[0], SIZE * SIZE).sum(1).tolist()
    threshold = int(np.median(areas))  # about half the masks are dropped
    small = sum(a < threshold for a in areas)
    out = tmp_path / "out"
    assert shard("nifti", corpus, out, "keep_empty_ratio=0", f"min_mask_pixels={threshold}") == 0
    reference = expected_samples("nifti", corpus, cfg_of(f"min_mask_pixels={threshold}"))
    assert small > 0, "the corpus should have masks below the threshold"
    empty = {k for k, r in reference.items() if not r["class_ids"]}
    assert empty, "the corpus should have slices without foreground"
    got = read_tars(out)
    assert sorted(got) == sorted(set(reference) - empty)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["empty_dropped"] == len(empty) and summary["empty_kept"] == 0
    assert summary["rejected"] == small
    assert summary["rejected_by_reason"] == {"mask below min_mask_pixels after resize": small}
    lines = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(lines) == small
    assert all(r["path"].endswith(".nii.gz") and "min_mask_pixels" in r["reason"] for r in lines)
    assert sum(len(s["meta"]["class_ids"]) for s in got.values()) == len(areas) - small


def test_inputs_per_shard_estimated_from_shard_size(tmp_path):
    corpus = synthetic.write_sa_med2d(
        tmp_path / "c", n_cases=8, slices_per_case=3, size=64, masks_per_image=(1, 2), seed=6
    )
    out = tmp_path / "out"
    target_mb = 0.02
    assert shard("sa-med2d", corpus, out, "inputs_per_shard=0", f"shard_size_mb={target_mb}") == 0
    cfg = cfg_of("inputs_per_shard=0", f"shard_size_mb={target_mb}")
    reader = get_reader("sa-med2d", corpus, cfg=cfg)
    units = reader.list_units()[:ESTIMATE_UNITS]
    splits = {
        u.id: split_of(u.dataset, u.case_id, val_fraction=0.25, test_fraction=0.25) for u in units
    }
    mean = estimate_unit_bytes(reader, units, splits=splits, cfg=cfg)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["inputs_per_shard"] == max(1, math.floor(target_mb * 1e6 / mean)) > 1
    manifest = load_manifest(out)
    assert len(manifest.shards) > 3
    assert all(s.bytes < 2 * target_mb * 1e6 for s in manifest.shards)


def test_plan_mismatch_and_bad_arguments(tmp_path, capsys):
    corpus = synthetic.write_sa_med2d(tmp_path / "c", n_cases=2, slices_per_case=2, size=48)
    out = tmp_path / "out"
    assert shard("sa-med2d", corpus, out, "inputs_per_shard=2") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert shard("sa-med2d", corpus, out, "inputs_per_shard=2", "sharding.resize=letterbox") == 2
    err = capsys.readouterr().err
    assert "resize='square'" in err and "resize='letterbox'" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a changed corpus is refused too
    extra = synthetic.write_sa_med2d(tmp_path / "x", n_cases=3, slices_per_case=2, size=48)
    assert shard("sa-med2d", extra, out, "inputs_per_shard=2") == 2
    err = capsys.readouterr().err
    assert "input units differ from the plan in split" in err
    # so is a corpus that lost one image
    smaller = synthetic.write_sa_med2d(tmp_path / "s", n_cases=2, slices_per_case=2, size=48)
    index = json.loads((smaller / "image2label_train.json").read_text())
    dropped = sorted(index)[-1]
    del index[dropped]
    (smaller / "image2label_train.json").write_text(json.dumps(index))
    assert shard("sa-med2d", smaller, out, "inputs_per_shard=2") == 2
    err = capsys.readouterr().err
    now, planned = map(int, re.search(r"(\d+) now, (\d+) planned", err).groups())
    assert now == planned - 1 and "first differing shard" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # plan.json is one line per shard, whatever the corpus size: no unit listing
    plan = json.loads((out / "plan.json").read_text())
    assert sum(s["count"] for s in plan["shards"]) == plan["units"] == 4
    assert all(
        set(s) == {"index", "split", "start", "count", "first", "last"} for s in plan["shards"]
    )
    assert shard("sa-med2d", tmp_path / "missing", tmp_path / "o2") == 2
    assert "does not exist" in capsys.readouterr().err
    assert shard("sa-med2d", corpus, tmp_path / "o3", "no_such_key=1") == 2
    assert "sharding.no_such_key" in capsys.readouterr().err
    assert shard("sa-med2d", corpus, tmp_path / "o4", "train.steps=3") == 2
    assert "only takes sharding" in capsys.readouterr().err
    assert shard("sa-med2d", corpus, tmp_path / "o5", "image_size=8") == 2
    assert "sharding.image_size" in capsys.readouterr().err
    assert (
        cli(["--format", "sa-med2d", str(corpus), str(tmp_path / "o6"), "--shard-range", "3:1"])
        == 2
    )
    assert "shard-range" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli(["--format", "png-soup", str(corpus), str(tmp_path / "o7")])
    assert exc.value.code == 2


def test_bad_inputs_are_reported_and_good_ones_written(tmp_path):
    import cv2

    corpus = synthetic.write_sa_med2d(
        tmp_path / "c", n_cases=4, slices_per_case=3, size=64, masks_per_image=(2, 3), seed=7
    )
    mapping = json.loads((corpus / "image2label_train.json").read_text())
    images = sorted(mapping)
    n_good_images = len(images)
    # corrupt PNG image -> the unit is rejected
    corrupt = corpus / images[0]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20 + b"IEND\xaeB`\x82")
    # wrong-size mask, empty mask, missing mask file: those masks are left out
    wrong = corpus / mapping[images[1]][0]
    cv2.imwrite(str(wrong), np.full((10, 12), 255, np.uint8))
    empty = corpus / mapping[images[2]][0]
    cv2.imwrite(str(empty), np.zeros((64, 64), np.uint8))
    missing_mask = corpus / mapping[images[3]][0]
    missing_mask.unlink()
    # an image named in the JSON that does not exist -> rejected unit
    mapping["images/ct_00--SynthAbdomen--case_0009--z_0001.png"] = []
    (corpus / "image2label_train.json").write_text(json.dumps(mapping))
    out = tmp_path / "out"
    assert shard("sa-med2d", corpus, out, "inputs_per_shard=3", "keep_empty_ratio=1.0") == 0
    lines = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    by_path = {r["path"]: r for r in lines}
    ghost = str(corpus / "images/ct_00--SynthAbdomen--case_0009--z_0001.png")
    for path, words in [
        (str(corrupt), "corrupt"),
        (str(wrong), "size"),
        (str(empty), "empty"),
        (str(missing_mask), "does not exist"),
        (ghost, "does not exist"),
    ]:
        assert path in by_path, f"{path} not in rejected.jsonl: {lines}"
        assert words in by_path[path]["reason"] and by_path[path]["unit"]
    assert len(lines) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == 5 and summary["units_rejected"] == 2
    assert sum(summary["rejected_by_reason"].values()) == 5
    got = read_tars(out)
    assert len(got) == n_good_images - 1  # every image but the corrupt one
    for key, sample in got.items():
        src = sample["meta"]["source"]
        n_listed = len(mapping[str(Path(src).relative_to(corpus))])
        lost = 1 if src in {str(corpus / images[i]) for i in (1, 2, 3)} else 0
        assert sample["masks"].shape[0] == n_listed - lost, key
    assert (out / "manifest.json").exists() and verify_shards(out) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_bad_volumes_are_reported(tmp_path, bad):
    corpus = synthetic.write_nifti(tmp_path / "c", n_cases=4, shape=(4, 32, 32), seed=8)
    images = sorted((corpus / "imagesTr").glob("*.nii.gz"))
    labels = sorted((corpus / "labelsTr").glob("*.nii.gz"))
    img = nib.load(images[0])
    data = img.get_fdata().astype(np.float32)
    data[1, 2, 3] = bad
    nib.save(nib.Nifti1Image(data, img.affine), images[0])
    lab = nib.load(labels[1])
    ldata = np.asarray(lab.dataobj).copy()
    ldata[0, 0, 0] = 7  # not in dataset.json labels
    nib.save(nib.Nifti1Image(ldata, lab.affine), labels[1])
    out = tmp_path / "out"
    assert shard("nifti", corpus, out, "keep_empty_ratio=1.0") == 0
    by_path = rejected_lines(out)
    assert set(by_path) == {str(images[0]), str(labels[1])}
    assert by_path[str(images[0])]["reason"] == "image has 1 NaN/Inf voxels"
    assert "label ids [7] are not in dataset.json" in by_path[str(labels[1])]["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == 2 and summary["units_rejected"] == 2
    assert summary["rejected_by_reason"]["image has N NaN/Inf voxels"] == 1
    got = read_tars(out)
    assert {s["meta"]["case_id"] for s in got.values()} == {"synth_002", "synth_003"}
    assert len(got) == 2 * 4
    store = zarr.open_group(str(next((out / "volumes").glob("*.zarr"))), mode="r")
    assert sorted(store.attrs["cases"]) == ["synth_002", "synth_003"]


@pytest.mark.parametrize("layout", ["nnunet", "msd"])
def test_truncated_nifti_files_are_reported(tmp_path, layout):
    corpus = synthetic.write_nifti(
        tmp_path / "c", n_cases=4, shape=(4, 32, 32), seed=9, layout=layout
    )
    units = get_reader("nifti", corpus, cfg=cfg_of()).list_units()
    image, label = Path(units[0].paths[0]), Path(units[2].paths[1])
    # a download cut off in the compressed voxels, and one cut inside the header
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    label.write_bytes(label.read_bytes()[:20])
    out = tmp_path / "out"
    assert shard("nifti", corpus, out, "keep_empty_ratio=1.0") == 0
    by_path = rejected_lines(out)
    assert set(by_path) == {str(image), str(label)}
    assert by_path[str(image)]["unit"] == units[0].id
    assert by_path[str(image)]["reason"].startswith("unreadable image NIfTI (")
    assert by_path[str(label)]["unit"] == units[2].id
    assert by_path[str(label)]["reason"].startswith("unreadable label NIfTI (")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == 2 and summary["units_rejected"] == 2 and summary["units"] == 4
    assert summary["rejected_by_reason"] == {
        "unreadable image NIfTI": 1,
        "unreadable label NIfTI": 1,
    }
    got = assert_written_as_read("nifti", corpus, out, "keep_empty_ratio=1.0")
    good = {units[1].case_id, units[3].case_id}
    assert {s["meta"]["case_id"] for s in got.values()} == good and len(got) == 2 * 4
    store = zarr.open_group(str(next((out / "volumes").glob("*.zarr"))), mode="r")
    assert set(store.attrs["cases"]) == good


def test_corrupt_dicom_files_are_reported(tmp_path):
    corpus = synthetic.write_dicom(tmp_path / "c", n_cases=3, shape=(5, 40, 48), seed=10)
    units = get_reader("dicom", corpus, cfg=cfg_of()).list_units()
    # a slice cut short (an interrupted copy), and a file that is no DICOM at all
    cut, junk = Path(units[0].paths[2]), Path(units[1].paths[0])
    assert cut.name.startswith("IM") and junk.name.startswith("IM")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 3 // 5])
    junk.write_bytes(b"not a DICOM file\n" * 20)
    out = tmp_path / "out"
    assert shard("dicom", corpus, out, "keep_empty_ratio=1.0") == 0
    by_path = rejected_lines(out)
    assert set(by_path) == {str(cut), str(junk)}
    assert by_path[str(cut)]["unit"] == "case_000"
    # pydicom reads a short file lazily: the cut shows when the pixels are decoded
    assert by_path[str(cut)]["reason"].startswith(("pixel data unreadable", "unreadable DICOM"))
    assert by_path[str(junk)]["unit"] == "case_001"
    assert by_path[str(junk)]["reason"].startswith("unreadable DICOM file (")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == 2 and summary["units_rejected"] == 2 and summary["units"] == 3
    assert sum(summary["rejected_by_reason"].values()) == 2
    got = assert_written_as_read("dicom", corpus, out, "keep_empty_ratio=1.0")
    assert {s["meta"]["case_id"] for s in got.values()} == {"case_002"} and len(got) == 5
    store = zarr.open_group(str(next((out / "volumes").glob("*.zarr"))), mode="r")
    assert list(store.attrs["cases"]) == ["case_002"]


def test_dicom_label_id_missing_from_classes_json(tmp_path):
    """The DICOM twin of the NIfTI label id missing from dataset.json: classes.json is the
    class map; without it every id is taken and named label_<id>."""
    corpus = synthetic.write_dicom(tmp_path / "c", n_cases=2, shape=(5, 40, 48), seed=11)
    label = corpus / "case_001" / "label.nii.gz"
    lab = nib.load(label)
    data = np.asanyarray(lab.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, lab.affine), label)
    out = tmp_path / "out"
    assert shard("dicom", corpus, out, "keep_empty_ratio=1.0") == 0
    by_path = rejected_lines(out)
    assert set(by_path) == {str(label)}
    assert by_path[str(label)]["unit"] == "case_001"
    assert by_path[str(label)]["reason"] == (
        "label ids [7] are not among the known labels [1, 2, 3]"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == 1 and summary["units_rejected"] == 1
    got = assert_written_as_read("dicom", corpus, out, "keep_empty_ratio=1.0")
    assert {s["meta"]["case_id"] for s in got.values()} == {"case_000"}
    assert load_manifest(out).document["classes"] == {"1": "liver", "2": "kidney", "3": "spleen"}
    assert load_manifest(out).classes == {1: "liver", 2: "kidney", 3: "spleen"}
    (corpus / "classes.json").unlink()
    out = tmp_path / "no_classes"
    assert shard("dicom", corpus, out, "keep_empty_ratio=1.0") == 0
    assert (out / "rejected.jsonl").read_text() == ""
    got = assert_written_as_read("dicom", corpus, out, "keep_empty_ratio=1.0")
    assert {s["meta"]["case_id"] for s in got.values()} == {"case_000", "case_001"}
    assert sum(7 in s["meta"]["class_ids"] for s in got.values()) == 1
    assert load_manifest(out).classes[7] == "label_7"


@pytest.mark.parametrize("overrides", [(), ("keep_empty_ratio=0.5",)], ids=["default", "0.5"])
def test_keep_empty_ratio_keeps_a_deterministic_fraction(tmp_path, overrides):
    ratio = cfg_of(*overrides).keep_empty_ratio
    assert ratio == (0.1 if not overrides else 0.5)
    corpus = synthetic.write_nifti(tmp_path / "c", n_cases=6, shape=(40, 16, 16), seed=13)
    for path in (corpus / "labelsTr").glob("*.nii.gz"):  # foreground in every 4th slice only
        lab = nib.load(path)
        data = np.asanyarray(lab.dataobj).copy()
        data[:, :, np.arange(data.shape[2]) % 4 != 0] = 0
        nib.save(nib.Nifti1Image(data, lab.affine), path)
    reference = expected_samples("nifti", corpus, cfg_of(*overrides))
    empty = {k for k, r in reference.items() if not r["class_ids"]}
    full = set(reference) - empty
    assert len(empty) == 6 * 30 and len(full) == 6 * 10
    # the writer's rule: a Bernoulli(ratio) draw per slice, from a hash of the sample key; over
    # these keys it must keep about ratio of the empties (within 4 binomial standard deviations)
    chosen = {k for k in empty if _keep_empty(k, ratio)}
    n = len(empty)
    assert abs(len(chosen) - n * ratio) <= 4 * math.sqrt(n * ratio * (1 - ratio))
    # the same slices are kept whatever the shard layout, and from pool workers (fresh
    # interpreters: a per-process hash seed would show)
    for i, (per_shard, workers) in enumerate([(2, 1), (3, 2)]):
        out = tmp_path / f"out{i}"
        rc = shard(
            "nifti", corpus, out, *overrides, f"inputs_per_shard={per_shard}", workers=workers
        )
        assert rc == 0
        got = read_tars(out)
        kept = {k for k, s in got.items() if not s["meta"]["class_ids"]}
        assert kept == chosen and set(got) == full | kept
        summary = json.loads((out / "summary.json").read_text())
        assert summary["empty_kept"] == len(kept)
        assert summary["empty_dropped"] == len(empty) - len(kept)
        assert summary["samples"] == len(got) == len(full) + len(kept)
        assert summary["rejected"] == 0


def mixed_sa_med2d(root: Path) -> Path:
    """An SA-Med2D corpus of three datasets and three modalities (6 images each), two images
    without any mask."""
    corpus = synthetic.write_sa_med2d(
        root, n_cases=6, slices_per_case=3, size=48, masks_per_image=(1, 3), seed=12
    )

    def rename(rel: str) -> str:
        case = int(re.search(r"--case_(\d+)--", rel).group(1))
        if case in (2, 3):
            return rel.replace("--SynthAbdomen--", "--SynthPelvis--")
        if case in (4, 5):
            return re.sub(r"(ct|mr)_00--SynthAbdomen--", "xray_00--SynthChest--", rel)
        return rel

    index = corpus / "image2label_train.json"
    mapping = {}
    for image, masks in json.loads(index.read_text()).items():
        for rel in (image, *masks):
            (corpus / rel).rename(corpus / rename(rel))
        mapping[rename(image)] = [rename(m) for m in masks]
    for image in sorted(mapping)[::9]:
        mapping[image] = []
    index.write_text(json.dumps(mapping))
    return corpus


def test_summary_counts_match_the_shards(tmp_path):
    corpus = mixed_sa_med2d(tmp_path / "c")
    out = tmp_path / "out"
    assert (
        shard("sa-med2d", corpus, out, "inputs_per_shard=2", "keep_empty_ratio=1", workers=2) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    counts = recount(assert_written_as_read("sa-med2d", corpus, out, "keep_empty_ratio=1"))
    assert {k: summary[k] for k in counts} == counts
    assert summary["by_dataset"] == {"SynthAbdomen": 6, "SynthChest": 6, "SynthPelvis": 6}
    assert summary["by_modality"] == {"ct": 6, "mr": 6, "xray": 6}
    assert summary["empty_kept"] == 2
    totals = load_manifest(out).totals["by_split"]
    assert {s: t["samples"] for s, t in totals.items()} == summary["by_split"]


@pytest.mark.parametrize("fmt", ["sa-med2d", "folder", "nifti", "dicom"])
def test_summary_counts_match_the_shards_of_each_format(fmt, sharded):
    _, out = sharded(fmt)
    summary = json.loads((out / "summary.json").read_text())
    counts = recount(read_tars(out))
    assert {k: summary[k] for k in counts} == counts


def test_verify_shards_names_a_modified_shard(sharded, tmp_path):
    import shutil

    _, src = sharded("folder")
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    manifest = load_manifest(out)
    victim = manifest.document["shards"][1]["path"]
    assert manifest.shards[1].url == str(out / victim)
    data = bytearray((out / victim).read_bytes())
    data[700] ^= 0xFF
    (out / victim).write_bytes(bytes(data))
    bad = verify_shards(out)
    assert len(bad) == 1 and bad[0].startswith(f"{out / victim}: sha256")
    Path(manifest.shards[0].url).write_bytes(b"short")
    bad = verify_shards(out)
    assert [b.split(":")[0] for b in bad] == [
        manifest.shards[0].url,
        str(out / victim),
    ]


def test_plan_listing_every_unit_is_still_read(tmp_path):
    """plan.json of the first releases listed every unit per shard: reruns accept it."""
    corpus = synthetic.write_sa_med2d(tmp_path / "c", n_cases=3, slices_per_case=2, size=48)
    out = tmp_path / "out"
    assert shard("sa-med2d", corpus, out, "inputs_per_shard=2") == 0
    plan = json.loads((out / "plan.json").read_text())
    for s in plan["shards"]:
        side = json.loads((out / s["split"] / f"{shard_name(s['index'])}.json").read_text())
        for key in ("start", "count", "first", "last"):
            del s[key]
        s["units"] = side["units"]
    del plan["splits"]
    (out / "plan.json").write_text(json.dumps(plan))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert shard("sa-med2d", corpus, out, "inputs_per_shard=2") == 0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # and still catches a changed corpus
    (out / "train" / f"{shard_name(0)}.tar").unlink()
    plan["shards"][0]["units"] = plan["shards"][0]["units"][:-1]
    (out / "plan.json").write_text(json.dumps(plan))
    assert shard("sa-med2d", corpus, out, "inputs_per_shard=2") == 2


@pytest.mark.parametrize("fmt", ["sa-med2d", "folder"])
def test_worker_reader_holds_only_its_units(fmt, tmp_path):
    """What a pool worker gets with a shard: a reader that loads that shard's units exactly as
    the full reader does, without the index of the whole corpus."""
    import pickle

    corpus = make_corpus(fmt, tmp_path / "corpus")
    reader = get_reader(fmt, corpus, cfg=cfg_of())
    units = reader.list_units()
    sub = reader.for_units(units[:2])
    small, full = len(pickle.dumps(sub)), len(pickle.dumps(reader))
    assert small < full
    for unit in units[:2]:
        a, b = reader.load(unit), pickle.loads(pickle.dumps(sub)).load(unit)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
        assert (a.class_ids, a.slice_index) == (b.class_ids, b.slice_index)


def test_units_are_shuffled_by_seed_deterministically(tmp_path, capsys):
    """Each split's inputs go to shards in a seeded random order: two runs write byte-identical
    files, shards mix cases, another seed gives other shards of the same samples, and a rerun
    with another seed (or on a plan made before the setting existed) is refused by name."""
    corpus = synthetic.write_sa_med2d(tmp_path / "c", n_cases=8, slices_per_case=4, size=48, seed=3)
    files, orders = {}, {}
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        out = tmp_path / name
        assert shard("sa-med2d", corpus, out, "inputs_per_shard=4", f"shuffle_seed={seed}") == 0
        files[name] = {
            str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
        }
        orders[name] = [
            json.loads(files[name][s["path"].replace(".tar", ".json")])["units"]
            for s in load_manifest(out).document["shards"]
        ]
    assert files["a"] == files["b"]
    units = [u for shard_units in orders["a"] for u in shard_units]
    assert units != sorted(units) and orders["c"] != orders["a"]
    # 4 inputs per shard: sorted, a shard held one case (4 slices); shuffled, most hold several
    cases = [len({re.search(r"case_\d+", u).group() for u in s}) for s in orders["a"]]
    assert sum(cases) / len(cases) > 2, cases
    assert set(read_tars(tmp_path / "a")) == set(read_tars(tmp_path / "c"))
    capsys.readouterr()
    assert shard("sa-med2d", corpus, tmp_path / "a", "inputs_per_shard=4", "shuffle_seed=5") == 2
    err = capsys.readouterr().err
    assert "shuffle_seed=0" in err and "shuffle_seed=5" in err
    plan_path = tmp_path / "a" / "plan.json"
    plan = json.loads(plan_path.read_text())
    del plan["settings"]["shuffle_seed"]
    plan_path.write_text(json.dumps(plan))
    assert shard("sa-med2d", corpus, tmp_path / "a", "inputs_per_shard=4") == 2
    assert "without the setting shuffle_seed" in capsys.readouterr().err


def test_slices_of_3d_cases_are_mixed_within_a_shard(tmp_path):
    """A shard of 3D cases holds their slices in a seeded random order, not case after case (in
    Z order, a shard of hundreds of slices per case is beyond any shuffle buffer), the same on a
    rerun, and the temp file that parks them is gone."""
    corpus = synthetic.write_nifti(tmp_path / "c", n_cases=6, shape=(8, 24, 24), seed=14)
    orders = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert shard("nifti", corpus, out, "inputs_per_shard=3", "keep_empty_ratio=1") == 0
        assert not list(out.rglob("*.tmp-*"))
        manifest = load_manifest(out)
        keys = [
            [raw["__key__"] for raw in wds.WebDataset(s.url, shardshuffle=False)]
            for s in manifest.shards
        ]
        orders.append(keys)
    assert orders[0] == orders[1]
    for keys in orders[0]:
        cases = [k.rsplit("/", 2)[-2] for k in keys]
        runs = 1 + sum(a != b for a, b in zip(cases, cases[1:], strict=False))
        if len(set(cases)) > 1:
            assert runs > 2 * len(set(cases)), cases  # not one run of slices per case
    assert_written_as_read("nifti", corpus, tmp_path / "a", "keep_empty_ratio=1")
