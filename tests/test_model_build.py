"""SAM construction, Meta-layout checkpoints (resizing, errors) and the batched decoder."""

from __future__ import annotations

import dataclasses
import json
import resource
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from configtree import ConfigError
from pipeline.model import WeightsError, build_model
from pipeline.model.build import build_meta_model
from pipeline.model.config import ModelConfig
from samadapt.cli import main
from samadapt.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
BASE = str(ROOT / "configs" / "base.yaml")
TINY = dict(arch="tiny", embed_dim=64, depth=2, num_heads=2, global_attn_indexes=[1])


def tiny_cfg(**kw) -> ModelConfig:
    values = {**TINY, "image_size": 64, "window_size": 2, "peft": [], **kw}
    return ModelConfig(**values)


def stock_sam(size: int, depth: int = 2, width: int = 64, window: int = 2) -> Sam:
    """A tiny SAM made of the segment_anything modules, with Meta's key layout."""
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=size,
            embed_dim=width,
            depth=depth,
            num_heads=2,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(depth - 1,),
            window_size=window,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(size // 16, size // 16),
            input_image_size=(size, size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
        ),
    )


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter random values (SAM zero-initialises pos_embed and rel_pos)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + p)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def stock128() -> Sam:
    torch.manual_seed(0)
    sam = stock_sam(128).eval()
    randomize(sam)
    return sam


def test_encoder_and_keys_match_stock_sam(tmp_path, stock128):
    """Our model has Meta's keys for the base, and computes what the stock modules compute."""
    path = tmp_path / "sam_tiny.pth"
    torch.save(stock128.state_dict(), path)
    model = build_model(cfg=tiny_cfg(image_size=128, checkpoint=str(path))).eval()
    assert set(model.state_dict()) == set(stock128.state_dict())
    x = images(2, 128)
    with torch.no_grad():
        ours = model.encode(x)
        theirs = stock128.image_encoder(stock128.preprocess(x.float()))
    assert ours.shape == (2, 256, 8, 8)
    assert torch.equal(ours, theirs)


def test_unit_pixel_norm_is_samed_preprocess(tmp_path, stock128):
    """model.pixel_norm=unit: our encoder on 0..255 pixels computes what SAMed's Sam (stock
    modules built with pixel_mean 0 and pixel_std 1) computes on the same image scaled to [0, 1];
    the default (sam) differs from it."""
    path = tmp_path / "sam_tiny.pth"
    torch.save(stock128.state_dict(), path)
    unit = build_model(cfg=tiny_cfg(image_size=128, checkpoint=str(path), pixel_norm="unit"))
    meta = build_model(cfg=tiny_cfg(image_size=128, checkpoint=str(path)))
    samed = Sam(
        stock128.image_encoder,
        stock128.prompt_encoder,
        stock128.mask_decoder,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    ).eval()
    x = images(2, 128)
    with torch.no_grad():
        ours = unit.eval().encode(x)
        theirs = samed.image_encoder(samed.preprocess(x.float() / 255))
        assert float((x.float() / 255).max()) <= 1.0 and torch.equal(unit._normalize(x), x / 255)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(meta.eval().encode(x), theirs, atol=1e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_padded_windows_match_stock_sam(tmp_path, fused):
    """Windows that do not tile the grid (SAM at 256 px: 16 x 16 tokens, window 14): we project
    only the real tokens and attend only from real queries (full, last-row, last-column and
    corner windows in groups); outputs and gradients are SAM's, padding keys and values included,
    on the plain and the fused (scaled_dot_product_attention) path."""
    torch.manual_seed(1)
    stock = stock_sam(128, window=3)  # 8 x 8 tokens in 3 x 3 windows: padded to 9 x 9
    randomize(stock)
    path = tmp_path / "sam_pad.pth"
    torch.save(stock.state_dict(), path)
    cfg = tiny_cfg(image_size=128, window_size=3, checkpoint=str(path), fused_attention=fused)
    model = build_model(cfg=cfg)
    for p in model.parameters():
        p.requires_grad_(True)
    x = images(2, 128)
    ours = model.encode(x)
    theirs = stock.image_encoder(stock.preprocess(x.float()))
    torch.testing.assert_close(ours, theirs, atol=1e-5 if fused else 1e-6, rtol=1e-5)
    (ours * theirs.detach()).sum().backward()
    (theirs * theirs.detach()).sum().backward()
    for name in ("blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.norm1.weight",
                 "blocks.0.attn.rel_pos_h", "blocks.0.attn.rel_pos_w"):  # fmt: skip
        mine = dict(model.image_encoder.named_parameters())[name]
        ref = dict(stock.image_encoder.named_parameters())[name]
        torch.testing.assert_close(mine.grad, ref.grad, atol=1e-5, rtol=1e-4)


def test_decode_with_image_index_matches_per_image_stock_calls(stock128, tmp_path):
    path = tmp_path / "sam_tiny.pth"
    torch.save(stock128.state_dict(), path)
    model = build_model(cfg=tiny_cfg(image_size=128, checkpoint=str(path))).eval()
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(3, 256, 8, 8, generator=g)
    index = torch.tensor([2, 0, 2, 1, 0])  # unordered, image 2 twice
    coords = torch.rand(5, 3, 2, generator=g) * 128
    labels = torch.tensor([[1, 0, -1], [1, 1, 0], [1, -1, -1], [0, 1, 1], [1, 0, 0]])
    boxes = torch.tensor(
        [[4.0, 8, 60, 90], [0, 0, 127, 127], [30, 30, 50, 70], [1, 2, 3, 4], [10, 20, 100, 110]]
    )
    masks_in = torch.randn(5, 1, 32, 32, generator=g)
    for multimask in (True, False):
        with torch.no_grad():
            low, iou = model.decode(
                emb,
                image_index=index,
                points=(coords, labels),
                boxes=boxes,
                mask_inputs=masks_in,
                multimask=multimask,
            )
        k = 3 if multimask else 1
        assert low.shape == (5, k, 32, 32) and iou.shape == (5, k)
        for p in range(5):
            with torch.no_grad():
                sparse, dense = stock128.prompt_encoder(
                    points=(coords[p : p + 1], labels[p : p + 1]),
                    boxes=boxes[p : p + 1],
                    masks=masks_in[p : p + 1],
                )
                ref_low, ref_iou = stock128.mask_decoder(
                    image_embeddings=emb[index[p]][None],
                    image_pe=stock128.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
            torch.testing.assert_close(low[p : p + 1], ref_low, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[p : p + 1], ref_iou, atol=1e-5, rtol=1e-5)
    # a wrong mapping is detected: prompt 0 decoded on image 0 instead of 2 differs
    with torch.no_grad():
        other, _ = model.decode(
            emb,
            image_index=torch.tensor([0, 0, 2, 1, 0]),
            points=(coords, labels),
            boxes=boxes,
            mask_inputs=masks_in,
        )
        right, _ = model.decode(
            emb, image_index=index, points=(coords, labels), boxes=boxes, mask_inputs=masks_in
        )
    assert not torch.allclose(other[0], right[0])
    assert torch.equal(other[1:], right[1:])


def test_decode_points_only_and_no_index(stock128):
    model = build_model(cfg=tiny_cfg(image_size=128)).eval()
    emb = torch.randn(2, 256, 8, 8)
    pts = (torch.rand(2, 1, 2) * 128, torch.ones(2, 1, dtype=torch.long))
    low, iou = model.decode(emb, points=pts, multimask=False)
    assert low.shape == (2, 1, 32, 32) and iou.shape == (2, 1)
    with pytest.raises(ValueError, match="image_index"):
        model.decode(emb, points=(torch.rand(3, 1, 2), torch.ones(3, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="image_index must be"):
        model.decode(emb, image_index=torch.tensor([0, 5]), points=pts)
    up = model.upscale(low, 128)
    assert up.shape == (2, 1, 128, 128)
    torch.testing.assert_close(
        up, F.interpolate(low, (128, 128), mode="bilinear", align_corners=False)
    )


def test_resize_position_embeddings_1024_to_256(tmp_path):
    """A tiny checkpoint saved at 1024 px (Meta's size) loads into a 256 px model."""
    torch.manual_seed(0)
    big = stock_sam(1024, window=4)
    randomize(big, seed=3)
    path = tmp_path / "sam_tiny_1024.pth"
    torch.save(big.state_dict(), path)
    cfg = tiny_cfg(image_size=256, window_size=4, checkpoint=str(path))
    model = build_model(cfg=cfg)
    sd = model.state_dict()
    ref = big.state_dict()
    assert ref["image_encoder.pos_embed"].shape == (1, 64, 64, 64)
    assert sd["image_encoder.pos_embed"].shape == (1, 16, 16, 64)
    want = F.interpolate(
        ref["image_encoder.pos_embed"].permute(0, 3, 1, 2),
        size=(16, 16),
        mode="bilinear",
        align_corners=False,
    ).permute(0, 2, 3, 1)
    torch.testing.assert_close(sd["image_encoder.pos_embed"], want)
    # global block 1: 2 * 64 - 1 = 127 rows -> 2 * 16 - 1 = 31; windowed block 0 unchanged
    assert ref["image_encoder.blocks.1.attn.rel_pos_h"].shape[0] == 127
    assert sd["image_encoder.blocks.1.attn.rel_pos_h"].shape[0] == 31
    assert torch.equal(
        sd["image_encoder.blocks.0.attn.rel_pos_w"], ref["image_encoder.blocks.0.attn.rel_pos_w"]
    )
    for key in (
        "mask_decoder.iou_token.weight",
        "prompt_encoder.point_embeddings.1.weight",
        "image_encoder.blocks.0.mlp.lin1.weight",
    ):
        assert torch.equal(sd[key], ref[key])
    out = model.encode(images(1, 256))
    assert out.shape == (1, 256, 16, 16) and torch.isfinite(out).all()


def test_checkpoint_errors(tmp_path, stock128):
    good = stock128.state_dict()
    cfg = tiny_cfg(image_size=128)

    with pytest.raises(WeightsError, match="checkpoint file not found"):
        build_model(cfg=dataclasses.replace(cfg, checkpoint=str(tmp_path / "nope.pth")))

    bad = dict(good)
    key = "image_encoder.blocks.0.attn.qkv.weight"
    bad[key + "t"] = bad.pop(key)
    torch.save(bad, tmp_path / "key.pth")
    with pytest.raises(WeightsError) as err:
        build_model(cfg=dataclasses.replace(cfg, checkpoint=str(tmp_path / "key.pth")))
    msg = str(err.value)
    assert "missing keys: image_encoder.blocks.0.attn.qkv.weight" in msg
    assert "unexpected keys: image_encoder.blocks.0.attn.qkv.weightt" in msg

    bad = dict(good)
    bad["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(
        WeightsError,
        match=r"mask_decoder.iou_token.weight: checkpoint \(1, 128\)"
        r" vs model \(1, 256\)",
    ):
        build_model(cfg=dataclasses.replace(cfg, checkpoint=str(tmp_path / "shape.pth")))

    deeper = stock_sam(128, depth=3)
    torch.save({"model": deeper.state_dict()}, tmp_path / "deep.pth")  # wrapped, as SAM-Med2D
    with pytest.raises(WeightsError, match="width 64, 3 blocks .* builds width 64, 2 blocks"):
        build_model(cfg=dataclasses.replace(cfg, checkpoint=str(tmp_path / "deep.pth")))

    many = dict(good)
    for i in range(8):
        many[f"extra.{i}"] = torch.zeros(1)
    torch.save(many, tmp_path / "many.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys: extra.0, .*\(8 in all\)"):
        build_model(cfg=dataclasses.replace(cfg, checkpoint=str(tmp_path / "many.pth")))

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        build_model(cfg=dataclasses.replace(cfg, checkpoint=str(tmp_path / "junk.pth")))


def test_sam_med2d_adapter_keys_load(tmp_path):
    """SAM-Med2D names its adapters blocks.i.Adapter.{channel,spatial.0,spatial.2,norm}."""
    cfg = tiny_cfg(peft=["sam_med2d_adapter"])
    src = build_model(cfg=cfg)
    randomize(src, seed=5)
    theirs = {}
    for k, v in src.state_dict().items():
        k = k.replace(".med2d_adapter.down.", ".Adapter.spatial.0.")
        k = k.replace(".med2d_adapter.up.", ".Adapter.spatial.2.")
        k = k.replace(".med2d_adapter.", ".Adapter.")
        theirs[k] = v
    torch.save({"model": theirs, "epoch": 3}, tmp_path / "sam-med2d_tiny.pth")
    loaded = build_model(
        cfg=dataclasses.replace(cfg, checkpoint=str(tmp_path / "sam-med2d_tiny.pth"))
    )
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("init", ["sam", "random"])
@pytest.mark.parametrize("num_classes", [1, 5])
def test_auto_head_maps_sam_mask_tokens(tmp_path, stock128, num_classes, init):
    """class_token_init=sam (the default): class token i starts as SAM's mask token i mod 4;
    random: the class tokens keep the model's fresh init, everything else is SAM's."""
    path = tmp_path / "sam.pth"
    torch.save(stock128.state_dict(), path)
    cfg = tiny_cfg(
        image_size=128,
        head="auto",
        num_classes=num_classes,
        checkpoint=str(path),
        class_token_init=init,
    )
    torch.manual_seed(3)
    model = build_model(cfg=cfg)
    torch.manual_seed(3)
    fresh = build_model(cfg=dataclasses.replace(cfg, checkpoint="")).mask_decoder.mask_tokens
    ref = stock128.mask_decoder
    dec = model.mask_decoder
    assert dec.num_mask_tokens == num_classes + 1
    if init == "random":
        assert torch.equal(dec.mask_tokens.weight, fresh.weight)
    for i in range(num_classes + 1):
        sam_token = ref.mask_tokens.weight[i % 4]
        assert torch.equal(dec.mask_tokens.weight[i], sam_token) == (init == "sam")
        for a, b in zip(
            dec.output_hypernetworks_mlps[i].parameters(),
            ref.output_hypernetworks_mlps[i % 4].parameters(),
            strict=True,
        ):
            assert torch.equal(a, b)
    assert torch.equal(
        dec.transformer.layers[0].mlp.lin1.weight, ref.transformer.layers[0].mlp.lin1.weight
    )


def test_config_checks_name_the_key(tmp_path):
    with pytest.raises(
        ConfigError, match="model.peft_blocks .* must be block indexes in \\[0, 2\\)"
    ):
        load_config(DEBUG, ["model.peft_blocks=[0,5]"])
    with pytest.raises(ConfigError, match="model.peft unknown PEFT method 'loraa'"):
        load_config(DEBUG, ["model.peft=[loraa]"])
    with pytest.raises(ConfigError, match="model.progressive_upsampling is an option of head=auto"):
        load_config(DEBUG, ["model.progressive_upsampling=true"])
    with pytest.raises(ConfigError, match="model.global_attn_indexes"):
        load_config(BASE, ["model.depth=2"])
    with pytest.raises(ConfigError, match="model.peft_method_blocks names 'fact'"):
        load_config(DEBUG, ["model.peft_method_blocks={fact: [0]}"])
    cfg = load_config(
        DEBUG, ["model.peft=[lora,fact]", "model.peft_method_blocks={fact: [1]}"]
    ).model
    assert cfg.blocks_for("fact") == [1] and cfg.blocks_for("lora") == [0, 1]


def _stock_counts(arch: str) -> dict[str, int]:
    """Parameters of Meta's SAM per part, from segment_anything's own builder (on meta)."""
    with torch.device("meta"):
        sam = sam_model_registry[arch](checkpoint=None)
    parts = ("image_encoder", "prompt_encoder", "mask_decoder")
    return {part: sum(p.numel() for p in getattr(sam, part).parameters()) for part in parts}


@pytest.mark.parametrize("arch", ["vit_l", "vit_h"])
def test_large_archs_on_meta_match_meta_sam(arch, capsys):
    """vit_l / vit_h at 1024 px without PEFT have exactly the parameters of Meta's builders
    (308M / 637M image encoder), counted by ``samadapt model-info`` with no memory used."""
    overrides = [f"model.arch={arch}", "model.peft=[]", "model.image_size=1024"]
    cfg = load_config(BASE, overrides).model
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    model = build_meta_model(cfg=cfg)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with torch.device("meta"):
        via_build = build_model(cfg=cfg, load_checkpoint=False)
    assert all(p.is_meta for p in via_build.parameters())
    # vit_h in fp32 is 2.5 GB; nothing near that was allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 512 * 1024

    assert main(["model-info", BASE, *overrides, "--json"]) == 0
    rows = {r["part"]: r["total"] for r in json.loads(capsys.readouterr().out)}
    stock = _stock_counts(arch)
    assert rows["image_encoder (SAM)"] == stock["image_encoder"]
    assert rows["prompt_encoder"] == stock["prompt_encoder"]
    assert rows["mask_decoder"] == stock["mask_decoder"]
    assert rows["total"] == sum(stock.values())
    assert rows["total"] == sum(p.numel() for p in model.parameters())
    assert set(rows) == {"image_encoder (SAM)", "prompt_encoder", "mask_decoder", "total"}
