"""Prompt-free training through ``samadapt train``, on CPU.

SAMed's recipe in 2D (LoRA + AutoSAM decoder from shards); SAMed's loss on the decoder's
low-resolution grid, on a real engine; the 3D stack depth and the class count checked at start.
The recipes (configs/recipes/samed.yaml, ma_sam.yaml, autosam.yaml, hu_xu_cnn.yaml) run in
tests/test_train_presets.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from conftest import ROOT, SMALL_SIZE
from mlflow.tracking import MlflowClient

from launch.local import free_port
from pipeline.distributed import DistEnv
from pipeline.engine import init_distributed
from samadapt.config import load_config


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


def _low_res_worker(rank: int, port: int, out: str) -> None:
    from pipeline.engine import build_engine
    from pipeline.losses import ce_dice_loss
    from pipeline.model import build_model
    from pipeline.steps import semantic_step, to_low_res

    env = DistEnv(rank, rank, 1, 1, "127.0.0.1", port, "gloo")
    init_distributed(env)
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        [
            f"model.image_size={SMALL_SIZE}",
            "model.peft=[lora]",
            "model.head=auto",
            "model.num_classes=2",
            "model.pixel_norm=unit",
            "train.mode=semantic",
            "train.loss_resolution=low_res",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg=cfg.model)
    groups = model.param_groups()
    engine = build_engine(
        model=model, param_groups=groups, train=cfg.train, batch_size=cfg.data.batch_size, env=env
    )
    size = SMALL_SIZE
    label = torch.zeros(2, size, size, dtype=torch.int64)
    label[:, :, 31] = 1  # a one-pixel column, between the S/4 grid's sample columns (4 o + 2)
    label[:, 8:40, 8:40] = 2  # a block: rows and columns 2..9 of the grid
    image = torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(3))
    image = image.to(torch.uint8)
    weights = dict(ce_weight=cfg.train.ce_weight, dice_weight=cfg.train.semantic_dice_weight)
    with torch.no_grad():
        low = model.semantic(image, low_res=True)
        small = to_low_res(label, size // 4)
        low_res_loss = ce_dice_loss(low, small, **weights)[0]
        input_loss = ce_dice_loss(model.upscale(low, size), label, **weights)[0]
    outputs = semantic_step(
        engine, {"image": image, "label": label}, train=cfg.train, step=0, phases=tuple(groups)
    )
    torch.save(
        {
            "small": small,
            "low_shape": tuple(low.shape),
            "loss": outputs["loss"],
            "low_res_loss": low_res_loss,
            "input_loss": input_loss,
        },
        out,
    )


def test_samed_loss_on_the_low_res_grid(tmp_path):
    """train.loss_resolution=low_res: CE + Dice on head=auto's S/4 logits against the label resized
    by nearest neighbour at pixel centres, where a one-pixel structure drops out."""
    out = tmp_path / "low_res.pt"
    mp.spawn(_low_res_worker, args=(free_port(), str(out)), nprocs=1, join=True)
    saved = torch.load(out, weights_only=False)
    quarter = SMALL_SIZE // 4
    assert saved["low_shape"] == (2, 3, quarter, quarter)
    expected = torch.zeros(2, quarter, quarter, dtype=torch.int64)
    expected[:, 2:10, 2:10] = 2
    assert torch.equal(saved["small"], expected)
    loss = float(saved["loss"])
    assert abs(loss - float(saved["low_res_loss"])) < 1e-5
    assert abs(float(saved["low_res_loss"]) - float(saved["input_loss"])) > 1e-3


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
