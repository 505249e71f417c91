"""Losses for promptable (SAM-style) heads, by name: ``build_interactive_loss(name, **options)``.

Every loss is ``pixel term + Dice + MSE(predicted IoU, IoU)`` on the selected mask's logits::

    total = pixel_weight * pixel + dice_weight * dice + iou_weight * iou

==============  ==========  =========  ==========  =============================================
name            pixel       reduction  iou_target  what it is
==============  ==========  =========  ==========  =============================================
``sam_med2d``   focal x 20  batch      live        SAM-Med2D's ``FocalDiceloss_IoULoss``, exactly
``focal_dice``  focal x 20  mask       detached    SAM's paper terms (20:1 focal:Dice), per mask
``bce_dice``    BCE x 1     mask       detached    BCE + soft Dice per mask (MSA: pos_weight 2)
==============  ==========  =========  ==========  =============================================

Options (``INTERACTIVE_LOSSES[name]`` lists each loss's options with their defaults):

* ``focal_weight`` (focal losses) / ``bce_weight`` (``bce_dice``), ``dice_weight``,
  ``iou_weight``: term weights, >= 0, not all 0.
* ``reduction``: ``mask`` = each mask's Dice (and soft IoU) on its own pixels, then the mean over
  masks, so a 20-pixel structure pulls as hard as a 20 000-pixel one; ``batch`` = one Dice and
  one IoU over all pixels of the batch (SAM-Med2D), where a small mask's share of the gradient is
  its share of the pixels. The pixel term is a mean over equal-size masks either way.
* ``iou_target``: ``detached`` = the soft IoU of the prediction is a constant regression target
  for the IoU head; ``live`` = the gradient of the IoU-MSE also flows through the target into the
  mask logits (SAM-Med2D: ``utils.py`` ``MaskIoULoss.forward``, lines 328-332 at bfd2b93, computes
  ``iou`` from ``torch.sigmoid(pred_mask)`` with no ``detach``, and ``train.py`` lines 138/155/182
  pass the live upsampled logits to the criterion).
* ``gamma``, ``alpha`` (focal), ``pos_weight`` (BCE, MSA ``function.py`` lines 46-47), ``smooth``
  (Dice).

The callable returns ``(total, parts)``; ``parts`` always has the keys ``PART_KEYS`` =
("pixel", "dice", "iou"): the unweighted pixel term (focal or BCE), Dice loss and IoU-MSE, as
detached device scalars. "pixel" rather than "focal": one key for either pixel term, so a curve
keeps its name when the loss changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.losses.specs import INTERACTIVE_LOSSES, IOU_TARGETS, REDUCTIONS, resolve_interactive
from pipeline.losses.terms import (
    Reduction,
    _bce,
    _check_iou_pred,
    _check_pair,
    _check_reduction,
    _dice,
    _focal,
    _full_precision,
    _iou_mse,
    _overlap,
    _soft_iou,
    _upcast,
)

__all__ = [
    "INTERACTIVE_LOSSES",
    "IOU_TARGETS",
    "PART_KEYS",
    "REDUCTIONS",
    "InteractiveLoss",
    "build_interactive_loss",
    "sam_med2d_loss",
]

PART_KEYS = ("pixel", "dice", "iou")
_TERM_REDUCTION = {"mask": "per_mask", "batch": "batch"}  # option value -> terms.py's name


def _combined(
    logits: torch.Tensor,
    target: torch.Tensor,
    iou_pred: torch.Tensor,
    *,
    pixel: str,
    pixel_weight: float,
    dice_weight: float,
    iou_weight: float,
    gamma: float,
    alpha: float,
    pos_weight: float,
    smooth: float,
    reduction: str,
    detach_iou_target: bool,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total and the three unweighted terms; ``reduction`` in terms.py's spelling."""
    _check_pair(logits, target, name)
    _check_reduction(reduction, name)
    _check_iou_pred(logits, iou_pred, name)
    # The pixel term, Dice and the soft IoU from one sigmoid pair and one set of sums (Dice and
    # the soft IoU share them): fewer full-size passes forward and backward over the P masks at
    # input size, nine times per batch.
    with _full_precision(logits):
        x = _upcast(logits)
        t = _upcast(target).to(x.dtype)
        p = torch.sigmoid(x)
        if pixel == "focal":
            term = _focal(p, torch.sigmoid(-x), t, gamma, alpha, reduction)
        else:
            term = _bce(x, t, pos_weight, reduction)
        inter, total = _overlap(p, t, reduction)
        dice = _dice(inter, total, smooth)
        iou = _iou_mse(_soft_iou(inter, total), iou_pred, reduction, detach_iou_target)
    total_loss = pixel_weight * term + dice_weight * dice + iou_weight * iou
    return total_loss, term, dice, iou


def sam_med2d_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    iou_pred: torch.Tensor,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    gamma: float = 2.0,
    alpha: float = 0.25,
    smooth: float = 1.0,
    reduction: Reduction = "batch",
    detach_iou_target: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAM-Med2D's ``FocalDiceloss_IoULoss``: 20 focal + 1 dice + 1 IoU-MSE.

    SAM-Med2D takes it on the logits upscaled to the input size (``train.py`` upsamples before
    calling the criterion); its IoU target is not detached, so the IoU term also pushes on the
    mask logits.

    Arguments:
      logits (torch.Tensor): (P, 1, H, W) logits of the selected mask (see ``select_best``);
        SAM-Med2D upsamples them to the input size first.
      target (torch.Tensor): (P, 1, H, W) 0/1 ground truth.
      iou_pred (torch.Tensor): (P, 1) predicted IoU of the selected mask.
      focal_weight, dice_weight, iou_weight (float): term weights.
      gamma, alpha (float): focal parameters.
      smooth (float): Dice smoothing.
      reduction (str): "batch" (SAM-Med2D) or "per_mask", applied to all three terms.
      detach_iou_target (bool): see ``iou_mse_loss``.

    Returns:
      total (torch.Tensor): scalar loss to backpropagate.
      parts (dict[str, torch.Tensor]): "focal", "dice", "iou" unweighted terms, detached scalars
        still on the device (log them without a sync by stacking first).
    """
    total, focal, dice, iou = _combined(
        logits, target, iou_pred, pixel="focal", pixel_weight=focal_weight,
        dice_weight=dice_weight, iou_weight=iou_weight, gamma=gamma, alpha=alpha, pos_weight=1.0,
        smooth=smooth, reduction=reduction, detach_iou_target=detach_iou_target,
        name="sam_med2d_loss",
    )  # fmt: skip
    return total, {"focal": focal.detach(), "dice": dice.detach(), "iou": iou.detach()}


@dataclass(frozen=True)
class InteractiveLoss:
    """A configured promptable-head loss; make one with ``build_interactive_loss``.

    Call it as ``loss(logits, target, iou_pred) -> (total, parts)``:

    Arguments:
      logits (torch.Tensor): (P, 1, H, W) logits of the selected mask (see ``select_best``).
      target (torch.Tensor): (P, 1, H, W) 0/1 ground truth, same size as ``logits``.
      iou_pred (torch.Tensor): (P, 1) the decoder's predicted IoU of that mask.

    Returns:
      total (torch.Tensor): scalar loss to backpropagate (float32, or float64 for float64 input).
      parts (dict[str, torch.Tensor]): ``PART_KEYS`` -> unweighted terms, detached device
        scalars (stack them before moving to the host: one sync for all).
    """

    name: str
    pixel: Literal["focal", "bce"]
    pixel_weight: float
    dice_weight: float
    iou_weight: float
    reduction: Literal["mask", "batch"]
    iou_target: Literal["detached", "live"]
    smooth: float
    gamma: float = 2.0
    alpha: float = 0.25
    pos_weight: float = 1.0

    @property
    def options(self) -> dict[str, Any]:
        """The resolved options under their public names (to log with the run's parameters)."""
        pixel_key = f"{self.pixel}_weight"
        return {
            key: self.pixel_weight if key == pixel_key else getattr(self, key)
            for key in INTERACTIVE_LOSSES[self.name]
        }

    def __call__(
        self, logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, pixel, dice, iou = _combined(
            logits, target, iou_pred, pixel=self.pixel, pixel_weight=self.pixel_weight,
            dice_weight=self.dice_weight, iou_weight=self.iou_weight, gamma=self.gamma,
            alpha=self.alpha, pos_weight=self.pos_weight, smooth=self.smooth,
            reduction=_TERM_REDUCTION[self.reduction],
            detach_iou_target=self.iou_target == "detached", name=self.name,
        )  # fmt: skip
        return total, {"pixel": pixel.detach(), "dice": dice.detach(), "iou": iou.detach()}


def build_interactive_loss(name: str, **options: Any) -> InteractiveLoss:
    """The promptable-head loss ``name`` with ``options`` over its defaults, checked.

    Cheap (no tensors): the config can call it at load time just to validate.

    Arguments:
      name (str): one of ``INTERACTIVE_LOSSES`` (sam_med2d, focal_dice, bce_dice).
      **options: any of that loss's options (``INTERACTIVE_LOSSES[name]``); see the module doc.

    Returns:
      (InteractiveLoss): the callable ``(logits, target, iou_pred) -> (total, parts)``.

    Raises:
      LossOptionError (a ValueError): ``.option`` is "name" for an unknown loss, else the unknown
        or bad option; the message says what is wrong and lists the choices.
    """
    pixel, resolved = resolve_interactive(name, options)
    pixel_weight = resolved.pop(f"{pixel}_weight")
    return InteractiveLoss(name=name, pixel=pixel, pixel_weight=pixel_weight, **resolved)
