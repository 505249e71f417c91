"""The files ``samadapt eval`` writes: tables, a Markdown report, the curve, the overlays.

``OUT/``::

    masks.csv           one row per mask x model x protocol x step (``scoring.Row``)
    summary.csv         mean / std per model x protocol x step, over all masks and per class
    summary.json        the same, with what was evaluated (``info``)
    report.md           the overall table (trained beside untrained and baseline, and the gain),
                        the per-class final CVPR table, the curve and the overlays
    dice_vs_clicks.png  mean Dice and NSD vs clicks of the CVPR protocol, per model
    overlays/*.png      worst / median / best final CVPR masks per class (truth green,
                        prediction red, positive clicks yellow, negative clicks blue)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pipeline.eval.scoring import Row
from pipeline.evaluate import Example
from pipeline.overlay import render

__all__ = ["Overlay", "write_report"]

_MODELS = ("trained", "untrained", "baseline")


@dataclass
class Overlay:
    """One mask to draw: (S, S, 3) uint8 image, truth and prediction (S, S) bool, the clicks."""

    image: torch.Tensor
    truth: torch.Tensor
    pred: torch.Tensor
    clicks: torch.Tensor
    labels: torch.Tensor
    title: str


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _cell(entry: dict[str, Any] | None, metric: str) -> str:
    if entry is None:
        return "-"
    mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f}"


def _overall_table(summary: list[dict[str, Any]]) -> list[str]:
    by = {(e["model"], e["protocol"], e["step"]): e for e in summary if e["class"] == "all"}
    steps = sorted(
        {(e["protocol"], e["index"], e["step"]) for e in summary if e["model"] == "trained"},
        key=lambda t: (t[0], t[1] if t[1] >= 0 else 100 - t[1]),
    )
    lines = [
        "| protocol | step | Dice trained | Dice untrained | Dice baseline | gain vs untrained "
        "| gain vs baseline | NSD trained | HD95 trained | masks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for protocol, _, step in steps:
        cells = {m: by.get((m, protocol, step)) for m in _MODELS}
        own = cells["trained"]
        gains = []
        for other in ("untrained", "baseline"):
            ref = cells[other]
            gains.append("-" if ref is None else f"{own['dice_mean'] - ref['dice_mean']:+.3f}")
        lines.append(
            f"| {protocol} | {step} | {_cell(own, 'dice')} | {_cell(cells['untrained'], 'dice')} "
            f"| {_cell(cells['baseline'], 'dice')} | {gains[0]} | {gains[1]} "
            f"| {_cell(own, 'nsd')} | {_cell(own, 'hd95')} | {own['masks']} |"
        )
    return lines


def _class_table(summary: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| class | model | final Dice | final NSD | Dice AUC | NSD AUC | masks |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(e["model"], e["step"], e["class"]): e for e in summary if e["protocol"] == "cvpr"}
    classes = sorted({e["class"] for e in summary if e["class"] != "all"})
    for cls in [*classes, "all"]:
        for model in ("trained", "untrained"):
            final, auc = by.get((model, "final", cls)), by.get((model, "auc", cls))
            if final is None:
                continue
            lines.append(
                f"| {cls} | {model} | {_cell(final, 'dice')} | {_cell(final, 'nsd')} "
                f"| {_cell(auc, 'dice')} | {_cell(auc, 'nsd')} | {final['masks']} |"
            )
    return lines


def box_table(summary: list[dict[str, Any]], *, untrained: str = "untrained") -> list[str]:
    """Box-prompt Dice per class (SAM-Med2D's box, no jitter): the trained model beside its
    base and the filled box, with the gains; the lines of a fixed-width text table.

    Arguments:
      summary: ``scoring.summary_rows``.
      untrained: the base model's column title ("zero-shot" when it is a named checkpoint).

    Returns:
      list[str]: a header, one line per class and one for all masks ("-" where a value is
      missing).
    """
    by = {(e["model"], e["class"]): e for e in summary
          if e["protocol"] == "sam_med2d_box" and e["step"] == "box"}  # fmt: skip
    classes = sorted({c for _, c in by if c != "all"})
    width = max([len(c) for c in classes] + [len("all masks")])
    names = ("trained", untrained, "fill box", "vs " + untrained, "vs fill box", "masks")
    lines = [f"{'box-prompt Dice':<{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    for cls in [*classes, "all"]:
        own, base, fill = (by.get((m, cls)) for m in ("trained", "untrained", "baseline"))
        if own is None:
            continue
        values = [e["dice_mean"] if e else math.nan for e in (own, base, fill)]
        gains = [values[0] - v for v in values[1:]]
        cells = [f"{v:.3f}" for v in values] + [f"{g:+.3f}" for g in gains]
        cells = ["-" if "nan" in c else c for c in cells] + [str(own["masks"])]
        label = "all masks" if cls == "all" else cls
        lines.append(f"{label:<{width}}  " + "  ".join(f"{c:>12}" for c in cells))
    return lines


def _curve(path: Path, summary: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display; set before pyplot is imported
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for model in ("trained", "untrained"):
        points = sorted(
            (e["index"], e["dice_mean"], e["nsd_mean"])
            for e in summary
            if e["model"] == model
            and e["protocol"] == "cvpr"
            and e["class"] == "all"
            and e["index"] >= 0
        )
        if not points:
            continue
        x, dice, nsd = zip(*points, strict=True)
        axes[0].plot(x, dice, marker="o", label=model)
        axes[1].plot(x, nsd, marker="o", label=model)
    for ax, name in zip(axes, ("Dice", "NSD"), strict=True):
        ax.set_xlabel("clicks after the box (CVPR 2025 protocol)")
        ax.set_ylabel(f"mean {name}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw(overlay: Overlay) -> np.ndarray:
    canvas = render(Example(overlay.image, overlay.truth, overlay.pred, overlay.title))
    for (x, y), label in zip(overlay.clicks.tolist(), overlay.labels.tolist(), strict=True):
        if label < 0:
            continue
        colour = (255, 255, 0) if label == 1 else (0, 120, 255)
        cv2.circle(canvas, (int(x), int(y)), 2, colour, -1)
    return canvas


def write_report(
    out: str | Path,
    *,
    rows: list[Row],
    summary: list[dict[str, Any]],
    info: dict[str, Any],
    overlays: list[Overlay],
) -> list[Path]:
    """Write every file of an evaluation (see the module docstring).

    Arguments:
      out: the folder (created).
      rows: per-mask rows.
      summary: ``scoring.summary_rows(rows)``.
      info: what was evaluated (model, split, counts, options).
      overlays: the masks to draw.

    Returns:
      list[Path]: the files written.
    """
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    files = [
        _write_csv(out / "masks.csv", [r.as_dict() for r in rows]),
        _write_csv(out / "summary.csv", summary),
    ]
    document = {
        "info": info,
        "summary": [{k: _json_safe(v) for k, v in e.items()} for e in summary],
    }
    files.append(out / "summary.json")
    files[-1].write_text(json.dumps(document, indent=1))
    files.append(_curve(out / "dice_vs_clicks.png", summary))
    pictures = []
    for i, overlay in enumerate(overlays):
        path = out / "overlays" / f"overlay-{i:02d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(_draw(overlay), cv2.COLOR_RGB2BGR))
        pictures.append((path, overlay.title))
    files += [p for p, _ in pictures]
    spacing = (
        f"{info['masks_spacing_mm']} of {info['masks']} masks measured in mm (the shards' "
        "spacing); the others in pixels (spacing 1)"
    )
    lines = [
        f"# Evaluation of {info['model']}",
        "",
        f"- model: {info['model_kind']} {info['model']} (step {info['step']}, source run "
        f"{info['source_run_id']}); untrained = its base ({info['base']})",
        f"- data: split {info['split']} ({info['split_name']}) of {info['shards']}: "
        f"{info['images']} images, {info['masks']} masks, at {info['image_size']} px",
        f"- spacing: {spacing}; NSD tolerance {info['nsd_tolerance']} (mm, or px)",
        f"- protocols: SAM-Med2D box, 1 point + {info['sam_med2d_iter_point'] - 1} random error "
        f"clicks; CVPR 2025: box + {info['cvpr_clicks']} clicks at the centre of the largest "
        "error region (AUC over the clicks, final = last)",
        "- baseline: the prompt box filled (box steps), a disc at the first click (1 pt)",
        "",
        "## All masks (mean ± std)",
        "",
        *_overall_table(summary),
        "",
        "## Per class, box prompt",
        "",
        "```",
        *box_table(summary, untrained=info.get("untrained_name", "untrained")),
        "```",
        "",
        "## Per class, CVPR protocol",
        "",
        *_class_table(summary),
        "",
        "## Dice vs clicks",
        "",
        "![Dice and NSD vs clicks](dice_vs_clicks.png)",
        "",
        "## Overlays (trained model, final CVPR prediction)",
        "",
        *[f"![{title}]({p.relative_to(out)})  \n{title}" for p, title in pictures],
        "",
    ]
    files.append(out / "report.md")
    files[-1].write_text("\n".join(lines))
    return files
