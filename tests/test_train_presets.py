"""Every training preset in configs/ and every recipe in configs/recipes/ runs ``samadapt train``
for a few steps on the tiny model.

One test, parametrized over the presets: the preset's recipe values as loaded (what the YAML
cites), then a short run with the same tiny-model overrides for all, through the command's own
entry point (``samadapt.cli.main``) in a fresh process (real DeepSpeed on gloo, real shards or
Zarr volumes, real MLflow). The run is watched from inside: what the image encoder is fed, what
the mask decoder returns and what the prompt-free loss is asked, then each preset's expectations
are checked against those records, its MLflow params and metrics, and its exported weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, SMALL_SIZE, TINY_MODEL
from mlflow.tracking import MlflowClient

from configtree import flatten
from samadapt.config import load_config

S = SMALL_SIZE

# The shared overrides: a short run at 64 px (two steps of two images, no validation, a
# checkpoint at the end only; a small shuffle buffer, or the reader decodes the whole corpus
# before the first batch). Before them, each case's model overrides: configs/debug.yaml's tiny
# model over the preset's ViT unless the case says otherwise.
TINY_RUN = [
    f"model.image_size={S}",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.shuffle_buffer=4",
    "train.steps=2",
    "train.log_every=1",
    "train.val_every=0",
    "train.checkpoint_every=0",
]


def _watched_train(rank: int, argv: list[str], out: str) -> None:
    """``samadapt train ARGV`` in this process, recording the encoder's inputs, the mask
    decoder's outputs and the prompt-free loss's calls; saved with the exit code to ``out``."""
    import pipeline.steps as steps
    import pipeline.trainer as trainer
    from samadapt.cli import main

    seen: dict[str, list] = {"encoder": [], "decoder": [], "semantic_loss": []}
    real_build, real_loss = trainer.build_model, steps.ce_dice_loss

    def build_and_watch(**kwargs):
        model = real_build(**kwargs)
        model.image_encoder.register_forward_pre_hook(
            lambda m, args: seen["encoder"].append(tuple(args[0].shape))
        )
        model.mask_decoder.register_forward_hook(
            lambda m, args, kw, result: seen["decoder"].append(
                (kw.get("per_class"), tuple(result[0].shape))
            ),
            with_kwargs=True,
        )
        return model

    def recording_loss(logits, label, **options):  # what the semantic step asks of the loss
        total, parts = real_loss(logits, label, **options)
        seen["semantic_loss"].append((tuple(logits.shape), options, float(total), parts))
        return total, parts

    trainer.build_model, steps.ce_dice_loss = build_and_watch, recording_loss
    rc = main(["train", *argv])
    torch.save({"rc": rc, **seen}, out)


@dataclass
class Run:
    """What a preset's short run left: MLflow params and metrics, exported names, records."""

    params: dict[str, str]
    metrics: dict[str, dict[int, float]]
    trained: list[str]
    seen: dict[str, Any]
    top: int
    """The highest class id of the shards (AutoSAM's num_classes)."""
    preset: dict[str, Any]
    """The preset as loaded, without overrides (flat keys)."""

    def history(self, key: str) -> dict[int, float]:
        return self.metrics.get(key, {})


def _debug(run: Run) -> None:
    # SAM-Med2D's loop on the tiny model from random weights: nine steps, BCE + Dice + IoU, the
    # whole encoder trained beside its adapters
    assert run.params["train.loss.name"] == "bce_dice" and run.params["model.arch"] == "tiny"
    for i in range(1, 10):
        assert sorted(run.history(f"loss_step{i}")) == [1, 2], i
    assert sorted(run.history("first_prompt_point")) == [1, 2]
    assert len(run.seen["encoder"]) == 2 and len(run.seen["decoder"]) == 2 * 9
    assert any(".med2d_adapter." in n for n in run.trained)
    assert "image_encoder.patch_embed.proj.weight" in run.trained


def _quickstart(run: Run) -> None:
    # the debug model with one interaction step per batch
    assert run.params["train.interaction_steps"] == "1"
    assert sorted(run.history("loss_step1")) == [1, 2] and not run.history("loss_step2")
    assert len(run.seen["encoder"]) == 2 and len(run.seen["decoder"]) == 2
    assert "image_encoder.patch_embed.proj.weight" in run.trained


def _sam_med2d(run: Run) -> None:
    # the loop of 1 + 8 steps, each with its own decoder pass, on one encoder pass per batch
    assert run.params["train.loss.name"] == "sam_med2d" and run.params["model.multimask"] == "True"
    for i in range(1, 10):
        assert sorted(run.history(f"loss_step{i}")) == [1, 2], i
    assert not run.history("loss_step10")
    assert sorted(run.history("focal")) == [1, 2]  # 20 focal + Dice + IoU
    assert run.seen["encoder"] == [(2, 3, S, S)] * 2
    assert len(run.seen["decoder"]) == 2 * 9
    # adapters, prompt encoder and decoder train; no other encoder weight
    assert any(".med2d_adapter." in n for n in run.trained)
    assert any(n.startswith("prompt_encoder.") for n in run.trained)
    assert any(n.startswith("mask_decoder.") for n in run.trained)
    encoder = [n for n in run.trained if n.startswith("image_encoder.")]
    assert encoder and all(".med2d_adapter." in n for n in encoder), encoder[:5]


def _msa(run: Run) -> None:
    assert run.params["model.multimask"] == "False" and run.params["train.loss.pos_weight"] == "2.0"
    assert run.params["train.loss_resolution"] == "low_res"
    assert sorted(run.history("loss_step1")) == [1, 2]
    assert not run.history("loss_step2")  # one step per batch
    assert run.history("first_prompt_point") == {1: 1.0, 2: 1.0}
    assert run.history("bce") and sorted(run.history("val/dice_point")) == [0, 2]
    assert not run.history("val/dice_box")
    assert not any(n.startswith("prompt_encoder.") for n in run.trained)
    assert any(n.startswith("mask_decoder.") for n in run.trained)


def _samed(run: Run) -> None:
    assert run.params["model.pixel_norm"] == "unit" and run.params["model.head"] == "auto"
    assert run.params["train.loss_resolution"] == "low_res"
    assert run.params["train.decay_steps"] == "18600"
    assert sorted(run.history("ce")) == sorted(run.history("dice")) == [1, 2]
    assert any("lora" in n for n in run.trained)


def _ma_sam(run: Run) -> None:
    # 400 epochs of decay, stopped at 300
    assert run.preset["train.decay_steps"] * 3 == run.preset["train.steps"] * 4
    assert len(run.history("loss")) == 4
    assert run.history("val/dice")
    for step, loss in run.history("loss").items():  # 0.2 CE + 0.8 Dice
        ce, dice = run.history("ce")[step], run.history("dice")[step]
        assert loss == pytest.approx(0.2 * ce + 0.8 * dice, rel=1e-5)
    # warm-up over 2 steps, then poly 7 over decay_steps=6, of which the run sees 2
    lr = [v for _, v in sorted(run.history("lr/encoder_peft").items())]
    want = [0.5, 1.0, 1.0, (5 / 6) ** 7]
    assert lr == pytest.approx([8e-4 * f for f in want], rel=1e-6)


def _lite_medsam(run: Run) -> None:
    # LiteMedSAM's TinyViT (random weights here) frozen: one box-prompted step per batch trains
    # the prompt encoder and the mask decoder
    assert run.params["model.arch"] == "tiny_vit"
    assert all(torch.isfinite(torch.tensor(v)) for v in run.history("loss").values())
    assert sorted(run.history("loss_step1")) == [1, 2] and not run.history("loss_step2")
    assert run.history("first_prompt_point") == {1: 0.0, 2: 0.0}  # a box every time
    assert sorted(run.history("bce")) == sorted(run.history("iou")) == [1, 2]
    assert len(run.seen["decoder"]) == 2
    assert run.seen["encoder"] and all(s[1:] == (3, S, S) for s in run.seen["encoder"])
    assert any(n.startswith("mask_decoder.") for n in run.trained)
    assert any(n.startswith("prompt_encoder.") for n in run.trained)
    assert not any(n.startswith("image_encoder.") for n in run.trained)


def _autosam(run: Run) -> None:
    # the encoder fed the images resized to encoder_input_size
    assert run.seen["encoder"] == [(2, 3, 2 * S, 2 * S)] * 2
    # one decoder sequence per image and class (background included), at the encoder's size / 4
    low = 2 * S // 4
    assert run.seen["decoder"] == [(True, (2, run.top + 1, low, low))] * 2
    _acdc_loss(run)


def _acdc_loss(run: Run) -> None:
    """Hu & Xu's loss (AutoSAM and its CNN head): CE + Dice without the background, on the
    logits resized to the input, for every class and the background."""
    assert len(run.seen["semantic_loss"]) == 2
    for shape, options, total, parts in run.seen["semantic_loss"]:
        assert shape == (2, run.top + 1, S, S)
        assert options == {
            "ce_weight": 1.0,
            "dice_weight": 1.0,
            "smooth": 1.0,
            "ignore_background_in_dice": True,
        }
        assert total == pytest.approx(float(parts["ce"] + parts["dice"]), rel=1e-5)


def _hu_xu_cnn(run: Run) -> None:
    # the frozen encoder fed the images resized to encoder_input_size; SAM's decoder never runs
    assert run.seen["encoder"] == [(2, 3, 2 * S, 2 * S)] * 2
    assert run.seen["decoder"] == []
    _acdc_loss(run)
    # the CNN head alone trains: no encoder, prompt encoder or mask decoder weight
    assert any(n.startswith("head.stem.") for n in run.trained)
    assert all(n.startswith("head.") for n in run.trained), run.trained[:5]
    assert run.params["model.head"] == "cnn"


@dataclass
class Case:
    """A preset, its recipe as loaded, what its run needs besides TINY_RUN, and its checks."""

    data: str
    """Fixture the run reads: small_shards (data.shards) or volumes (data.volumes)."""
    recipe: dict[str, Any]
    """Flat keys of the preset as loaded (no overrides) and their values."""
    extra: list[str]
    """Overrides after TINY_RUN; {top} is the shards' highest class id."""
    check: Callable[[Run], None]
    model: list[str] | None = None
    """Overrides that shrink the model, before TINY_RUN; None = TINY_MODEL (a tiny ViT)."""


CASES = {
    "debug": Case(
        "small_shards",
        {"model.arch": "tiny", "model.prompt_dim": 128, "model.train_encoder": True,
         "train.mode": "interactive", "train.interaction_steps": 9,
         "train.loss.name": "bce_dice", "train.loss.bce_weight": None, "train.lr": 1e-3},
        [],
        _debug,
    ),
    "quickstart": Case(
        "small_shards",
        {"model.arch": "tiny", "model.image_size": 128, "sharding.image_size": 128,
         "model.train_encoder": True, "train.interaction_steps": 1, "train.steps": 3000,
         "train.val_every": 500},
        [],
        _quickstart,
    ),
    "recipes/sam_med2d": Case(
        "small_shards",
        {"model.arch": "vit_b", "model.image_size": 256, "sharding.image_size": 256,
         "model.peft": ["sam_med2d_adapter"], "model.train_encoder": False,
         "model.multimask": True, "data.mask_num": 5, "data.batch_size": 2,
         "train.interaction_steps": 9, "train.click_choices": [1, 3, 5, 9],
         "train.first_prompt_box_prob": 0.5, "train.loss.name": "sam_med2d",
         "train.loss_resolution": "input", "train.lr": 1e-4, "train.weight_decay": 0.0,
         "train.schedule": "constant", "train.warmup_steps": 0, "train.steps": 15 * 2_300_000},
        [],
        _sam_med2d,
    ),
    "recipes/msa": Case(
        "small_shards",
        {"model.peft": ["msa_adapter"], "model.image_size": 1024, "data.batch_size": 32,
         "train.interaction_steps": 1, "train.log_every": 50, "train.mode": "interactive"},
        ["train.val_every=2", "eval.max_samples=4"],
        _msa,
    ),
    "recipes/samed": Case(
        "small_shards",
        {"model.peft": ["lora"], "model.lora_rank": 4, "model.image_size": 512,
         "train.lr": 0.005, "train.poly_power": 0.9, "train.warmup_steps": 250},
        ["model.num_classes=6", "train.warmup_steps=1"],  # warm-up fits in the 2 steps
        _samed,
    ),
    "recipes/ma_sam": Case(
        "volumes",
        {"model.arch": "vit_h", "model.slices": 5, "model.fact_rank": 32,
         "model.progressive_upsampling": True, "model.class_token_init": "random",
         "model.pixel_norm": "unit", "sharding.ct_window": [25, 450], "train.lr": 8e-4,
         "train.weight_decay": 0.1, "data.batch_size": 24, "train.poly_power": 7.0,
         "train.warmup_steps": 250},
        ["model.slices=3", "model.fact_rank=8", "model.adapter3d_dim=16", "model.num_classes=3",
         "train.steps=4", "train.warmup_steps=2", "train.decay_steps=6", "train.val_every=4"],
        _ma_sam,
    ),
    "recipes/autosam": Case(
        "small_shards",
        {"model.arch": "vit_b", "model.image_size": 224, "model.encoder_input_size": 1024,
         "model.head_decode": "per_class", "model.class_token_init": "random", "model.peft": [],
         "data.batch_size": 4, "model.pixel_norm": "unit", "sharding.image_size": 224,
         "train.lr": 5e-4, "train.weight_decay": 0.0, "train.schedule": "constant"},
        [f"model.encoder_input_size={2 * S}", "model.num_classes={top}"],
        _autosam,
    ),
    "recipes/hu_xu_cnn": Case(
        "small_shards",
        {"model.arch": "vit_b", "model.head": "cnn", "model.image_size": 224,
         "model.encoder_input_size": 1024, "model.peft": [], "model.train_encoder": False,
         "model.pixel_norm": "unit", "model.num_classes": 3, "sharding.image_size": 224,
         "data.batch_size": 4, "data.augment.split_at_one": True, "train.mode": "semantic",
         "train.lr": 5e-4, "train.weight_decay": 0.0, "train.schedule": "constant",
         "train.steps": 600, "train.semantic_dice_background": False},
        [f"model.encoder_input_size={2 * S}", "model.num_classes={top}"],
        _hu_xu_cnn,
    ),
    "recipes/lite_medsam": Case(
        "small_shards",
        {"model.arch": "tiny_vit", "model.checkpoint": "lite_medsam", "model.peft": [],
         "model.image_size": 256, "model.pixel_norm": "unit", "model.multimask": False,
         "data.mask_num": 1, "data.batch_size": 4, "data.box_from": "whole_mask",
         "data.box_jitter": 5, "train.interaction_steps": 1, "train.first_prompt_box_prob": 1.0,
         "train.loss.name": "bce_dice", "train.lr": 5e-5, "train.weight_decay": 0.01},
        [],
        _lite_medsam,
        # the TinyViT itself, with random weights (the real file is 256 px; these shards are 64)
        ["model.checkpoint=", "model.prompt_dim=32"],
    ),
}  # fmt: skip


def test_every_training_preset_is_a_case():
    """A preset that trains (not a profile such as slurm.yaml, nor base.yaml) has a case here,
    and so has every recipe in configs/recipes/."""
    configs = ROOT / "configs"
    # brain_mri.yaml (the real-MRI quickstart) trains through the CLI on LiteMedSAM's real
    # weights in tests/test_brain_mri.py
    presets = {p.stem for p in configs.glob("*.yaml")} - {"base", "slurm", "brain_mri"}
    recipes = {f"recipes/{p.stem}" for p in (configs / "recipes").glob("*.yaml")}
    assert presets | recipes == set(CASES)


@pytest.mark.parametrize("preset", list(CASES))
def test_preset_trains_on_the_tiny_model(preset, request, tmp_path):
    case = CASES[preset]
    config = ROOT / f"configs/{preset}.yaml"
    loaded = flatten(load_config(config))
    assert {k: loaded[k] for k in case.recipe} == case.recipe

    shards = request.getfixturevalue("small_shards")  # the class map, and 2D data
    top = max(int(k) for k in json.loads((shards / "manifest.json").read_text())["classes"])
    source = request.getfixturevalue(case.data)
    run_dir = tmp_path / preset
    key = "data.volumes" if case.data == "volumes" else "data.shards"
    model = TINY_MODEL if case.model is None else case.model
    argv = [str(config), f"run_dir={run_dir}", f"{key}={source}", *model, *TINY_RUN]
    argv += [x.format(top=top) for x in case.extra]
    out = tmp_path / "seen.pt"
    mp.spawn(_watched_train, args=(argv, str(out)), nprocs=1, join=True)
    seen = torch.load(out, weights_only=False)
    assert seen.pop("rc") == 0

    from pipeline.model import load_exported

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    (mlrun,) = client.search_runs(client.search_experiments()[0].experiment_id)
    metrics = {
        key: {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
        for key in mlrun.data.metrics
    }
    trained = load_exported(run_dir / "export" / "trainable.pt").trainable_names
    run = Run(mlrun.data.params, metrics, trained, seen, top, loaded)
    steps = int(run.params["train.steps"])
    assert sorted(run.history("loss")) == list(range(1, steps + 1))
    case.check(run)
