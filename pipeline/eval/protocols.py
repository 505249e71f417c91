"""Interactive evaluation protocols for promptable 2D models, batched over the masks of a batch.

Every protocol runs on the P masks of one batch at once (one decoder pass per step, as
``pipeline/evaluate.py``'s validation does) and returns its prediction after every step, at the
shard resolution. With ``model.multimask`` the mask with the highest predicted IoU is kept.

SAM-Med2D's test script (OpenGVLab/SAM-Med2D@bfd2b93, ``test.py``; ``utils.py``):

* box (test.py:160-164; ``--boxes_prompt`` defaults to True): one pass with the box of the
  mask's largest connected component, no jitter (``get_boxes_from_mask(mask, max_pixel=0)``,
  DataLoader.py:78); our eval loader makes that box (``data.box_from=largest_component``). It is
  the first pass of ``run_cvpr``, which the caller reuses;
* points (test.py:166-181): ``--point_num`` points (default 1) and ``--iter_point`` passes
  (default 1, i.e. no correction; test.py:41-42 forces point_num = 1 when iter_point > 1). Each
  later pass adds one click drawn uniformly from the error region of the previous prediction
  (``generate_point`` / ``select_random_points``: label 1 missed foreground, 0 false foreground),
  keeps every earlier point (test.py:176-178), drops the box and feeds the previous low-res
  mask as sigmoid probabilities. The first points are the loader's foreground points; SAM-Med2D
  draws half foreground, half background when point_num > 1 (utils.py:``init_point_sampling``),
  which our reader does not make: n-point prompts here are n foreground points.

The CVPR 2025 interactive medical segmentation challenge (JunMa11/CVPR-MedSegFMCompetition,
``CVPR25_iter_eval.py``), on a 2D mask:

* step 0: the box; steps 1..n_clicks (n = 5): one click each, box and every earlier click kept,
  the previous low-res logits as the mask prompt;
* a click goes to the largest connected component of the error (prediction != truth, full
  connectivity: 8-neighbours in 2D, as cc3d's 26 in 3D), at the maximum of its Euclidean
  distance transform (``scipy.ndimage.distance_transform_edt`` of the component, the image
  border counting as outside: the challenge pads its crop with zeros); ties are broken as the
  challenge does (``np.random.seed(42)`` then a uniform choice among the maxima, raster order);
  positive if the truth is foreground there (missed foreground), else negative;
* a mask with no error left gets no click (label -1, which SAM ignores);
* scores: Dice and NSD after each step; AUC = trapezoid over the click steps 1..5 with unit
  spacing (the box step is left out, ``dscs[-n_clicks:]``); final = the last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from scipy import ndimage

from pipeline.interact import sample_clicks
from pipeline.losses import select_best

__all__ = [
    "DISC_RADIUS_FRACTION",
    "Predictor",
    "Trace",
    "click_disc",
    "cvpr_click",
    "cvpr_clicks",
    "run_cvpr",
    "run_sam_med2d_points",
]

DISC_RADIUS_FRACTION = 0.05
"""The disc baseline of point prompts: a disc of radius ``max(1, round(0.05 * S))`` pixels
around the first click (3 px at S = 64, 13 px at S = 256), what a model that only marks where it
was clicked would draw."""

_FULL = np.ones((3, 3), dtype=bool)  # 8-connectivity, the challenge's full connectivity in 2D


class Predictor(Protocol):
    """What a protocol needs of a model (``pipeline.model.SamAdapt`` has both)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(
        self, embeddings: torch.Tensor, **prompts: Any
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Trace:
    """The predictions of one protocol on P masks.

    Attributes:
      protocol: its name, e.g. ``"cvpr"``.
      steps: one label per step, e.g. ``["box", "click 1", ...]``.
      preds: per step, (P, S, S) bool on the CPU.
      clicks: per step, the clicks fed so far: coords (P, n, 2) float (x, y), labels (P, n).
    """

    protocol: str
    steps: list[str] = field(default_factory=list)
    preds: list[torch.Tensor] = field(default_factory=list)
    clicks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def add(self, step: str, pred: torch.Tensor, clicks: tuple | None = None) -> None:
        """Record one step's prediction (moved to the CPU)."""
        self.steps.append(step)
        self.preds.append(pred.cpu())
        if clicks is not None:
            self.clicks.append((clicks[0].cpu(), clicks[1].cpu()))


def _decode(
    model: Predictor, embeddings: torch.Tensor, image_index: torch.Tensor, size: int, **prompts
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder pass: the chosen low-res logits (P, 1, h, w) and the mask (P, S, S) bool."""
    logits, iou = model.decode(embeddings, image_index=image_index, **prompts)
    best, _, _ = select_best(logits, iou)
    full = best.float()
    if tuple(full.shape[-2:]) != (size, size):
        full = torch.nn.functional.interpolate(
            full, (size, size), mode="bilinear", align_corners=False
        )
    return best, full[:, 0] > 0


def _component_edt(component: np.ndarray) -> np.ndarray:
    """Distance of each component pixel to the nearest pixel outside it, the image border
    included (the challenge pads its crop with >= 1 zero; one zero ring gives the same field)."""
    padded = np.pad(component, 1)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1] * component


def cvpr_click(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, bool] | None:
    """The challenge's next click on one mask.

    Arguments:
      pred, truth: (H, W) bool.

    Returns:
      ``(row, col, positive)``: the pixel of the largest error component farthest from its
      border (ties: the challenge's seeded choice), positive = missed foreground; None when the
      prediction has no error.
    """
    error = np.asarray(pred, dtype=bool) != np.asarray(truth, dtype=bool)
    if not error.any():
        return None
    labels, _ = ndimage.label(error, structure=_FULL)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    component = labels == int(sizes.argmax())
    edt = _component_edt(component)
    if not edt.any():  # cannot happen with a padded component; kept as the challenge has it
        edt = component.astype(np.float64)
    maxima = np.argwhere(edt == edt.max())
    row, col = maxima[np.random.RandomState(42).choice(len(maxima))]
    return int(row), int(col), bool(truth[row, col])


def cvpr_clicks(pred: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cvpr_click`` for every mask of a batch.

    Arguments:
      pred, truth: (P, H, W) bool.

    Returns:
      coords (P, 1, 2) float32 (x = col, y = row), labels (P, 1) int64: 1 positive, 0 negative,
      -1 no click (no error left; SAM ignores the point).
    """
    p = pred.shape[0]
    coords = torch.zeros(p, 1, 2)
    labels = torch.full((p, 1), -1, dtype=torch.long)
    pred_np, truth_np = pred.cpu().numpy(), truth.cpu().numpy()
    for i in range(p):
        click = cvpr_click(pred_np[i], truth_np[i])
        if click is not None:
            row, col, positive = click
            coords[i, 0] = torch.tensor([col, row], dtype=torch.float32)
            labels[i, 0] = int(positive)
    return coords, labels


@torch.no_grad()
def run_cvpr(
    model: Predictor,
    embeddings: torch.Tensor,
    image_index: torch.Tensor,
    boxes: torch.Tensor,
    truth: torch.Tensor,
    *,
    clicks: int = 5,
    mask_as_probs: bool = False,
) -> Trace:
    """The CVPR 2025 challenge protocol: a box, then ``clicks`` corrective clicks.

    Arguments:
      model: a predictor (``SamAdapt``).
      embeddings: (B, C, h, w) from ``model.encode``.
      image_index: (P,) image of each mask.
      boxes: (P, 4) x0, y0, x1, y1 (max exclusive) without jitter.
      truth: (P, S, S) bool.
      clicks: corrective clicks after the box (the challenge: 5).
      mask_as_probs: feed the previous mask as sigmoid probabilities, as a model trained with
        ``train.mask_prompt_as_probs`` (SAM-Med2D's loop) saw it, instead of SAM's logits.

    Returns:
      Trace: steps ``box, click 1, ..., click n``.
    """
    size = truth.shape[-1]
    trace = Trace("cvpr")
    low, pred = _decode(model, embeddings, image_index, size, boxes=boxes)
    coords = boxes.new_zeros(truth.shape[0], 0, 2)
    labels = torch.zeros(truth.shape[0], 0, dtype=torch.long, device=boxes.device)
    trace.add("box", pred, (coords, labels))
    for k in range(1, clicks + 1):
        new_coords, new_labels = cvpr_clicks(pred, truth)
        coords = torch.cat([coords, new_coords.to(coords.device)], 1)
        labels = torch.cat([labels, new_labels.to(labels.device)], 1)
        low, pred = _decode(
            model,
            embeddings,
            image_index,
            size,
            boxes=boxes,
            points=(coords, labels),
            mask_inputs=torch.sigmoid(low) if mask_as_probs else low,
        )
        trace.add(f"click {k}", pred, (coords, labels))
    return trace


@torch.no_grad()
def run_sam_med2d_points(
    model: Predictor,
    embeddings: torch.Tensor,
    image_index: torch.Tensor,
    points: tuple[torch.Tensor, torch.Tensor],
    truth: torch.Tensor,
    *,
    iter_point: int,
    generator: torch.Generator,
) -> Trace:
    """SAM-Med2D's point prompt with ``iter_point`` passes (test.py:166-181).

    Arguments:
      points: the first points, coords (P, n, 2) and labels (P, n).
      truth: (P, S, S) bool.
      iter_point: passes; each after the first adds one random error click (utils.py
        ``generate_point`` with point_num 1) to all earlier points, with the previous low-res
        mask as sigmoid probabilities.
      generator: draws the error clicks (on the truth's device).

    Returns:
      Trace ``sam_med2d_points``: steps ``"{n} pt"``, then ``"iter 2"`` ... ``"iter N"``.
    """
    size = truth.shape[-1]
    coords, labels = points
    trace = Trace("sam_med2d_points")
    low, pred = _decode(model, embeddings, image_index, size, points=(coords, labels))
    trace.add(f"{coords.shape[1]} pt", pred, (coords, labels))
    target = truth[:, None].float()
    for k in range(2, iter_point + 1):
        logits = torch.where(pred, 1.0, -1.0)[:, None]  # sample_clicks thresholds sigmoid > 0.5
        new_coords, new_labels = sample_clicks(logits, target, k=1, generator=generator)
        coords = torch.cat([coords, new_coords.to(coords.device)], 1)
        labels = torch.cat([labels, new_labels.to(labels.device)], 1)
        low, pred = _decode(
            model,
            embeddings,
            image_index,
            size,
            points=(coords, labels),
            mask_inputs=torch.sigmoid(low),
        )
        trace.add(f"iter {k}", pred, (coords, labels))
    return trace


def click_disc(coords: torch.Tensor, size: int, radius: int | None = None) -> torch.Tensor:
    """The disc baseline: a disc around each mask's first click.

    Arguments:
      coords: (P, n, 2) x, y pixel coordinates; the first point is used.
      size: the image side S.
      radius: in pixels; None = ``max(1, round(DISC_RADIUS_FRACTION * size))``.

    Returns:
      (P, S, S) bool.
    """
    if radius is None:
        radius = max(1, round(DISC_RADIUS_FRACTION * size))
    grid = torch.arange(size, dtype=torch.float32, device=coords.device)
    x, y = coords[:, 0, 0, None, None], coords[:, 0, 1, None, None]
    return (grid[None, None, :] - x) ** 2 + (grid[None, :, None] - y) ** 2 <= radius**2
