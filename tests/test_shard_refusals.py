"""``samadapt shard`` on inputs it cannot use as asked: one line naming the file, folder or
series, never a traceback, and never a set that looks fine without any sample in it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import webdataset as wds

from samadapt.cli import main
from sharding import synthetic
from sharding.manifest import load_manifest

COMMON = ["image_size=32", "inputs_per_shard=2", "keep_empty_ratio=1"]


def shard(fmt: str, corpus: Path, out: Path, *overrides: str) -> int:
    argv = ["--format", fmt, str(corpus), str(out), *COMMON, *overrides]
    return main(["shard", *argv, "--workers", "1", "--no-progress"])


def one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def rejected(out: Path) -> dict[str, str]:
    lines = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    return {r["path"]: r["reason"] for r in lines}


def test_a_set_without_samples_is_an_error(tmp_path, capsys):
    corpus = synthetic.write_sa_med2d(tmp_path / "c", n_cases=2, slices_per_case=2, size=32)
    images = sorted((corpus / "images").glob("*.png"))
    for image in images:
        image.write_bytes(image.read_bytes()[:100])  # truncated: every input is bad
    out = tmp_path / "out"
    assert shard("sa-med2d", corpus, out) == 2
    first = one_line(capsys, "no sample written", "4 of 4 inputs rejected", str(images[0]))
    assert "truncated" in first and set(rejected(out)) == {str(p) for p in images}
    # a rerun of the finished, empty set says the same, it does not end quietly
    assert shard("sa-med2d", corpus, out) == 2
    assert one_line(capsys) == first
    # slices without a mask, all dropped by keep_empty_ratio=0
    blank = synthetic.write_folder(tmp_path / "blank", n_cases=2, slices_per_case=2, size=(32, 32))
    for mask in (blank / "masks").glob("*.png"):
        cv2.imwrite(str(mask), np.zeros((32, 32), np.uint8))
    assert shard("folder", blank, tmp_path / "o2", "keep_empty_ratio=0") == 2
    one_line(capsys, "no sample written", "0 of 4 inputs rejected", "4 slices without a mask")
    # an empty input folder
    (tmp_path / "empty").mkdir()
    assert shard("folder", tmp_path / "empty", tmp_path / "o3") == 2
    one_line(capsys, "input folder is empty", str(tmp_path / "empty"))
    assert not (tmp_path / "o3").exists()


def test_nan_2d_image_is_rejected_by_name(tmp_path):
    corpus = synthetic.write_folder(
        tmp_path / "c", n_cases=3, slices_per_case=1, size=(32, 32), ext="tif"
    )
    images = sorted((corpus / "images").glob("*.tif"))
    assert cv2.imwrite(str(images[1]), np.full((32, 32), np.nan, np.float32))
    out = tmp_path / "out"
    assert shard("folder", corpus, out) == 0
    assert rejected(out) == {str(images[1]): "image has 1024 NaN/Inf pixels (of 1024)"}
    urls = [s.url for s in load_manifest(out).shards]
    sources = {json.loads(s["json"])["source"] for s in wds.WebDataset(urls, shardshuffle=False)}
    assert sources == {str(images[0]), str(images[2])}


def test_sa_med2d_on_a_folder_layout_is_refused(tmp_path, capsys):
    corpus = synthetic.write_folder(tmp_path / "c", n_cases=3, slices_per_case=4, size=(32, 32))
    out = tmp_path / "out"
    assert shard("sa-med2d", corpus, out) == 2
    one_line(capsys, str(corpus / "masks"), "none of its 12 masks", "--format folder")
    assert not out.exists()


def _describe(folder: Path, description: str, number: int) -> str:
    """Give the series in ``folder`` a description and number; returns its UID."""
    uid = ""
    for path in sorted(folder.iterdir()):
        if path.name.startswith("IM"):
            ds = pydicom.dcmread(path)
            ds.SeriesDescription, ds.SeriesNumber = description, number
            ds.save_as(path)
            uid = str(ds.SeriesInstanceUID)
    return uid


def test_dicom_folder_mixing_two_series_names_them(tmp_path):
    corpus = synthetic.write_dicom(tmp_path / "c", n_cases=3, shape=(3, 24, 24), seed=1)
    uids = [
        _describe(corpus / f"case_{i:03d}", name, i + 2)
        for i, name in enumerate(["AX CT 3mm", "COR CT", "SAG CT"])
    ]
    # case_000 gets every slice of case_001 (equal sizes: nothing to choose), case_002 one
    for path in sorted((corpus / "case_001").glob("IM*")):
        shutil.copy(path, corpus / "case_000" / f"X{path.name}")
    stray = corpus / "case_002" / "X.dcm"
    shutil.copy(next((corpus / "case_001").glob("IM*")), stray)
    out = tmp_path / "out"
    assert shard("dicom", corpus, out) == 0
    reasons = rejected(out)
    assert set(reasons) == {str(corpus / "case_000"), str(stray)}
    tie = reasons[str(corpus / "case_000")]
    assert "mixes 2 series" in tie and "none larger" in tie
    for uid, name in ((uids[0], "'AX CT 3mm' #2"), (uids[1], "'COR CT' #3")):
        assert f"{uid} {name} (3 files)" in tie
    extra = reasons[str(stray)]
    assert "mixes 2 series" in extra and "largest is used" in extra
    assert f"{uids[2]} 'SAG CT' #4 (3 files)" in extra and f"{uids[1]} 'COR CT'" in extra
    urls = [s.url for s in load_manifest(out).shards]
    cases = [json.loads(s["json"])["case_id"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(cases) == ["case_001"] * 3 + ["case_002"] * 3


def test_output_that_is_a_file(tmp_path, capsys):
    corpus = synthetic.write_folder(tmp_path / "c", n_cases=1, slices_per_case=1, size=(32, 32))
    out = tmp_path / "out.txt"
    out.write_text("keep me\n")
    assert shard("folder", corpus, out) == 2
    one_line(capsys, str(out), "is a file")
    assert out.read_text() == "keep me\n"
    assert shard("folder", corpus, out / "sub") == 2
    one_line(capsys, str(out / "sub"))
