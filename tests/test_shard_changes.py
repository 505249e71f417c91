"""A rerun of ``samadapt shard`` into an output written from other inputs: a changed file, a
touched file, another input folder, a corpus that lost a case, each also with plan.json deleted.
The rerun refuses with one line naming what changed and leaves every file as it was;
``--overwrite`` rewrites the affected shards (the others stay byte for byte) and the result is
the set a fresh run on the changed corpus writes."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np

from samadapt.cli import main
from sharding import synthetic

COMMON = ["image_size=32", "inputs_per_shard=2", "keep_empty_ratio=1"]


def shard(fmt: str, corpus: Path, out: Path, *flags: str) -> int:
    argv = ["--format", fmt, str(corpus), str(out), *COMMON, "--workers", "1", "--no-progress"]
    return main(["shard", *argv, *flags])


def snapshot(out: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file of the output (the empty lock files aside: a
    shard taken back keeps its lock file)."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".finalize.lock" and p.parent.name != ".locks"
    }


def refused(capsys, *words: str) -> str:
    """The run's stderr: exactly one line, holding every one of ``words``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def tars(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def test_changed_image_is_refused_then_overwritten(tmp_path, capsys):
    corpus = synthetic.write_sa_med2d(
        tmp_path / "c", n_cases=4, slices_per_case=2, size=40, masks_per_image=(1, 2), seed=5
    )
    out = tmp_path / "out"
    assert shard("sa-med2d", corpus, out) == 0
    before, before_tars = snapshot(out), tars(out)
    # same name, other content (another size)
    image = sorted((corpus / "images").glob("*.png"))[3]
    cv2.imwrite(str(image), np.full((40, 40), 77, np.uint8))
    capsys.readouterr()
    assert shard("sa-med2d", corpus, out) == 2
    refused(capsys, str(image), "size", "--overwrite")
    assert snapshot(out) == before
    # plan.json deleted: the sidecars still say what each shard was written from
    (out / "plan.json").unlink()
    assert shard("sa-med2d", corpus, out) == 2
    refused(capsys, str(image), "size")
    assert not (out / "plan.json").exists(), "a refused run writes nothing, plan.json included"
    assert snapshot(out) == {k: v for k, v in before.items() if k != "plan.json"}
    # --overwrite rewrites the shard of that image only, and gives what a fresh run gives
    assert shard("sa-med2d", corpus, out, "--overwrite") == 0
    after = tars(out)
    changed = [name for name in before_tars if after[name] != before_tars[name]]
    assert len(changed) == 1 and set(after) == set(before_tars)
    fresh = tmp_path / "fresh"
    assert shard("sa-med2d", corpus, fresh) == 0
    assert snapshot(out) == snapshot(fresh)


def test_touched_and_silently_rewritten_files_with_verify_content(tmp_path, capsys):
    corpus = synthetic.write_folder(tmp_path / "c", n_cases=3, slices_per_case=2, size=(32, 40))
    out = tmp_path / "out"
    assert shard("folder", corpus, out) == 0
    before = snapshot(out)
    mask = sorted((corpus / "masks").glob("*.png"))[2]
    # touched only: the time changed, the content did not
    stat = mask.stat()
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    capsys.readouterr()
    assert shard("folder", corpus, out) == 2
    refused(capsys, str(mask), "modified", "--verify-content")
    assert shard("folder", corpus, out, "--verify-content") == 0
    assert snapshot(out) == before
    # rewritten with the same size and time: only the content hash sees it
    data = bytearray(mask.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mask.write_bytes(bytes(data))
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard("folder", corpus, out) == 0
    assert snapshot(out) == before
    assert shard("folder", corpus, out, "--verify-content") == 2
    refused(capsys, str(mask), "content")
    assert snapshot(out) == before


def test_another_input_folder(tmp_path, capsys):
    corpus = synthetic.write_sa_med2d(tmp_path / "c", n_cases=3, slices_per_case=2, size=32)
    out = tmp_path / "out"
    assert shard("sa-med2d", corpus, out) == 0
    before = snapshot(out)
    moved = shutil.copytree(corpus, tmp_path / "copy" / "c")
    capsys.readouterr()
    assert shard("sa-med2d", moved, out) == 2
    refused(capsys, f"made from {corpus}", f"reads {moved}")
    (out / "plan.json").unlink()
    assert shard("sa-med2d", moved, out) == 2
    refused(capsys, f"written from {corpus}", f"reads {moved}")
    assert snapshot(out) == {k: v for k, v in before.items() if k != "plan.json"}
    assert shard("sa-med2d", moved, out, "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert shard("sa-med2d", moved, fresh) == 0
    assert snapshot(out) == snapshot(fresh)


def test_volumes_of_a_changed_and_a_smaller_corpus(tmp_path, capsys):
    corpus = synthetic.write_nifti(tmp_path / "c", n_cases=5, shape=(3, 24, 24), seed=2)
    out = tmp_path / "out"
    assert shard("nifti", corpus, out) == 0
    before = snapshot(out)
    # one case's image rewritten, one case gone, plan.json deleted
    img_path = corpus / "imagesTr/synth_001_0000.nii.gz"
    img = nib.load(img_path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine), img_path)
    (corpus / "imagesTr/synth_004_0000.nii.gz").unlink()
    (corpus / "labelsTr/synth_004.nii.gz").unlink()
    capsys.readouterr()
    assert shard("nifti", corpus, out) == 2
    refused(capsys, "input units differ from the plan", "--overwrite")
    (out / "plan.json").unlink()
    assert shard("nifti", corpus, out) == 2
    refused(capsys, "not written from this run's inputs", "--overwrite")
    assert snapshot(out) == {k: v for k, v in before.items() if k != "plan.json"}
    # --overwrite: the groups of the changed and the vanished case are rewritten / gone
    assert shard("nifti", corpus, out, "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert shard("nifti", corpus, fresh) == 0
    assert snapshot(out) == snapshot(fresh)
    groups = sorted(p.name for p in (out / "volumes").glob("*.zarr/synth_*"))
    assert groups == ["synth_000", "synth_001", "synth_002", "synth_003"]
