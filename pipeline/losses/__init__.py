"""Training losses, as a library the training steps call by configured name.

* ``terms``: the tensor terms (focal, BCE, soft Dice, soft IoU, IoU-MSE) and ``select_best``;
* ``interactive``: promptable-head losses by name (``sam_med2d``, ``focal_dice``, ``bce_dice``),
  built with ``build_interactive_loss(name, **options)``, and ``sam_med2d_loss`` itself;
* ``semantic``: prompt-free-head losses by name (``ce_dice``), ``build_semantic_loss``;
* ``options``: ``LossOptionError``, which names the bad option for the config's one-line error.

A step builds its loss once and calls it per forward pass::

    loss_fn = build_interactive_loss("bce_dice", reduction="mask", pos_weight=2.0)
    total, parts = loss_fn(logits, target, iou_pred)     # parts: pixel, dice, iou

The config validates ``train.loss`` at load by calling the same builder (no tensors involved);
``INTERACTIVE_LOSSES`` / ``SEMANTIC_LOSSES`` map each name to its options and defaults.

The names below are imported on first use: the config imports ``pipeline.losses.specs`` to
check ``train.loss`` at load time, and loading a config must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.lazy import lazy_names

if TYPE_CHECKING:  # for type checkers and editors; at run time see __getattr__
    from pipeline.losses.interactive import (
        PART_KEYS,
        InteractiveLoss,
        build_interactive_loss,
        sam_med2d_loss,
    )
    from pipeline.losses.options import LossOptionError
    from pipeline.losses.semantic import (
        SEMANTIC_PART_KEYS,
        SemanticLoss,
        build_semantic_loss,
        ce_dice_loss,
    )
    from pipeline.losses.specs import (
        INTERACTIVE_LOSSES,
        IOU_TARGETS,
        REDUCTIONS,
        SEMANTIC_LOSSES,
        resolve_interactive,
        resolve_semantic,
    )
    from pipeline.losses.terms import (
        Reduction,
        bce_loss,
        dice_loss,
        focal_loss,
        iou_mse_loss,
        select_best,
        soft_iou,
    )

_WHERE = {
    "INTERACTIVE_LOSSES": "pipeline.losses.specs",
    "IOU_TARGETS": "pipeline.losses.specs",
    "InteractiveLoss": "pipeline.losses.interactive",
    "LossOptionError": "pipeline.losses.options",
    "PART_KEYS": "pipeline.losses.interactive",
    "REDUCTIONS": "pipeline.losses.specs",
    "Reduction": "pipeline.losses.terms",
    "SEMANTIC_LOSSES": "pipeline.losses.specs",
    "SEMANTIC_PART_KEYS": "pipeline.losses.semantic",
    "SemanticLoss": "pipeline.losses.semantic",
    "bce_loss": "pipeline.losses.terms",
    "build_interactive_loss": "pipeline.losses.interactive",
    "build_semantic_loss": "pipeline.losses.semantic",
    "ce_dice_loss": "pipeline.losses.semantic",
    "dice_loss": "pipeline.losses.terms",
    "focal_loss": "pipeline.losses.terms",
    "iou_mse_loss": "pipeline.losses.terms",
    "resolve_interactive": "pipeline.losses.specs",
    "resolve_semantic": "pipeline.losses.specs",
    "sam_med2d_loss": "pipeline.losses.interactive",
    "select_best": "pipeline.losses.terms",
    "soft_iou": "pipeline.losses.terms",
}

__all__ = [
    "INTERACTIVE_LOSSES",
    "IOU_TARGETS",
    "InteractiveLoss",
    "LossOptionError",
    "PART_KEYS",
    "REDUCTIONS",
    "Reduction",
    "SEMANTIC_LOSSES",
    "SEMANTIC_PART_KEYS",
    "SemanticLoss",
    "bce_loss",
    "build_interactive_loss",
    "build_semantic_loss",
    "ce_dice_loss",
    "dice_loss",
    "focal_loss",
    "iou_mse_loss",
    "resolve_interactive",
    "resolve_semantic",
    "sam_med2d_loss",
    "select_best",
    "soft_iou",
]

__getattr__ = lazy_names(__name__, _WHERE)
