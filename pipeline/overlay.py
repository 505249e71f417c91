"""Prediction-vs-truth overlay PNGs for MLflow: truth outlined green, prediction red."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.evaluate import Example

_TRUTH = (0, 220, 0)
_PRED = (230, 40, 40)


def _outline(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, contours, -1, colour, 1)


def render(example: Example) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the image with truth and prediction outlines (every class of a label
    map is outlined on its own)."""
    canvas = np.ascontiguousarray(example.image.numpy().astype(np.uint8))
    truth, pred = example.truth.numpy(), example.pred.numpy()
    if truth.dtype == bool:
        _outline(canvas, truth, _TRUTH)
        _outline(canvas, pred, _PRED)
    else:
        for c in np.union1d(np.unique(truth), np.unique(pred)):
            if c == 0:
                continue
            _outline(canvas, truth == c, _TRUTH)
            _outline(canvas, pred == c, _PRED)
    cv2.putText(canvas, example.title, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 0), 1)
    return canvas


def write_overlays(examples: list[Example], folder: str | Path) -> list[Path]:
    """Write one PNG per example; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, example in enumerate(examples):
        path = folder / f"overlay-{i:02d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(render(example), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths
