"""Bad input around TinyViT, through ``samadapt train`` (and ``model-info``): a file that is no
SAM checkpoint, a ViT file for tiny_vit and a TinyViT file for a ViT preset, PEFT targets the
backbone does not have. Each stops with one line naming the file or key and the tensors, before
any process, engine, MLflow run or checkpoint exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.model import build_model
from pipeline.model.weights import lite_medsam_path
from samadapt.cli import main
from samadapt.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LITE = str(ROOT / "configs/recipes/lite_medsam.yaml")
DEBUG = str(ROOT / "configs/debug.yaml")


def train_fails(capsys, tmp_path: Path, preset: str, shards: Path, *overrides: str) -> str:
    """Run ``samadapt train`` (64 px shards); return its one stderr line, checking that it
    stopped with status 2 before anything was made."""
    run_dir = tmp_path / "run"
    argv = ["train", preset, f"run_dir={run_dir}", f"data.shards={shards}"]
    argv += ["model.image_size=64", "data.num_workers=0", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert not run_dir.exists()  # no MLflow store, no checkpoint, no config written
    return err


@pytest.fixture(scope="module")
def lite_state() -> dict[str, torch.Tensor]:
    return torch.load(lite_medsam_path(), map_location="cpu", weights_only=True)


def test_a_file_that_is_no_sam_checkpoint(capsys, tmp_path, small_shards):
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(2, 8)}, other)
    err = train_fails(capsys, tmp_path, LITE, small_shards, f"model.checkpoint={other}")
    assert err == (
        f"samadapt train: {other}: not a SAM / TinyViT checkpoint (model.arch=tiny_vit): none "
        "of its 2 tensors is image_encoder.*, prompt_encoder.* or mask_decoder.*; it holds "
        "conv1.weight, fc.weight"
    )
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    err = train_fails(capsys, tmp_path, LITE, small_shards, f"model.checkpoint={text}")
    assert err == (
        f"samadapt train: {text}: not a readable PyTorch checkpoint (neither a torch.save zip "
        "archive nor a pickle)"
    )


def test_vit_file_for_tiny_vit_and_tiny_vit_file_for_a_vit_preset(capsys, tmp_path, small_shards):
    vit = tmp_path / "vit.pth"
    torch.save(build_model(cfg=load_config(DEBUG, ["model.image_size=64"]).model).state_dict(), vit)
    err = train_fails(capsys, tmp_path, LITE, small_shards, f"model.checkpoint={vit}")
    assert err.startswith(
        f"samadapt train: {vit}: holds a ViT (SAM) image encoder, but model.arch=tiny_vit builds "
        "a TinyViT (LiteMedSAM / MobileSAM); missing keys: image_encoder.layers.0."
    )
    assert "(292 in all); unexpected keys: image_encoder.blocks.0." in err

    err = train_fails(capsys, tmp_path, DEBUG, small_shards, "model.checkpoint=lite_medsam")
    assert err.startswith(
        f"samadapt train: {lite_medsam_path()}: holds a TinyViT (LiteMedSAM / MobileSAM) image "
        "encoder, but model.arch=tiny builds a ViT (SAM); missing keys: image_encoder.blocks.0."
    )
    assert "; unexpected keys: image_encoder.layers.0." in err


def test_peft_targets_the_backbone_does_not_have(capsys, tmp_path, small_shards, lite_state):
    # in the config: block 10 of a TinyViT with 10 transformer blocks
    err = train_fails(
        capsys, tmp_path, LITE, small_shards, "model.peft=[lora]", "model.peft_blocks=[10]"
    )
    assert err == (
        "samadapt train: config error: command line: model.peft_blocks [10] must be block "
        "indexes in [0, 10): model.arch=tiny_vit has 10 transformer blocks (stages 1-3: 2, 6, "
        "2); stage 0 is convolutional (MBConv) and takes no PEFT"
    )
    assert main(["model-info", LITE, "model.peft=[lora]", "model.peft_blocks=[10]"]) == 2
    assert capsys.readouterr().err.strip() == err.replace("samadapt train", "samadapt model-info")

    # in a checkpoint: LoRA on stage 0, whose MBConv blocks have no attention
    stage0 = tmp_path / "stage0_lora.pth"
    key = "image_encoder.layers.0.blocks.0.attn.qkv.lora.a_q.weight"
    torch.save({**lite_state, key: torch.zeros(4, 64)}, stage0)
    err = train_fails(
        capsys, tmp_path, LITE, small_shards, f"model.checkpoint={stage0}", "model.peft=[lora]"
    )
    assert err == (
        f"samadapt train: {stage0}: does not match the SAM layout (image_encoder.*, "
        f"prompt_encoder.*, mask_decoder.*) of model.arch=tiny_vit; unexpected keys: {key}"
    )

    # in a checkpoint: LoRA factors of a ViT-B's width for a TinyViT block of width 128
    wide = tmp_path / "wide_lora.pth"
    key = "image_encoder.layers.1.blocks.0.attn.qkv.lora.a_q.weight"
    torch.save({**lite_state, key: torch.zeros(4, 768)}, wide)
    err = train_fails(
        capsys, tmp_path, LITE, small_shards, f"model.checkpoint={wide}", "model.peft=[lora]"
    )
    assert err == (
        f"samadapt train: {wide}: tensor shapes differ from the model: {key}: checkpoint "
        "(4, 768) vs model (4, 128)"
    )
