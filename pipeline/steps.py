"""One training batch: SAM-Med2D's simulated interaction (nine steps), or a prompt-free step.

The rules, as SAM-Med2D's ``train.py`` runs them (``pipeline/interact.py`` documents each with its
line in the reference), every deviation a config option:

* the image encoder runs once per batch, inside step 0's forward;
* step 0 prompts with a box (p = 0.5) or one foreground point; its update covers the encoder
  adapters, the prompt encoder and the mask decoder;
* steps 1..n-1 reuse the detached image embeddings; the prompt encoder runs without gradient and
  only the mask decoder is updated; each re-prompts with k clicks from the current error region
  (k from {1, 3, 5, 9}, once per step) plus the previous low-resolution mask (sigmoid
  probabilities by default); one random step and the last step are mask-only;
* multimask output (``model.multimask``; MSA: one mask); the loss is taken on the mask with the
  highest predicted IoU: 20 focal + dice + MSE(IoU prediction, IoU), at the input size
  (``train.loss_resolution``; MSA: on the decoder's S/4 grid);
* each step is its own optimizer step, or, with ``train.sum_interaction_losses``, the losses are
  summed into one update (SAM-Med3D).

Everything is batched over the B x M prompts of a batch on the device: no Python loop over masks
and no host round-trip inside the loop (the per-step losses come back in one transfer at the end).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.interact import StepPlan, mask_prompt, plan_interaction, sample_clicks
from pipeline.losses import InteractiveLoss, build_interactive_loss, ce_dice_loss, select_best


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("image", "masks", "boxes", "point_coords", "point_labels", "label")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


def to_low_res(truth: torch.Tensor, size: int) -> torch.Tensor:
    """Masks or label maps resized down to the decoder's grid (``train.loss_resolution=low_res``).

    Nearest neighbour at pixel centres, so labels stay labels (SAMed makes its low_res_label with
    scipy's zoom, order 0).

    Arguments:
      truth (torch.Tensor): (P, 1, S, S) float 0/1 masks or (N, S, S) int64 label maps.
      size (int): the side of the low-resolution grid (S / 4).

    Returns:
      torch.Tensor: the same kind, (P, 1, size, size) or (N, size, size).
    """
    if truth.dim() == 3:
        small = F.interpolate(truth[:, None].float(), (size, size), mode="nearest-exact")
        return small[:, 0].to(truth.dtype)
    return F.interpolate(truth.float(), (size, size), mode="nearest-exact").to(truth.dtype)


def prompts_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flatten the (B, M, ...) prompts of a collated batch to (P = B*M, ...)."""
    b, m = batch["masks"].shape[:2]
    size = batch["masks"].shape[-1]
    return {
        "target": batch["masks"].reshape(b * m, 1, size, size).float(),
        "image_index": torch.arange(b, device=batch["masks"].device).repeat_interleave(m),
        "boxes": batch["boxes"].reshape(b * m, 4),
        "point_coords": batch["point_coords"].reshape(b * m, -1, 2),
        "point_labels": batch["point_labels"].reshape(b * m, -1),
    }


@dataclass
class _Turn:
    """What one interaction step leaves behind: its loss and loss terms, and the best mask, at
    low resolution (the next step's mask prompt) and at the target's (where clicks are drawn)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    low: torch.Tensor
    full: torch.Tensor


def _score(
    logits: torch.Tensor,
    iou: torch.Tensor,
    p: dict[str, torch.Tensor],
    loss_fn: InteractiveLoss,
) -> _Turn:
    """Select the best mask and take the loss: at the input size against ``p["target"]``, or,
    when ``p`` holds ``low_target`` (``train.loss_resolution=low_res``), on the decoder's grid."""
    target = p["target"]
    best_low, best_iou, _ = select_best(logits, iou)
    full = F.interpolate(best_low, target.shape[-2:], mode="bilinear", align_corners=False)
    if "low_target" in p:
        loss, parts = loss_fn(best_low, p["low_target"], best_iou)
    else:
        loss, parts = loss_fn(full, target, best_iou)
    return _Turn(loss=loss, parts=parts, low=best_low, full=full)


# The embeddings of a batch's images from somewhere other than the training forward: a
# pipeline.embedding_cache.EmbeddingCache (frozen encoder), called as encode(images, slices).
Encode = Callable[..., torch.Tensor]


def _first_turn(
    engine: Any,
    image: torch.Tensor,
    p: dict[str, torch.Tensor],
    first: StepPlan,
    loss_fn: InteractiveLoss,
    encode: Encode | None = None,
) -> tuple[_Turn, torch.Tensor]:
    """Step 0: encoder + prompt encoder + decoder in one forward, a box or one point; with
    ``encode`` (a frozen encoder's cached embeddings), prompt encoder + decoder only.

    Returns:
      The step's result and the image embeddings (still in the graph).
    """
    # No "multimask" key: the decoder outputs what model.multimask says (3 masks or 1).
    inputs: dict[str, Any] = {"image_index": p["image_index"]}
    if first.uses_box:
        inputs["boxes"] = p["boxes"]
    else:
        inputs["points"] = (p["point_coords"][:, :1], p["point_labels"][:, :1])
    if encode is not None:
        embeddings = encode(image)
        logits, iou = engine({**inputs, "embeddings": embeddings}, "decode")
    else:
        logits, iou, embeddings = engine({**inputs, "images": image}, "prompt")
    return _score(logits, iou, p, loss_fn), embeddings


def _next_turn(
    engine: Any,
    embeddings: torch.Tensor,
    p: dict[str, torch.Tensor],
    prev: _Turn,
    plan: StepPlan,
    *,
    train: TrainConfig,
    loss_fn: InteractiveLoss,
    click_generator: torch.Generator,
) -> _Turn:
    """A re-prompt step: the previous mask, plus clicks from its error region unless the step is
    mask-only; decoder only (the prompt encoder runs frozen on detached embeddings)."""
    inputs: dict[str, Any] = {
        "embeddings": embeddings,
        "image_index": p["image_index"],
        "frozen_prompt_encoder": True,
        "mask_inputs": mask_prompt(prev.low, as_probs=train.mask_prompt_as_probs),
    }
    if plan.uses_points:
        inputs["points"] = sample_clicks(
            prev.full.detach(), p["target"], k=plan.clicks, generator=click_generator
        )
    logits, iou = engine(inputs, "decode")
    turn = _score(logits, iou, p, loss_fn)
    turn.low, turn.full = turn.low.detach(), turn.full.detach()
    return turn


def _update(engine: Any, loss: torch.Tensor, phases: tuple[str, ...], step: int) -> None:
    engine.backward(loss)
    engine.step(phases, step=step)


def _outputs(turns: list[_Turn], plan: list[StepPlan], pixel: str) -> dict[str, torch.Tensor]:
    return {
        "loss_steps": torch.stack([t.loss.detach() for t in turns]),
        pixel: torch.stack([t.parts["pixel"] for t in turns]),
        "dice": torch.stack([t.parts["dice"] for t in turns]),
        "iou": torch.stack([t.parts["iou"] for t in turns]),
        "prompt_kind": torch.tensor(0 if plan[0].uses_box else 1),
        "mask_only": torch.tensor([1 if s.kind == "mask_only" else 0 for s in plan]),
    }


def build_loss(train: TrainConfig) -> InteractiveLoss:
    """The interaction loop's loss from ``train.loss`` (checked when the config was loaded)."""
    return build_interactive_loss(train.loss.name, **train.loss.options())


def interactive_step(
    engine: Any,
    batch: dict[str, Any],
    *,
    train: TrainConfig,
    step: int,
    plan_generator: torch.Generator,
    click_generator: torch.Generator,
    phases: tuple[str, ...],
    loss_fn: InteractiveLoss | None = None,
    encode: Encode | None = None,
) -> dict[str, torch.Tensor]:
    """Run the n-step simulated interaction on one batch and update the model.

    Arguments:
      engine: a ``pipeline.engine.Engine`` around a ``SamAdapt`` with head=sam.
      batch: a collated interactive batch (``pipeline.data.collate``): image (B, 3, S, S) uint8,
        masks (B, M, S, S), boxes (B, M, 4), point_coords (B, M, n, 2), point_labels (B, M, n).
      train: the training section.
      step: the trainer's step counter (for the learning-rate schedule).
      plan_generator: CPU generator for the step plan (box or point, mask-only step, k).
      click_generator: generator on the engine's device for click sampling.
      phases: all trainable phases (updated in step 0).
      loss_fn: the loss of every step (default: built from ``train.loss``; build it once and
        pass it in a loop).
      encode: where a frozen encoder's embeddings come from (``EmbeddingCache``); None = the
        encoder runs inside step 0's forward.

    Returns:
      Detached device tensors: ``loss_steps`` (n,) and the unweighted terms per step (n,):
      the pixel term under its name (``focal`` or ``bce``), ``dice``, ``iou``;
      ``prompt_kind`` (0 box, 1 point), ``mask_only`` (n,) 0/1.
    """
    if loss_fn is None:
        loss_fn = build_loss(train)
    data = _to(batch, engine.device)
    p = prompts_of(data)
    if train.loss_resolution == "low_res":
        p["low_target"] = to_low_res(p["target"], p["target"].shape[-1] // 4)
    plan = plan_interaction(
        train.interaction_steps,
        generator=plan_generator,
        first_prompt_box_prob=train.first_prompt_box_prob,
        click_choices=tuple(train.click_choices),
        random_mask_only=train.random_mask_only,
    )
    summed = train.sum_interaction_losses
    turn, embeddings = _first_turn(engine, data["image"], p, plan[0], loss_fn, encode)
    turns = [turn]
    if not summed:
        _update(engine, turn.loss, phases, step)

    # The re-prompt steps train the decoder only: the embeddings are cut from the graph and the
    # prompt encoder runs without gradient (as SAM-Med2D), so no other tensor gets a gradient.
    embeddings = embeddings.detach()
    for s in plan[1:]:
        turn = _next_turn(
            engine,
            embeddings,
            p,
            turns[-1],
            s,
            train=train,
            loss_fn=loss_fn,
            click_generator=click_generator,
        )
        turns.append(turn)
        if not summed:
            _update(engine, turn.loss, ("mask_decoder",), step)
    if summed:
        total = turns[0].loss
        for t in turns[1:]:  # added in step order, as the losses were made
            total = total + t.loss
        _update(engine, total, phases, step)
    return _outputs(turns, plan, loss_fn.pixel)


def semantic_step(
    engine: Any,
    batch: dict[str, Any],
    *,
    train: TrainConfig,
    step: int,
    phases: tuple[str, ...],
    slices: int = 1,
    encode: Encode | None = None,
) -> dict[str, torch.Tensor]:
    """One prompt-free step (SAMed / MA-SAM / AutoSAM): CE + Dice on the multi-class logits, at
    the input size or, with ``train.loss_resolution=low_res``, on the head's low-resolution
    logits against the label resized to them (SAMed).

    Arguments:
      batch: image (N, 3, S, S) uint8 and label (N, S, S) int64 (N = B*D for D-slice stacks).
      encode: where a frozen encoder's embeddings come from (``EmbeddingCache``); None = the
        encoder runs inside the forward.

    Returns:
      Detached device tensors ``loss``, ``ce``, ``dice``.
    """
    data = _to(batch, engine.device)
    low_res = train.loss_resolution == "low_res"
    inputs = {"images": data["image"], "slices": slices, "low_res": low_res}
    if encode is not None:
        inputs["embeddings"] = encode(data["image"], slices)
    logits = engine(inputs, "semantic")
    label = data["label"]
    if low_res:
        label = to_low_res(label, logits.shape[-1])
    loss, parts = ce_dice_loss(
        logits,
        label,
        ce_weight=train.ce_weight,
        dice_weight=train.semantic_dice_weight,
        smooth=train.semantic_dice_smooth,
        ignore_background_in_dice=not train.semantic_dice_background,
    )
    engine.backward(loss)
    engine.step(phases, step=step)
    return {"loss": loss.detach(), "ce": parts["ce"], "dice": parts["dice"]}
