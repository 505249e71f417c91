"""Losses against loop-based float64 re-implementations of SAM-Med2D's and SAMed's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import (
    ce_dice_loss,
    dice_loss,
    focal_loss,
    iou_mse_loss,
    sam_med2d_loss,
    select_best,
    soft_iou,
)

# ---------------------------------------------------------------------------------------------
# References: plain Python floats, one pixel at a time, from the published formulas.
# ---------------------------------------------------------------------------------------------


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _masks(logits: torch.Tensor, target: torch.Tensor) -> list[tuple[list[float], list[float]]]:
    """Per mask: (probabilities, targets) as Python lists."""
    out = []
    for i in range(logits.shape[0]):
        p = [_sig(v) for v in logits[i].double().flatten().tolist()]
        t = [float(v) for v in target[i].double().flatten().tolist()]
        out.append((p, t))
    return out


def ref_focal(logits, target, gamma=2.0, alpha=0.25, per_mask=False) -> float:
    means, total, count = [], 0.0, 0
    for p, t in _masks(logits, target):
        s = 0.0
        for pi, ti in zip(p, t, strict=True):
            s += -alpha * ti * (1 - pi) ** gamma * math.log(pi + 1e-12)
            s += -(1 - alpha) * (1 - ti) * pi**gamma * math.log(1 - pi + 1e-12)
        means.append(s / (len(p) + 1e-12))
        total, count = total + s, count + len(p)
    return sum(means) / len(means) if per_mask else total / (count + 1e-12)


def ref_dice(logits, target, smooth=1.0, per_mask=False) -> float:
    losses, inter, sp, st = [], 0.0, 0.0, 0.0
    for p, t in _masks(logits, target):
        i = sum(a * b for a, b in zip(p, t, strict=True))
        losses.append(1 - (2 * i + smooth) / (sum(p) + sum(t) + smooth))
        inter, sp, st = inter + i, sp + sum(p), st + sum(t)
    if per_mask:
        return sum(losses) / len(losses)
    return 1 - (2 * inter + smooth) / (sp + st + smooth)


def ref_iou_mse(logits, target, iou_pred, per_mask=False) -> float:
    ious, inter, sp, st = [], 0.0, 0.0, 0.0
    for p, t in _masks(logits, target):
        i = sum(a * b for a, b in zip(p, t, strict=True))
        ious.append((i + 1e-7) / (sum(p) + sum(t) - i + 1e-7))
        inter, sp, st = inter + i, sp + sum(p), st + sum(t)
    batch_iou = (inter + 1e-7) / (sp + st - inter + 1e-7)
    preds = iou_pred.double().flatten().tolist()
    errs = [((ious[j] if per_mask else batch_iou) - q) ** 2 for j, q in enumerate(preds)]
    return sum(errs) / len(errs)


def ref_ce_dice(logits, label, ce_w, dice_w, smooth=1e-5, skip_bg=False) -> tuple[float, float]:
    b, c, h, w = logits.shape
    lg, lb = logits.double().tolist(), label.tolist()
    ce, inter, ss, ys = 0.0, [0.0] * c, [0.0] * c, [0.0] * c
    for n in range(b):
        for y in range(h):
            for x in range(w):
                z = [lg[n][k][y][x] for k in range(c)]
                mx = max(z)
                den = sum(math.exp(v - mx) for v in z)
                s = [math.exp(v - mx) / den for v in z]
                ce -= math.log(s[lb[n][y][x]])
                for k in range(c):
                    yk = 1.0 if lb[n][y][x] == k else 0.0
                    inter[k] += s[k] * yk
                    ss[k] += s[k] * s[k]
                    ys[k] += yk * yk
    ce /= b * h * w
    per_class = [1 - (2 * inter[k] + smooth) / (ss[k] + ys[k] + smooth) for k in range(c)]
    if skip_bg:
        per_class = per_class[1:]
    dice = sum(per_class) / len(per_class)
    return ce_w * ce + dice_w * dice, dice


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 1, 12, 12, generator=g) * 3
    target = (torch.rand(3, 1, 12, 12, generator=g) < 0.3).float()
    target[2] = 0.0  # an empty mask: batch and per-mask reductions differ most here
    iou_pred = torch.rand(3, 1, generator=g)
    return logits, target, iou_pred


@pytest.mark.parametrize("reduction", ["batch", "per_mask"])
def test_terms_match_reference(batch, reduction):
    logits, target, iou_pred = batch
    per_mask = reduction == "per_mask"
    cases = [
        (
            focal_loss(logits, target, reduction=reduction),
            ref_focal(logits, target, per_mask=per_mask),
        ),
        (
            focal_loss(logits, target, gamma=1.5, alpha=0.6, reduction=reduction),
            ref_focal(logits, target, gamma=1.5, alpha=0.6, per_mask=per_mask),
        ),
        (
            dice_loss(logits, target, reduction=reduction),
            ref_dice(logits, target, per_mask=per_mask),
        ),
        (
            dice_loss(logits, target, smooth=0.5, reduction=reduction),
            ref_dice(logits, target, smooth=0.5, per_mask=per_mask),
        ),
        (
            iou_mse_loss(logits, target, iou_pred, reduction=reduction),
            ref_iou_mse(logits, target, iou_pred, per_mask=per_mask),
        ),
    ]
    for got, want in cases:
        assert got.dtype == torch.float32 and got.dim() == 0
        assert abs(got.item() - want) < 1e-6, (got.item(), want)
    # float64 inputs stay float64 and agree to rounding.
    got64 = dice_loss(logits.double(), target.double(), reduction=reduction)
    assert got64.dtype == torch.float64
    assert abs(got64.item() - ref_dice(logits, target, per_mask=per_mask)) < 1e-12


def test_batch_and_per_mask_really_differ(batch):
    logits, target, iou_pred = batch
    per_mask = dice_loss(logits, target, reduction="per_mask")
    assert abs(dice_loss(logits, target).item() - per_mask.item()) > 1e-3
    assert soft_iou(logits, target).shape == ()
    assert soft_iou(logits, target, reduction="per_mask").shape == (3,)


def test_sam_med2d_loss_total_and_parts(batch):
    logits, target, iou_pred = batch
    logits = logits.clone().requires_grad_(True)
    total, parts = sam_med2d_loss(logits, target, iou_pred)
    want = (
        20 * ref_focal(logits.detach(), target)
        + ref_dice(logits.detach(), target)
        + ref_iou_mse(logits.detach(), target, iou_pred)
    )
    assert abs(total.item() - want) < 1e-5
    assert set(parts) == {"focal", "dice", "iou"}
    assert all(not v.requires_grad and v.dim() == 0 for v in parts.values())
    total2, _ = sam_med2d_loss(
        logits, target, iou_pred, focal_weight=1, dice_weight=2, iou_weight=3
    )
    want2 = parts["focal"] + 2 * parts["dice"] + 3 * parts["iou"]
    assert torch.allclose(total2.detach(), want2, atol=1e-6)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_iou_target_gradient_reaches_logits_unless_detached(batch):
    logits, target, iou_pred = batch
    grads = []
    for detach in (False, True):
        x = logits.clone().requires_grad_(True)
        pred = iou_pred.clone().requires_grad_(True)
        iou_mse_loss(x, target, pred, detach_iou_target=detach).backward()
        assert pred.grad is not None and pred.grad.abs().sum() > 0
        grads.append(None if x.grad is None else x.grad.abs().sum().item())
    assert grads[0] > 0 and grads[1] is None


def test_bf16_autocast_reduces_in_fp32(batch):
    logits, target, iou_pred = batch
    half = logits.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = sam_med2d_loss(half, target.bfloat16(), iou_pred.bfloat16())
    assert total.dtype == torch.float32
    want, _ = sam_med2d_loss(half.float(), target, iou_pred.bfloat16().float())
    assert torch.equal(total, want)


def test_select_best_picks_argmax_and_routes_gradient():
    g = torch.Generator().manual_seed(3)
    low = torch.randn(5, 3, 4, 4, generator=g, requires_grad=True)
    iou = torch.tensor(
        [[0.1, 0.9, 0.3], [0.8, 0.2, 0.1], [0.2, 0.3, 0.7], [0.5, 0.5, 0.1], [0.0, 0.0, 0.0]]
    )
    logits, best, index = select_best(low, iou)
    assert index.tolist() == [1, 0, 2, 0, 0]  # ties -> lowest index
    assert logits.shape == (5, 1, 4, 4) and best.shape == (5, 1)
    for i, k in enumerate(index.tolist()):
        assert torch.equal(logits[i, 0], low[i, k])
        assert best[i, 0] == iou[i, k]
    logits.sum().backward()
    chosen = torch.zeros(5, 3)
    chosen[torch.arange(5), index] = 1
    assert torch.equal(low.grad.abs().sum((2, 3)) > 0, chosen.bool())
    one, _, idx1 = select_best(low[:, :1], iou[:, :1])
    assert torch.equal(one, low[:, :1]) and idx1.tolist() == [0] * 5


@pytest.mark.parametrize("skip_bg", [False, True])
def test_ce_dice_matches_samed_formula(skip_bg):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 4, 6, 5, generator=g) * 2
    label = torch.randint(0, 4, (2, 6, 5), generator=g)
    label[:, :, 0] = 3
    total, parts = ce_dice_loss(logits, label, ignore_background_in_dice=skip_bg)
    want_total, want_dice = ref_ce_dice(logits, label, 0.2, 0.8, skip_bg=skip_bg)
    assert abs(total.item() - want_total) < 1e-6
    assert abs(parts["dice"].item() - want_dice) < 1e-6
    total2, parts2 = ce_dice_loss(logits, label, ce_weight=1.0, dice_weight=0.0)
    assert abs(total2.item() - parts2["ce"].item()) < 1e-7


def test_bad_inputs_name_the_function(batch):
    logits, target, iou_pred = batch
    with pytest.raises(ValueError, match="focal_loss.*differ in shape"):
        focal_loss(logits, target[:, :, :6])
    with pytest.raises(ValueError, match="dice_loss: reduction"):
        dice_loss(logits, target, reduction="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"iou_mse_loss: iou_pred must be \(P, 1\)"):
        iou_mse_loss(logits, target, iou_pred[:, 0])
    with pytest.raises(ValueError, match="select_best"):
        select_best(logits, iou_pred[:2])
    with pytest.raises(ValueError, match="ce_dice_loss: label must be int64"):
        ce_dice_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"ce_dice_loss: need logits \(B, C\+1, H, W\)"):
        ce_dice_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.int64))
