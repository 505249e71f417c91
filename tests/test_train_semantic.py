"""Prompt-free training (SAMed / MA-SAM / AutoSAM recipes) through ``samadapt train``, on CPU.

2D: LoRA + AutoSAM decoder from shards. 3D: FacT + 3D adapters over stacks of adjacent slices
from the Zarr volumes that ``samadapt shard --format nifti`` writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMALL_SIZE
from mlflow.tracking import MlflowClient

from samadapt.config import load_config
from sharding.run import run_shard
from sharding.synthetic import write_nifti


def _train(config: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "samadapt", "train", config, f"run_dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)


def _metrics(run_dir: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    return client, run.info.run_id


def test_samed_recipe_2d(small_shards, tmp_path):
    run_dir = tmp_path / "samed"
    proc = _train(
        str(ROOT / "configs/debug.yaml"),
        run_dir,
        f"data.shards={small_shards}",
        f"model.image_size={SMALL_SIZE}",
        "model.peft=[lora]",
        "model.head=auto",
        "model.num_classes=6",
        "train.mode=semantic",
        "train.steps=12",
        "train.log_every=1",
        "train.lr=2e-3",
        "train.warmup_steps=2",
        "train.schedule=poly",
        "train.val_every=12",
        "data.num_workers=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run_id = _metrics(run_dir)
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert sorted(loss) == list(range(1, 13))
    assert sum(loss[s] for s in (10, 11, 12)) < sum(loss[s] for s in (1, 2, 3))
    for key in ("ce", "dice", "val/dice"):
        assert client.get_metric_history(run_id, key), key
    lr = [m.value for m in client.get_metric_history(run_id, "lr/encoder_peft")]
    assert lr[0] < lr[1] and lr[-1] < max(lr)  # warm-up, then poly decay


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    corpus = write_nifti(root / "corpus", n_cases=6, shape=(8, 48, 48), modality="CT", seed=2)
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        ["sharding.image_size=64", "sharding.workers=1", "sharding.val_fraction=0.3"],
    ).sharding
    out = root / "shards"
    run_shard("nifti", corpus, out, cfg=cfg, workers=1)
    (store,) = (out / "volumes").glob("*.zarr")
    return store


def test_ma_sam_recipe_3d_from_zarr(volumes, tmp_path):
    run_dir = tmp_path / "masam"
    proc = _train(
        str(ROOT / "configs/debug.yaml"),
        run_dir,
        f"data.volumes={volumes}",
        "model.image_size=64",
        "model.slices=3",
        "model.peft=[fact, adapter3d]",
        "model.fact_rank=8",
        "model.adapter3d_dim=16",
        "model.head=auto",
        "model.progressive_upsampling=true",
        "model.num_classes=3",
        "train.mode=semantic",
        "train.steps=4",
        "train.log_every=1",
        "train.val_every=4",
        "data.num_workers=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run_id = _metrics(run_dir)
    assert len(client.get_metric_history(run_id, "loss")) == 4
    assert client.get_metric_history(run_id, "val/dice")


def test_3d_stack_depth_is_the_models(volumes, tmp_path):
    """The stack depth is set once (model.slices): data.slices is no key of the config."""
    proc = _train(
        str(ROOT / "configs/debug.yaml"),
        tmp_path / "r",
        f"data.volumes={volumes}",
        "data.slices=3",
        "model.slices=1",
        "model.head=auto",
        "train.mode=semantic",
    )
    assert proc.returncode == 2 and "unknown key 'data.slices'" in proc.stderr
    assert "samadapt train: config error: command line:" in proc.stderr


def test_num_classes_checked_against_the_shards_class_map(small_shards, tmp_path):
    classes = json.loads((small_shards / "manifest.json").read_text())["classes"]
    assert classes and all(int(k) >= 1 and v for k, v in classes.items())
    top = max(int(k) for k in classes)
    proc = _train(
        str(ROOT / "configs/debug.yaml"),
        tmp_path / "r",
        f"data.shards={small_shards}",
        f"model.image_size={SMALL_SIZE}",
        "model.head=linear",
        f"model.num_classes={top - 1}",
        "train.mode=semantic",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"model.num_classes={top - 1}" in proc.stderr and f"class ids up to {top}" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
