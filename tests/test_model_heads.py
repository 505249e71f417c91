"""Heads x PEFT methods: shapes, gradients, the forward router, AutoSAM progressive upsampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import build_model
from pipeline.model.config import ModelConfig
from pipeline.model.decoder import BatchedMaskDecoder

TINY = dict(arch="tiny", embed_dim=64, depth=2, num_heads=2, global_attn_indexes=[1])
METHODS = ["sam_med2d_adapter", "msa_adapter", "lora", "fact", "adapter3d"]
S = 64
D = 2  # slices: the 3D branches run too


def tiny_cfg(**kw) -> ModelConfig:
    values = {
        **TINY,
        "image_size": S,
        "window_size": 2,
        "fact_rank": 4,
        "adapter3d_dim": 16,
        "slices": D,
        "num_classes": 3,
        **kw,
    }
    return ModelConfig(**values)


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8)


def prompts(p: int) -> dict:
    g = torch.Generator().manual_seed(p)
    return {
        "points": (torch.rand(p, 3, 2, generator=g) * S, torch.tensor([[1, 0, -1]] * p)),
        "boxes": torch.tensor([[2.0, 3.0, 40.0, 50.0]] * p),
        "mask_inputs": torch.randn(p, 1, S // 4, S // 4, generator=g),
    }


def check_gradients(model) -> None:
    """Every parameter group got a gradient, and no frozen parameter did."""
    for group, params in model.param_groups().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), group
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name


# Trainable groups of each head besides the encoder's PEFT modules (auto trains its decoder).
HEAD_GROUPS = {
    "sam": {"prompt_encoder", "mask_decoder"},
    "auto": {"mask_decoder"},
    "cnn": {"head"},
    "linear": {"head"},
}
# Each method alone, none (frozen encoder, as configs/recipes/autosam.yaml), pairs, all five.
PEFTS = [[m] for m in METHODS] + [[], ["lora", "adapter3d"], ["fact", "msa_adapter"], METHODS]


@pytest.mark.parametrize("head", ["sam", "auto", "cnn", "linear"])
@pytest.mark.parametrize("peft", PEFTS, ids=lambda p: "+".join(p) or "frozen")
def test_every_peft_and_head_forward_backward(peft, head):
    torch.manual_seed(0)
    model = build_model(cfg=tiny_cfg(peft=peft, head=head)).train()
    x = images(2 * D)
    groups = set(model.param_groups())
    assert groups == HEAD_GROUPS[head] | ({"encoder_peft"} if peft else set())
    if head == "sam":
        emb = model.encode(x)
        assert emb.shape == (2 * D, 256, S // 16, S // 16)
        index = torch.tensor([0, 3, 3, 1, 2])
        low, iou = model.decode(emb, image_index=index, multimask=True, **prompts(5))
        assert low.shape == (5, 3, S // 4, S // 4) and iou.shape == (5, 3)
        single, iou1 = model.decode(emb, image_index=index, multimask=False, **prompts(5))
        assert single.shape == (5, 1, S // 4, S // 4) and iou1.shape == (5, 1)
        loss = low.sigmoid().mean() + iou.square().mean() + single.mean()
    else:
        logits = model.semantic(x)
        assert logits.shape == (2 * D, 4, S, S) and logits.dtype == torch.float32
        loss = F.cross_entropy(logits, torch.randint(0, 4, (2 * D, S, S)))
    loss.backward()
    check_gradients(model)
    if not peft:  # frozen encoder: nothing in it is trained, so no gradient reaches it
        assert not any(p.requires_grad for p in model.image_encoder.parameters())
        assert all(p.grad is None for p in model.image_encoder.parameters())


def test_forward_router_matches_methods():
    torch.manual_seed(0)
    model = build_model(cfg=tiny_cfg(peft=["lora"], slices=1)).eval()
    x = images(2)
    p = prompts(3)
    index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        emb = model(dict(images=x), mode="encode")
        assert torch.equal(emb, model.encode(x))
        batch = dict(
            embeddings=emb,
            image_index=index,
            point_coords=p["points"][0],
            point_labels=p["points"][1],
            boxes=p["boxes"],
            multimask=False,
        )
        low, iou = model(batch, mode="decode")
        ref = model.decode(
            emb, image_index=index, points=p["points"], boxes=p["boxes"], multimask=False
        )
        assert torch.equal(low, ref[0]) and torch.equal(iou, ref[1])
        low2, iou2, emb2 = model(dict(batch, images=x), mode="prompt")
        assert torch.equal(low2, low) and torch.equal(emb2, emb)
    with pytest.raises(ValueError, match="mode must be one of"):
        model({}, mode="train")
    with pytest.raises(ValueError, match="semantic\\(\\) needs a prompt-free head"):
        model(dict(images=x), mode="semantic")
    with pytest.raises(ValueError, match=r"images must be \(N, 3, 64, 64\)"):
        model.encode(torch.zeros(1, 3, 32, 32))
    auto = build_model(cfg=tiny_cfg(head="auto", slices=1))
    with pytest.raises(ValueError, match="decode\\(\\) needs SAM's promptable decoder"):
        auto.decode(emb, points=p["points"])
    with torch.no_grad():
        assert torch.equal(auto(dict(images=x), mode="semantic"), auto.semantic(x))


def test_semantic_low_res_is_the_decoders_grid():
    """semantic(low_res=True) (train.loss_resolution=low_res) returns head=auto's S/4 logits, of
    which the default output is the bilinear resize; the router passes the flag."""
    torch.manual_seed(0)
    model = build_model(cfg=tiny_cfg(head="auto", slices=1)).eval()
    x = images(2)
    with torch.no_grad():
        low = model.semantic(x, low_res=True)
        assert low.shape == (2, 4, S // 4, S // 4) and low.dtype == torch.float32
        full = model.semantic(x)
        assert full.shape == (2, 4, S, S)
        torch.testing.assert_close(full, model.upscale(low, S))
        assert torch.equal(model(dict(images=x, low_res=True), mode="semantic"), low)


def test_auto_progressive_upsampling_starts_at_bilinear():
    torch.manual_seed(0)
    plain = build_model(cfg=tiny_cfg(head="auto", slices=1)).eval()
    prog = build_model(cfg=tiny_cfg(head="auto", slices=1, progressive_upsampling=True)).eval()
    prog.load_state_dict(plain.state_dict(), strict=False)
    x = images(2)
    with torch.no_grad():
        emb = plain.encode(x)
        sparse, dense = plain.prompt_encoder(None, None, None)
        low, _ = plain.mask_decoder(
            emb, plain.prompt_encoder.get_dense_pe(), sparse.expand(2, -1, -1), dense
        )
        up = F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)
        up = F.interpolate(up, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(prog.semantic(x), up, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain.semantic(x), up, atol=1e-4)  # one x4 step differs
    assert "head" in prog.param_groups()
    assert low.shape == (2, 4, S // 4, S // 4)


def test_auto_progressive_upsampling_backward():
    """The upsampler runs at full resolution ((P, C, S/4, S/4) -> (P, C, S, S), C = prompt_dim
    / 8), and the loss reaches all of its parameters: at initialisation the zero projections
    (whose gradient is not zero), once they have moved, the stages behind them too."""
    torch.manual_seed(0)
    model = build_model(cfg=tiny_cfg(head="auto", slices=1, progressive_upsampling=True)).train()
    upsampler = model.head
    shapes = []
    upsampler.register_forward_hook(lambda m, i, o: shapes.append((i[0].shape, o.shape)))
    x = images(2)
    target = torch.randint(0, 4, (2, S, S), generator=torch.Generator().manual_seed(1))

    logits = model.semantic(x)
    assert logits.shape == (2, 4, S, S) and logits.dtype == torch.float32
    assert shapes == [((2, 32, S // 4, S // 4), (2, 32, S, S))]  # prompt_dim 256 / 8
    F.cross_entropy(logits, target).backward()
    check_gradients(model)
    grads = {n: p.grad for n, p in upsampler.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name, grad in grads.items():
        assert (grad.abs().sum() > 0) == (".proj." in name), name

    with torch.no_grad():  # as after some training: the learned residuals are no longer zero
        for stage in upsampler.stages:
            stage.proj.weight.normal_(0, 0.1)
    model.zero_grad()
    F.cross_entropy(model.semantic(x), target).backward()
    for name, p in upsampler.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    check_gradients(model)


def _low_res(model, x, per_class: bool) -> torch.Tensor:
    """head=auto's decoder logits before the resize to the input size."""
    emb = model.encode(x)
    sparse, dense = model.prompt_encoder(None, None, None)
    logits, iou = model.mask_decoder(
        emb,
        model.prompt_encoder.get_dense_pe(),
        sparse.expand(emb.shape[0], -1, -1),
        dense,
        per_class=per_class,
    )
    assert iou.shape == logits.shape[:2]
    return logits


def test_auto_per_class_decodes_each_class_alone():
    """head_decode=per_class: class k's logits are what a decoder holding only class k's token
    (and its hypernetwork MLP) computes, so the other class tokens do not touch them; joint
    decoding (one pass, the tokens attend to each other) differs."""
    torch.manual_seed(0)
    model = build_model(cfg=tiny_cfg(head="auto", slices=1, head_decode="per_class")).eval()
    x = images(2)
    k = model.mask_decoder.num_mask_tokens
    with torch.no_grad():
        logits = model.semantic(x)
        assert logits.shape == (2, 4, S, S) and logits.dtype == torch.float32
        per_class = _low_res(model, x, per_class=True)
        joint = _low_res(model, x, per_class=False)
        assert per_class.shape == joint.shape == (2, k, S // 4, S // 4)
        assert not torch.allclose(per_class, joint, atol=1e-3)
        torch.testing.assert_close(logits, model.upscale(per_class, S))

        emb = model.encode(x)
        sparse, dense = model.prompt_encoder(None, None, None)
        state = model.mask_decoder.state_dict()
        for c in range(k):
            alone = BatchedMaskDecoder(num_mask_tokens=1, transformer_dim=model.cfg.prompt_dim)
            mine = {
                n: v
                for n, v in state.items()
                if not n.startswith(("mask_tokens", "output_hypernetworks_mlps", "iou_prediction"))
            }
            mine["mask_tokens.weight"] = state["mask_tokens.weight"][c : c + 1]
            prefix = f"output_hypernetworks_mlps.{c}."
            mine |= {
                "output_hypernetworks_mlps.0." + n[len(prefix) :]: v
                for n, v in state.items()
                if n.startswith(prefix)
            }
            missing, unexpected = alone.load_state_dict(mine, strict=False)
            assert not unexpected and all(n.startswith("iou_prediction") for n in missing)
            one, _ = alone(
                emb, model.prompt_encoder.get_dense_pe(), sparse.expand(2, -1, -1), dense,
                with_iou=False,
            )  # fmt: skip
            torch.testing.assert_close(per_class[:, c : c + 1], one, atol=1e-5, rtol=1e-5)

        # a change of one class token moves that class's logits only (joint: all of them)
        model.mask_decoder.mask_tokens.weight[1] += 1.0
        moved = _low_res(model, x, per_class=True)
        moved_joint = _low_res(model, x, per_class=False)
    others = [0, 2, 3]
    torch.testing.assert_close(moved[:, others], per_class[:, others], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(moved[:, 1], per_class[:, 1], atol=1e-3)
    assert not torch.allclose(moved_joint[:, others], joint[:, others], atol=1e-3)


def test_auto_per_class_backward_with_progressive_upsampling():
    torch.manual_seed(0)
    cfg = tiny_cfg(head="auto", head_decode="per_class", progressive_upsampling=True)
    model = build_model(cfg=cfg).train()
    logits = model.semantic(images(2 * D))
    assert logits.shape == (2 * D, 4, S, S)
    F.cross_entropy(logits, torch.randint(0, 4, (2 * D, S, S))).backward()
    check_gradients(model)
    assert model.mask_decoder.mask_tokens.weight.grad.abs().sum(1).gt(0).all()  # every class


@pytest.mark.parametrize("head", ["auto", "cnn", "linear"])
def test_encoder_input_size_upsamples_the_input(head):
    """model.encoder_input_size=2S: the encoder sees the images bilinearly resized to 2S (as a
    model built for 2S fed the resized images), and the logits come back at S."""
    torch.manual_seed(0)
    small = build_model(cfg=tiny_cfg(head=head, slices=1, encoder_input_size=2 * S)).eval()
    big = build_model(cfg=tiny_cfg(head=head, slices=1, image_size=2 * S)).eval()
    big.load_state_dict(small.state_dict())
    seen = []
    small.image_encoder.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    x = images(2)
    resized = F.interpolate(x.float(), (2 * S, 2 * S), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert small.encode(x).shape == (2, 256, 2 * S // 16, 2 * S // 16)
        logits = small.semantic(x)
        ref = F.interpolate(big.semantic(resized), (S, S), mode="bilinear", align_corners=False)
    assert seen == [(2, 3, 2 * S, 2 * S)] * 2
    assert logits.shape == (2, 4, S, S)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"images must be \(N, 3, 64, 64\)"):
        small.semantic(resized)  # the input is still model.image_size
