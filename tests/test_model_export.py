"""Exports of trained tensors, loading onto a fresh base, LoRA/FacT merge, and the two CLIs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.model import WeightsError, build_model, export_trainable, load_exported
from pipeline.model.config import ModelConfig
from pipeline.model.export import read_export
from pipeline.model.peft import peft_method_of
from samadapt.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    arch="tiny",
    embed_dim=64,
    depth=2,
    num_heads=2,
    global_attn_indexes=[1],
    window_size=2,
    image_size=64,
)


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, "fact_rank": 4, "adapter3d_dim": 16, **kw})


def images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> str:
    """A random tiny SAM in Meta's layout, as if downloaded."""
    torch.manual_seed(123)
    model = build_model(cfg=tiny_cfg(peft=[]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def train_a_little(model) -> None:
    """Stand-in for training: move every trainable tensor."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def outputs(model, x):
    with torch.no_grad():
        emb = model.encode(x)
        pts = (torch.tensor([[[10.0, 20.0]], [[40.0, 33.0]]]), torch.ones(2, 1, dtype=torch.long))
        return emb, *model.decode(emb, points=pts)


@pytest.mark.parametrize("peft", [["sam_med2d_adapter", "adapter3d"], ["lora", "fact"]])
def test_export_load_onto_fresh_base_identical(tmp_path, base_checkpoint, peft):
    cfg = tiny_cfg(peft=peft, checkpoint=base_checkpoint)
    model = build_model(cfg=cfg)
    train_a_little(model)
    model.eval()
    out = export_trainable(model, tmp_path / "trained.pt", meta={"step": 7})
    stored_cfg, tensors = read_export(out)
    assert stored_cfg == cfg
    assert set(tensors) == set(model.trainable_names)
    assert not any(k.startswith("image_encoder.") and not peft_method_of(k) for k in tensors)
    full = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in tensors.values()) < full

    fresh = load_exported(out, checkpoint=base_checkpoint)
    assert not fresh.training
    for a, b in zip(outputs(model, images(2)), outputs(fresh, images(2)), strict=True):
        assert torch.equal(a, b)

    if "lora" in peft:
        merged = load_exported(out, checkpoint=base_checkpoint, merge=True)
        assert merged.cfg.peft == []
        assert not any(peft_method_of(k) for k in merged.state_dict())
        for a, b in zip(outputs(model, images(2)), outputs(merged, images(2)), strict=True):
            # fp32 rounding of W + dW, relative to the output's scale (logits reach ~20 here)
            torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, a.abs().max().item()), rtol=0)

    # a different base checkpoint gives different outputs (the base really comes from it)
    other = load_exported(out, checkpoint="")
    assert not torch.allclose(outputs(other, images(2))[0], outputs(model, images(2))[0])


@pytest.mark.parametrize(
    "head, peft, progressive",
    [
        ("auto", [], False),  # AutoSAM: frozen encoder, trained decoder
        ("auto", ["lora"], True),  # MA-SAM's progressive upsampler is exported as the head
        ("cnn", ["sam_med2d_adapter"], False),
        ("linear", ["fact"], False),
    ],
    ids=["auto", "auto-progressive", "cnn", "linear"],
)
def test_prompt_free_export_load_onto_fresh_base_identical(
    tmp_path, base_checkpoint, head, peft, progressive
):
    cfg = tiny_cfg(
        peft=peft,
        head=head,
        num_classes=3,
        progressive_upsampling=progressive,
        checkpoint=base_checkpoint,
    )
    model = build_model(cfg=cfg)
    train_a_little(model)
    model.eval()
    out = export_trainable(model, tmp_path / "trained.pt")
    stored_cfg, tensors = read_export(out)
    assert stored_cfg == cfg
    assert set(tensors) == set(model.trainable_names)
    owner = "mask_decoder." if head == "auto" and not progressive else "head."
    assert any(k.startswith(owner) for k in tensors)

    fresh = load_exported(out, checkpoint=base_checkpoint)
    assert not fresh.training
    with torch.no_grad():
        ours = model.semantic(images(2))
        theirs = fresh.semantic(images(2))
    assert ours.shape == (2, 4, 64, 64)
    assert torch.equal(ours, theirs)
    # the base really comes from the checkpoint: a random one gives other logits
    with torch.no_grad():
        other = load_exported(out, checkpoint="").semantic(images(2))
    assert not torch.allclose(other, ours)


def test_export_errors(tmp_path, base_checkpoint):
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(WeightsError, match="not a samadapt export"):
        load_exported(tmp_path / "x.pt")
    with pytest.raises(WeightsError, match="export file not found"):
        load_exported(tmp_path / "missing.pt")
    model = build_model(cfg=tiny_cfg(peft=["lora"]))
    path = export_trainable(model, tmp_path / "lora.pt", dtype=torch.bfloat16)
    payload = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in payload["tensors"].values())
    payload["tensors"].pop("image_encoder.blocks.0.attn.qkv.lora.a_q.weight")
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(WeightsError, match="missing keys: image_encoder.blocks.0.attn.qkv.lora"):
        load_exported(tmp_path / "broken.pt")
    with pytest.raises(KeyError, match="unexpected keys: nonsense"):
        model.load_trainable_state_dict(
            {**model.trainable_state_dict(), "nonsense": torch.zeros(1)}
        )


def _write_config(tmp_path, checkpoint: str, **model) -> str:
    cfg = {
        "defaults": [str(ROOT / "configs" / "debug.yaml")],
        # prompt_dim 256: the tiny checkpoint has Meta's layout (debug.yaml shrinks it to 128);
        # a frozen base (debug.yaml trains its whole encoder): the exports hold the PEFT tensors
        "model": {
            "image_size": 64,
            "window_size": 2,
            "checkpoint": checkpoint,
            "prompt_dim": 256,
            "train_encoder": False,
            **model,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_export_cli_from_a_full_state_dict(tmp_path, base_checkpoint, capsys):
    config = _write_config(tmp_path, base_checkpoint, peft=["lora", "msa_adapter"], head="sam")
    from samadapt.config import load_config

    cfg = load_config(config).model
    model = build_model(cfg=cfg)
    train_a_little(model)
    model.eval()
    torch.save({"module": model.state_dict()}, tmp_path / "trained_full.pt")
    out = tmp_path / "export.pt"
    assert main(["export", config, str(tmp_path / "trained_full.pt"), str(out)]) == 0
    loaded = load_exported(out)  # base path from the stored config
    assert loaded.cfg.checkpoint == base_checkpoint
    for a, b in zip(outputs(model, images(2)), outputs(loaded, images(2)), strict=True):
        assert torch.equal(a, b)
    # a state without the trained tensors is refused, naming them
    torch.save(build_model(cfg=tiny_cfg(peft=[])).state_dict(), tmp_path / "untrained.pt")
    with pytest.raises(SystemExit, match="missing keys"):
        main(["export", config, str(tmp_path / "untrained.pt"), str(tmp_path / "e2.pt")])


def test_export_cli_merged_loads_into_stock_sam(tmp_path, base_checkpoint):
    """--merged folds LoRA into the base weights: the file loads, strict, into a stock
    segment_anything Sam and computes what the trained (unmerged) model computes."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_model_build import stock_sam

    from samadapt.config import load_config

    config = _write_config(tmp_path, base_checkpoint, peft=["lora"], head="sam")
    model = build_model(cfg=load_config(config).model)
    train_a_little(model)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "trained.pt")
    merged = tmp_path / "merged.pth"
    args = [config, str(tmp_path / "trained.pt"), str(tmp_path / "e.pt"), "--merged", str(merged)]
    assert main(["export", *args]) == 0
    stock = stock_sam(64).eval()
    stock.load_state_dict(torch.load(merged, weights_only=True), strict=True)
    x = images(2)
    with torch.no_grad():
        theirs = stock.image_encoder(stock.preprocess(x.float()))
        ours = model.encode(x)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # the base weights are needed to merge
    no_base = _write_config(tmp_path, "", peft=["lora"], head="sam")
    with pytest.raises(SystemExit, match="--merged needs the base weights"):
        main(["export", no_base, *args[1:]])


def test_model_info_cli(tmp_path, capsys):
    config = _write_config(tmp_path, "", peft=["lora"], head="sam", lora_rank=4)
    assert main(["model-info", config, "--json"]) == 0
    rows = {r["part"]: r for r in json.loads(capsys.readouterr().out)}
    # LoRA on q and v of 2 blocks, width 64, rank 4: 2 blocks * 2 * (64*4 + 4*64)
    assert rows["peft: lora"] == {"part": "peft: lora", "total": 2048, "trainable": 2048}
    assert rows["image_encoder (SAM)"]["trainable"] == 0
    model = build_model(cfg=tiny_cfg(peft=["lora"]))
    assert rows["total"]["total"] == sum(p.numel() for p in model.parameters())
    assert rows["total"]["trainable"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_model_info_vit_b_sam_med2d_matches_paper(capsys):
    """SAM-Med2D reports 271.24M parameters for its ViT-B model with adapters."""
    assert main(["model-info", str(ROOT / "configs" / "base.yaml"), "--json"]) == 0
    rows = {r["part"]: r for r in json.loads(capsys.readouterr().out)}
    assert round(rows["total"]["total"] / 1e6, 2) == 271.24
    # Meta's 89,670,912 at 1024 px, minus the position embedding (64^2 - 16^2) * 768 and the
    # global blocks' relative tables 4 * 2 * (127 - 31) * 64 that shrink at 256 px
    assert rows["image_encoder (SAM)"]["total"] == 89_670_912 - 2_949_120 - 49_152


_DEEPSPEED_TRAIN = r"""
import sys, torch, deepspeed
from pipeline.model import build_model
from samadapt.config import load_config
config, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = build_model(cfg=load_config(config).model)
params = [p for ps in model.param_groups().values() for p in ps]
ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
             "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2),
                                  config=ds_config)
x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
low, iou, _ = engine(dict(images=x, points=(torch.rand(2, 1, 2) * 64, torch.ones(2, 1).long())),
                     mode="prompt")
engine.backward(low.sigmoid().mean() + iou.mean())
engine.step()
engine.save_checkpoint(out, tag="step-1", exclude_frozen_parameters=True)
torch.save(model.trainable_state_dict(), out + "/trained.pt")
"""


def test_export_cli_from_a_deepspeed_checkpoint(tmp_path, base_checkpoint):
    """A real (ZeRO-2, gloo, 1 rank) DeepSpeed checkpoint folder is consolidated and exported."""
    import os
    import subprocess
    import sys

    from launch.local import free_port

    config = _write_config(tmp_path, base_checkpoint, peft=["lora", "adapter3d"], head="sam")
    env = dict(
        os.environ,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        DS_ACCELERATOR="cpu",
    )
    ckpt = tmp_path / "ds"
    proc = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_TRAIN, config, str(ckpt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "export.pt"
    assert main(["export", config, str(ckpt / "step-1"), str(out)]) == 0
    _, tensors = read_export(out)
    trained = torch.load(ckpt / "trained.pt", weights_only=True)
    assert tensors.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(tensors[k], v), k
    initial = build_model(cfg=tiny_cfg(peft=["lora", "adapter3d"], checkpoint=base_checkpoint))
    assert not torch.equal(  # the optimizer step is in the export
        tensors["image_encoder.blocks.0.attn.qkv.lora.b_q.weight"],
        initial.trainable_state_dict()["image_encoder.blocks.0.attn.qkv.lora.b_q.weight"],
    )


_LOAD_IN_FRESH_PROCESS = r"""
import sys, torch
sys.path.insert(0, sys.argv[3])
from test_model_export import images, outputs
from pipeline.model import load_exported
torch.manual_seed(int(sys.argv[2]))  # another seed than the trainer's: must not matter
model = load_exported(sys.argv[1])
torch.save([t.clone() for t in outputs(model, images(2))], sys.argv[1] + ".out")
"""


def _outputs_in_fresh_process(export: Path, seed: int) -> list[torch.Tensor]:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(export), str(seed), str(ROOT / "tests")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(str(export) + ".out", weights_only=True)


@pytest.mark.parametrize("peft", [["lora"], ["sam_med2d_adapter"]])
def test_random_base_export_is_self_contained(tmp_path, peft):
    """A run from random weights: the export carries the frozen base, so a fresh process with
    another seed rebuilds the very same model (issue 12: Dice 0.0008 instead of 0.0435)."""
    torch.manual_seed(0)  # the trainer's seed
    model = build_model(cfg=tiny_cfg(peft=peft))
    train_a_little(model)
    model.eval()
    out = export_trainable(model, tmp_path / "trained.pt")
    payload = torch.load(out, weights_only=True)
    frozen = set(model.state_dict()) - set(model.trainable_names)
    assert set(payload["base"]) == {"tensors"} and set(payload["base"]["tensors"]) == frozen
    assert any(k.startswith("image_encoder.blocks.0.attn.qkv.") for k in frozen)
    expected = outputs(model, images(2))
    for a, b in zip(expected, _outputs_in_fresh_process(out, seed=1234), strict=True):
        assert torch.equal(a, b)
    # in this process too, whatever the RNG state; naming a base file for it is refused
    torch.manual_seed(77)
    assert torch.equal(outputs(load_exported(out), images(2))[0], expected[0])
    with pytest.raises(WeightsError, match="carries its own base weights"):
        load_exported(out, checkpoint=str(out))


def test_checkpoint_export_names_its_base_by_sha256(tmp_path, base_checkpoint):
    import hashlib
    import shutil

    own = tmp_path / "sam_tiny.pth"
    shutil.copy(base_checkpoint, own)
    model = build_model(cfg=tiny_cfg(peft=["lora"], checkpoint=str(own)))
    train_a_little(model)
    out = export_trainable(model, tmp_path / "trained.pt")
    base = torch.load(out, weights_only=True)["base"]
    digest = hashlib.sha256(own.read_bytes()).hexdigest()
    assert base == {"checkpoint": str(own), "sha256": digest}
    load_exported(out)  # the named file, unchanged: loads
    load_exported(out, checkpoint=base_checkpoint)  # an identical copy elsewhere: loads
    state = torch.load(own, weights_only=True)
    state["image_encoder.neck.0.weight"][0, 0] += 1.0
    torch.save(state, own)
    changed = hashlib.sha256(own.read_bytes()).hexdigest()
    with pytest.raises(WeightsError) as err:
        load_exported(out)
    message = str(err.value)
    assert "\n" not in message and str(own) in message
    assert digest in message and changed in message
    other = build_model(cfg=tiny_cfg(peft=[]))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="other.pth has sha256 .* but the export was trained"):
        load_exported(out, checkpoint=str(tmp_path / "other.pth"))
    own.unlink()
    with pytest.raises(WeightsError, match=f"base checkpoint {own} not found"):
        load_exported(out)


def test_export_cli_random_base_from_trainable_only_state(tmp_path):
    """A trainable-only state (DeepSpeed's default) of a random-base run: the CLI rebuilds the
    base from the run's seed, as the trainer built it, and carries it in the export."""
    from samadapt.config import load_config

    config = _write_config(tmp_path, "", peft=["lora"], head="sam")
    root = load_config(config)
    torch.manual_seed(root.seed)  # as Trainer.__init__
    model = build_model(cfg=root.model)
    train_a_little(model)
    model.eval()
    torch.save(model.trainable_state_dict(), tmp_path / "trainable.pt")
    out = tmp_path / "export.pt"
    torch.manual_seed(root.seed + 1)
    assert main(["export", config, str(tmp_path / "trainable.pt"), str(out)]) == 0
    for a, b in zip(outputs(model, images(2)), _outputs_in_fresh_process(out, 5), strict=True):
        assert torch.equal(a, b)
    from pipeline.model.export import export_state

    with pytest.raises(WeightsError, match="the random base needs the run's seed"):
        export_state(root.model, tmp_path / "trainable.pt", tmp_path / "e2.pt")
