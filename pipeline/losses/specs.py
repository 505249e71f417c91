"""The losses' names, options and defaults, and the checks on them, without torch.

The config (``pipeline/config.py``, ``train.loss``) validates a loss at load time through
``resolve_interactive`` / ``resolve_semantic``, so a bad name or option fails before anything is
built, and loading a config never imports torch. ``interactive.py`` and ``semantic.py`` build the
callables from the same resolved options.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from pipeline.losses.options import (
    LossOptionError,
    boolean,
    check_options,
    fraction,
    non_negative,
    one_of,
    positive,
)

__all__ = [
    "INTERACTIVE_LOSSES",
    "IOU_TARGETS",
    "REDUCTIONS",
    "SEMANTIC_LOSSES",
    "resolve_interactive",
    "resolve_semantic",
]

REDUCTIONS = ("mask", "batch")
IOU_TARGETS = ("detached", "live")

_FOCAL = {"gamma": 2.0, "alpha": 0.25}
_INTERACTIVE: dict[str, tuple[Literal["focal", "bce"], dict[str, Any]]] = {
    "sam_med2d": (
        "focal",
        {"focal_weight": 20.0, "dice_weight": 1.0, "iou_weight": 1.0, **_FOCAL, "smooth": 1.0,
         "reduction": "batch", "iou_target": "live"},
    ),
    "focal_dice": (
        "focal",
        {"focal_weight": 20.0, "dice_weight": 1.0, "iou_weight": 1.0, **_FOCAL, "smooth": 1.0,
         "reduction": "mask", "iou_target": "detached"},
    ),
    "bce_dice": (
        "bce",
        {"bce_weight": 1.0, "dice_weight": 1.0, "iou_weight": 1.0, "pos_weight": 1.0,
         "smooth": 1.0, "reduction": "mask", "iou_target": "detached"},
    ),
}  # fmt: skip
_INTERACTIVE_RULES = {
    "focal_weight": non_negative,
    "bce_weight": non_negative,
    "dice_weight": non_negative,
    "iou_weight": non_negative,
    "gamma": non_negative,
    "alpha": fraction,
    "pos_weight": positive,
    "smooth": non_negative,
    "reduction": one_of(*REDUCTIONS),
    "iou_target": one_of(*IOU_TARGETS),
}
_SEMANTIC: dict[str, dict[str, Any]] = {
    "ce_dice": {
        "ce_weight": 0.2,
        "dice_weight": 0.8,
        "smooth": 1e-5,
        "include_background": True,
        "reduction": "batch",
    },
}
_SEMANTIC_RULES = {
    "ce_weight": non_negative,
    "dice_weight": non_negative,
    "smooth": non_negative,
    "include_background": boolean,
    "reduction": one_of(*REDUCTIONS),
}

INTERACTIVE_LOSSES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: MappingProxyType(defaults) for name, (_, defaults) in _INTERACTIVE.items()}
)
"""Loss name -> {option: default}: what the config validates ``train.loss`` against."""
SEMANTIC_LOSSES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: MappingProxyType(defaults) for name, defaults in _SEMANTIC.items()}
)
"""Loss name -> {option: default} for prompt-free heads."""


def resolve_interactive(
    name: str, options: Mapping[str, Any]
) -> tuple[Literal["focal", "bce"], dict[str, Any]]:
    """The pixel term's kind and ``options`` over the defaults of interactive loss ``name``.

    Raises:
      LossOptionError: ``.option`` is "name" for an unknown loss, else the unknown or bad option;
        also when every term weight is 0.
    """
    if name not in _INTERACTIVE:
        from_semantic = " (a loss for prompt-free heads)" if name in _SEMANTIC else ""
        raise LossOptionError(
            "name",
            f"unknown interactive loss {name!r}{from_semantic}; known: {', '.join(_INTERACTIVE)}",
        )
    pixel, defaults = _INTERACTIVE[name]
    resolved = check_options(name, options, defaults, _INTERACTIVE_RULES)
    weight_keys = [k for k in resolved if k.endswith("_weight") and k != "pos_weight"]
    if all(resolved[k] == 0 for k in weight_keys):
        raise LossOptionError(
            weight_keys[0], f"all term weights ({', '.join(weight_keys)}) are 0 (loss {name!r})"
        )
    return pixel, resolved


def resolve_semantic(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over the defaults of prompt-free loss ``name``, checked.

    Raises:
      LossOptionError: naming the unknown loss ("name"), option or bad value.
    """
    if name not in _SEMANTIC:
        from_interactive = " (a loss for promptable heads)" if name in _INTERACTIVE else ""
        raise LossOptionError(
            "name",
            f"unknown prompt-free loss {name!r}{from_interactive}; known: {', '.join(_SEMANTIC)}",
        )
    resolved = check_options(name, options, _SEMANTIC[name], _SEMANTIC_RULES)
    if resolved["ce_weight"] == 0 and resolved["dice_weight"] == 0:
        raise LossOptionError("ce_weight", f"ce_weight and dice_weight are both 0 (loss {name!r})")
    return resolved
