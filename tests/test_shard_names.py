"""Names outside plain ASCII, and names that slug alike, through ``samadapt shard`` in every
format: every input is written under its own sample key (and Zarr group), the original names are
kept in the metadata, and plain names keep the keys they always had."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import webdataset as wds
import zarr

from samadapt.cli import main
from sharding import synthetic
from sharding.manifest import load_manifest, verify_shards

# two names in Chinese and two that slug alike; before, their keys met and inputs were dropped
NAMES = ["王五_001", "李四_001", "case 1", "case_1"]
SIZE = 48
KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*/[A-Za-z0-9][A-Za-z0-9_-]*/(2d|z\d{5})")


def hashed(name: str) -> str:
    """The 8 hex digits the documented form appends (sha1 of the UTF-8 name)."""
    return hashlib.sha1(name.encode()).hexdigest()[:8]


def shard(fmt: str, corpus: Path, out: Path) -> int:
    argv = ["--format", fmt, str(corpus), str(out), f"image_size={SIZE}", "keep_empty_ratio=1"]
    return main(["shard", *argv, "inputs_per_shard=2", "--workers", "1", "--no-progress"])


def samples(out: Path) -> dict[str, dict]:
    """key -> the sample's JSON, every shard of the manifest read with WebDataset."""
    urls = [s.url for s in load_manifest(out).shards]
    got: dict[str, dict] = {}
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert raw["__key__"] not in got, f"key {raw['__key__']} written twice"
        got[raw["__key__"]] = json.loads(raw["json"])
    return got


def rename_2d(corpus: Path, stems: dict[str, str]) -> None:
    """Rename images and masks (file names start with the image stem) and the JSON listing."""
    for folder in ("images", "masks"):
        for path in sorted((corpus / folder).iterdir()):
            for old, new in stems.items():
                if path.stem == old or path.stem.startswith(old + "_"):
                    path.rename(path.with_name(new + path.name[len(old) :]))
                    break

    def moved(rel: str) -> str:
        head, name = rel.rsplit("/", 1)
        for old, new in stems.items():
            if name.startswith(old + "_") or name.startswith(old + "."):
                return f"{head}/{new}{name[len(old) :]}"
        return rel

    for listing in corpus.glob("image2label_*.json"):
        mapping = json.loads(listing.read_text())
        renamed = {moved(k): [moved(m) for m in v] for k, v in mapping.items()}
        listing.write_text(json.dumps(renamed, ensure_ascii=False))


def sa_med2d(base: Path) -> Path:
    corpus = synthetic.write_sa_med2d(
        base / "sa", n_cases=6, slices_per_case=1, size=SIZE, masks_per_image=(1, 2), style="demo"
    )
    # demo stems synth_000N_10 -> case = the name before its trailing _digits
    stems = ["王五_001", "李四_001", "case 1_001", "case_1_001", "case 1", "case_1"]
    rename_2d(corpus, {f"synth_{i:04d}_10": s for i, s in enumerate(stems)})
    return corpus


def folder(base: Path) -> Path:
    corpus = synthetic.write_folder(base / "胸部 CT", n_cases=6, slices_per_case=1, size=(40, 48))
    stems = ["王五_001", "李四_001", "case 1_001", "case_1_001", "case 1", "case_1"]
    rename_2d(corpus, {f"patient{i}_000": s for i, s in enumerate(stems)})
    return corpus


def nifti(base: Path) -> Path:
    corpus = synthetic.write_nifti(base / "nn", n_cases=4, shape=(3, 24, 24))
    for i, name in enumerate(NAMES):
        (corpus / f"imagesTr/synth_{i:03d}_0000.nii.gz").rename(
            corpus / f"imagesTr/{name}_0000.nii.gz"
        )
        (corpus / f"labelsTr/synth_{i:03d}.nii.gz").rename(corpus / f"labelsTr/{name}.nii.gz")
    return corpus


def dicom(base: Path) -> Path:
    corpus = synthetic.write_dicom(base / "病例", n_cases=4, shape=(3, 24, 24))
    for i, name in enumerate(NAMES):
        (corpus / f"case_{i:03d}").rename(corpus / name)
    return corpus


# format -> (corpus writer, case ids the reader gives, samples expected)
CASES = {
    "sa-med2d": (sa_med2d, {"王五", "李四", "case 1", "case_1", "case"}, 6),
    "folder": (folder, {"王五", "李四", "case 1", "case_1", "case"}, 6),
    "nifti": (nifti, set(NAMES), 4 * 3),
    "dicom": (dicom, set(NAMES), 4 * 3),
}


@pytest.mark.parametrize("fmt", list(CASES))
def test_every_name_gets_its_own_key(fmt, tmp_path):
    write, case_ids, n_samples = CASES[fmt]
    corpus = write(tmp_path)
    out = tmp_path / "out"
    assert shard(fmt, corpus, out) == 0
    assert (out / "rejected.jsonl").read_text() == "", "nothing may be rejected or dropped"
    got = samples(out)
    assert len(got) == n_samples
    assert all(KEY.fullmatch(key) for key in got), sorted(got)
    # the original names are in the metadata, one key group per distinct case
    assert {meta["case_id"] for meta in got.values()} == case_ids
    by_case = {(m["dataset"], m["case_id"]): key.rsplit("/", 1)[0] for key, m in got.items()}
    assert len(set(by_case.values())) == len(by_case) == len(case_ids)
    sources = {m["source"] for m in got.values()}
    assert len(sources) == (6 if n_samples == 6 else 4)
    # plain names keep their key; others get a readable slug plus the hash of the name
    dataset = next(iter(got.values()))["dataset"]
    ds_key = dataset if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", dataset) else None
    if fmt in ("folder", "dicom"):  # corpus folders named in Chinese / with a space
        assert ds_key is None
        ds_key = {"folder": "CT", "dicom": ""}[fmt]
        ds_key = f"{ds_key}-{hashed(dataset)}" if ds_key else hashed(dataset)
    cases = {c: by_case[(dataset, c)].split("/")[1] for c in case_ids}
    assert {by_case[(dataset, c)].split("/")[0] for c in case_ids} == {ds_key}
    assert cases["case_1"] == "case_1" and cases["case 1"] == f"case_1-{hashed('case 1')}"
    if "王五" in cases:  # 2D: the case is the name before its slice number
        assert cases["王五"] == hashed("王五") != cases["李四"] == hashed("李四")
    else:
        assert cases["王五_001"] == f"001-{hashed('王五_001')}" != cases["李四_001"]
    assert verify_shards(out) == []
    if fmt in ("nifti", "dicom"):
        stores = sorted((out / "volumes").glob("*.zarr"))
        assert [s.name for s in stores] == [f"{ds_key}.zarr"]
        root = zarr.open_group(str(stores[0]), mode="r")
        index = root.attrs["cases"]
        assert sorted(index) == sorted(cases.values())
        for group, entry in index.items():
            assert root[group].attrs["case_id"] == entry["case_id"]
            assert cases[entry["case_id"]] == group


def test_names_that_still_meet_are_refused(tmp_path, capsys):
    """A plain name equal to another name's slug and hash: refused up front, naming both."""
    corpus = synthetic.write_nifti(tmp_path / "nn", n_cases=2, shape=(3, 24, 24))
    for i, name in enumerate(["case 1", f"case_1-{hashed('case 1')}"]):
        (corpus / f"imagesTr/synth_{i:03d}_0000.nii.gz").rename(
            corpus / f"imagesTr/{name}_0000.nii.gz"
        )
        (corpus / f"labelsTr/synth_{i:03d}.nii.gz").rename(corpus / f"labelsTr/{name}.nii.gz")
    out = tmp_path / "out"
    assert shard("nifti", corpus, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'case 1'" in err and f"'case_1-{hashed('case 1')}'" in err
    assert not list(out.glob("*/shard-*"))
