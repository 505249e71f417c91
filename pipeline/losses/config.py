"""The ``train.loss`` section: the interactive loss by name with its options, checked against
``pipeline/losses/specs.py`` at load time (no torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from configtree import require
from pipeline.losses.options import LossOptionError
from pipeline.losses.specs import resolve_interactive

__all__ = ["LossConfig"]


@dataclass
class LossConfig:
    """The loss of promptable training (``pipeline/losses``): a name and its options.

    An option left empty takes the named loss's default (``pipeline/losses/specs.py`` lists them).
    """

    name: str = "sam_med2d"
    """sam_med2d: SAM-Med2D's 20 focal + Dice + IoU-MSE over the whole batch (made for a
    pretrained SAM; from random weights it collapses to empty masks); bce_dice: BCE + Dice per
    mask; focal_dice: 20 focal + Dice per mask."""
    focal_weight: float | None = None
    """Weight of the focal term (sam_med2d, focal_dice)."""
    bce_weight: float | None = None
    """Weight of the BCE term (bce_dice)."""
    dice_weight: float | None = None
    iou_weight: float | None = None
    """Weight of the MSE between the predicted IoU and the mask's IoU."""
    reduction: str = ""
    """mask: each mask's Dice on its own pixels, averaged over masks (small structures weigh as
    much as large ones); batch: one Dice over every pixel of the batch (SAM-Med2D)."""
    iou_target: str = ""
    """detached: the IoU regression target carries no gradient; live: it does (SAM-Med2D)."""
    pos_weight: float | None = None
    """BCE weight of foreground pixels (bce_dice; MSA: 2)."""
    gamma: float | None = None
    alpha: float | None = None
    smooth: float | None = None

    def options(self) -> dict[str, Any]:
        """The options set here (the rest take the loss's defaults)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) not in (None, "")
        }

    def __post_init__(self) -> None:
        try:
            resolve_interactive(self.name, self.options())
        except LossOptionError as err:
            message = err.message
            require(False, err.option, f"is an {message}" if message.startswith("un") else message)
