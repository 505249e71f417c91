"""Losses for prompt-free (semantic) heads, by name: ``build_semantic_loss(name, **options)``.

One loss today, SAMed's (``trainer.py::calc_loss``, ``utils.py::DiceLoss``)::

    total = (1 - w) * CE + w * Dice,  w = 0.8   ->  ce_weight 0.2, dice_weight 0.8
    Dice  = mean over classes c of 1 - (2 sum(s_c y_c) + 1e-5) / (sum(s_c^2) + sum(y_c^2) + 1e-5)

with ``s = softmax(logits)``, ``y`` the one-hot label, sums over the whole batch per class, and
the mean over ALL ``C + 1`` classes, background included (SAMed's ``DiceLoss(num_classes + 1)``).

Options of ``ce_dice`` (``SEMANTIC_LOSSES["ce_dice"]`` has the defaults): ``ce_weight``,
``dice_weight`` (>= 0, not both 0), ``smooth`` (>= 0), ``include_background`` (class 0 in the
Dice mean, as SAMed) and ``reduction``: ``batch`` (SAMed: one Dice per class over the batch) or
``mask`` (one Dice per image and class, then the mean: a class small in one image is not drowned
by the same class large in another). The callable returns ``(total, parts)`` with the keys
``SEMANTIC_PART_KEYS`` = ("ce", "dice"), unweighted and detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from pipeline.losses.specs import SEMANTIC_LOSSES, resolve_semantic
from pipeline.losses.terms import Reduction, _check_reduction, _full_precision, _upcast

__all__ = [
    "SEMANTIC_LOSSES",
    "SEMANTIC_PART_KEYS",
    "SemanticLoss",
    "build_semantic_loss",
    "ce_dice_loss",
]

SEMANTIC_PART_KEYS = ("ce", "dice")


def ce_dice_loss(
    logits: torch.Tensor,
    label: torch.Tensor,
    *,
    ce_weight: float = 0.2,
    dice_weight: float = 0.8,
    smooth: float = 1e-5,
    ignore_background_in_dice: bool = False,
    reduction: Reduction = "batch",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy + multi-class soft Dice for prompt-free (semantic) heads, as SAMed.

    SAMed: ``0.2 * CE + 0.8 * Dice`` (its ``dice_param`` 0.8), Dice on softmax scores with squared
    terms in the denominator, smooth 1e-5, summed over the whole batch per class and averaged over
    all classes including background. ``ignore_background_in_dice=True`` averages over the
    foreground classes 1..C only; ``reduction="per_mask"`` computes one Dice per image and class
    (each image's class mask on its own pixels) and averages those.

    Arguments:
      logits (torch.Tensor): (B, C+1, H, W) class logits, channel 0 = background.
      label (torch.Tensor): (B, H, W) int64 class index per pixel, in [0, C].
      ce_weight, dice_weight (float): term weights.
      smooth (float): Dice smoothing.
      ignore_background_in_dice (bool): leave class 0 out of the Dice mean.
      reduction (str): "batch" = sums over the whole batch per class (SAMed), mean over classes;
        "per_mask" = sums per image and class, mean over images and classes.

    Returns:
      total (torch.Tensor): scalar loss.
      parts (dict[str, torch.Tensor]): "ce" and "dice" unweighted terms, detached.
    """
    if logits.dim() != 4 or label.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"ce_dice_loss: need logits (B, C+1, H, W) and label (B, H, W), got "
            f"{tuple(logits.shape)} and {tuple(label.shape)}"
        )
    if label.dtype != torch.int64:
        raise ValueError(f"ce_dice_loss: label must be int64 class indices, got {label.dtype}")
    _check_reduction(reduction, "ce_dice_loss")
    n_classes = logits.shape[1]
    if ignore_background_in_dice and n_classes < 2:
        raise ValueError("ce_dice_loss: ignore_background_in_dice needs at least 2 channels")
    with _full_precision(logits):
        x = _upcast(logits)
        ce = F.cross_entropy(x, label)
        score = torch.softmax(x, dim=1)
        # One-hot by comparison (F.one_hot checks the label range with a host sync on CUDA).
        classes = torch.arange(n_classes, device=label.device).view(1, n_classes, 1, 1)
        onehot = (label.unsqueeze(1) == classes).to(score.dtype)
        dims = (0, 2, 3) if reduction == "batch" else (2, 3)
        inter = (score * onehot).sum(dims)
        denom = (score * score).sum(dims) + (onehot * onehot).sum(dims)
        per_class = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
        if ignore_background_in_dice:
            per_class = per_class[..., 1:]
        dice = per_class.mean()
        total = ce_weight * ce + dice_weight * dice
    return total, {"ce": ce.detach(), "dice": dice.detach()}


@dataclass(frozen=True)
class SemanticLoss:
    """A configured prompt-free-head loss; make one with ``build_semantic_loss``.

    Call it as ``loss(logits, label) -> (total, parts)``: logits (B, C+1, H, W), label (B, H, W)
    int64 (see ``ce_dice_loss``); parts has the keys ``SEMANTIC_PART_KEYS``.
    """

    name: str
    ce_weight: float
    dice_weight: float
    smooth: float
    include_background: bool
    reduction: Literal["mask", "batch"]

    @property
    def options(self) -> dict[str, Any]:
        """The resolved options under their public names."""
        return {key: getattr(self, key) for key in SEMANTIC_LOSSES[self.name]}

    def __call__(
        self, logits: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return ce_dice_loss(
            logits,
            label,
            ce_weight=self.ce_weight,
            dice_weight=self.dice_weight,
            smooth=self.smooth,
            ignore_background_in_dice=not self.include_background,
            reduction="per_mask" if self.reduction == "mask" else "batch",
        )


def build_semantic_loss(name: str, **options: Any) -> SemanticLoss:
    """The prompt-free-head loss ``name`` with ``options`` over its defaults, checked.

    Arguments:
      name (str): one of ``SEMANTIC_LOSSES`` (ce_dice).
      **options: any of its options (``SEMANTIC_LOSSES[name]``); see the module doc.

    Returns:
      (SemanticLoss): the callable ``(logits, label) -> (total, parts)``.

    Raises:
      LossOptionError (a ValueError): ``.option`` is "name" for an unknown loss, else the unknown
        or bad option.
    """
    return SemanticLoss(name=name, **resolve_semantic(name, options))
