"""PEFT methods: authors' and zero init, frozen base, 3D slice mixing, merge, blocks, speed/memory
switches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import build_model
from pipeline.model.config import ModelConfig
from pipeline.model.peft import peft_method_of
from pipeline.model.peft.adapter3d import Adapter3d
from pipeline.model.peft.adapters import Bottleneck, Med2dAdapter

TINY = dict(arch="tiny", embed_dim=64, depth=2, num_heads=2, global_attn_indexes=[1])
ALL = ["sam_med2d_adapter", "msa_adapter", "lora", "fact", "adapter3d"]


def tiny_cfg(**kw) -> ModelConfig:
    values = {
        **TINY,
        "image_size": 64,
        "window_size": 2,
        "peft": [],
        "fact_rank": 4,
        "adapter3d_dim": 16,
        **kw,
    }
    return ModelConfig(**values)


def images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def with_base_of(cfg: ModelConfig, base: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)  # PEFT modules get other random values than in `base`
    model = build_model(cfg=cfg)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(peft_method_of(k) for k in missing)
    return model


def perturb_peft(model: torch.nn.Module, seed: int = 7, scale: float = 0.05) -> None:
    """Move every PEFT tensor off its initial value (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if peft_method_of(name):
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cfg=tiny_cfg(slices=2)).eval()


def adapted(base: torch.nn.Module, peft: list[str], *, init: str) -> nn.Module:
    """A model built with ``peft`` and ``model.adapter_init=init`` on the weights of ``base``."""
    return with_base_of(tiny_cfg(peft=peft, slices=2, adapter_init=init), base).eval()


@pytest.mark.parametrize("peft", [[m] for m in ALL] + [ALL], ids=lambda p: "+".join(p))
def test_zero_init_is_exactly_sam(base, peft):
    model = adapted(base, peft, init="zero")
    x = images(4)
    with torch.no_grad():
        assert torch.equal(model.encode(x), base.encode(x))
    # and it is not trivially so: moved PEFT weights change the output
    perturb_peft(model)
    with torch.no_grad():
        assert not torch.allclose(model.encode(x), base.encode(x))


# the tensors that "zero" sets to 0 and the authors' code does not (LoRA and FacT: none)
ZEROED = {
    "sam_med2d_adapter": ["med2d_adapter.norm.weight"],
    "msa_adapter": [
        f"msa.{a}.fc2.{p}" for a in ("space", "mlp", "depth") for p in ("weight", "bias")
    ],
    "adapter3d": ["adapter3d_attn.up.weight", "adapter3d_mlp.up.weight"],
    "lora": [],
    "fact": [],
}


@pytest.mark.parametrize("method", ALL)
def test_authors_init_as_each_method_starts(base, method):
    authors, zero = (adapted(base, [method], init=i) for i in ("authors", "zero"))
    x = images(2)
    with torch.no_grad():
        out = authors.encode(x)
        assert torch.equal(zero.encode(x), base.encode(x))
    # SAM-Med2D's, MSA's and MA-SAM's adapters start active; SAMed's LoRA and MA-SAM's FacT start
    # with a zero factor in their authors' code too
    assert torch.equal(out, base.encode(x)) == (method in ("lora", "fact"))
    # same random draws: the two inits differ exactly in the tensors "zero" zeroes
    a, z = authors.state_dict(), zero.state_dict()
    differ = {k.split(".", 3)[3] for k in a if not torch.equal(a[k], z[k])}
    assert differ == set(ZEROED[method])
    blk = authors.image_encoder.blocks[0]
    if method == "sam_med2d_adapter":  # SAM-Med2D's Adapter_Layer: nn.LayerNorm's default
        norm = blk.med2d_adapter.norm
        assert (norm.weight == 1).all() and (norm.bias == 0).all()
        assert (zero.image_encoder.blocks[0].med2d_adapter.norm.weight == 0).all()
    if method == "msa_adapter":  # nn.Linear's default: uniform within 1 / sqrt(fan_in)
        bound = 1 / blk.msa.space.fc2.in_features**0.5
        for p in (blk.msa.space.fc2.weight, blk.msa.space.fc2.bias):
            assert 0 < p.abs().max() <= bound
    if method == "adapter3d":
        assert blk.adapter3d_attn.up.weight.abs().min() > 0
    if method == "lora":
        assert not blk.attn.qkv.lora.b_q.weight.any() and blk.attn.qkv.lora.a_q.weight.all()
    if method == "fact":
        assert not authors.image_encoder.fact.v.weight.any()


def test_adapter_init_is_checked():
    for build in (lambda: Med2dAdapter(8, init="ones"), lambda: Bottleneck(8, init="Zero")):
        with pytest.raises(ValueError, match="adapter init must be one of authors, zero"):
            build()
    with pytest.raises(ValueError, match="adapter init"):
        Adapter3d(8, 4, init="")
    with pytest.raises(ValueError, match="must be one of authors, zero, got 'ones'") as err:
        tiny_cfg(adapter_init="ones")
    assert err.value.key == "adapter_init"


def test_only_trainable_tensors_change_after_a_step(base):
    cfg = tiny_cfg(peft=ALL, slices=2)
    model = with_base_of(cfg, base).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(model.trainable_names)
    groups = model.param_groups()
    assert set(groups) == {"encoder_peft", "prompt_encoder", "mask_decoder"}
    assert sum(len(v) for v in groups.values()) == len(trainable)
    opt = torch.optim.AdamW([p for ps in groups.values() for p in ps], lr=1e-2)
    emb = model.encode(images(4))
    low, iou = model.decode(
        emb,
        image_index=torch.tensor([0, 1, 1, 3]),
        points=(torch.rand(4, 2, 2) * 64, torch.tensor([[1, 0]] * 4)),
        boxes=torch.tensor([[2.0, 2, 40, 40]] * 4),
    )
    (low.sigmoid().mean() + iou.mean()).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    frozen = [k for k in before if k not in trainable]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    # every method's last projection moved
    for key in (
        "image_encoder.blocks.0.med2d_adapter.norm.weight",
        "image_encoder.blocks.0.msa.space.fc2.weight",
        "image_encoder.blocks.1.msa.depth.fc2.weight",
        "image_encoder.blocks.1.attn.qkv.lora.b_q.weight",
        "image_encoder.fact.v.weight",
        "image_encoder.blocks.0.adapter3d_mlp.up.weight",
    ):
        assert key in changed, key
    assert not any(k.startswith("image_encoder.") and peft_method_of(k) is None for k in changed)


@pytest.mark.parametrize("method", ["adapter3d", "msa_adapter"])
def test_3d_adapters_mix_adjacent_slices_within_a_volume_only(base, method):
    d = 3
    model = with_base_of(tiny_cfg(peft=[method], slices=d), base).eval()
    perturb_peft(model)
    x = images(2 * d)  # volume 0 = slices 0..2, volume 1 = slices 3..5
    y = x.clone()
    y[0] = 255 - y[0]  # change slice 0 of volume 0
    with torch.no_grad():
        ex, ey = model.encode(x), model.encode(y)
    assert not torch.allclose(ex[1], ey[1], atol=1e-6)  # the neighbour slice sees it
    assert torch.equal(ex[d:], ey[d:])  # the other volume does not
    # a 2D method cannot mix slices: the same test fails for it
    flat = with_base_of(tiny_cfg(peft=["lora"], slices=d), base).eval()
    perturb_peft(flat)
    with torch.no_grad():
        assert torch.equal(flat.encode(x)[1:], flat.encode(y)[1:])


def test_adapter3d_with_one_slice_is_a_2d_adapter(base):
    model = with_base_of(tiny_cfg(peft=["adapter3d"], slices=1), base).eval()
    perturb_peft(model)
    x = images(2)
    with torch.no_grad():
        out = model.encode(x)
        for block in model.image_encoder.blocks:  # side taps of the (3, 1, 1) kernel
            for adapter in (block.adapter3d_attn, block.adapter3d_mlp):
                adapter.conv.weight[:, :, 0].normal_()
                adapter.conv.weight[:, :, 2].normal_()
        assert torch.equal(model.encode(x), out)
        assert not torch.equal(model.encode(x, slices=2), out)


def test_lora_fact_merge_same_outputs_modules_removed(base):
    cfg = tiny_cfg(peft=["lora", "fact", "sam_med2d_adapter"])
    model = with_base_of(cfg, base).eval()
    perturb_peft(model, scale=0.2)
    x = images(2)
    with torch.no_grad():
        before = model.encode(x)
        assert not torch.allclose(before, base.encode(x), atol=1e-3)
        merged = model.merge_peft()
        after = model.encode(x)
    assert merged == ["lora", "fact"]
    assert model.cfg.peft == ["sam_med2d_adapter"]
    names = list(model.state_dict())
    assert not any(".lora." in n or ".fact." in n for n in names)
    assert any(".med2d_adapter." in n for n in names)
    assert set(model.trainable_names) == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_peft_blocks_and_per_method_blocks():
    cfg = tiny_cfg(
        depth=3,
        global_attn_indexes=[2],
        peft=["lora", "msa_adapter"],
        peft_blocks=[1, 2],
        peft_method_blocks={"lora": [0]},
    )
    model = build_model(cfg=cfg)
    blocks = model.image_encoder.blocks
    assert [b.attn.qkv.lora is not None for b in blocks] == [True, False, False]
    assert [b.msa is not None for b in blocks] == [False, True, True]
    assert blocks[1].msa.depth is None  # slices == 1: no depth branch
    per_block = {}
    for name in model.trainable_names:
        if name.startswith("image_encoder.blocks."):
            per_block.setdefault(int(name.split(".")[2]), set()).add(peft_method_of(name))
    assert per_block == {0: {"lora"}, 1: {"msa_adapter"}, 2: {"msa_adapter"}}


def _grads(model, x):
    model.zero_grad()
    model.encode(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_attention_and_checkpointing_match_plain(base):
    cfg = tiny_cfg(peft=["lora", "adapter3d"], slices=2)
    plain = with_base_of(cfg, base)
    perturb_peft(plain)
    variants = {
        "fused": dataclasses.replace(cfg, fused_attention=True),
        "ckpt": dataclasses.replace(cfg, activation_checkpointing=True),
        "ckpt1": dataclasses.replace(
            cfg, activation_checkpointing=True, activation_checkpointing_blocks=[1]
        ),
    }
    x = images(2)
    ref_out = plain.encode(x).detach()
    ref_grad = _grads(plain, x)
    assert ref_grad
    for name, vcfg in variants.items():
        model = build_model(cfg=vcfg)
        model.load_state_dict(plain.state_dict())
        if name.startswith("ckpt"):
            assert model.image_encoder.checkpoint_blocks == ({1} if name == "ckpt1" else {0, 1})
            torch.testing.assert_close(model.encode(x), ref_out, atol=0, rtol=0)
        else:
            assert all(b.attn.fused for b in model.image_encoder.blocks)
            torch.testing.assert_close(model.encode(x), ref_out, atol=1e-5, rtol=1e-5)
        grads = _grads(model, x)
        assert grads.keys() == ref_grad.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grad[k], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_and_bf16_weights(base):
    cfg = tiny_cfg(peft=["lora"])
    x = images(2)
    ref = with_base_of(cfg, base).eval()
    with torch.no_grad():
        want = ref.encode(x)
    auto = with_base_of(dataclasses.replace(cfg, autocast_bf16=True), base).eval()
    with torch.no_grad():
        got = auto.encode(x)
    assert not torch.equal(got.float(), want)  # bf16 arithmetic happened ...
    assert (got.float() - want).abs().mean() < 0.05 * want.abs().mean()  # ... and is close
    # weights cast to bf16 (DeepSpeed bf16) still run, prompts included
    half = with_base_of(cfg, base).to(torch.bfloat16).eval()
    with torch.no_grad():
        emb = half.encode(x)
        low, iou = half.decode(
            emb,
            points=(torch.rand(2, 1, 2) * 64, torch.ones(2, 1).long()),
            boxes=torch.tensor([[1.0, 1, 30, 30]] * 2),
        )
    assert low.dtype == torch.float32 and low.shape == (2, 3, 16, 16) and torch.isfinite(low).all()


def test_compile_option(base):
    cfg = tiny_cfg(peft=["lora"], compile=True, compile_backend="eager")
    model = with_base_of(cfg, base).eval()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), base.encode(x))
    assert set(model.state_dict()) >= set(base.state_dict())  # keys not prefixed by compile


@pytest.mark.parametrize("side", [16, 15, 7])
def test_med2d_adapter_is_sam_med2d_convolutions(side):
    """The CPU path (im2col / col2im matrix products on channels-last tokens) computes SAM-Med2D's
    adapter: channel gate, Conv2d 3x3 stride 2, ConvTranspose2d 4x4 stride 2, ReLUs, skip and
    LayerNorm, as ``torch.nn`` convolutions on NCHW maps; outputs and all gradients, odd sizes
    included (the transposed convolution comes back one larger and is cropped)."""
    torch.manual_seed(0)
    adapter = Med2dAdapter(24).double()
    nn.init.normal_(adapter.norm.weight)  # zero at init would hide the branch
    x = torch.randn(2, side, side, 24, dtype=torch.float64, requires_grad=True)

    def reference(x):
        gate = adapter.channel(x.mean(dim=(1, 2)))
        maps = (x * gate[:, None, None, :]).permute(0, 3, 1, 2)
        y = F.relu(adapter.up(F.relu(adapter.down(maps))))[:, :, :side, :side]
        return adapter.norm(x + y.permute(0, 2, 3, 1))

    ours, theirs = adapter(x), reference(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    inputs = [x, *adapter.parameters()]
    mine, ref = torch.autograd.grad(ours, inputs, g), torch.autograd.grad(theirs, inputs, g)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("peft", [[], ["lora"]])
def test_train_encoder_trains_every_encoder_weight(peft):
    frozen = build_model(cfg=tiny_cfg(peft=peft))
    full = build_model(cfg=tiny_cfg(peft=peft, train_encoder=True))
    encoder = {n for n, _ in full.image_encoder.named_parameters()}
    trained = {n.removeprefix("image_encoder.") for n in full.trainable_names}
    assert encoder <= trained  # base weights and PEFT modules alike
    # without it only the PEFT modules of the encoder train
    frozen_encoder = [n for n in frozen.trainable_names if n.startswith("image_encoder.")]
    assert all(peft_method_of(n) for n in frozen_encoder)
    assert len(frozen_encoder) < len(encoder)
    emb = full.encode(images(2))
    emb.square().mean().backward()
    grads = [n for n, p in full.image_encoder.named_parameters() if p.grad is not None]
    assert "patch_embed.proj.weight" in grads and "blocks.0.mlp.lin1.weight" in grads
