"""Per-mask scores of the protocols' predictions, and their summaries per class and overall.

Each mask of each step of each protocol and model gets one row with Dice, IoU, HD95 and NSD
(``pipeline/metrics.py``, empty-mask rules there), measured with the sample's pixel spacing at
the shard resolution when the shards store it (``KEY.json`` ``spacing``, in mm at the original
size, scaled by the resize the sharder applied), else 1 per pixel (``spacing_mm`` False).
The CVPR protocol adds per mask its AUC (trapezoid of Dice / NSD over clicks 1..n, unit spacing,
as ``CVPR25_iter_eval.py``) and final scores as steps ``"auc"`` and ``"final"``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.metrics import METRICS, score_mask, summarize
from sharding.transform import target_shape

__all__ = ["Row", "auc_rows", "score_masks", "shard_spacing", "summary_rows"]


@dataclass
class Row:
    """The scores of one mask under one model, protocol and step."""

    model: str
    protocol: str
    step: str
    index: int
    """Position of the step in its protocol (0 = first prompt; the CVPR click count)."""
    key: str
    mask: int
    class_id: int
    class_name: str
    spacing_mm: bool
    dice: float
    iou: float
    hd95: float
    nsd: float

    def as_dict(self) -> dict[str, Any]:
        """The row as a flat dict (CSV / JSON)."""
        return asdict(self)


def shard_spacing(meta: dict, *, size: int, resize: str) -> tuple[tuple[float, float], bool]:
    """The (row, col) pixel size in mm of a stored sample.

    Arguments:
      meta: the sample's ``KEY.json`` (``spacing`` (row, col) mm at ``original_size``).
      size: the stored side S.
      resize: the manifest's resize mode ("square" or "letterbox").

    Returns:
      ((dy, dx), True) from the stored spacing, or ((1, 1), False) when it is not stored.
    """
    spacing = meta.get("spacing") or []
    original = meta.get("original_size") or []
    if len(spacing) != 2 or len(original) != 2 or min(spacing) <= 0:
        return (1.0, 1.0), False
    h, w = (int(v) for v in original)
    new_h, new_w = target_shape(h, w, size=size, mode=resize)
    return (float(spacing[0]) * h / new_h, float(spacing[1]) * w / new_w), True


def score_masks(
    preds: np.ndarray,
    truths: np.ndarray,
    *,
    model: str,
    protocol: str,
    step: str,
    index: int,
    masks: Sequence[dict[str, Any]],
    tolerance: float,
) -> list[Row]:
    """Rows for the masks of one batch at one step.

    Arguments:
      preds, truths: (P, S, S) bool, the valid masks only.
      model, protocol, step, index: what the rows are of.
      masks: per mask ``{"key", "mask", "class_id", "class_name", "spacing", "spacing_mm"}``.
      tolerance: NSD tolerance in mm (pixels where the spacing is not stored).

    Returns:
      list[Row]: one per mask.
    """
    rows = []
    for pred, truth, info in zip(preds, truths, masks, strict=True):
        s = score_mask(pred, truth, spacing=info["spacing"], tolerance=tolerance)
        rows.append(
            Row(
                model=model,
                protocol=protocol,
                step=step,
                index=index,
                key=info["key"],
                mask=info["mask"],
                class_id=info["class_id"],
                class_name=info["class_name"],
                spacing_mm=info["spacing_mm"],
                dice=s.dice,
                iou=s.iou,
                hd95=s.hd95,
                nsd=s.nsd,
            )
        )
    return rows


def auc_rows(rows: Iterable[Row], *, protocol: str = "cvpr") -> list[Row]:
    """Per mask and model, the AUC and final rows of an iterative protocol.

    AUC: ``np.trapezoid`` of Dice and of NSD over the steps with index >= 1 (the clicks), x =
    0, 1, ..., as the challenge integrates; final: the last step's scores. IoU and HD95 of an
    AUC row are NaN.

    Returns:
      list[Row]: steps ``"auc"`` (index -1) and ``"final"`` (index -2).
    """
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        if row.protocol == protocol and row.index >= 0:
            groups[(row.model, row.key, row.mask)].append(row)
    out = []
    for series in groups.values():
        series.sort(key=lambda r: r.index)
        clicks = [r for r in series if r.index >= 1]
        last = series[-1]
        if clicks:
            dice = [r.dice for r in clicks]
            nsd = [r.nsd for r in clicks]
            auc = dict(dice=_trapezoid(dice), nsd=_trapezoid(nsd), iou=math.nan, hd95=math.nan)
            out.append(Row(**{**last.as_dict(), "step": "auc", "index": -1, **auc}))
        out.append(Row(**{**last.as_dict(), "step": "final", "index": -2}))
    return out


def _trapezoid(values: list[float]) -> float:
    y = np.asarray(values, dtype=np.float64)
    if y.size < 2:
        return float(y[0]) if y.size else math.nan
    return float(((y[1:] + y[:-1]) / 2).sum())


def summary_rows(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Mean and std per (model, protocol, step), over all masks and per class.

    Returns:
      list[dict]: ``model, protocol, step, index, class`` ("all" or the class name), ``masks``,
      then ``{metric}_mean``, ``{metric}_std`` and ``{metric}_n`` (values not NaN) per metric.
    """
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        head = (row.model, row.protocol, row.step, row.index)
        groups[(*head, "all")].append(row)
        groups[(*head, row.class_name or f"class {row.class_id}")].append(row)
    out = []
    for (model, protocol, step, index, cls), members in groups.items():
        entry: dict[str, Any] = dict(
            model=model, protocol=protocol, step=step, index=index, **{"class": cls}
        )
        entry["masks"] = len(members)
        for metric in METRICS:
            s = summarize(getattr(r, metric) for r in members)
            entry[f"{metric}_mean"], entry[f"{metric}_std"], entry[f"{metric}_n"] = (
                s.mean,
                s.std,
                s.n,
            )
        out.append(entry)
    return out
