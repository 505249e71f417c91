"""The model on the planes of one scan, batched over slices, on one device.

Promptable heads (``model.head=sam``): the slices that hold prompts are encoded ``batch_size``
at a time, and all prompts of those slices are decoded in one pass per kind (with a box, or
points only); each prompt's mask is the output with the highest predicted IoU when
``model.multimask`` is set (``pipeline.losses.select_best``, as evaluation keeps it). Masks are
painted in increasing prompt id, so where two overlap the higher id wins.

Prompt-free heads: every slice, ``batch_size`` at a time; the label is the argmax over the
background and the head's classes at the plane's size (the logits are resized back before the
argmax), restricted to ``classes`` when given.

With ``model.slices = D > 1`` each slice is predicted from the stack of the D slices centred on
it, replicate-padded at the ends as the 3D reader makes them (``pipeline/data/volume.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.losses import select_best
from pipeline.model.wrapper import SamAdapt
from pipeline.predict.geometry import PlaneGeometry, model_image
from pipeline.predict.inputs import Scan
from pipeline.predict.prompts import Prompt

__all__ = ["predict_prompted", "predict_semantic"]


def _chunks(items: Sequence[int], n: int) -> Iterator[list[int]]:
    for start in range(0, len(items), n):
        yield list(items[start : start + n])


def _stacks(scan: Scan, ks: list[int], geometry: PlaneGeometry, depth: int) -> torch.Tensor:
    """(len(ks) * D, 3, S, S) uint8: the D-slice stack of each slice k, stacks consecutive."""
    half, last = depth // 2, scan.planes.shape[0] - 1
    images = [
        model_image(scan.planes[z], geometry)
        for k in ks
        for z in np.clip(np.arange(k - half, k + half + 1), 0, last)
    ]
    return torch.from_numpy(np.ascontiguousarray(np.stack(images)))


def _bar(scan: Scan, total: int, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        unit="slice",
        desc=scan.name,
        disable=not (progress and scan.is_volume),
        leave=False,
    )


def _decode(
    model: Any,
    embeddings: torch.Tensor,
    items: list[tuple[int, Prompt]],
    geometry: PlaneGeometry,
) -> torch.Tensor:
    """(P, H, W) bool masks of ``items`` = (index of its image in ``embeddings``, prompt), all
    with a box or all without."""
    device = embeddings.device
    n = max(len(p.labels) for _, p in items)
    points = None
    if n:
        coords = torch.zeros(len(items), n, 2)
        labels = torch.full((len(items), n), -1, dtype=torch.long)  # -1: padding, SAM ignores it
        for i, (_, p) in enumerate(items):
            coords[i, : len(p.labels)] = torch.from_numpy(geometry.points(p.points))
            labels[i, : len(p.labels)] = torch.from_numpy(p.labels)
        points = (coords.to(device), labels.to(device))
    boxes = None
    if items[0][1].box is not None:
        boxes = torch.tensor([geometry.box(p.box) for _, p in items], device=device)
    index = torch.tensor([i for i, _ in items], dtype=torch.long)
    logits, iou = model.decode(embeddings, image_index=index, points=points, boxes=boxes)
    best, _, _ = select_best(logits, iou)
    return geometry.logits_back(SamAdapt.upscale(best, geometry.size))[:, 0] > 0


@torch.no_grad()
def predict_prompted(
    model: Any,
    scan: Scan,
    prompts: list[Prompt],
    *,
    geometry: PlaneGeometry,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> np.ndarray:
    """Label the prompted objects of a scan.

    Arguments:
      model: a promptable ``SamAdapt`` (or anything with its ``cfg``, ``encode``, ``decode``).
      scan: the input's planes.
      prompts: resolved on ``scan`` (at least one).
      geometry: the planes' resize to the model's input.
      batch_size: slices encoded at once.
      device: where the model is.

    Returns:
      (K, H, W) int32: 0 background, else the prompt id.
    """
    depth, half = model.cfg.slices, model.cfg.slices // 2
    by_slice: dict[int, list[Prompt]] = {}
    for prompt in prompts:
        by_slice.setdefault(prompt.slice, []).append(prompt)
    label = np.zeros(scan.planes.shape[:3], dtype=np.int32)
    ks = sorted(by_slice)
    with _bar(scan, len(ks), progress) as bar:
        for batch in _chunks(ks, batch_size):
            embeddings = model.encode(_stacks(scan, batch, geometry, depth).to(device), depth)
            items = [(b * depth + half, p) for b, k in enumerate(batch) for p in by_slice[k]]
            masks: list[tuple[Prompt, np.ndarray]] = []
            for with_box in (True, False):
                group = [item for item in items if (item[1].box is not None) == with_box]
                if group:
                    pred = _decode(model, embeddings, group, geometry).cpu().numpy()
                    masks += [(p, m) for (_, p), m in zip(group, pred, strict=True)]
            for prompt, mask in sorted(masks, key=lambda pm: pm[0].id):
                label[prompt.slice][mask] = prompt.id
            bar.update(len(batch))
    return label


@torch.no_grad()
def predict_semantic(
    model: Any,
    scan: Scan,
    *,
    geometry: PlaneGeometry,
    batch_size: int,
    device: torch.device,
    classes: list[int] | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Label every slice of a scan with a prompt-free head.

    Arguments:
      model: a ``SamAdapt`` with head auto, cnn or linear.
      classes: class ids to keep (others become background); None = all.

    Returns:
      (K, H, W) int32 class ids, 0 background.
    """
    depth, half = model.cfg.slices, model.cfg.slices // 2
    label = np.zeros(scan.planes.shape[:3], dtype=np.int32)
    keep = None if classes is None else torch.tensor(sorted(classes), device=device)
    with _bar(scan, label.shape[0], progress) as bar:
        for batch in _chunks(range(label.shape[0]), batch_size):
            logits = model.semantic(_stacks(scan, batch, geometry, depth).to(device), depth)
            pred = geometry.logits_back(logits[half::depth]).argmax(1)
            if keep is not None:
                pred = torch.where(torch.isin(pred, keep), pred, 0)
            label[batch] = pred.cpu().numpy()
            bar.update(len(batch))
    return label
