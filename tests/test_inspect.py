"""``samadapt inspect``: the printed summary and the contact sheet of a real shard set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from samadapt.cli import main
from sharding import synthetic
from sharding.inspect import pick_samples, render_tile
from sharding.manifest import ManifestError, load_manifest

TILE, STRIP, GAP = 256, 18, 4


def cli(argv: list[str]) -> int:
    """``samadapt inspect ARGV`` in this process."""
    return main(["inspect", *argv])


def shard_cli(argv: list[str]) -> int:
    """``samadapt shard ARGV`` in this process."""
    return main(["shard", *argv])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("inspect")
    corpus = synthetic.write_sa_med2d(
        base / "corpus", n_cases=4, slices_per_case=2, size=80, masks_per_image=(2, 3), seed=21
    )
    # one bad mask, so the report has a rejection to show
    mapping = json.loads((corpus / "image2label_train.json").read_text())
    first = sorted(mapping)[0]
    cv2.imwrite(str(corpus / mapping[first][0]), np.zeros((80, 80), np.uint8))
    out = base / "out"
    rc = shard_cli(
        [
            "--format",
            "sa-med2d",
            str(corpus),
            str(out),
            "image_size=64",
            "inputs_per_shard=3",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def test_prints_totals_and_summary(shards, capsys):
    assert cli([str(shards), "--no-sheet"]) == 0
    text = capsys.readouterr().out
    manifest = load_manifest(shards)
    summary = json.loads((shards / "summary.json").read_text())
    totals = manifest.totals
    assert f"{totals['samples']} samples in {totals['shards']} shards" in text
    for split, t in manifest.totals["by_split"].items():
        assert f"{split:<5} {t['samples']:>8} samples" in text
    for name, count in summary["by_class"].items():
        assert f"{name}" in text and str(count) in text
    assert "SynthAbdomen" in text and "ct" in text and "mr" in text
    classes = json.loads((shards / "manifest.json").read_text())["classes"]
    assert "class ids (model.num_classes >= " in text and all(
        f"{i}={n}" in text for i, n in classes.items()
    )
    assert "rejected: 1" in text and "mask is empty" in text


def test_verify_names_damaged_shards(shards, tmp_path, capsys):
    """--verify re-hashes every shard: all good -> a line saying so; a same-size flipped byte
    and a cut shard -> exit 1, each named by its path, and nothing is written."""
    assert cli([str(shards), "--no-sheet", "--verify"]) == 0
    n = len(load_manifest(shards).shards)
    assert f"verified: {n} shards match the manifest" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    paths = [Path(s.url) for s in load_manifest(copy).shards]
    assert all(p.parent.parent == copy for p in paths)
    flipped, cut = paths[0], paths[-1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-1024])
    assert cli([str(copy), "--verify", "--sheet", str(tmp_path / "s.png")]) == 1
    err = capsys.readouterr().err
    assert f"{flipped}: sha256" in err and f"{cut}: " in err and "bytes, manifest says" in err
    assert f"2 of {n} shards fail" in err
    assert not (tmp_path / "s.png").exists()


def test_contact_sheet_overlays_masks(shards, tmp_path, capsys):
    sheet_path = tmp_path / "sheet.png"
    assert cli([str(shards), "--sheet", str(sheet_path), "--samples", "4"]) == 0
    assert str(sheet_path) in capsys.readouterr().out
    sheet = cv2.cvtColor(cv2.imread(str(sheet_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    # 4 samples: a 2 x 2 grid of tiles with a title strip each
    assert sheet.shape == (2 * (TILE + STRIP + GAP) + GAP, 2 * (TILE + GAP) + GAP, 3)
    samples = pick_samples(shards, load_manifest(shards), 4)
    assert len(samples) == 4 and all(s["masks"].shape[0] for _, s in samples)
    for i, (key, sample) in enumerate(samples):
        r, c = divmod(i, 2)
        y, x = GAP + r * (TILE + STRIP + GAP) + STRIP, GAP + c * (TILE + GAP)
        tile = sheet[y : y + TILE, x : x + TILE].astype(int)
        raw = cv2.resize(sample["image"], (TILE, TILE), interpolation=cv2.INTER_NEAREST)
        union = np.zeros((TILE, TILE), bool)
        for m in sample["masks"]:
            union |= cv2.resize(m, (TILE, TILE), interpolation=cv2.INTER_NEAREST).astype(bool)
        changed = np.abs(tile - raw[..., None]).max(axis=2) > 10
        # inside the masks the colours are blended in; well outside, the image is untouched
        inside = cv2.erode(union.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        outside = ~cv2.dilate(union.astype(np.uint8), np.ones((31, 31), np.uint8)).astype(bool)
        assert changed[inside].mean() > 0.9, key
        assert changed[outside].mean() < 0.01, key
        # coloured, not grey, where masks are
        assert (np.ptp(tile[inside], axis=1) > 20).mean() > 0.7, key  # (text covers some)


def test_tile_writes_class_names(shards):
    (key, sample), *_ = pick_samples(shards, load_manifest(shards), 1)
    names = sample["meta"]["class_names"]
    with_names = render_tile(sample["image"], sample["masks"], names, key)
    without = render_tile(sample["image"], sample["masks"], [""] * len(names), key)
    assert with_names.shape == (TILE + STRIP, TILE, 3)
    assert (with_names != without).any()  # the names are drawn


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    assert cli([str(tmp_path)]) == 2
    assert "has no manifest.json: run samadapt shard first" in capsys.readouterr().err


def test_manifest_reader_is_typed_and_names_what_is_wrong(shards, tmp_path):
    manifest = load_manifest(shards)
    assert manifest.image_size == 64 and manifest.path == shards / "manifest.json"
    assert sum(s.samples for s in manifest.shards) == manifest.totals["samples"]
    assert manifest.split("train") and all(s.split == "train" for s in manifest.split("train"))
    assert all(isinstance(i, int) for i in manifest.classes)
    document = json.loads((shards / "manifest.json").read_text())
    for change, message in [
        ({"format": "other"}, "is not a samadapt shard manifest"),
        ({"format_version": 1}, "format_version 1, .*reshard"),
        ({"shards": [{"split": "train"}]}, r"shards\[0\] is malformed"),
        ({"classes": [1]}, "'classes' is not an id -> name map"),
    ]:
        (tmp_path / "manifest.json").write_text(json.dumps({**document, **change}))
        with pytest.raises(ManifestError, match=f"{tmp_path / 'manifest.json'}.*{message}"):
            load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**document, "shards": []}))
    with pytest.raises(ManifestError, match="no shards for split 'train'"):
        load_manifest(tmp_path).split("train")
