"""Losses against loop-based float64 re-implementations of SAM-Med2D's and SAMed's formulas, and
the configured losses (``build_interactive_loss`` / ``build_semantic_loss``) against values
worked out by hand on tensors small enough to write down."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    INTERACTIVE_LOSSES,
    PART_KEYS,
    SEMANTIC_LOSSES,
    LossOptionError,
    bce_loss,
    build_interactive_loss,
    build_semantic_loss,
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


# ---------------------------------------------------------------------------------------------
# Configured losses against hand-computed values
# ---------------------------------------------------------------------------------------------

LN3, LN43, LN2 = math.log(3.0), math.log(4.0 / 3.0), math.log(2.0)


def _hand() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 2x2 mask: sigmoid(logits) = [[3/4, 1/4], [1/2, 1/4]], target [[1, 0], [1, 0]].

    By hand: sum(p t) = 5/4, sum(p) = 7/4, sum(t) = 2, so Dice loss (smooth 1) = 1 - 3.5/4.75
    = 5/19 and soft IoU = 1.25 / 2.5 = 1/2; with a predicted IoU of 0.3 the IoU-MSE is 0.04.
    Every pixel's cross-entropy is -log(3/4) except the p = 1/2 foreground one (log 2).
    """
    logits = torch.tensor([[[[LN3, -LN3], [0.0, -LN3]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    return logits, target, torch.tensor([[0.3]])


BCE_HAND = (3 * LN43 + LN2) / 4
# alpha (1-p)^2 log(1/p) on the foreground, (1-alpha) p^2 log(1/(1-p)) on the background:
# 0.25 * 1/16 * log(4/3) + 2 * 0.75 * 1/16 * log(4/3) + 0.25 * 1/4 * log 2, over 4 pixels.
FOCAL_HAND = (0.109375 * LN43 + 0.0625 * LN2) / 4
DICE_HAND, IOU_HAND = 5 / 19, 0.04


@pytest.mark.parametrize(
    ("name", "pixel", "pixel_weight"),
    [
        ("bce_dice", BCE_HAND, 1.0),
        ("focal_dice", FOCAL_HAND, 20.0),
        ("sam_med2d", FOCAL_HAND, 20.0),
    ],
)
def test_interactive_losses_match_hand_values(name, pixel, pixel_weight):
    logits, target, iou_pred = _hand()
    total, parts = build_interactive_loss(name)(logits, target, iou_pred)
    assert tuple(parts) == PART_KEYS
    assert parts["pixel"].item() == pytest.approx(pixel, abs=1e-6)
    assert parts["dice"].item() == pytest.approx(DICE_HAND, abs=1e-6)
    assert parts["iou"].item() == pytest.approx(IOU_HAND, abs=1e-6)
    assert total.item() == pytest.approx(pixel_weight * pixel + DICE_HAND + IOU_HAND, abs=1e-5)
    # Weights scale the unweighted parts.
    weights = {f"{'bce' if name == 'bce_dice' else 'focal'}_weight": 2.0, "dice_weight": 0.5}
    total2, _ = build_interactive_loss(name, **weights, iou_weight=3.0)(logits, target, iou_pred)
    assert total2.item() == pytest.approx(2 * pixel + 0.5 * DICE_HAND + 3 * IOU_HAND, abs=1e-6)


def test_sam_med2d_by_name_is_sam_med2d_loss_exactly(batch):
    logits, target, iou_pred = batch
    pairs = [({}, {}), ({"reduction": "mask"}, {"reduction": "per_mask"}),
             ({"iou_target": "detached"}, {"detach_iou_target": True}),
             ({"focal_weight": 1.0, "gamma": 1.0, "smooth": 0.5},
              {"focal_weight": 1.0, "gamma": 1.0, "smooth": 0.5})]  # fmt: skip
    for by_name, by_keyword in pairs:
        grads = []
        for fn in (build_interactive_loss("sam_med2d", **by_name), sam_med2d_loss):
            x = logits.clone().requires_grad_(True)
            kw = {} if fn is not sam_med2d_loss else by_keyword
            total, parts = fn(x, target, iou_pred, **kw)
            total.backward()
            grads.append((total, parts.get("pixel", parts.get("focal")), x.grad))
        (t1, f1, g1), (t2, f2, g2) = grads
        assert torch.equal(t1, t2) and torch.equal(f1, f2) and torch.equal(g1, g2), by_name


def test_reduction_mask_gives_a_small_mask_its_own_dice():
    """Two 4x4 masks predicted at p = 1/2 everywhere: A has 1 foreground pixel, B has 8.

    mask:  Dice_A = 1 - 2/10 = 4/5, Dice_B = 1 - 9/17 = 8/17, loss = mean = 54/85;
           soft IoU_A = 0.5/8.5 = 1/17, IoU_B = 4/12 = 1/3.
    batch: one Dice over both, 1 - 10/26 = 8/13; one soft IoU 4.5/20.5 = 9/41 for both.
    d(loss)/d(logit) on a foreground pixel = -(2 (S + 1) - (2 I + 1)) / (S + 1)^2 * p (1 - p)
    (S = sum p + sum t of the Dice's own pixels), halved by the mean over two masks:
    mask: A -18/100 / 8 = -9/400, B -25/289 / 8; batch: -42/676 / 4 on every foreground pixel.
    """
    logits = torch.zeros(2, 1, 4, 4)
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, 0, 0] = 1.0
    target[1, 0, :2] = 1.0
    iou_pred = torch.zeros(2, 1)
    want = {"mask": (54 / 85, (1 / 17**2 + 1 / 9) / 2), "batch": (8 / 13, (9 / 41) ** 2)}
    grad_fg = {}
    for reduction, (dice, iou) in want.items():
        x = logits.clone().requires_grad_(True)
        loss = build_interactive_loss("bce_dice", reduction=reduction, bce_weight=0.0,
                                      iou_weight=0.0)  # fmt: skip
        total, parts = loss(x, target, iou_pred)
        assert parts["dice"].item() == pytest.approx(dice, abs=1e-6)
        _, parts_iou = build_interactive_loss("bce_dice", reduction=reduction)(x, target, iou_pred)
        assert parts_iou["iou"].item() == pytest.approx(iou, abs=1e-6)
        total.backward()
        grad_fg[reduction] = (x.grad[0, 0, 0, 0].item(), x.grad[1, 0, 0, 0].item())
    assert grad_fg["mask"][0] == pytest.approx(-9 / 400, abs=1e-7)
    assert grad_fg["mask"][1] == pytest.approx(-25 / 289 / 8, abs=1e-7)
    assert grad_fg["batch"][0] == pytest.approx(-42 / 676 / 4, abs=1e-7)
    # batch: the small mask's pixel pulls exactly as hard as any large-mask pixel, so the small
    # mask's share is its share of the pixels; mask: its one pixel pulls twice as hard.
    assert grad_fg["batch"][0] == pytest.approx(grad_fg["batch"][1], abs=1e-9)
    assert grad_fg["mask"][0] / grad_fg["mask"][1] > 2.0


def test_iou_target_detached_stops_the_gradient_into_the_logits():
    """IoU-MSE alone on the hand mask: L = (IoU - q)^2 with IoU = I / U, U = sum p + sum t - I.

    dIoU/dp = (t U - I (1 - t)) / U^2 = 0.4 (foreground), -0.2 (background); 2 (IoU - q) = 0.4;
    times p (1 - p) = 3/16, 3/16, 1/4, 3/16 -> live gradient [[0.03, -0.015], [0.04, -0.015]].
    """
    logits, target, iou_pred = _hand()
    grads = {}
    for iou_target in ("live", "detached"):
        x = logits.clone().requires_grad_(True)
        q = iou_pred.clone().requires_grad_(True)
        loss = build_interactive_loss("bce_dice", bce_weight=0.0, dice_weight=0.0,
                                      iou_target=iou_target)  # fmt: skip
        total, _ = loss(x, target, q)
        total.backward()
        assert q.grad.item() == pytest.approx(-2 * (0.5 - 0.3), abs=1e-6)  # same either way
        grads[iou_target] = x.grad
    want = torch.tensor([[[[0.03, -0.015], [0.04, -0.015]]]])
    assert torch.allclose(grads["live"], want, atol=1e-6)
    assert torch.equal(grads["detached"], torch.zeros_like(want))


def test_pos_weight_scales_the_foreground_term():
    logits, target, iou_pred = _hand()
    want = (4 * LN43 + 2 * LN2) / 4  # the two foreground pixels count twice
    assert bce_loss(logits, target, pos_weight=2.0).item() == pytest.approx(want, abs=1e-6)
    ref = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(2.0))
    assert bce_loss(logits, target, pos_weight=2.0).item() == pytest.approx(ref.item(), abs=1e-7)
    grads = []
    for pos_weight in (1.0, 2.0):
        x = logits.clone().requires_grad_(True)
        loss = build_interactive_loss("bce_dice", pos_weight=pos_weight, dice_weight=0.0,
                                      iou_weight=0.0)  # fmt: skip
        total, parts = loss(x, target, iou_pred)
        total.backward()
        grads.append(x.grad)
    assert parts["pixel"].item() == pytest.approx(want, abs=1e-6)
    fg = target.bool()
    assert torch.allclose(grads[1][fg], 2 * grads[0][fg]) and (grads[0][fg] < 0).all()
    assert torch.equal(grads[1][~fg], grads[0][~fg])


def test_bce_is_stable_and_matches_torch(batch):
    logits, target, _ = batch
    logits = torch.cat([logits, torch.full((1, 1, 12, 12), 60.0)])  # confident and wrong
    target = torch.cat([target, torch.zeros(1, 1, 12, 12)])
    for reduction in ("batch", "per_mask"):
        got = bce_loss(logits, target, pos_weight=3.0, reduction=reduction)
        ref = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(3.0))
        assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_options_are_listed_and_resolved():
    assert set(INTERACTIVE_LOSSES) == {"sam_med2d", "focal_dice", "bce_dice"}
    assert set(SEMANTIC_LOSSES) == {"ce_dice"}
    for name, defaults in INTERACTIVE_LOSSES.items():
        assert build_interactive_loss(name).options == dict(defaults)
    loss = build_interactive_loss("bce_dice", pos_weight=2.0, reduction="batch")
    assert loss.options["pos_weight"] == 2.0 and loss.options["reduction"] == "batch"
    assert INTERACTIVE_LOSSES["sam_med2d"]["reduction"] == "batch"
    assert INTERACTIVE_LOSSES["sam_med2d"]["iou_target"] == "live"
    with pytest.raises(TypeError):
        INTERACTIVE_LOSSES["bce_dice"]["pos_weight"] = 5.0  # type: ignore[index]
    assert build_semantic_loss("ce_dice").options == dict(SEMANTIC_LOSSES["ce_dice"])


@pytest.mark.parametrize(
    ("name", "options", "option", "match"),
    [
        ("dice_bce", {}, "name", "unknown interactive loss 'dice_bce'; known: sam_med2d"),
        ("ce_dice", {}, "name", "a loss for prompt-free heads"),
        ("bce_dice", {"gama": 2.0}, "gama", "unknown option of loss 'bce_dice'; its options"),
        ("focal_dice", {"pos_weight": 2.0}, "pos_weight", "unknown option of loss 'focal_dice'"),
        ("bce_dice", {"reduction": "mean"}, "reduction", "must be one of mask, batch; got 'mean'"),
        ("sam_med2d", {"iou_target": "stop"}, "iou_target", "must be one of detached, live"),
        ("bce_dice", {"dice_weight": -1}, "dice_weight", "must be >= 0, got -1"),
        ("bce_dice", {"bce_weight": "1"}, "bce_weight", "must be a number, got '1'"),
        ("bce_dice", {"iou_weight": True}, "iou_weight", "must be a number, got True"),
        ("bce_dice", {"pos_weight": 0.0}, "pos_weight", "must be > 0, got 0.0"),
        ("focal_dice", {"alpha": 1.5}, "alpha", r"must be in \[0, 1\], got 1.5"),
        ("focal_dice", {"gamma": float("nan")}, "gamma", "must be a number, got nan"),
        ("bce_dice", {"bce_weight": 0, "dice_weight": 0, "iou_weight": 0}, "bce_weight",
         "all term weights"),
    ],
)  # fmt: skip
def test_bad_interactive_options_name_the_option(name, options, option, match):
    with pytest.raises(LossOptionError, match=match) as err:
        build_interactive_loss(name, **options)
    assert err.value.option == option
    assert str(err.value).startswith(f"{option}: ")
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("name", "options", "option", "match"),
    [
        ("bce_dice", {}, "name",
         r"unknown prompt-free loss 'bce_dice' \(a loss for promptable heads\); known: ce_dice"),
        ("ce_dice", {"reduction": "image"}, "reduction", "must be one of mask, batch"),
        ("ce_dice", {"include_background": "no"}, "include_background", "true or false"),
        ("ce_dice", {"ce_weight": 0, "dice_weight": 0.0}, "ce_weight", "both 0"),
        ("ce_dice", {"squared": True}, "squared", "unknown option of loss 'ce_dice'"),
    ],
)
def test_bad_semantic_options_name_the_option(name, options, option, match):
    with pytest.raises(LossOptionError, match=match) as err:
        build_semantic_loss(name, **options)
    assert err.value.option == option


def test_semantic_loss_matches_hand_values():
    """Two 1x2 images, both channels at logit 0 (softmax 1/2): labels [0, 1] and [0, 0].

    CE = log 2 everywhere. Dice (squared denominator, s = 1e-5), per class c:
    batch: c0 1 - (3 + s) / (4 + s), c1 1 - (1 + s) / (2 + s).
    mask:  image 0: c0 and c1 1 - (1 + s) / (1.5 + s); image 1: c0 1 - (2 + s) / (2.5 + s),
           c1 (absent) 1 - s / (0.5 + s).
    """
    s = 1e-5
    logits = torch.zeros(2, 2, 1, 2)
    label = torch.tensor([[[0, 1]], [[0, 0]]])
    img0 = 1 - (1 + s) / (1.5 + s)
    absent = 1 - s / (0.5 + s)
    cases = {
        ("batch", True): (2 - (3 + s) / (4 + s) - (1 + s) / (2 + s)) / 2,
        ("batch", False): 1 - (1 + s) / (2 + s),
        ("mask", True): (2 * img0 + 1 - (2 + s) / (2.5 + s) + absent) / 4,
        ("mask", False): (img0 + absent) / 2,
    }
    for (reduction, background), dice in cases.items():
        loss = build_semantic_loss("ce_dice", reduction=reduction, include_background=background)
        total, parts = loss(logits, label)
        assert set(parts) == {"ce", "dice"}
        assert parts["ce"].item() == pytest.approx(LN2, abs=1e-7)
        assert parts["dice"].item() == pytest.approx(dice, abs=1e-6), (reduction, background)
        assert total.item() == pytest.approx(0.2 * LN2 + 0.8 * dice, abs=1e-6)
    # By name with the defaults is exactly today's function.
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 4, 6, 5, generator=g), torch.randint(0, 4, (2, 6, 5), generator=g)
    assert torch.equal(build_semantic_loss("ce_dice")(x, y)[0], ce_dice_loss(x, y)[0])
