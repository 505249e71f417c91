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
"""

from pipeline.losses.interactive import (
    INTERACTIVE_LOSSES,
    IOU_TARGETS,
    PART_KEYS,
    REDUCTIONS,
    InteractiveLoss,
    build_interactive_loss,
    sam_med2d_loss,
)
from pipeline.losses.options import LossOptionError
from pipeline.losses.semantic import (
    SEMANTIC_LOSSES,
    SEMANTIC_PART_KEYS,
    SemanticLoss,
    build_semantic_loss,
    ce_dice_loss,
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

__all__ = [
    "INTERACTIVE_LOSSES",
    "IOU_TARGETS",
    "PART_KEYS",
    "REDUCTIONS",
    "SEMANTIC_LOSSES",
    "SEMANTIC_PART_KEYS",
    "InteractiveLoss",
    "LossOptionError",
    "Reduction",
    "SemanticLoss",
    "bce_loss",
    "build_interactive_loss",
    "build_semantic_loss",
    "ce_dice_loss",
    "dice_loss",
    "focal_loss",
    "iou_mse_loss",
    "sam_med2d_loss",
    "select_best",
    "soft_iou",
]
