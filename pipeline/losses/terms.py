"""Loss terms for mask logits: focal, BCE, soft Dice, soft IoU and its MSE, best-of-K selection.

Everything here is a tensor op on the device: no host round-trip, no Python loop over masks.
The math runs in float32 (float64 inputs stay float64) with autocast switched off inside, so a
bf16/fp16 forward pass still gets full-precision reductions over the ~65k pixels of each mask.

The formulas (SAM-Med2D ``utils.py``, classes ``FocalLoss``, ``DiceLoss``, ``MaskIoULoss``)::

    p      = sigmoid(logits)
    focal  = sum(-alpha * t * (1-p)^gamma * log(p + 1e-12)
                 - (1-alpha) * (1-t) * p^gamma * log(1-p + 1e-12)) / (numel + 1e-12)
    bce    = mean(-w * t * log(p) - (1-t) * log(1-p))          (w = pos_weight, as BCEWithLogits)
    dice   = 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)
    iou    = (sum(p t) + 1e-7) / (sum(p) + sum(t) - sum(p t) + 1e-7)      (soft IoU, no threshold)
    iou_l  = mean((iou - iou_pred)^2)

``reduction="batch"`` sums over the WHOLE batch tensor (all masks at once), as SAM-Med2D does, so
its Dice and its IoU target are one number for the batch; ``reduction="per_mask"`` computes each
term per mask and averages over masks (for focal and BCE the two agree, since every mask has the
same pixel count). One numerical (not mathematical) difference from SAM-Med2D: ``1 - p`` is
computed as ``sigmoid(-logits)``, which avoids float32 cancellation for confident pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "Reduction",
    "bce_loss",
    "dice_loss",
    "focal_loss",
    "iou_mse_loss",
    "select_best",
    "soft_iou",
]

Reduction = Literal["batch", "per_mask"]
_REDUCTIONS = ("batch", "per_mask")


@contextlib.contextmanager
def _full_precision(t: torch.Tensor) -> Iterator[None]:
    """Switch autocast off for ``t``'s device type, so sums and logs run in the dtype we choose."""
    with torch.autocast(device_type=t.device.type, enabled=False):
        yield


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32: half/bfloat16 (and integer/bool targets) become float32."""
    if t.dtype == torch.float64:
        return t
    return t.float()


def _check_pair(logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if logits.shape != target.shape:
        raise ValueError(
            f"{name}: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape"
        )
    if logits.dim() < 2:
        raise ValueError(f"{name}: expected (P, ...) masks, got shape {tuple(logits.shape)}")


def _check_reduction(reduction: str, name: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float = 0.25,
    reduction: Reduction = "batch",
) -> torch.Tensor:
    """Sigmoid focal loss as SAM-Med2D defines it (``log(p + 1e-12)``, mean over pixels).

    Arguments:
      logits (torch.Tensor): (P, 1, H, W) mask logits (any (P, ...) shape works).
      target (torch.Tensor): same shape, 0/1 ground truth (any dtype).
      gamma (float): focusing exponent.
      alpha (float): weight of the positive term; negatives get 1 - alpha.
      reduction (str): "batch" = sum over the whole tensor / its element count (SAM-Med2D);
        "per_mask" = the same per mask, then the mean over masks (equal up to rounding).

    Returns:
      (torch.Tensor): scalar loss, float32 (float64 for float64 inputs).
    """
    _check_pair(logits, target, "focal_loss")
    _check_reduction(reduction, "focal_loss")
    with _full_precision(logits):
        x = _upcast(logits)
        t = _upcast(target).to(x.dtype)
        # 1 - p as sigmoid(-x): the same value, without float32 cancellation for confident pixels.
        return _focal(torch.sigmoid(x), torch.sigmoid(-x), t, gamma, alpha, reduction)


def _focal(
    p: torch.Tensor, q: torch.Tensor, t: torch.Tensor, gamma: float, alpha: float, reduction: str
) -> torch.Tensor:
    """Focal loss from p = sigmoid(x), q = sigmoid(-x) = 1 - p and the target."""
    positive = -alpha * t * q**gamma * torch.log(p + 1e-12)
    negative = -(1.0 - alpha) * (1.0 - t) * p**gamma * torch.log(q + 1e-12)
    per_pixel = positive + negative
    if reduction == "batch":
        return per_pixel.sum() / (per_pixel.numel() + 1e-12)
    flat = per_pixel.flatten(1)
    return (flat.sum(1) / (flat.shape[1] + 1e-12)).mean()


def bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    pos_weight: float = 1.0,
    reduction: Reduction = "batch",
) -> torch.Tensor:
    """Binary cross-entropy on logits, ``BCEWithLogitsLoss(pos_weight=...)`` averaged per pixel.

    Arguments:
      logits (torch.Tensor): (P, 1, H, W) mask logits (any (P, ...) shape works).
      target (torch.Tensor): same shape, 0/1 ground truth (any dtype).
      pos_weight (float): weight of the foreground term (MSA trains with 2).
      reduction (str): "batch" = mean over the whole tensor; "per_mask" = the mean per mask, then
        the mean over masks (equal up to rounding, every mask has the same pixel count).

    Returns:
      (torch.Tensor): scalar loss, float32 (float64 for float64 inputs).
    """
    _check_pair(logits, target, "bce_loss")
    _check_reduction(reduction, "bce_loss")
    with _full_precision(logits):
        x = _upcast(logits)
        return _bce(x, _upcast(target).to(x.dtype), pos_weight, reduction)


def _bce(x: torch.Tensor, t: torch.Tensor, pos_weight: float, reduction: str) -> torch.Tensor:
    """BCE from logits: -log(sigmoid(x)) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x).

    pos_weight stays a Python float: a tensor for it would be a host-to-device copy per call.
    """
    per_pixel = pos_weight * t * F.softplus(-x) + (1.0 - t) * F.softplus(x)
    if reduction == "batch":
        return per_pixel.mean()
    return per_pixel.flatten(1).mean(1).mean()


def _overlap(p: torch.Tensor, t: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(p t) and sum(p) + sum(t): over everything ("batch", shape ()) or per mask (P,)."""
    if reduction == "per_mask":
        p, t = p.flatten(1), t.flatten(1)
        return (p * t).sum(1), p.sum(1) + t.sum(1)
    return (p * t).sum(), p.sum() + t.sum()


def _dice(inter: torch.Tensor, total: torch.Tensor, smooth: float) -> torch.Tensor:
    """1 - Dice from sum(p t) and sum(p) + sum(t), averaged over masks for "per_mask"."""
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).mean()


def _soft_iou(inter: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Soft IoU from sum(p t) and sum(p) + sum(t), eps 1e-7 as SAM-Med2D."""
    return (inter + 1e-7) / (total - inter + 1e-7)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    reduction: Reduction = "batch",
) -> torch.Tensor:
    """Soft Dice loss on sigmoid probabilities, as SAM-Med2D defines it.

    Arguments:
      logits (torch.Tensor): (P, 1, H, W) mask logits.
      target (torch.Tensor): same shape, 0/1 ground truth.
      smooth (float): added to numerator and denominator.
      reduction (str): "batch" = one Dice over all masks' pixels together (SAM-Med2D);
        "per_mask" = one Dice per mask, then the mean of the P losses.

    Returns:
      (torch.Tensor): scalar loss ``1 - dice``.
    """
    _check_pair(logits, target, "dice_loss")
    _check_reduction(reduction, "dice_loss")
    with _full_precision(logits):
        p = torch.sigmoid(_upcast(logits))
        inter, total = _overlap(p, _upcast(target).to(p.dtype), reduction)
        return _dice(inter, total, smooth)


def soft_iou(
    logits: torch.Tensor, target: torch.Tensor, *, reduction: Reduction = "batch"
) -> torch.Tensor:
    """Soft (unthresholded) IoU between sigmoid(logits) and the target, eps 1e-7 as SAM-Med2D.

    Arguments:
      logits (torch.Tensor): (P, 1, H, W) mask logits.
      target (torch.Tensor): same shape, 0/1 ground truth.
      reduction (str): "batch" = one IoU over all masks together, shape (); "per_mask" = (P,).

    Returns:
      (torch.Tensor): the IoU, shape () or (P,), with gradient to ``logits``.
    """
    _check_pair(logits, target, "soft_iou")
    _check_reduction(reduction, "soft_iou")
    with _full_precision(logits):
        p = torch.sigmoid(_upcast(logits))
        inter, total = _overlap(p, _upcast(target).to(p.dtype), reduction)
        return _soft_iou(inter, total)


def iou_mse_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    iou_pred: torch.Tensor,
    *,
    reduction: Reduction = "batch",
    detach_iou_target: bool = False,
) -> torch.Tensor:
    """MSE between the decoder's predicted IoU and the soft IoU of its mask (SAM-Med2D).

    Arguments:
      logits (torch.Tensor): (P, 1, H, W) mask logits of the selected mask.
      target (torch.Tensor): (P, 1, H, W) 0/1 ground truth.
      iou_pred (torch.Tensor): (P, 1) predicted IoU of the selected mask.
      reduction (str): "batch" = the target is ONE soft IoU over the whole batch, broadcast
        against all P predictions (SAM-Med2D); "per_mask" = each mask's own soft IoU.
      detach_iou_target (bool): stop the gradient through the IoU target into ``logits``
        (SAM-Med2D does not).

    Returns:
      (torch.Tensor): scalar loss.
    """
    _check_iou_pred(logits, iou_pred, "iou_mse_loss")
    iou = soft_iou(logits, target, reduction=reduction)
    return _iou_mse(iou, iou_pred, reduction, detach_iou_target)


def _check_iou_pred(logits: torch.Tensor, iou_pred: torch.Tensor, name: str) -> None:
    if iou_pred.shape != (logits.shape[0], 1):
        raise ValueError(
            f"{name}: iou_pred must be (P, 1) = ({logits.shape[0]}, 1), got {tuple(iou_pred.shape)}"
        )


def _iou_mse(iou: torch.Tensor, iou_pred: torch.Tensor, reduction: str, detach: bool):
    if detach:
        iou = iou.detach()
    with _full_precision(iou_pred):
        pred = _upcast(iou_pred).to(iou.dtype)
        if reduction == "per_mask":
            iou = iou.unsqueeze(1)
        return ((iou - pred) ** 2).mean()


def select_best(
    low_res_logits: torch.Tensor, iou_pred: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, per prompt, the output mask with the highest predicted IoU (SAM-Med2D's multimask).

    Arguments:
      low_res_logits (torch.Tensor): (P, K, h, w) decoder logits, K = 3 with multimask, else 1.
      iou_pred (torch.Tensor): (P, K) predicted IoUs.

    Returns:
      logits (torch.Tensor): (P, 1, h, w) the chosen mask (gradient flows to it only).
      iou (torch.Tensor): (P, 1) its predicted IoU.
      index (torch.Tensor): (P,) int64 chosen mask index; ties go to the lowest index.
    """
    if low_res_logits.dim() != 4 or iou_pred.shape != low_res_logits.shape[:2]:
        raise ValueError(
            f"select_best: need logits (P, K, h, w) and iou_pred (P, K), got "
            f"{tuple(low_res_logits.shape)} and {tuple(iou_pred.shape)}"
        )
    p, _, h, w = low_res_logits.shape
    index = iou_pred.argmax(dim=1)
    logits = low_res_logits.gather(1, index.view(p, 1, 1, 1).expand(p, 1, h, w))
    iou = iou_pred.gather(1, index.view(p, 1))
    return logits, iou, index
