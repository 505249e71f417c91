"""AdamW that only updates the parameter groups of the active training phases, and its schedule.

Why a gate in the optimizer: SAM-Med2D's interaction loop trains encoder adapters + prompt encoder
+ mask decoder in the first of nine steps and only the mask decoder in the other eight. Setting
``requires_grad=False`` or a zero learning rate between steps does not freeze a group under ZeRO:
DeepSpeed still runs Adam on a (zero) gradient, so weight decay, moment decay and the step count
move the adapters. ``PhaseGatedAdamW.step`` skips the inactive groups instead, so their weights
and their Adam state stay bit-identical. It works under ZeRO-1/2/3 because both ZeRO optimizers
keep one inner group per client group (the group dicts, "phase" key included, are kept) and call
the client ``step()`` with those groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from pipeline.config import TrainConfig

__all__ = ["PhaseGatedAdamW", "build_optimizer", "lr_factor"]


class PhaseGatedAdamW(torch.optim.AdamW):
    """AdamW whose ``step()`` only touches groups whose ``"phase"`` is active.

    Arguments:
      param_groups: dicts with ``"params"`` and ``"phase"`` (a name such as ``"mask_decoder"``),
        plus any AdamW group option.
      **kwargs: AdamW defaults (lr, betas, eps, weight_decay).

    All phases are active until ``set_active`` is called.
    """

    def __init__(self, param_groups: list[dict], **kwargs) -> None:
        for group in param_groups:
            if not isinstance(group.get("phase"), str) or not group["phase"]:
                raise ValueError("every parameter group needs a 'phase' name (a non-empty str)")
        super().__init__(param_groups, **kwargs)
        self.phases: tuple[str, ...] = tuple(dict.fromkeys(g["phase"] for g in param_groups))
        self._active: frozenset[str] = frozenset(self.phases)

    @property
    def active(self) -> frozenset[str]:
        return self._active

    def set_active(self, phases: Iterable[str]) -> None:
        """Choose the phases that the next ``step()`` updates.

        Arguments:
          phases: names among ``self.phases`` (an empty set makes ``step()`` a no-op).
        """
        wanted = frozenset(phases)
        unknown = wanted - set(self.phases)
        if unknown:
            raise ValueError(
                f"unknown phase(s) {sorted(unknown)}; this optimizer has {list(self.phases)}"
            )
        self._active = wanted

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        # ZeRO swaps ``self.param_groups`` around this call (one group at a time); the gate
        # filters whatever it is given and puts the same list back.
        groups = self.param_groups
        self.param_groups = [g for g in groups if g.get("phase") in self._active]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


def build_optimizer(
    param_groups: dict[str, list[torch.nn.Parameter]],
    *,
    train: TrainConfig,
    lr_scale: dict[str, float] | None = None,
) -> PhaseGatedAdamW:
    """One AdamW group per phase, hyper-parameters from the config.

    Arguments:
      param_groups: phase name -> its parameters (empty lists are skipped).
      train: lr, weight_decay, adam_betas, adam_eps.
      lr_scale: optional phase name -> factor on ``train.lr``.

    Returns:
      The optimizer; each group carries ``"phase"`` and ``"base_lr"`` (the peak rate).
    """
    scale = lr_scale or {}
    unknown = set(scale) - set(param_groups)
    if unknown:
        raise ValueError(f"lr_scale names unknown phase(s) {sorted(unknown)}")
    groups = [
        {"params": list(params), "phase": name, "base_lr": train.lr * scale.get(name, 1.0)}
        for name, params in param_groups.items()
        if len(params) > 0
    ]
    for group in groups:
        group["lr"] = group["base_lr"]
    opt = PhaseGatedAdamW(
        groups,
        lr=train.lr,
        betas=(train.adam_betas[0], train.adam_betas[1]),
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        # One fused kernel per group (CPU and CUDA): 7x faster than the per-tensor loop on the
        # CPU for ViT-B's 185M adapter parameters, and the same update rule.
        fused=True,
    )
    # Phases without parameters are still valid names for set_active().
    opt.phases = tuple(param_groups)
    return opt


def lr_factor(step: int, *, train: TrainConfig) -> float:
    """Multiplier of the peak learning rate at a training step (0-based, counted in batches).

    Linear warm-up ``(step + 1) / warmup_steps`` (SAMed), then constant, cosine or poly
    ``(1 - t) ** poly_power`` decay from 1 to ``min_lr_ratio`` over ``decay_steps`` (default:
    the remaining steps; SAMed's is longer than its run, which stops part-way down).
    """
    warm = train.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if train.schedule == "constant":
        return 1.0
    span = max(1, train.decay_steps or train.steps - warm)
    t = min(1.0, max(0.0, (step - warm) / span))
    floor = train.min_lr_ratio
    if train.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return floor + (1.0 - floor) * (1.0 - t) ** train.poly_power

