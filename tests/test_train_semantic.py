"""Prompt-free training (SAMed / MA-SAM / AutoSAM recipes) through ``samadapt train``, on CPU.

2D: LoRA + AutoSAM decoder from shards; configs/autosam.yaml (per-class decoding, encoder input
upsampled, AutoSAM's loss) on a tiny model. 3D: configs/ma_sam.yaml (FacT + 3D adapters over
stacks of adjacent slices from the Zarr volumes that ``samadapt shard --format nifti`` writes)
on a tiny model. SAMed's loss on the decoder's low-resolution grid, on a real engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, SMALL_SIZE
from mlflow.tracking import MlflowClient

from launch.local import free_port
from pipeline.distributed import DistEnv
from pipeline.engine import init_distributed
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


# configs/debug.yaml's tiny model, for the recipes' presets (which name Meta's vit_b / vit_h)
TINY = [
    "model.arch=tiny",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "model.global_attn_indexes=[1]",
    "model.window_size=4",
    "model.prompt_dim=32",
]


def test_ma_sam_recipe_3d_from_zarr(volumes, tmp_path):
    preset = load_config(ROOT / "configs/ma_sam.yaml")
    assert (preset.model.arch, preset.model.slices, preset.model.fact_rank) == ("vit_h", 5, 32)
    assert preset.model.progressive_upsampling and preset.model.class_token_init == "random"
    assert preset.model.pixel_norm == "unit" and preset.sharding.ct_window == [25, 450]
    assert (preset.train.lr, preset.train.weight_decay, preset.data.batch_size) == (8e-4, 0.1, 24)
    assert (preset.train.poly_power, preset.train.warmup_steps) == (7.0, 250)
    assert preset.train.decay_steps * 3 == preset.train.steps * 4  # 400 epochs, stopped at 300
    run_dir = tmp_path / "masam"
    proc = _train(
        str(ROOT / "configs/ma_sam.yaml"),
        run_dir,
        f"data.volumes={volumes}",
        *TINY,
        "model.image_size=64",
        "model.slices=3",
        "model.fact_rank=8",
        "model.adapter3d_dim=16",
        "model.num_classes=3",
        "data.batch_size=2",
        "train.steps=4",
        "train.warmup_steps=2",
        "train.decay_steps=6",
        "train.log_every=1",
        "train.val_every=4",
        "train.checkpoint_every=0",
        "data.num_workers=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run_id = _metrics(run_dir)
    history = {k: client.get_metric_history(run_id, k) for k in ("loss", "ce", "dice")}
    assert len(history["loss"]) == 4
    assert client.get_metric_history(run_id, "val/dice")
    for loss, ce, dice in zip(*history.values(), strict=True):  # 0.2 CE + 0.8 Dice
        assert loss.value == pytest.approx(0.2 * ce.value + 0.8 * dice.value, rel=1e-5)
    # warm-up over 2 steps, then poly 7 over decay_steps=6, of which the run sees 2
    lr = [m.value for m in client.get_metric_history(run_id, "lr/encoder_peft")]
    want = [0.5, 1.0, 1.0, (5 / 6) ** 7]
    assert lr == pytest.approx([8e-4 * f for f in want], rel=1e-6)


def _autosam_worker(rank: int, port: int, shards: str, classes: int, out: str) -> None:
    import pipeline.steps as steps
    from pipeline.trainer import Trainer

    env = DistEnv(rank, rank, 1, 1, "127.0.0.1", port, "gloo")
    init_distributed(env)
    seen: dict[str, list] = {"loss": [], "encoder": [], "decoder": []}
    real_loss = steps.ce_dice_loss

    def recording_loss(logits, label, **options):  # what the semantic step asks of the loss
        total, parts = real_loss(logits, label, **options)
        seen["loss"].append((tuple(logits.shape), options, float(total), parts))
        return total, parts

    steps.ce_dice_loss = recording_loss
    cfg = load_config(
        ROOT / "configs/autosam.yaml",
        [
            f"run_dir={Path(out).parent / 'run'}",
            f"data.shards={shards}",
            *TINY,
            f"model.image_size={SMALL_SIZE}",
            f"model.encoder_input_size={2 * SMALL_SIZE}",
            f"model.num_classes={classes}",
            "data.num_workers=0",
            "train.steps=2",
            "train.log_every=1",
            "train.checkpoint_every=0",
            "tracking.enabled=false",
        ],
    )
    trainer = Trainer(cfg, env)
    model = trainer.model
    model.image_encoder.register_forward_pre_hook(
        lambda m, args: seen["encoder"].append(tuple(args[0].shape))
    )
    model.mask_decoder.register_forward_hook(
        lambda m, args, kwargs, out: seen["decoder"].append(
            (kwargs.get("per_class"), tuple(out[0].shape))
        ),
        with_kwargs=True,
    )
    assert trainer.train() == 0
    torch.save(seen, out)


def test_autosam_recipe_2d(small_shards, tmp_path):
    """configs/autosam.yaml on the tiny model: two steps, the encoder fed the images resized to
    encoder_input_size, each class decoded in its own pass, the loss with AutoSAM's options."""
    preset = load_config(ROOT / "configs/autosam.yaml")
    assert (preset.model.arch, preset.model.image_size, preset.model.encoder_input_size) == (
        "vit_b",
        224,
        1024,
    )
    assert preset.model.head_decode == "per_class" and preset.model.class_token_init == "random"
    assert preset.model.peft == [] and preset.data.batch_size == 4
    assert preset.model.pixel_norm == "unit" and preset.sharding.image_size == 224
    assert (preset.train.lr, preset.train.weight_decay, preset.train.schedule) == (
        5e-4,
        0.0,
        "constant",
    )
    classes = json.loads((small_shards / "manifest.json").read_text())["classes"]
    top = max(int(k) for k in classes)
    out = tmp_path / "seen.pt"
    mp.spawn(
        _autosam_worker, args=(free_port(), str(small_shards), top, str(out)), nprocs=1, join=True
    )
    seen = torch.load(out, weights_only=False)
    batch = preset.data.batch_size
    assert seen["encoder"] == [(batch, 3, 2 * SMALL_SIZE, 2 * SMALL_SIZE)] * 2
    # one decoder sequence per image and class (background included), at the encoder's size / 4
    low = 2 * SMALL_SIZE // 4
    assert seen["decoder"] == [(True, (batch, top + 1, low, low))] * 2
    assert len(seen["loss"]) == 2
    for shape, options, total, parts in seen["loss"]:
        assert shape == (batch, top + 1, SMALL_SIZE, SMALL_SIZE)
        assert options == {
            "ce_weight": 1.0,
            "dice_weight": 1.0,
            "smooth": 1.0,
            "ignore_background_in_dice": True,
        }
        assert total == pytest.approx(float(parts["ce"] + parts["dice"]), rel=1e-5)


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
