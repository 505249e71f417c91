"""Validation during training: Dice and IoU per mask (promptable) or per class (semantic).

Promptable models are scored the way SAM-Med2D reports them: one box prompt, and one point
prompt, per ground-truth mask, no interaction; with ``model.multimask`` the mask with the highest
predicted IoU is kept.
Sums are all-reduced, so every rank returns the same figures over the whole split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.losses import select_best
from pipeline.steps import prompts_of


@dataclass
class Example:
    """One validation prediction for an overlay: (H, W, 3) uint8 image, truth and prediction
    masks (bool) or label maps (int)."""

    image: torch.Tensor
    truth: torch.Tensor
    pred: torch.Tensor
    title: str


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard Dice and IoU per row.

    Arguments:
      pred, target: (P, ...) 0/1 tensors.

    Returns:
      dice, iou: (P,) float32; 1.0 where both are empty.
    """
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    total = pred.sum(1) + target.sum(1)
    union = total - inter
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return dice, iou


def fill_box(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The prompt boxes filled: what a model that only draws its box prompt would predict.

    Arguments:
      boxes: (P, 4) x0, y0, x1, y1 in pixels, max exclusive (``pipeline/data/prompts.py``).
      size: side of the square image.

    Returns:
      (P, size, size) bool.
    """
    grid = torch.arange(size, device=boxes.device, dtype=boxes.dtype)
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    cols = (grid >= x0) & (grid < x1)  # (P, size)
    rows = (grid >= y0) & (grid < y1)
    return rows[:, :, None] & cols[:, None, :]


def baseline_dice(boxes: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dice of the trivial answers per mask: the filled prompt box, and the whole image.

    Arguments:
      boxes: (P, 4) the box prompts (no jitter in validation).
      target: (P, 1, S, S) 0/1 masks.

    Returns:
      ``{"fill_box": (P,), "fill_image": (P,)}`` float32.
    """
    truth = target[:, 0] > 0.5
    box_dice, _ = dice_iou(fill_box(boxes, truth.shape[-1]), truth)
    area = truth.flatten(1).sum(1).float()
    image_dice = 2 * area / (area + truth[0].numel())
    return {"fill_box": box_dice, "fill_image": image_dice}


BASELINES = ("fill_box", "fill_image")
"""Trivial answers scored beside the model in every interactive validation
(``val/baseline/dice_<name>``)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(values)
    return values


def lockstep(loader: Iterable[dict], device: torch.device) -> Iterator[tuple[dict, bool]]:
    """Yield ``(batch, real)`` until every rank's loader is exhausted.

    An exactly-once eval split gives ranks different batch counts, but a ZeRO-3 forward is a
    collective (it gathers the partitioned weights): a rank that ran out repeats its last batch
    with ``real=False`` (not counted) until all ranks are done. One all-reduce per batch.
    """
    it = iter(loader)
    last = None
    while True:
        batch = next(it, None)
        if batch is not None:
            last = batch
        if _distributed():
            more = torch.tensor([0 if batch is None else 1], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if int(more.item()) == 0:
                return
        elif batch is None:
            return
        if batch is None and last is None:
            raise RuntimeError("this rank's validation split is empty while others are not")
        yield (batch if batch is not None else last), batch is not None


def _one_dummy_mask(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    b, _, s, _ = data["image"].shape
    out = dict(data)
    out["masks"] = data["image"].new_zeros(b, 1, s, s)
    out["boxes"] = torch.zeros(b, 1, 4, device=data["image"].device)
    out["point_coords"] = torch.zeros(b, 1, 1, 2, device=data["image"].device)
    out["point_labels"] = torch.zeros(b, 1, 1, dtype=torch.long, device=data["image"].device)
    out["mask_valid"] = torch.zeros(b, 1, dtype=torch.bool, device=data["image"].device)
    return out


@torch.no_grad()
def validate_interactive(
    engine: Any,
    loader: Iterable[dict],
    *,
    prompts: tuple[str, ...] = ("box", "point"),
    clicks: int = 1,
    keep: int = 0,
    encode: Callable[..., torch.Tensor] | None = None,
) -> tuple[dict[str, float], list[Example]]:
    """Mean Dice / IoU over every valid mask of the split, per prompt kind.

    Arguments:
      prompts: "box" (the mask's box) and/or "point" (``clicks`` foreground points).
      clicks: points per point prompt, the first ``clicks`` the reader made for the mask.
      keep: examples (image, truth, prediction with the first prompt kind) to return for
        overlays, from this rank's first batch.
      encode: where a frozen encoder's embeddings come from (an ``EmbeddingCache``: the fixed
        split is encoded once per run); None = the engine's encode forward.

    Returns:
      ``{"val/dice_box": ..., "val/iou_box": ..., "val/dice_point": ..., ...}`` with the trivial
      answers' Dice on the same masks (``val/baseline/dice_fill_box``, ``.../dice_fill_image``),
      and the examples.
    """
    examples: list[Example] = []
    sums = torch.zeros(len(prompts), 3, dtype=torch.float64)  # dice, iou, count per prompt
    trivial = torch.zeros(len(BASELINES), dtype=torch.float64)  # Dice sums of the baselines
    for batch, real in lockstep(loader, engine.device):
        data = {k: v.to(engine.device) for k, v in batch.items() if torch.is_tensor(v)}
        if data["masks"].shape[1] == 0:
            data = _one_dummy_mask(data)  # same forwards on every rank (ZeRO-3), none counted
        p = prompts_of(data)
        valid = data["mask_valid"].reshape(-1) & real
        if encode is not None:
            embeddings = encode(data["image"])
        else:
            embeddings = engine({"images": data["image"]}, "encode")
        for j, dice in enumerate(baseline_dice(p["boxes"], p["target"]).values()):
            trivial[j] += dice[valid].sum().double().cpu()
        for i, kind in enumerate(prompts):
            # the decoder outputs what model.multimask says: 3 masks (the best-scored kept) or 1
            inputs: dict[str, Any] = {"embeddings": embeddings, "image_index": p["image_index"]}
            if kind == "box":
                inputs["boxes"] = p["boxes"]
            else:
                if p["point_coords"].shape[1] < clicks:
                    raise ValueError(
                        f"eval.clicks={clicks}: the batch has {p['point_coords'].shape[1]} "
                        "points per mask (data.point_num)"
                    )
                inputs["points"] = (p["point_coords"][:, :clicks], p["point_labels"][:, :clicks])
            logits, iou = engine(inputs, "decode")
            best, _, _ = select_best(logits, iou)
            full = torch.nn.functional.interpolate(
                best, p["target"].shape[-2:], mode="bilinear", align_corners=False
            )
            dice, jacc = dice_iou(full > 0, p["target"] > 0.5)
            if i == 0 and len(examples) < keep and real:
                for j in torch.nonzero(valid).flatten()[: keep - len(examples)].tolist():
                    examples.append(
                        Example(
                            image=data["image"][p["image_index"][j]].permute(1, 2, 0).cpu(),
                            truth=p["target"][j, 0].cpu() > 0.5,
                            pred=full[j, 0].cpu() > 0,
                            title=f"{kind} dice {float(dice[j]):.3f}",
                        )
                    )
            sums[i, 0] += dice[valid].sum().double().cpu()
            sums[i, 1] += jacc[valid].sum().double().cpu()
            sums[i, 2] += valid.sum().double().cpu()
    sums = _all_reduce(sums.to(engine.device)).cpu()
    trivial = _all_reduce(trivial.to(engine.device)).cpu()
    out = {}
    for i, kind in enumerate(prompts):
        n = max(float(sums[i, 2]), 1.0)
        out[f"val/dice_{kind}"] = float(sums[i, 0]) / n
        out[f"val/iou_{kind}"] = float(sums[i, 1]) / n
    out["val/masks"] = float(sums[0, 2])
    for j, name in enumerate(BASELINES):
        out[f"val/baseline/dice_{name}"] = float(trivial[j]) / max(float(sums[0, 2]), 1.0)
    return out, examples


@torch.no_grad()
def validate_semantic(
    engine: Any,
    loader: Iterable[dict],
    *,
    num_classes: int,
    slices: int = 1,
    keep: int = 0,
    encode: Callable[..., torch.Tensor] | None = None,
) -> tuple[dict[str, float], list[Example]]:
    """Per-class Dice over the split (accumulated intersections, so every voxel counts once).

    ``encode``: where a frozen encoder's embeddings come from (an ``EmbeddingCache``); None =
    encoded inside the forward.

    Returns:
      ``{"val/dice": mean over classes present, "val/dice_c1": ..., ...}`` and up to ``keep``
      examples (image, label map, predicted label map) from this rank's first batch.
    """
    examples: list[Example] = []
    inter = torch.zeros(num_classes + 1, dtype=torch.float64)
    total = torch.zeros(num_classes + 1, dtype=torch.float64)
    for batch, real in lockstep(loader, engine.device):
        images = batch["image"].to(engine.device)
        label = batch["label"].to(engine.device)
        inputs = {"images": images, "slices": slices}
        if encode is not None:
            inputs["embeddings"] = encode(images, slices)
        pred = engine(inputs, "semantic").argmax(1)
        if not real:
            continue
        for j in range(min(keep - len(examples), images.shape[0])):
            examples.append(
                Example(
                    image=images[j].permute(1, 2, 0).cpu(),
                    truth=label[j].cpu(),
                    pred=pred[j].cpu(),
                    title="semantic",
                )
            )
        for c in range(1, num_classes + 1):
            p, t = pred == c, label == c
            inter[c] += (p & t).sum().double().cpu()
            total[c] += (p.sum() + t.sum()).double().cpu()
    both = _all_reduce(torch.stack([inter, total]).to(engine.device)).cpu()
    inter, total = both[0], both[1]
    out, dices = {}, []
    for c in range(1, num_classes + 1):
        if total[c] > 0:
            d = float(2 * inter[c] / total[c])
            out[f"val/dice_c{c}"] = d
            dices.append(d)
    out["val/dice"] = sum(dices) / len(dices) if dices else 0.0
    return out, examples
